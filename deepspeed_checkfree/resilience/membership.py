"""Job membership over a persistent key-value store: generations, who is fresh, and token-checked joins.

Every time the process group has to be re-formed (a trainer died), the members move to the next *generation*:
each publishes its rank, whether it still holds its stage's state, and how many steps it has completed, then all
wait until the whole world is there and form a new process group on a store prefix of that generation. Keys live
under a prefix derived from the job token, so a process without the token can neither read nor join a generation;
a new machine asks to join and is admitted by rank 0's supervisor only with the right token.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import socket
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Dict, Optional

import torch.distributed as dist

from ..errors import CheckFreeError

TOKEN_ENV = "CHECKFREE_JOB_TOKEN"
STORE_PORT_ENV = "CHECKFREE_STORE_PORT"
STORE_PORT_OFFSET = 1  # default store port: MASTER_PORT + 1 (MASTER_PORT itself is the launcher's)


class JoinRefused(CheckFreeError):
    """A process asked to join the job without the job's token (or for a rank that is not free)."""


class MembershipTimeout(CheckFreeError):
    """Not every rank arrived for a generation within the join timeout."""


def job_token(explicit: Optional[str] = None) -> str:
    """The job token: the explicit one, else ``$CHECKFREE_JOB_TOKEN``.

    Raises:
        CheckFreeError: neither is set.
    """
    token = explicit or os.environ.get(TOKEN_ENV)
    if not token:
        raise CheckFreeError(f"surviving process loss needs a job token shared by every rank: set {TOKEN_ENV} "
                             f"(e.g. export {TOKEN_ENV}=$(python -c 'import secrets; print(secrets.token_hex(16))')) "
                             f"before launching, and pass the same value to processes that join later")
    return token


def _mac(token: str, message: str) -> str:
    return hmac.new(token.encode(), message.encode(), hashlib.sha256).hexdigest()


def key_prefix(token: str) -> str:
    """Where the job keeps its keys: unguessable without the token."""
    return "cf/" + _mac(token, "checkfree-job")[:32]


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket listening on ``host`` only (torch's TCPStore on its own would listen on every interface)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(512)
    return sock


def host_store(host: str, port: int, timeout_s: float) -> tuple:
    """Start the job's persistent store server bound to ``host``; returns (store, socket) (keep both alive)."""
    sock = listening_socket(host, port)
    store = dist.TCPStore(host, port, is_master=True, wait_for_workers=False, master_listen_fd=sock.fileno(),
                          timeout=timedelta(seconds=timeout_s), use_libuv=True)
    return store, sock


def connect_store(host: str, port: int, timeout_s: float) -> dist.TCPStore:
    """A client of the job's store."""
    return dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout_s))


@dataclass(frozen=True)
class MemberInfo:
    """What a member says of itself when it arrives for a generation."""

    rank: int
    fresh: bool           # holds no stage state (a replacement, or everyone at generation 0)
    completed_steps: int  # optimizer steps this rank has applied
    incarnation: int      # how many times this rank's trainer has been (re)started
    pid: int


