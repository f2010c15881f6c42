"""One supervisor's share of the job-level work: renew its rank's lease, and, if it is the leader, watch every
supervisor's lease, record a machine whose supervisor went silent as lost (which aborts the generation, so every
rank learns of it within the lease timeout whether or not a replacement waits), answer joins and delete finished
generations.

The leader is rank 0's supervisor with the embedded store (it hosts it); with an external store (etcd) it is
elected through the store (:mod:`deepspeed_checkfree.core.leadership`). A quiet job costs the store two requests a
second from the leader (its renewal and one read of every lease) and one from every other supervisor (two on etcd,
where a follower also reads the leader key).
"""
from __future__ import annotations

import logging
import time
from typing import Dict, List, Optional, Tuple

from ..core import leadership
from ..core.fault_policy import silent_ranks
from ..core.rejoin import MACHINE_SILENT
from ..events import EventLog
from .contract import (JOIN_REQUESTS, LEADER_KEY, LEASE_INTERVAL_S, Lease, generation_prefix, lease_key,
                       parse_lease)
from .joins import JoinReviewer
from .membership import Membership

logger = logging.getLogger("deepspeed_checkfree.supervisor")

STAGGER_S = LEASE_INTERVAL_S  # rank r takes a silent leader's duties over r seconds after rank 1 would
CLEANUP_INTERVAL_S = 10.0     # how often the leader deletes the keys of generations every rank has left


class LeaseWatch:
    """The leader's view of every supervisor's lease: who renewed it when, and who has been silent too long.

    A lease counts as renewed when its value changes under an owner that is not recorded lost: a supervisor that
    comes back after a partition renews under its old id, which the leader ignores (it is fenced); a machine that
    joined for the rank renews under a new id, and the rank is judged again from then on.
    """

    def __init__(self, membership: Membership, lease_timeout_s: float, lost: Optional[Dict[int, dict]] = None):
        self.membership, self.lease_timeout_s = membership, lease_timeout_s
        self.renewed_at: Dict[int, Optional[float]] = {}  # rank -> monotonic time of its last seen renewal
        self.seen: Dict[int, Lease] = {}
        self.recorded: Dict[int, Optional[str]] = {r: rec.get("owner") for r, rec in (lost or {}).items()}
        self._all_present = False

    def read(self, extra: List[str]) -> Tuple[Dict[int, Lease], List[Optional[bytes]]]:
        """Every rank's lease and the values of the (full) keys ``extra``, in one request once every lease exists
        (on etcd always)."""
        m = self.membership
        keys = [m.key(lease_key(r)) for r in range(m.world_size)] + list(extra)
        if self._all_present and not hasattr(m.store, "values_if_set"):
            values = list(m.store.multi_get(keys))
        else:
            values = m.values_if_set(keys)
            self._all_present = all(v is not None for v in values)
        n = m.world_size
        return {r: parse_lease(v) for r, v in enumerate(values[:n])}, values[n:]

    def update(self, leases: Dict[int, Lease], now: float, own_rank: int) -> List[int]:
        """Take in what was read at ``now``; return the ranks silent for longer than the lease timeout and not
        recorded lost yet (never ``own_rank``)."""
        for rank, lease in leases.items():
            previous = self.seen.get(rank)
            self.seen[rank] = lease
            if lease.renewals == 0 or lease == previous:
                self.renewed_at.setdefault(rank, None)
                continue
            if rank in self.recorded:
                if lease.owner == self.recorded[rank]:
                    continue  # the lost supervisor, back after a partition: fenced, not alive
                del self.recorded[rank]  # a machine that joined for the rank: judged from now on
            self.renewed_at[rank] = now
        return silent_ranks(self.renewed_at, now, self.lease_timeout_s, recorded=set(self.recorded) | {own_rank})


