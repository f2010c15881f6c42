"""Job membership over a persistent key-value store: generations, who is fresh, and token-checked joins.

Every time the process group has to be re-formed (a trainer died), the members move to the next *generation*:
each publishes its rank, whether it still holds its stage's state, and how many steps it has completed, then all
wait until the whole world is there (a member counts only while it is its rank's active trainer) and form a new
process group on a store prefix of that generation. Keys live under a prefix derived from the job token, so a
process without the token can neither read nor join a generation; a new machine asks to join and is admitted by
rank 0's supervisor only with the right token and only for a rank whose supervisor is gone. The store also carries
the job-wide stop, the first completed step and the supervisors' leases. The key names are :mod:`.contract`'s.
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
from typing import Dict, List, Optional, Sequence, Tuple

import torch.distributed as dist

from ..core.fault_policy import ADMIT, PENDING, join_verdict
from ..core.rejoin import MemberInfo
from ..errors import CheckFreeError
# (MemberInfo, STORE_PORT_ENV, STORE_PORT_OFFSET, TOKEN_ENV, JOIN_REQUESTS and key_prefix are also this module's
# names since version 0.1.)
from .contract import (DONE_KEY, FRESH_START_KEY, INCARNATION_MOVES_KEY, JOIN_REQUESTS,  # noqa: F401
                       LEASE_TIMEOUT_S, PROGRESS_FACT, STOP_ACKS_KEY, STOPPED_FACT, STORE_PORT_ENV,
                       STORE_PORT_OFFSET, TOKEN_ENV, TrainerDeath,
                       death_fact, fact_key, finished_fact, formed_key, incarnation_fact,
                       join_request_key, join_verdict_key, key_prefix, lease_key, member_key, pid_fact,
                       rank_generation_key, token_mac)


class JoinRefused(CheckFreeError):
    """A process asked to join the job without the job's token (or for a rank that is not free)."""


class MembershipTimeout(CheckFreeError):
    """Not every rank arrived for a generation within the join timeout."""


