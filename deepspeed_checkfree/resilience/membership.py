"""Job membership over a persistent key-value store: generations, who is fresh, who was lost, the job-wide facts.

Every time the process group has to be re-formed (a trainer died, a machine went silent or left), the members move
to the next *generation*: each publishes its rank, whether it still holds its stage's state and how many steps it
has completed, and counts itself in; the arrival that completes the count checks that every rank's active trainer
is there and writes the generation's member list, which everyone else waits for with one blocking request. A
generation that fails (before or after it formed) gets an *abort* record, the one key every trainer's death watch
waits on. Keys live under a prefix derived from the job token, so a process without the token can neither read nor
join a generation. The store also carries the job-wide stop, the first completed step, the supervisors' leases and
the signals supervisors act on. The key names are :mod:`.contract`'s; every read is one request
(:mod:`.store_access`), so a re-formation costs each member a handful of requests whatever the world size.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch.distributed as dist

from ..core.rejoin import MemberInfo, missing_members
from ..errors import CheckFreeError
from .contract import (ABORTED, DONE_KEY, FRESH_START_KEY, PROGRESS_FACT, SIGNALS_KEY, STOP_ACKS_KEY, STOPPED_FACT,
                       TOKEN_ENV, Lease, TrainerDeath, abort_key, arrivals_key, death_fact, draining_fact, fact_key,
                       finished_fact, formed_key, incarnation_fact, key_prefix, lease_key, lease_value, lost_fact,
                       member_key, members_prefix, parse_lease, pid_fact, rank_generation_key, signal_key,
                       written_key)
from .store_access import get_if_set, get_waited_for, values_if_set, wait_for

ARRIVAL_WAIT_S = 2.0  # a member waiting for its generation to form looks at the job's stop this often


class MembershipTimeout(CheckFreeError):
    """Not every rank arrived for a generation within the join timeout."""


class JobStopped(CheckFreeError):
    """Another rank stopped the job (the message gives its rank and reason)."""


class Fenced(Exception):
    """This trainer's rank was recorded lost while it was cut off (its machine's lease went silent, or it drained):
    the job went on without it, so it must not come back as a second copy of the rank."""


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


class Membership:
    """One process's view of the job's generations and facts.

    Args:
        store: the job's store (client).
        token: the job token.
        rank, world_size: this process's global rank and the job's size.
        join_timeout_s: how long to wait for every rank to arrive for a generation.
    """

    def __init__(self, store: dist.Store, token: str, rank: int, world_size: int, join_timeout_s: float) -> None:
        self.store, self.prefix, self.rank, self.world_size = store, key_prefix(token), rank, world_size
        self.join_timeout_s = join_timeout_s
        self._lease_written: Optional[bytes] = None  # this process's last lease value (see renew_lease)

    def key(self, name: str) -> str:
        """The store key of ``name`` (one of :mod:`.contract`'s keys) under this job's prefix."""
        return f"{self.prefix}/{name}"

    def values_if_set(self, keys: Sequence[str]) -> List[Optional[bytes]]:
        """Each (full) key's value, None where unset, read together (:func:`.store_access.values_if_set`)."""
        return values_if_set(self.store, keys)

    def _get(self, name: str) -> Optional[bytes]:
        return get_if_set(self.store, self.key(name))

    def _get_waited(self, name: str) -> Optional[bytes]:  # (a key others wait on, read not waking them)
        return get_waited_for(self.store, self.key(name))

    # ------------------------------------------------------------------------------------------------------
    # Generations
    # ------------------------------------------------------------------------------------------------------

    def last_generations(self) -> List[int]:
        """The last generation each rank joined (-1 for none), read together."""
        values = self.values_if_set([self.key(rank_generation_key(r)) for r in range(self.world_size)])
        return [-1 if v is None else int(v) for v in values]

    def latest_generation(self) -> int:
        """The latest generation any rank arrived for; -1 if none."""
        return max(self.last_generations())

    def formed(self, generation: int) -> bool:
        """Whether ``generation``'s arrival has ended: it formed (every rank arrived) or was aborted before."""
        return self._get_waited(formed_key(generation)) is not None

    def arrive(self, generation: int, info: MemberInfo,
               on_waiting: Optional[Callable[[int, List[int], float], None]] = None,
               on_idle: Optional[Callable[[], None]] = None, on_counted: Optional[Callable[[], None]] = None
               ) -> Tuple[int, Dict[int, MemberInfo]]:
        """Announce this rank for ``generation`` and wait until every rank has; return the generation that formed
        (a later one if ``generation`` was aborted before it formed) and everyone's info.

        A rank counts as arrived only while the member it announced is its rank's active trainer (its supervisor
        records the incarnation before it starts a trainer, and moves it on before it starts another), so a trainer
        that died after arriving is never waited for as a ghost: its replacement arrives in its place.

        Args:
            generation: the generation to arrive for.
            info: what this rank says of itself.
            on_waiting: called as ``on_waiting(generation, missing_ranks, waited_s)`` after :data:`ARRIVAL_WAIT_S`
                of waiting, then every 30 s (to tell the user what the job waits for).
            on_idle: called every :data:`ARRIVAL_WAIT_S` of waiting (a parker serves requests; a trainer told to
                leave raises out of the wait).
            on_counted: called once this rank has counted itself in (a test's death hook).

        Raises:
            Fenced: this trainer is not its rank's active one any more (its rank was recorded lost).
            MembershipTimeout: some ranks did not arrive within the join timeout (they are named).
            JobStopped: a rank stopped the job meanwhile.
        """
        started = time.monotonic()
        next_report = started + ARRIVAL_WAIT_S
        while True:
            formed = self.key(formed_key(generation))  # (read without waking its waiters: see get_waited_for)
            ended, active = values_if_set(self.store, [formed, self.key(fact_key(incarnation_fact(self.rank)))],
                                          waited=[formed])
            if active is not None and json.loads(active) != info.incarnation:
                raise Fenced(f"rank {self.rank}'s active trainer is incarnation {json.loads(active)}, not this one "
                             f"({info.incarnation}): the job recorded this rank as lost and went on without it")
            if ended is not None:
                members = self._formed_with(generation, ended, info)
                if members is not None:
                    return generation, members  # (it formed with this member's earlier arrival)
                generation += 1  # aborted, or formed without this incarnation: the job is at a later generation
                continue
            if self._count_in(generation, info) >= self.world_size:
                self._form(generation)
            if on_counted is not None:
                on_counted()
            while True:
                value = wait_for(self.store, self.key(formed_key(generation)), ARRIVAL_WAIT_S)
                if value is not None:
                    break
                self.raise_if_stopped()
                if on_idle is not None:
                    on_idle()
                now = time.monotonic()
                if (now >= next_report and on_waiting is not None) or now - started > self.join_timeout_s:
                    missing = self.missing(generation)  # (2N keys: read only to tell the user, or to stop)
                    if now - started > self.join_timeout_s:
                        raise MembershipTimeout(
                            f"generation {generation}: ranks {missing} did not arrive within join_timeout_s="
                            f"{self.join_timeout_s} ({self._lease_words(missing)}). Start a replacement machine "
                            f"for them with the join command (see the README), or raise checkfree.join_timeout_s.")
                    if on_waiting is not None and missing:
                        on_waiting(generation, missing, now - started)
                    next_report = now + 30.0
            members = self._formed_with(generation, value, info)
            if members is None:
                generation += 1
                continue
            return generation, members

    def _count_in(self, generation: int, info: MemberInfo) -> int:
        """Write this rank's member entry; return the arrivals counted so far (the one that reaches the world size
        checks the members). etcd: one transaction writes and counts the entries (no contended counter)."""
        keys = [self.key(rank_generation_key(self.rank)), self.key(member_key(generation, self.rank))]
        values = [str(generation), json.dumps(info.__dict__)]
        set_and_count = getattr(self.store, "set_and_count", None)
        if set_and_count is not None:
            return set_and_count(keys, values, self.key(members_prefix(generation)))
        self.store.multi_set(keys, values)
        return self.store.add(self.key(arrivals_key(generation)), 1)

    def _formed_with(self, generation: int, value: bytes, info: MemberInfo) -> Optional[Dict[int, MemberInfo]]:
        """The members of a generation whose arrival ended with ``value``, if it formed with ``info``; None if it
        was aborted or formed with an earlier trainer of this rank (which died: it fails, and the job moves on).

        Raises:
            Fenced: it formed with a later trainer of this rank.
        """
        if value.decode() == ABORTED:
            return None
        members = {int(r): MemberInfo(**m) for r, m in json.loads(value).items()}
        mine = members[self.rank].incarnation
        if mine > info.incarnation:
            raise Fenced(f"generation {generation} formed with rank {self.rank}'s incarnation {mine}, later than "
                         f"this one ({info.incarnation})")
        return members if mine == info.incarnation else None

    def _members_and_incarnations(self, generation: int) -> Tuple[Dict[int, MemberInfo], Dict[int, int]]:
        n = self.world_size
        values = self.values_if_set([self.key(member_key(generation, r)) for r in range(n)]
                                    + [self.key(fact_key(incarnation_fact(r))) for r in range(n)])
        members = {r: MemberInfo(**json.loads(v)) for r, v in enumerate(values[:n]) if v is not None}
        incarnations = {r: json.loads(v) for r, v in enumerate(values[n:]) if v is not None}
        return members, incarnations

    def missing(self, generation: int) -> List[int]:
        """The ranks ``generation`` still waits for (one batched read)."""
        members, incarnations = self._members_and_incarnations(generation)
        return missing_members(members, incarnations, self.world_size)

    def _form(self, generation: int) -> None:
        """Called by an arrival that made the count reach the world size (and by every later one): if every rank's
        active trainer has arrived and the generation was not aborted, write the member list, which ends everyone's
        wait. The write is a compare-and-set, so an abort that came first stands."""
        n = self.world_size
        keys = ([self.key(member_key(generation, r)) for r in range(n)]
                + [self.key(fact_key(incarnation_fact(r))) for r in range(n)])
        if hasattr(self.store, "values_if_set"):  # etcd: one request, unset keys included
            values = self.store.values_if_set(keys)
        elif self.store.check(keys):  # else two: every entry exists (or a rank has not arrived yet)
            values = self.store.multi_get(keys)
        else:
            return
        members = {r: MemberInfo(**json.loads(v)) for r, v in enumerate(values[:n]) if v is not None}
        incarnations = {r: json.loads(v) for r, v in enumerate(values[n:]) if v is not None}
        if missing_members(members, incarnations, n):
            return
        # (an abort written meanwhile either came first, and this compare-and-set leaves it, or it fires every
        # member's death watch as soon as the generation forms)
        listing = json.dumps({str(r): m.__dict__ for r, m in sorted(members.items())})
        self.store.compare_set(self.key(formed_key(generation)), "", listing)

    def register_written(self, generation: int, keys: Sequence[str]) -> None:
        """Note (one request) the keys this rank wrote for ``generation``'s process groups, so that the leader
        deletes them with the generation on a store that cannot delete by prefix."""
        if keys:
            self.store.append(self.key(written_key(generation)), "".join(k + "\n" for k in keys))

    def delete_generation(self, generation: int) -> int:
        """Delete ``generation``'s keys (every rank has left it): its members, count, end, abort record and the
        keys its ranks registered. Returns how many were deleted."""
        names = ([member_key(generation, r) for r in range(self.world_size)]
                 + [arrivals_key(generation), formed_key(generation), abort_key(generation)])
        registered = self._get(written_key(generation))
        keys = [self.key(n) for n in names] + (registered.decode().split() if registered else [])
        keys.append(self.key(written_key(generation)))
        return sum(bool(self.store.delete_key(k)) for k in dict.fromkeys(keys))

    def abort(self, generation: int, reason: str) -> None:
        """Record that ``generation`` failed: its members' death watches wake, a wait for it to form ends (everyone
        moves to the next generation), and its rendezvous gives up. Idempotent; the first reason is kept."""
        record = json.dumps({"rank": self.rank, "reason": reason, "time": time.time()})
        self.store.compare_set(self.key(abort_key(generation)), "", record)
        self.store.compare_set(self.key(formed_key(generation)), "", ABORTED)

    def abort_reason(self, generation: int) -> Optional[dict]:
        """``generation``'s abort record, None while it stands (read not waking the death watches waiting on it)."""
        value = self._get_waited(abort_key(generation))
        return None if value is None else json.loads(value)

    def _lease_words(self, ranks: Sequence[int]) -> str:
        leases = self.leases(ranks)
        now = time.time()
        return "; ".join(f"rank {r}'s supervisor " + (f"last renewed its lease {now - leases[r].time:.0f} s ago"
                                                      if leases[r].time is not None else "never renewed its lease")
                         for r in ranks)

    def finish(self) -> None:
        """Count this trainer as done with the job (and with the store)."""
        self.record(finished_fact(self.rank), True)
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
        value = self._get(fact_key(name))
        return None if value is None else json.loads(value)

    def record_trainer(self, rank: int, incarnation: int, pid: Optional[int] = None) -> None:
        """``rank``'s active trainer is now ``incarnation``, process ``pid`` (its supervisor says so; before the
        process exists, with no pid, so that no member of an older incarnation counts as arrived any more)."""
        names = [incarnation_fact(rank)] + ([pid_fact(rank, incarnation)] if pid is not None else [])
        values = [incarnation] + ([pid] if pid is not None else [])
        self.store.multi_set([self.key(fact_key(n)) for n in names], [json.dumps(v) for v in values])

    def record_loss(self, rank: int, incarnation: int, death: TrainerDeath, generation: int) -> None:
        """``rank``'s trainer of ``incarnation`` is lost (``death`` says how) and the next incarnation takes over,
        in one write; then the generation it was in (``generation``, its last; -1 for none) is aborted."""
        self.store.multi_set([self.key(fact_key(incarnation_fact(rank))),
                              self.key(fact_key(death_fact(rank, incarnation)))],
                             [json.dumps(incarnation + 1), json.dumps(asdict(death))])
        if generation >= 0:
            self.abort(generation, f"rank {rank}'s trainer (incarnation {incarnation}) was lost: {death.cause}")

    def exit_facts(self, rank: int) -> Dict[str, object]:
        """What the supervisor's decision on ``rank``'s trainer exit needs to know of the job
        (:func:`~deepspeed_checkfree.core.fault_policy.on_trainer_exit`'s keyword arguments) and the generation the
        trainer was last in, in two reads."""
        stop, progress, generation, finished = self.values_if_set(
            [self.key(fact_key(STOPPED_FACT)), self.key(fact_key(PROGRESS_FACT)),
             self.key(rank_generation_key(rank)), self.key(fact_key(finished_fact(rank)))])
        last = -1 if generation is None else int(generation)
        ended = self._get_waited(formed_key(last)) if last >= 0 else None
        formed = ended is not None and ended.decode() != ABORTED
        return dict(job_stopped=stop is not None, job_has_progress=progress is not None, group_formed=formed,
                    trainer_finished=finished is not None, generation=last)

    def incarnation(self, rank: int) -> Optional[int]:
        """The incarnation of ``rank``'s active trainer; None before its supervisor started one."""
        return self.fact(incarnation_fact(rank))

    def incarnations(self, ranks: Optional[Sequence[int]] = None) -> Dict[int, Optional[int]]:
        """The active incarnation of each rank (default: all), read together."""
        ranks = list(range(self.world_size)) if ranks is None else list(ranks)
        values = self.values_if_set([self.key(fact_key(incarnation_fact(r))) for r in ranks])
        return {r: None if v is None else json.loads(v) for r, v in zip(ranks, values)}

    def death(self, rank: int, incarnation: int) -> Optional[TrainerDeath]:
        """How ``rank``'s trainer of ``incarnation`` was lost; None if it was not recorded."""
        value = self.fact(death_fact(rank, incarnation))
        return TrainerDeath(**value) if value else None

    # ------------------------------------------------------------------------------------------------------
    # The job's stop, its first completed step, fresh starts, the supervisors' leases and signals
    # ------------------------------------------------------------------------------------------------------

    def stop(self, rank: int, cause: str, reason: str) -> dict:
        """Stop the job: every trainer and supervisor that sees it ends. The first stop's reason is kept; returns
        the stop in force."""
        key = self.key(fact_key(STOPPED_FACT))
        wanted = json.dumps({"rank": rank, "cause": cause, "reason": reason})
        # compare_set with an empty expectation sets only a missing key, and returns the value in force.
        standing = self.store.compare_set(key, "", wanted)
        if standing.decode() == wanted:
            self.post_signal("stop")
        return json.loads(standing)

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
        epoch = self.store.add(self.key(FRESH_START_KEY), 1)
        self.post_signal("fresh_start", epoch=epoch)
        return epoch

    def fresh_start_epoch(self) -> int:
        return self.store.add(self.key(FRESH_START_KEY), 0)

    def renew_lease(self, rank: int, renewals: int, owner: str) -> None:
        """``rank``'s supervisor ``owner`` is alive: its ``renewals``-th renewal, with this machine's wall time.

        One request that the store answers: a TCPStore ``set`` is never answered, so a store whose machine vanished
        would go unnoticed behind it (its deadline never runs out). After the first renewal it is a compare-and-set
        on the value this process wrote last, which also leaves alone a lease that another supervisor has written
        since (a new machine's, for this rank: this one was recorded lost and learns so from the job's signals)."""
        key, value = self.key(lease_key(rank)), lease_value(renewals, time.time(), owner).encode()
        if self._lease_written is None:
            self.store.set(key, value)
            self._lease_written = value
        elif self.store.compare_set(key, self._lease_written, value) == value:
            self._lease_written = value

    def leases(self, ranks: Optional[Sequence[int]] = None) -> Dict[int, Lease]:
        """Each rank's lease (default: all ranks), read together."""
        ranks = list(range(self.world_size)) if ranks is None else list(ranks)
        values = self.values_if_set([self.key(lease_key(r)) for r in ranks])
        return {r: parse_lease(v) for r, v in zip(ranks, values)}

    def lease(self, rank: int) -> int:
        """How often ``rank``'s lease has been renewed."""
        return self.leases([rank])[rank].renewals

    def record_machine_loss(self, rank: int, incarnation: int, cause: str, owner: Optional[str], when: float,
                            generation: int) -> None:
        """``rank``'s machine is gone (``cause``: its supervisor ``owner`` went silent after ``when``, or it left on
        a preemption notice at ``when``): its trainer of ``incarnation`` is recorded lost, its generation aborted,
        the rank freed for a machine that joins, and every supervisor told."""
        self.record(lost_fact(rank), {"incarnation": incarnation, "cause": cause, "owner": owner, "time": when})
        self.record_loss(rank, incarnation, TrainerDeath(time=when, returncode=None, cause=cause), generation)
        self.post_signal("lost", rank=rank, incarnation=incarnation, cause=cause, owner=owner)

    def record_draining(self, rank: int, notice: float, deadline: float, owner: str) -> None:
        """``rank``'s supervisor ``owner`` got a preemption notice at ``notice``; its trainer hands over by
        ``deadline`` (a join for the rank is then held, not refused as alive)."""
        self.record(draining_fact(rank), {"notice": notice, "deadline": deadline, "owner": owner})

    def clear_draining(self, rank: int) -> None:
        self.store.delete_key(self.key(fact_key(draining_fact(rank))))

    def draining(self) -> Dict[int, dict]:
        """The ranks whose supervisor is draining (one batched read)."""
        values = self.values_if_set([self.key(fact_key(draining_fact(r))) for r in range(self.world_size)])
        return {r: json.loads(v) for r, v in enumerate(values) if v is not None}

    def lost_machines(self, ranks: Optional[Sequence[int]] = None) -> Dict[int, dict]:
        """The ranks recorded lost and not yet taken over (their active incarnation is the one after the lost one):
        rank -> the loss record. Two batched reads."""
        ranks = list(range(self.world_size)) if ranks is None else list(ranks)
        values = self.values_if_set([self.key(fact_key(lost_fact(r))) for r in ranks])
        lost = {r: json.loads(v) for r, v in zip(ranks, values) if v is not None}
        if not lost:
            return {}
        current = self.incarnations(list(lost))
        return {r: rec for r, rec in lost.items() if current[r] == rec["incarnation"] + 1}

    def post_signal(self, kind: str, **payload: object) -> int:
        """Tell every supervisor something (``kind``: "stop", "fresh_start", "lost", "leaving"); returns its index.
        Supervisors wait for the next signal with one blocking request (:meth:`next_signal`)."""
        index = self.store.add(self.key(SIGNALS_KEY), 1)
        self.store.set(self.key(signal_key(index)), json.dumps({"kind": kind, **payload}))
        return index

    def next_signal(self, seen: int, timeout_s: float) -> Tuple[int, Optional[dict]]:
        """The signal after the ``seen``-th: ``(seen + 1, signal)`` once it is posted, ``(seen, None)`` after
        ``timeout_s``. A signal whose poster died between counting and writing it is skipped once later ones exist
        (``(seen + 1, None)``)."""
        value = wait_for(self.store, self.key(signal_key(seen + 1)), timeout_s)
        if value is not None:
            return seen + 1, json.loads(value)
        if self.store.add(self.key(SIGNALS_KEY), 0) > seen + 1 and self._get(signal_key(seen + 1)) is None:
            return seen + 1, None
        return seen, None