class Coordinator:
    """Called every store tick (:meth:`tick`). See the module docstring.

    Args:
        membership: this supervisor's view of the job (its store is the job's).
        token: the job token (join requests carry its MAC).
        owner: this supervisor's id (written into its lease).
        hosted: this supervisor hosts the embedded store (it leads, no election).
        external: the store is external (elect a leader).
        lease_timeout_s: silence after which a supervisor counts as gone.
        events: where detections and decisions are written.
        prefix: the log lines' identity prefix.
        join_command: the command that starts a replacement for a rank (for the log line when one is lost).
    """

    def __init__(self, membership: Membership, token: str, *, owner: str, hosted: bool, external: bool,
                 lease_timeout_s: float, events: EventLog, prefix: str, join_command=None) -> None:
        self.membership, self.token, self.owner, self.events, self.prefix = membership, token, owner, events, prefix
        self.rank, self.hosted, self.external, self.lease_timeout_s = membership.rank, hosted, external, lease_timeout_s
        self.join_command = join_command or (lambda rank: f"... --join --rank {rank}")
        self.renewals = 0
        self.next_lease = 0.0
        self.next_look = 0.0
        self.next_cleanup = 0.0
        self.started_at: Optional[float] = None
        self.holder: Optional[leadership.Holder] = None
        # (holder, its lease, monotonic time it was last seen to move)
        self.holder_lease: Tuple[Optional[leadership.Holder], Lease, float] = (None, Lease(), 0.0)
        self.watch: Optional[LeaseWatch] = None
        self.reviewer: Optional[JoinReviewer] = None
        self.deleted_below = 0
        if hosted:
            membership.store.add(JOIN_REQUESTS, 0)  # exists from now on, so the lease look reads it with the leases
            self._start_leading()

    @property
    def leading(self) -> bool:
        return self.watch is not None

    def note_lost(self, signals: List[dict]) -> None:
        """Losses other processes recorded (a leaving trainer's): the leader's lease watch ignores the lost
        supervisor's renewals from then on, as for a loss it recorded itself; and it looks at the next tick (a
        machine waiting for the rank is admitted at once)."""
        if self.watch is not None:
            for signal_ in signals:
                self.watch.recorded.setdefault(int(signal_["rank"]), signal_.get("owner"))
            if signals:
                self.next_look = 0.0

    def renew(self) -> None:
        """Renew this rank's lease now (the first one at start-up, before anything else)."""
        self.renewals += 1
        self.membership.renew_lease(self.rank, self.renewals, self.owner)

    def tick(self, now: float) -> None:
        """Raises: the store's errors (the supervisor treats them as a lost store)."""
        if now >= self.next_lease:
            self.renew()
            self.next_lease = now + LEASE_INTERVAL_S
        if now < self.next_look:
            return
        # (while a join waits for a draining rank's hand-over, the leader looks every tick: the successor is
        # admitted the moment the rank leaves, not up to a second later)
        hurry = self.leading and self.reviewer is not None and self.reviewer.awaits_drain
        self.next_look = now + (0.0 if hurry else LEASE_INTERVAL_S)
        if self.external:
            self._lead_or_follow(now)
        elif self.leading:
            leases, (requests,) = self.watch.read([JOIN_REQUESTS])
            self._lead(now, leases, int(requests or 0))

    # the leader's duties -------------------------------------------------------------------------------------------

    def _start_leading(self, seen: Optional[Dict[int, Tuple[Lease, float]]] = None) -> None:
        self.watch = LeaseWatch(self.membership, self.lease_timeout_s, self.membership.lost_machines())
        for rank, (lease, at) in (seen or {}).items():  # what this supervisor saw of the previous leader
            self.watch.seen[rank], self.watch.renewed_at[rank] = lease, at
        self.reviewer = JoinReviewer(self.membership, self.token, self.lease_timeout_s, self.watch.renewed_at)
        self.deleted_below = 0

    def _lead(self, now: float, leases: Dict[int, Lease], requests: int) -> None:
        for rank in self.watch.update(leases, now, self.rank):
            self._record_silent(rank, leases[rank], now)
        for req, admitted, reason in self.reviewer.review(now, requests):
            what = "admitted a new machine" if admitted else "refused a join"
            (logger.warning if admitted else logger.error)("%s %s for rank %s (%s, pid %s): %s", self.prefix, what,
                                                           req.get("rank"), req.get("host"), req.get("pid"), reason)
            self.events.write("join_admitted" if admitted else "join_refused", rank=req.get("rank"),
                              host=req.get("host"), reason=reason)
        if now >= self.next_cleanup:
            # (while the ranks are leaving a generation for the next, look again at the next look: its keys go as
            # soon as the last rank has left it, not up to 10 s later, which may be after the job's end)
            leaving = self._delete_finished_generations()
            self.next_cleanup = now + (LEASE_INTERVAL_S if leaving else CLEANUP_INTERVAL_S)

    def _record_silent(self, rank: int, lease: Lease, now: float) -> None:
        m = self.membership
        silent_s = now - (self.watch.renewed_at.get(rank) or now)
        incarnation = m.incarnations([rank])[rank] or 0
        generation = m.last_generations()[rank]
        when = lease.time if lease.time is not None else time.time() - silent_s
        m.record_machine_loss(rank, incarnation, MACHINE_SILENT, lease.owner, when, generation)
        self.watch.recorded[rank] = lease.owner
        logger.error("%s rank %d's machine is silent: its supervisor has not renewed its lease for %.1f s (lease "
                     "timeout %.1f s). Recorded as lost (trainer incarnation %d); generation %d is aborted and the "
                     "job waits for a replacement. Start one on a new machine: %s", self.prefix, rank, silent_s,
                     self.lease_timeout_s, incarnation, generation, self.join_command(rank))
        self.events.write("machine_silent", rank=rank, incarnation=incarnation, generation=generation,
                          silent_s=round(silent_s, 3), last_renewal=when, detected_by=self.rank)

    def _delete_finished_generations(self) -> bool:
        """A long job's store does not grow with its failures: every generation all ranks have left goes (on etcd
        by prefix; elsewhere key by key, from the list its ranks registered). Returns whether some ranks are still
        leaving one (they are not all in the same generation)."""
        store = self.membership.store
        last = self.membership.last_generations()
        gone = leadership.generations_to_delete(last, self.deleted_below)
        for generation in gone:
            if hasattr(store, "delete_prefix"):
                deleted = store.delete_prefix(self.membership.key(generation_prefix(generation)))
            else:
                deleted = self.membership.delete_generation(generation)
            logger.debug("%s deleted generation %d's %d keys", self.prefix, generation, deleted)
        self.deleted_below = gone.stop
        return bool(last) and min(last) != max(last)

    # the leadership (external store) ------------------------------------------------------------------------------

    def _lead_or_follow(self, now: float) -> None:
        m = self.membership
        if self.started_at is None:
            self.started_at = now
        leases: Dict[int, Lease] = {}
        if self.leading:
            leases, (held, requests) = self.watch.read([m.key(LEADER_KEY), JOIN_REQUESTS])
            holder = leadership.parse_holder(held.decode() if held else None)
            if holder is not None and holder.rank == self.rank:
                self.holder = holder
                self._lead(now, leases, int(requests or 0))
                return
        else:
            # One request: the leader key and the lease of the holder seen last time (the holder rarely changes).
            guess = self.holder.rank if self.holder is not None else None
            values = m.values_if_set([m.key(LEADER_KEY)] + ([m.key(lease_key(guess))] if guess is not None else []))
            holder = leadership.parse_holder(values[0].decode() if values[0] else None)
            if holder is not None and holder.rank == guess:
                leases = {guess: parse_lease(values[1])}
            elif holder is not None and holder.rank != self.rank:
                leases = m.leases([holder.rank])
        silent_s = None
        if holder is not None and holder.rank != self.rank:
            lease = leases[holder.rank] if holder.rank in leases else m.leases([holder.rank])[holder.rank]
            if (holder, lease) != self.holder_lease[:2]:
                self.holder_lease = (holder, lease, now)
            silent_s = now - self.holder_lease[2]
        self.holder = holder
        action = leadership.leader_action(rank=self.rank, holder=holder, waited_s=now - self.started_at,
                                          holder_silent_s=silent_s, lease_timeout_s=self.lease_timeout_s,
                                          stagger_s=STAGGER_S)
        if action == leadership.CLAIM:
            wanted = leadership.successor(holder, self.rank).value()
            standing = m.store.compare_set(m.key(LEADER_KEY), holder.value() if holder else "", wanted)
            self.holder = leadership.parse_holder(standing.decode())
        if self.holder is not None and self.holder.rank == self.rank:
            if not self.leading:
                self._became_leader(holder if action == leadership.CLAIM else None, silent_s)
            return
        if self.leading:
            logger.warning("%s no longer leads the job's coordination: rank %s does now", self.prefix,
                           self.holder.rank if self.holder else None)
            self.events.write("leader_lost", rank=self.rank, leader=self.holder.rank if self.holder else None)
        self.watch = self.reviewer = None

    def _became_leader(self, previous: Optional[leadership.Holder], silent_s: Optional[float]) -> None:
        # The lease watch starts from what this supervisor saw of the previous leader's lease, so the lost leader's
        # rank is recorded lost as soon as it has been silent for the lease timeout.
        seen = {previous.rank: self.holder_lease[1:]} if previous is not None else {}
        self._start_leading(seen)
        if previous is None:
            logger.info("%s leads the job's coordination (watches the leases, answers joins)", self.prefix)
            self.events.write("leader", rank=self.rank, epoch=self.holder.epoch, previous=None)
        else:
            logger.warning("%s took over the job's coordination from rank %d, whose supervisor has been silent for "
                           "%.1f s (lease timeout %.1f s): this supervisor now watches the leases and answers joins",
                           self.prefix, previous.rank, silent_s or 0.0, self.lease_timeout_s)
            self.events.write("leader", rank=self.rank, epoch=self.holder.epoch, previous=previous.rank,
                              previous_silent_s=round(silent_s or 0.0, 3))