class JobStopped(CheckFreeError):
    """Another rank stopped the job (the message gives its rank and reason)."""


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

    def _get_if_set(self, key: str) -> Optional[bytes]:
        """``key``'s value, None when unset; one request on a store that can (the etcd store), else two."""
        get_if_set = getattr(self.store, "get_if_set", None)
        if get_if_set is not None:
            return get_if_set(key)
        return self.store.get(key) if self.store.check([key]) else None

    def values_if_set(self, keys: Sequence[str]) -> List[Optional[bytes]]:
        """Each key's value, None where unset: one request on a store that reads many keys at once (the etcd
        store), else one or two per key (the embedded store's requests take microseconds)."""
        values_if_set = getattr(self.store, "values_if_set", None)
        if values_if_set is not None:
            return values_if_set(list(keys))
        return [self._get_if_set(k) for k in keys]

    def last_generation(self, rank: Optional[int] = None) -> int:
        """The last generation ``rank`` (default: this rank) joined; -1 if none."""
        value = self._get_if_set(self.key(rank_generation_key(self.rank if rank is None else rank)))
        return -1 if value is None else int(value)

    def last_generations(self) -> List[int]:
        """The last generation each rank joined (-1 for none), read together."""
        values = self.values_if_set([self.key(rank_generation_key(r)) for r in range(self.world_size)])
        return [-1 if v is None else int(v) for v in values]

    def latest_generation(self) -> int:
        """The latest generation any rank arrived for; -1 if none."""
        return max(self.last_generations())

    def formed(self, generation: int) -> bool:
        """Whether every rank arrived for ``generation`` (its process group formed, or was formed)."""
        return self.store.check([self.key(formed_key(generation))])

    def arrive(self, generation: int, info: MemberInfo) -> Dict[int, MemberInfo]:
        """Announce this rank for ``generation`` and wait until every rank has; return everyone's info.

        A rank counts as arrived only while the member it announced is its rank's active trainer (its supervisor
        moves the rank's incarnation on before it starts another), so a trainer that died after arriving is never
        waited for as a ghost.

        Raises:
            MembershipTimeout: some ranks did not arrive within the join timeout (they are named).
            JobStopped: a rank stopped the job meanwhile.
        """
        self.store.multi_set([self.key(rank_generation_key(self.rank)), self.key(member_key(generation, self.rank))],
                             [str(generation), json.dumps(info.__dict__)])
        n = self.world_size
        # One read per round (on etcd): every member's entry, every rank's incarnation and the job's stop.
        keys = ([self.key(member_key(generation, r)) for r in range(n)]
                + [self.key(fact_key(incarnation_fact(r))) for r in range(n)] + [self.key(fact_key(STOPPED_FACT))])
        deadline = time.monotonic() + self.join_timeout_s
        while True:
            values = self.values_if_set(keys)
            if values[-1] is not None:
                self.raise_if_stopped()
            members = {r: MemberInfo(**json.loads(v)) for r, v in enumerate(values[:n]) if v is not None}
            incarnations = [0 if v is None else json.loads(v) for v in values[n:2 * n]]
            missing = [r for r in range(n) if r not in members or members[r].incarnation != incarnations[r]]
            if not missing:
                break
            if time.monotonic() > deadline:
                raise MembershipTimeout(
                    f"generation {generation}: ranks {missing} did not arrive within join_timeout_s="
                    f"{self.join_timeout_s} (their supervisors are {self._lease_words(missing)}). Start a "
                    f"replacement machine for them with the join command (see the README), or raise "
                    f"checkfree.join_timeout_s.")
            time.sleep(0.05)
        self.store.set(self.key(formed_key(generation)), "1")
        return members

    def _lease_words(self, ranks) -> str:
        return ", ".join(f"rank {r}: lease {self.lease(r)}" for r in ranks) + " renewals so far"

    def finish(self) -> None:
        """Count this trainer as done with the job (and with the store)."""
        self.record(finished_fact(self.rank), True)
        self.store.add(self.key(DONE_KEY), 1)

    def rank_finished(self, rank: int) -> bool:
        """Whether ``rank``'s trainer completed the job."""
        return self.fact(finished_fact(rank)) is not None

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
        value = self._get_if_set(self.key(fact_key(name)))
        return None if value is None else json.loads(value)

    def record_trainer(self, rank: int, incarnation: int, pid: Optional[int] = None) -> None:
        """``rank``'s active trainer is now ``incarnation``, process ``pid`` (its supervisor says so; before the
        process exists, with no pid, so that no member of an older incarnation counts as arrived any more)."""
        self.record(incarnation_fact(rank), incarnation)
        self.store.add(self.key(INCARNATION_MOVES_KEY), 1)  # (after the fact: a watcher that sees it move finds it)
        if pid is not None:
            self.record(pid_fact(rank, incarnation), pid)

    def record_replacement(self, rank: int, dead_incarnation: int, death: TrainerDeath) -> None:
        """``rank``'s trainer of ``dead_incarnation`` died (``death``) and the next incarnation takes over: both
        facts in one write, then the counter (as :meth:`record_trainer`)."""
        self.store.multi_set([self.key(fact_key(incarnation_fact(rank))),
                              self.key(fact_key(death_fact(rank, dead_incarnation)))],
                             [json.dumps(dead_incarnation + 1), json.dumps(asdict(death))])
        self.store.add(self.key(INCARNATION_MOVES_KEY), 1)

    def exit_facts(self, rank: int) -> Dict[str, bool]:
        """What the supervisor's decision on ``rank``'s trainer exit needs to know of the job
        (:func:`~deepspeed_checkfree.core.fault_policy.on_trainer_exit`'s keyword arguments), in two reads."""
        stop, progress, generation, finished = self.values_if_set(
            [self.key(fact_key(STOPPED_FACT)), self.key(fact_key(PROGRESS_FACT)),
             self.key(rank_generation_key(rank)), self.key(fact_key(finished_fact(rank)))])
        formed = generation is not None and self.formed(int(generation))
        return dict(job_stopped=stop is not None, job_has_progress=progress is not None, group_formed=formed,
                    trainer_finished=finished is not None)

    def incarnation_moves(self) -> int:
        """How often any rank's incarnation moved on (one key: what a death watch polls)."""
        return self.store.add(self.key(INCARNATION_MOVES_KEY), 0)

    def incarnation(self, rank: int) -> Optional[int]:
        """The incarnation of ``rank``'s active trainer; None before its supervisor started one."""
        return self.fact(incarnation_fact(rank))

    def death(self, rank: int, incarnation: int) -> Optional[TrainerDeath]:
        """How ``rank``'s trainer of ``incarnation`` died; None if no supervisor saw it die."""
        value = self.fact(death_fact(rank, incarnation))
        return TrainerDeath(**value) if value else None

    # ------------------------------------------------------------------------------------------------------
    # The job's stop, its first completed step, fresh starts and the supervisors' leases
    # ------------------------------------------------------------------------------------------------------

    def stop(self, rank: int, cause: str, reason: str) -> dict:
        """Stop the job: every trainer and supervisor that sees it ends. The first stop's reason is kept; returns
        the stop in force."""
        key = self.key(fact_key(STOPPED_FACT))
        wanted = json.dumps({"rank": rank, "cause": cause, "reason": reason})
        # compare_set with an empty expectation sets only a missing key, and returns the value in force.
        return json.loads(self.store.compare_set(key, "", wanted))

    def job_signals(self) -> Tuple[Optional[dict], int]:
        """The job's stop (see :meth:`stopped`) and its fresh-start epoch, read together (a supervisor's tick)."""
        stop, epoch = self.values_if_set([self.key(fact_key(STOPPED_FACT)), self.key(FRESH_START_KEY)])
        return (None if stop is None else json.loads(stop)), (0 if epoch is None else int(epoch))

    def stopped(self) -> Optional[dict]:
        """The job's stop ({"rank", "cause", "reason"}), or None while it runs."""
        return self.fact(STOPPED_FACT)

    def raise_if_stopped(self) -> None:
        """Raises: JobStopped: a rank stopped the job."""
        stop = self.stopped()
        if stop is not None:
            raise JobStopped(f"rank {stop['rank']} stopped the job ({stop['cause']}): {stop['reason']}")

    def acknowledge_stop(self) -> int:
        """Count this supervisor as having seen the stop; returns how many have."""
        return self.store.add(self.key(STOP_ACKS_KEY), 1)

    def stop_acknowledgements(self) -> int:
        return self.store.add(self.key(STOP_ACKS_KEY), 0)

    def record_progress(self) -> None:
        """A step of the job has completed (from then on, a rank that lost its state is rebuilt, not restarted)."""
        self.record(PROGRESS_FACT, True)

    def has_progress(self) -> bool:
        return self.fact(PROGRESS_FACT) is not None

    def request_fresh_start(self) -> int:
        """Ask every rank's trainer to start over (returns the new fresh-start epoch)."""
        return self.store.add(self.key(FRESH_START_KEY), 1)

    def fresh_start_epoch(self) -> int:
        return self.store.add(self.key(FRESH_START_KEY), 0)

    def renew_lease(self, rank: int) -> int:
        """``rank``'s supervisor is alive (called every LEASE_INTERVAL_S)."""
        return self.store.add(self.key(lease_key(rank)), 1)

    def lease(self, rank: int) -> int:
        """How often ``rank``'s lease has been renewed."""
        return self.store.add(self.key(lease_key(rank)), 0)


