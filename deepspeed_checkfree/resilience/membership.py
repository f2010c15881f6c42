"""Job membership over a persistent key-value store: generations, who is fresh, and token-checked joins.

Every time the process group has to be re-formed (a trainer died), the members move to the next *generation*:
each publishes its rank, whether it still holds its stage's state, and how many steps it has completed, then all
wait until the whole world is there and form a new process group on a store prefix of that generation. Keys live
under a prefix derived from the job token, so a process without the token can neither read nor join a generation;
a new machine asks to join and is admitted by rank 0's supervisor only with the right token. The key names are
:mod:`.contract`'s.
"""
from __future__ import annotations

import hmac
import json
import os
import secrets
import socket
import time
from dataclasses import asdict
from datetime import timedelta
from typing import Dict, Optional

import torch.distributed as dist

from ..core.rejoin import MemberInfo
from ..errors import CheckFreeError
# (MemberInfo, STORE_PORT_ENV, STORE_PORT_OFFSET, TOKEN_ENV, JOIN_REQUESTS and key_prefix are also this module's
# names since version 0.1.)
from .contract import (DONE_KEY, JOIN_REQUESTS, STORE_PORT_ENV, STORE_PORT_OFFSET, TOKEN_ENV,  # noqa: F401
                       TrainerDeath, death_fact, fact_key, group_store_prefix, incarnation_fact, join_request_key,
                       join_verdict_key, key_prefix, member_key, pid_fact, rank_generation_key, token_mac)


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

    def key(self, name: str) -> str:
        """The store key of ``name`` (one of :mod:`.contract`'s keys) under this job's prefix."""
        return f"{self.prefix}/{name}"

    def last_generation(self, rank: Optional[int] = None) -> int:
        """The last generation ``rank`` (default: this rank) joined; -1 if none."""
        key = self.key(rank_generation_key(self.rank if rank is None else rank))
        return int(self.store.get(key)) if self.store.check([key]) else -1

    def arrive(self, generation: int, info: MemberInfo) -> Dict[int, MemberInfo]:
        """Announce this rank for ``generation`` and wait until every rank has; return everyone's info.

        Raises:
            MembershipTimeout: some ranks did not arrive within the join timeout (they are named).
        """
        self.store.set(self.key(rank_generation_key(self.rank)), str(generation))
        self.store.set(self.key(member_key(generation, self.rank)), json.dumps(info.__dict__))
        keys = [self.key(member_key(generation, r)) for r in range(self.world_size)]
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
        return dist.PrefixStore(self.key(group_store_prefix(generation)), self.store)

    def finish(self) -> None:
        """Count this trainer as done with the job (and with the store)."""
        self.store.add(self.key(DONE_KEY), 1)

    def finished(self) -> int:
        """How many trainers are done with the job."""
        return self.store.add(self.key(DONE_KEY), 0)

    # ------------------------------------------------------------------------------------------------------
    # Job-wide facts (JSON)
    # ------------------------------------------------------------------------------------------------------

    def record(self, name: str, value: object) -> None:
        """Publish a job-wide fact (JSON), e.g. when a trainer died."""
        self.store.set(self.key(fact_key(name)), json.dumps(value))

    def fact(self, name: str) -> Optional[object]:
        """A fact published with :meth:`record`; None if nobody has."""
        key = self.key(fact_key(name))
        return json.loads(self.store.get(key)) if self.store.check([key]) else None

    def record_trainer(self, rank: int, incarnation: int, pid: int) -> None:
        """``rank``'s active trainer is now ``incarnation``, process ``pid`` (its supervisor says so)."""
        self.record(incarnation_fact(rank), incarnation)
        self.record(pid_fact(rank, incarnation), pid)

    def incarnation(self, rank: int) -> Optional[int]:
        """The incarnation of ``rank``'s active trainer; None before its supervisor started one."""
        return self.fact(incarnation_fact(rank))

    def record_death(self, rank: int, incarnation: int, death: TrainerDeath) -> None:
        """``rank``'s trainer of ``incarnation`` died (its supervisor saw it exit)."""
        self.record(death_fact(rank, incarnation), asdict(death))

    def death(self, rank: int, incarnation: int) -> Optional[TrainerDeath]:
        """How ``rank``'s trainer of ``incarnation`` died; None if no supervisor saw it die."""
        value = self.fact(death_fact(rank, incarnation))
        return TrainerDeath(**value) if value else None


# ---------------------------------------------------------------------------------------------------------------
# Joining from a new machine: request, admission by rank 0's supervisor, verdict
# ---------------------------------------------------------------------------------------------------------------

def request_join(store: dist.Store, token: str, rank: int, timeout_s: float) -> None:
    """Ask to take over ``rank``; returns when admitted.

    Raises:
        JoinRefused: the supervisor refused (wrong token, rank out of range); the message says why.
    """
    nonce = secrets.token_hex(16)
    index = store.add(JOIN_REQUESTS, 1)
    store.set(join_request_key(index), json.dumps({"rank": rank, "nonce": nonce, "mac": token_mac(token, nonce),
                                                   "host": socket.gethostname(), "pid": os.getpid()}))
    verdict_key = join_verdict_key(index)
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
        key = join_request_key(index)
        if not store.check([key]):
            return index - 1, decided  # the joiner has counted itself but not written yet: next round
        req = json.loads(store.get(key))
        if not hmac.compare_digest(str(req.get("mac", "")), token_mac(token, str(req.get("nonce", "")))):
            admitted, reason = False, (f"the job token does not match the job's. Set {TOKEN_ENV} to the token the "
                                       f"job was launched with")
        elif not 0 <= int(req.get("rank", -1)) < world_size:
            admitted, reason = False, f"rank {req.get('rank')} is not in 0..{world_size - 1}"
        else:
            admitted, reason = True, "token verified"
        store.set(join_verdict_key(index), json.dumps({"admitted": admitted, "reason": reason}))
        decided.append((req, admitted, reason))
    return total, decided
