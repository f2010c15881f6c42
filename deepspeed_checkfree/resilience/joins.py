"""Joining from a new machine: the request (with the job token's MAC), the leader's review, the verdict.

A machine that replaces a lost one asks to take over its rank. The supervisor that does the job-level duties (rank
0's with the embedded store, the elected leader on etcd) admits it only with the job's token and only for a rank
whose machine is gone: recorded lost (its supervisor's lease went silent, or it left on a preemption notice), or
silent for the lease timeout as this reviewer saw it. Join requests are public keys, because a joiner does not
know the job's prefix before it is admitted; each verdict is written by compare-and-set, so only one ever stands.
"""
from __future__ import annotations

import hmac
import json
import logging
import os
import secrets
import socket
import time
from typing import Callable, Dict, Optional

import torch.distributed as dist

from ..core.fault_policy import ADMIT, COMMUNICATION, PENDING, classify, join_verdict
from ..errors import CheckFreeError
from ..events import identity
from .contract import TOKEN_ENV, JOIN_REQUESTS, join_request_key, join_verdict_key, token_mac
from .membership import Membership
from .store_access import wait_for


logger = logging.getLogger("deepspeed_checkfree.supervisor")


class JoinRefused(CheckFreeError):
    """A process asked to join the job without the job's token (or for a rank that is not free)."""


class StandbyEnded(CheckFreeError):
    """The job ended while a joiner stood by for a rank that never needed it."""


def request_join(store: dist.Store, token: str, rank: int, timeout_s: float,
                 job_over: Optional[Callable[[], Optional[str]]] = None) -> None:
    """Ask to take over ``rank``; returns when admitted.

    Args:
        job_over: given, the joiner stands by (``--standby``): the leader keeps the request pending while the rank
            runs, and admits it the moment the rank is recorded lost or leaves. Called between waits, it says why
            the job is over (finished, stopped), or None while it runs; ``timeout_s`` does not apply (the wait
            ends with the job).

    Raises:
        JoinRefused: the supervisor refused (wrong token, rank out of range, rank alive), or nobody answered within
            ``timeout_s``; the message says why.
        StandbyEnded: standing by, the job ended without needing this machine.
    """
    nonce = secrets.token_hex(16)
    index = store.add(JOIN_REQUESTS, 1)
    store.set(join_request_key(index), json.dumps({"rank": rank, "nonce": nonce, "mac": token_mac(token, nonce),
                                                   "host": socket.gethostname(), "pid": os.getpid(),
                                                   "standby": job_over is not None}))
    deadline = time.monotonic() + timeout_s
    value = None
    while value is None:
        left = deadline - time.monotonic()
        if job_over is not None:
            over = job_over()
            if over is not None:
                raise StandbyEnded(f"the job {over} while this machine stood by for rank {rank}: nothing to take over")
            left = 5.0
        elif left <= 0:
            raise JoinRefused(f"no answer to the join request for rank {rank} within {timeout_s:g} s: is the job "
                              f"running, and is this the job's store address?")
        value = wait_for(store, join_verdict_key(index), min(left, 5.0))
    verdict = json.loads(value)
    if not verdict["admitted"]:
        raise JoinRefused(f"join refused for rank {rank}: {verdict['reason']}")


def join_job(membership: Membership, token: str, standby: bool) -> int:
    """A new machine's supervisor takes over its rank (``--join``; ``--standby``: once the rank needs it) and
    returns the incarnation its trainer continues with (the rank's next).

    Raises:
        JoinRefused: see :func:`request_join`.
        StandbyEnded: standing by, the job ended (also when its embedded store closed: it closes at the job's end,
            or with rank 0's machine, which ends the job too).
    """
    def job_over() -> Optional[str]:
        if membership.finished() >= membership.world_size:
            return "finished"
        stop = membership.stopped()
        return None if stop is None else f"stopped (rank {stop['rank']}: {stop['reason']})"

    if standby:
        logger.warning("%s stands by for rank %d: it takes the rank over when its machine is lost or leaves on a "
                       "preemption notice, and ends with the job otherwise", identity(rank=membership.rank),
                       membership.rank)
    try:
        request_join(membership.store, token, membership.rank, timeout_s=60, job_over=job_over if standby else None)
    except Exception as err:
        if not standby or not (isinstance(err, dist.DistStoreError) or classify(err) == COMMUNICATION):
            raise
        raise StandbyEnded(f"the job's store closed while this machine stood by for rank {membership.rank}: the "
                           f"job ended, or rank 0's machine is gone ({err}); nothing to take over") from err
    return (membership.incarnation(membership.rank) or 0) + 1


class JoinReviewer:
    """The leader answers join requests with it (:meth:`review`, called every store tick).

    Args:
        membership: the leader's view of the job.
        token: the job token.
        lease_timeout_s: silence after which a supervisor counts as gone.
        renewed_at: rank -> when the leader last saw the rank's lease renewed by its owner (its monotonic clock;
            None: never), kept up to date by the leader's lease watch and shared with this reviewer.
    """

    def __init__(self, membership: Membership, token: str, lease_timeout_s: float,
                 renewed_at: Dict[int, Optional[float]]) -> None:
        self.membership, self.store, self.token = membership, membership.store, token
        self.lease_timeout_s = lease_timeout_s
        self.renewed_at = renewed_at
        self.reviewed = 0            # requests answered or seen so far
        self.pending: Dict[int, tuple] = {}  # index -> (request, first seen at)
        self.awaits_drain = False    # a pending request is for a rank that drains (its admission is imminent)

    def review(self, now: float, requests: int) -> list:
        """Answer what can be answered, ``requests`` being the count of join requests made so far; returns the
        (request, admitted, reason) decided in this call."""
        for index in range(self.reviewed + 1, requests + 1):
            value = self.membership.values_if_set([join_request_key(index), join_verdict_key(index)])
            if value[0] is None:
                break  # the joiner has counted itself but not written yet: next round
            self.reviewed = index
            if value[1] is None:  # (else answered already, by an earlier leader)
                self.pending[index] = (json.loads(value[0]), now)
        if not self.pending:
            self.awaits_drain = False
            return []
        lost = self.membership.lost_machines()
        draining = self.membership.draining()
        decided = []
        for index, (req, seen) in sorted(self.pending.items()):
            token_ok = hmac.compare_digest(str(req.get("mac", "")), token_mac(self.token, str(req.get("nonce", ""))))
            rank = int(req.get("rank", -1))
            verdict, reason = join_verdict(token_ok=token_ok, rank=rank, world_size=self.membership.world_size,
                                           now=now, requested_at=seen, lease_renewed_at=self.renewed_at.get(rank),
                                           lease_timeout_s=self.lease_timeout_s, token_env=TOKEN_ENV,
                                           recorded_lost=lost[rank]["cause"] if rank in lost else None,
                                           draining=rank in draining, standby=bool(req.get("standby")))
            if verdict == PENDING:
                continue
            if verdict == ADMIT:
                self.renewed_at[rank] = now  # the rank is taken from now on
                lost.pop(rank, None)
                if rank in draining:  # (its drain is over: the rank has a new machine)
                    self.membership.clear_draining(rank)
                    draining.pop(rank)
            # Only the first verdict stands (a leader that was replaced while it reviewed cannot overrule the next).
            wanted = json.dumps({"admitted": verdict == ADMIT, "reason": reason})
            standing = json.loads(self.store.compare_set(join_verdict_key(index), "", wanted))
            del self.pending[index]
            decided.append((req, standing["admitted"], standing["reason"]))
        self.awaits_drain = any(int(req.get("rank", -1)) in draining for req, _ in self.pending.values())
        return decided