# ---------------------------------------------------------------------------------------------------------------
# Joining from a new machine: request, admission by rank 0's supervisor, verdict
# ---------------------------------------------------------------------------------------------------------------

def request_join(store: dist.Store, token: str, rank: int, timeout_s: float) -> None:
    """Ask to take over ``rank``; returns when admitted.

    Raises:
        JoinRefused: the supervisor refused (wrong token, rank out of range, rank alive); the message says why.
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


class JoinReviewer:
    """Rank 0's supervisor answers join requests with it (:meth:`review`, called periodically). It watches every
    rank's lease, and admits a request with the job's token only for a rank whose supervisor has been silent for
    ``lease_timeout_s`` (:func:`~deepspeed_checkfree.core.fault_policy.join_verdict`).
    """

    def __init__(self, membership: Membership, token: str, lease_timeout_s: float = LEASE_TIMEOUT_S,
                 leases: Optional[Dict[int, tuple]] = None) -> None:
        self.membership, self.store, self.token = membership, membership.store, token
        self.lease_timeout_s = lease_timeout_s
        self.reviewed = 0            # requests answered or seen so far
        self.pending: Dict[int, tuple] = {}  # index -> (request, first seen at)
        # rank -> (lease counter, monotonic time it was last seen to change); a new leader starts from what it saw
        # of the previous one's lease
        self.leases: Dict[int, tuple] = dict(leases or {})

    def _watch_leases(self, now: float) -> int:
        """Note who renewed its lease since the last look; returns how many join requests were made (all read
        together)."""
        n = self.membership.world_size
        values = self.membership.values_if_set([self.membership.key(lease_key(r)) for r in range(n)]
                                               + [JOIN_REQUESTS])
        for rank in range(n):
            value = int(values[rank] or 0)
            if rank not in self.leases or self.leases[rank][0] != value:
                # A counter seen for the first time counts as renewed now only if it has ever been renewed.
                seen = now if value > 0 or rank in self.leases else None
                self.leases[rank] = (value, seen)
        return int(values[n] or 0)

    def review(self, now: Optional[float] = None) -> list:
        """Answer what can be answered; returns the (request, admitted, reason) decided in this call."""
        now = time.monotonic() if now is None else now
        total = self._watch_leases(now)
        for index in range(self.reviewed + 1, total + 1):
            if not self.store.check([join_request_key(index)]):
                break  # the joiner has counted itself but not written yet: next round
            self.reviewed = index
            if self.store.check([join_verdict_key(index)]):
                continue  # answered already (by an earlier leader)
            self.pending[index] = (json.loads(self.store.get(join_request_key(index))), now)
        decided = []
        for index, (req, seen) in sorted(self.pending.items()):
            token_ok = hmac.compare_digest(str(req.get("mac", "")), token_mac(self.token, str(req.get("nonce", ""))))
            rank = int(req.get("rank", -1))
            verdict, reason = join_verdict(token_ok=token_ok, rank=rank, world_size=self.membership.world_size,
                                           now=now, requested_at=seen,
                                           lease_renewed_at=self.leases.get(rank, (0, None))[1],
                                           lease_timeout_s=self.lease_timeout_s, token_env=TOKEN_ENV)
            if verdict == PENDING:
                continue
            if verdict == ADMIT:
                self.leases[rank] = (self.leases.get(rank, (0, None))[0], now)  # the rank is taken from now on
            # Only the first verdict stands (a leader that was replaced while it reviewed cannot overrule the next).
            wanted = json.dumps({"admitted": verdict == ADMIT, "reason": reason})
            standing = json.loads(self.store.compare_set(join_verdict_key(index), "", wanted))
            del self.pending[index]
            decided.append((req, standing["admitted"], standing["reason"]))
        return decided