class Membership:
    """One trainer's view of the job's generations.

    Args:
        store: the job's store (client).
        token: the job token.
        rank, world_size: this trainer's global rank and the job's size.
        join_timeout_s: how long to wait for every rank to arrive for a generation.
    """

    def __init__(self, store: dist.Store, token: str, rank: int, world_size: int, join_timeout_s: float) -> None:
        self.store = store
        self.prefix = key_prefix(token)
        self.rank = rank
        self.world_size = world_size
        self.join_timeout_s = join_timeout_s

    def _key(self, *parts: object) -> str:
        return "/".join([self.prefix, *map(str, parts)])

    def last_generation(self, rank: Optional[int] = None) -> int:
        """The last generation ``rank`` (default: this rank) joined; -1 if none."""
        key = self._key("rank_gen", self.rank if rank is None else rank)
        return int(self.store.get(key)) if self.store.check([key]) else -1

    def arrive(self, generation: int, info: MemberInfo) -> Dict[int, MemberInfo]:
        """Announce this rank for ``generation`` and wait until every rank has; return everyone's info.

        Raises:
            MembershipTimeout: some ranks did not arrive within the join timeout (they are named).
        """
        self.store.set(self._key("rank_gen", self.rank), str(generation))
        self.store.set(self._key("g", generation, "member", self.rank), json.dumps(info.__dict__))
        keys = [self._key("g", generation, "member", r) for r in range(self.world_size)]
        deadline = time.monotonic() + self.join_timeout_s
        while True:
            missing = [r for r, k in enumerate(keys) if not self.store.check([k])]
            if not missing:
                break
            if time.monotonic() > deadline:
                raise MembershipTimeout(
                    f"generation {generation}: ranks {missing} did not arrive within join_timeout_s="
                    f"{self.join_timeout_s}. Start a replacement for them with the join command (see the "
                    f"README), or raise checkfree.join_timeout_s.")
            time.sleep(0.02)
        return {r: MemberInfo(**json.loads(self.store.get(k))) for r, k in enumerate(keys)}

    def group_store(self, generation: int) -> dist.PrefixStore:
        """The store a generation's process group rendezvouses on."""
        return dist.PrefixStore(self._key("g", generation, "pg"), self.store)

    def record(self, name: str, value: object) -> None:
        """Publish a job-wide fact (JSON), e.g. when a trainer died."""
        self.store.set(self._key("fact", name), json.dumps(value))

    def fact(self, name: str) -> Optional[object]:
        key = self._key("fact", name)
        return json.loads(self.store.get(key)) if self.store.check([key]) else None


# ---------------------------------------------------------------------------------------------------------------
# Joining from a new machine: request, admission by rank 0's supervisor, verdict
# ---------------------------------------------------------------------------------------------------------------

JOIN_REQUESTS = "cf-join/requests"  # public keys: a joiner does not know the job prefix before it is admitted


def request_join(store: dist.Store, token: str, rank: int, timeout_s: float) -> None:
    """Ask to take over ``rank``; returns when admitted.

    Raises:
        JoinRefused: the supervisor refused (wrong token, rank out of range); the message says why.
    """
    nonce = secrets.token_hex(16)
    index = store.add(JOIN_REQUESTS, 1)
    store.set(f"{JOIN_REQUESTS}/{index}", json.dumps({"rank": rank, "nonce": nonce, "mac": _mac(token, nonce),
                                                      "host": socket.gethostname(), "pid": os.getpid()}))
    verdict_key = f"{JOIN_REQUESTS}/{index}/verdict"
    deadline = time.monotonic() + timeout_s
    while not store.check([verdict_key]):
        if time.monotonic() > deadline:
            raise JoinRefused(f"no answer to the join request for rank {rank} within {timeout_s} s: is the job "
                              f"running, and is this the job's store address?")
        time.sleep(0.05)
    verdict = json.loads(store.get(verdict_key))
    if not verdict["admitted"]:
        raise JoinRefused(f"join refused for rank {rank}: {verdict['reason']}")


def review_join_requests(store: dist.Store, token: str, world_size: int, reviewed: int) -> tuple:
    """Answer the join requests after the first ``reviewed`` ones (rank 0's supervisor calls this periodically).

    Returns:
        (number reviewed so far, list of (request, admitted, reason) decided in this call).
    """
    decided = []
    total = store.add(JOIN_REQUESTS, 0)
    for index in range(reviewed + 1, total + 1):
        key = f"{JOIN_REQUESTS}/{index}"
        if not store.check([key]):
            return index - 1, decided  # the joiner has counted itself but not written yet: next round
        req = json.loads(store.get(key))
        if not hmac.compare_digest(str(req.get("mac", "")), _mac(token, str(req.get("nonce", "")))):
            admitted, reason = False, (f"the job token does not match the job's. Set {TOKEN_ENV} to the token the "
                                       f"job was launched with")
        elif not 0 <= int(req.get("rank", -1)) < world_size:
            admitted, reason = False, f"rank {req.get('rank')} is not in 0..{world_size - 1}"
        else:
            admitted, reason = True, "token verified"
        store.set(f"{key}/verdict", json.dumps({"admitted": admitted, "reason": reason}))
        decided.append((req, admitted, reason))
    return total, decided
