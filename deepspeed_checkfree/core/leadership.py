"""PURE: which supervisor does the job's job-level duties (answering joins, deleting finished generations) when the
job's store is external (etcd) and no supervisor hosts it.

The duties go to one *leader*, named by a key in the store that holds ``"<rank>:<epoch>"``. A supervisor claims the
key while it is unset, and takes it over when its holder's lease (the counter every supervisor renews each second)
has not moved for the lease timeout: that holder's machine is gone. Every claim is a compare-and-set against the
exact value seen (the epoch grows with each takeover), so two supervisors that both decide to take over cannot both
win: the store lets one value stand. A slow holder that comes back reads the key and sees it is no longer the
leader. Candidates are staggered by rank, so the lowest live rank normally claims or takes over, and the others find
a fresh holder when their turn comes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

LEAD = "lead"          # this supervisor holds the key: do the duties
FOLLOW = "follow"      # another supervisor holds it and is alive (or not silent for long enough yet)
CLAIM = "claim"        # compare-and-set the key from the value seen to this supervisor's (unset or stale holder)


@dataclass(frozen=True)
class Holder:
    """The leader key's value, parsed."""

    rank: int
    epoch: int

    def value(self) -> str:
        return f"{self.rank}:{self.epoch}"


def parse_holder(value: Optional[str]) -> Optional[Holder]:
    """The holder in a leader key's value; None for an unset or empty key.

    Raises:
        ValueError: the value is not ``"<rank>:<epoch>"`` (another program wrote the key).
    """
    if not value:
        return None
    rank, sep, epoch = value.partition(":")
    if not sep or not rank.isdigit() or not epoch.isdigit():
        raise ValueError(f"the leader key holds {value!r}, not '<rank>:<epoch>'")
    return Holder(int(rank), int(epoch))


def successor(holder: Optional[Holder], rank: int) -> Holder:
    """What ``rank`` writes when it claims the key from ``holder``."""
    return Holder(rank, 1 if holder is None else holder.epoch + 1)


def leader_action(*, rank: int, holder: Optional[Holder], waited_s: float, holder_silent_s: Optional[float],
                  lease_timeout_s: float, stagger_s: float) -> str:
    """What ``rank``'s supervisor does about the leader key now.

    Args:
        rank: this supervisor's rank.
        holder: the key's holder as last read; None while it is unset.
        waited_s: how long this supervisor has been looking at the key (for an unset key).
        holder_silent_s: how long the holder's lease has not moved, as this supervisor saw it; None if not known.
        lease_timeout_s: silence after which a supervisor counts as gone (the joins' rule too).
        stagger_s: rank ``r`` waits ``r * stagger_s`` longer than rank 0 before it takes over a silent holder
            (an unset key, at the job's start, it claims only after ``r * lease_timeout_s``: rank 0 leads unless it
            has not started by then).

    Returns:
        :data:`LEAD`, :data:`FOLLOW` or :data:`CLAIM`.
    """
    if holder is not None and holder.rank == rank:
        return LEAD
    if holder is None:
        return CLAIM if waited_s >= rank * lease_timeout_s else FOLLOW
    turn_s = rank * stagger_s
    if holder_silent_s is not None and holder_silent_s > lease_timeout_s + turn_s:
        return CLAIM
    return FOLLOW


def generations_to_delete(last_generations: Sequence[int], deleted_below: int) -> range:
    """The generations whose keys can go: every rank has arrived for a later one (a rank arrives only after it left
    its previous generation's process group), so no process reads them again.

    Args:
        last_generations: each rank's last generation (-1 before it arrived for any).
        deleted_below: generations below this were deleted already.
    """
    lowest = min(last_generations) if last_generations else -1
    return range(deleted_below, max(deleted_below, lowest))
