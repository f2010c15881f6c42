"""Re-joining after a lost process, as pure decisions: from what every member of a generation says of itself, who
restores what from whom and which step the job replays; and the outage record measured across it. The resilient
trainer (:mod:`deepspeed_checkfree.resilience.trainer`) carries the decisions out.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, List, Mapping, Optional, Sequence, Tuple

from ..errors import RecoveryError


@dataclass(frozen=True)
class MemberInfo:
    """What a member says of itself when it arrives for a generation."""

    rank: int
    fresh: bool           # holds no stage state (a replacement, or everyone at generation 0)
    completed_steps: int  # optimizer steps this rank has applied
    incarnation: int      # how many times this rank's trainer has been (re)started
    pid: int
    took_over: Optional[str] = None  # a replacement that received its predecessor's exact state: from whom


def missing_members(members: Mapping[int, MemberInfo], incarnations: Mapping[int, int], world_size: int
                    ) -> List[int]:
    """The ranks that have not arrived for a generation: no member entry, or one of an incarnation that is not
    the rank's active trainer any more (it died after arriving; a ghost is never waited for). Empty: the generation
    can form. ``incarnations``: rank -> its active incarnation (0 where none is recorded)."""
    return [r for r in range(world_size)
            if r not in members or members[r].incarnation != incarnations.get(r, 0)]


def joining_generation(latest_generation: int, latest_formed: bool) -> int:
    """The generation a trainer arrives for first: the latest one any rank arrived for (-1 if none), unless that one
    has already formed its process group, in which case the next one (where the survivors move as soon as they
    notice the failure). A trainer that died before its generation formed is so replaced within that generation."""
    return latest_generation + 1 if latest_formed or latest_generation < 0 else latest_generation


@dataclass(frozen=True)
class ReplicaRestore:
    """One data-parallel group's restore: ``source_rank`` gives its state to ``restored_ranks``."""

    source_rank: int
    restored_ranks: Tuple[int, ...]


@dataclass(frozen=True)
class RejoinPlan:
    """What a generation does before it trains on (identical on every rank: computed from the same members).

    Attributes:
        generation: the generation being formed.
        cold_start: every rank fresh and no step completed yet (generation 0, or a fault before the first step):
            the job starts from initialisation, nothing is restored.
        fresh_ranks: ranks that hold no stage state (replacements), sorted.
        survivor_ranks: ranks that kept their stage state in memory, sorted.
        step: the step to run next: the fewest completed by a survivor (a rank one step ahead replays it without
            applying it again). Unused (0) on a cold start, where the engine starts from its own count.
        schedule_source: the survivor whose schedule state (LR scheduler, sample count) the fresh ranks take: the
            lowest rank that has not yet applied ``step``. None on a cold start.
        handed_over_ranks: replacements that hold their predecessor's exact state (it left on a notice and handed
            it over, directly or through a parker): nothing to restore, but the outage is theirs.
        hit_stages: the stages of the fresh and handed-over ranks, sorted.
        replicated_stages: hit stages that kept a data-parallel replica: restored from it exactly.
        lost_stages: hit stages that lost every replica: rebuilt from their neighbours.
    """

    generation: int
    cold_start: bool
    fresh_ranks: Tuple[int, ...]
    survivor_ranks: Tuple[int, ...]
    step: int
    schedule_source: Optional[int]
    hit_stages: Tuple[int, ...]
    replicated_stages: Tuple[int, ...]
    lost_stages: Tuple[int, ...]
    handed_over_ranks: Tuple[int, ...] = ()

    def replica_restore(self, stage: int, data_parallel_ranks: Sequence[int]) -> Optional[ReplicaRestore]:
        """The restore ``stage``'s data-parallel group (its global ranks) takes part in, or None.

        The source is the group's lowest surviving rank; every fresh rank of the group is restored.
        """
        if stage not in self.replicated_stages:
            return None
        return ReplicaRestore(min(r for r in data_parallel_ranks if r in self.survivor_ranks),
                              tuple(r for r in data_parallel_ranks if r in self.fresh_ranks))


def plan_rejoin(generation: int, members: Mapping[int, MemberInfo], stage_of: Mapping[int, int],
                job_has_progress: bool = True) -> RejoinPlan:
    """Decide how ``generation`` continues from what its ``members`` (global rank -> info) say of themselves.

    Args:
        generation: the generation being formed.
        members: every rank's info for this generation.
        stage_of: global rank -> pipeline stage.
        job_has_progress: some rank has completed a step of this job (before that, a job whose ranks all lost their
            state simply starts over). Unknown counts as yes: never start over silently.

    Returns:
        The plan; the same on every rank.

    Raises:
        RecoveryError: no rank kept its state after the job made progress, so there is nothing to rebuild from.
    """
    fresh = tuple(sorted(r for r, m in members.items() if m.fresh))
    if len(fresh) == len(members) and (generation == 0 or not job_has_progress):
        return RejoinPlan(generation, cold_start=True, fresh_ranks=fresh, survivor_ranks=(), step=0,
                          schedule_source=None, hit_stages=(), replicated_stages=(), lost_stages=())
    survivors = {r: m for r, m in members.items() if not m.fresh}
    if not survivors:
        raise RecoveryError(f"generation {generation}: every rank lost its state (ranks {list(fresh)}); nothing "
                            f"to rebuild from (the job had completed steps). Restart from a checkpoint.")
    step = min(m.completed_steps for m in survivors.values())
    # The replayed step's schedule state comes from a survivor that has not yet applied it.
    source = min(r for r, m in survivors.items() if m.completed_steps == step)
    handed = tuple(sorted(r for r, m in survivors.items() if m.took_over))
    hit_stages = tuple(sorted({stage_of[r] for r in fresh + handed}))
    # A stage that kept a data-parallel replica is restored from it exactly; only a stage that lost every replica
    # is rebuilt from its neighbours (after the restores, so a restored rank can be a source).
    fresh_stages = {stage_of[r] for r in fresh}
    replicated = tuple(s for s in hit_stages if s in fresh_stages and any(stage_of[r] == s for r in survivors))
    lost = tuple(s for s in hit_stages if s in fresh_stages and s not in replicated)
    return RejoinPlan(generation, cold_start=False, fresh_ranks=fresh, survivor_ranks=tuple(sorted(survivors)),
                      handed_over_ranks=handed,
                      step=step, schedule_source=source, hit_stages=hit_stages, replicated_stages=replicated,
                      lost_stages=lost)


# ---------------------------------------------------------------------------------------------------------------
# The outage record of a rejoin
# ---------------------------------------------------------------------------------------------------------------

# What started an outage (the ``start`` of its record), from what the job's store recorded of the lost ranks.
TRAINER_DEATH = "trainer death"          # a supervisor saw its trainer exit
MACHINE_SILENT = "machine silent"        # the leader recorded a supervisor whose lease went silent (machine gone)
PREEMPTION = "preemption notice"         # a machine announced that it goes (a drain)
COMMUNICATION = "communication failure"  # no loss was recorded: a transient error, or a partition that healed


@dataclass(frozen=True)
class Loss:
    """A loss of one rank's trainer as the job's store recorded it (its death record).

    Attributes:
        time: when it happened, as well as anyone could see it: for a trainer death, when its supervisor saw the
            exit; for a silent machine, its supervisor's last lease renewal; for a preemption, when the notice came.
        cause: :data:`TRAINER_DEATH`, :data:`MACHINE_SILENT` or :data:`PREEMPTION`.
    """

    time: float
    cause: str
    left: Optional[float] = None  # a preemption: when the leaving trainer left its generation


@dataclass(frozen=True)
class RankTimes:
    """One rank's wall-clock times (``time.time()``) around a failure, gathered after the first step it completes
    in the new generation."""

    detected: Optional[float]      # its first detection of a failure since its last completed step
    last_success: Optional[float]  # when it last completed a step (None: a replacement)
    arrived: float                 # arrived for the new generation
    rejoined: float                # the new process group and engine exist
    rebuilt: float                 # state restored and lost stages rebuilt
    resumed: float                 # the first step of the new generation completed
    completed_before: Optional[int] = None  # steps it had applied when the failure came (None: a replacement)
    completed_after: Optional[int] = None   # steps it has applied after that first step


@dataclass(frozen=True)
class Outage:
    """The ``outage`` event: seconds from the outage's start to the end of each phase, the slowest rank's."""

    generation: int
    lost_ranks: List[int]
    lost_stages: List[int]
    replayed_step: int
    lost_steps: int
    start: str                  # what started the outage (see the causes above)
    method: str                 # how the lost state came back ("gradnorm_average", "copy", "exact hand-over", ...)
    drain_s: Optional[float]    # a preemption: from the notice to the leaving trainer's leaving its generation
    silent_s: float             # start to the first detection: the time nobody knew
    detected_s: Optional[float]
    rejoined_s: float
    rebuilt_s: float
    resumed_s: float
    outage_s: float


def measure_outage(plan: RejoinPlan, times: Sequence[RankTimes], losses: Iterable[Loss], method: str) -> Outage:
    """The outage of the failure ``plan`` recovered from, from every rank's ``times`` and the job's records of this
    failure's lost trainers (``losses``).

    The start is the earliest trace of the failure. A trainer death or a preemption notice is dated by its record;
    the kernel closes a dead process's sockets before its parent learns of the exit, so a neighbour's detection can
    come first, and counts then. A machine that went silent left no trace: its outage starts at the survivors' last
    completed step or at its supervisor's last lease renewal, whichever is earlier, and ``silent_s`` is the time
    until the first detection. With no recorded loss (a transient error, a partition shorter than the lease timeout)
    the first detection is the start. A preemption notice starts its outage; ``drain_s`` is how long the leaving
    trainer took to reach a step boundary and leave.

    ``lost_steps`` counts the steps the job had completed before the failure and no longer holds after it: the
    ranks report the steps they had applied before the failure and after the first step of the new generation (a
    rank one step ahead keeps its update while the others replay it, so a sound recovery loses none).
    """
    losses = list(losses)
    detected = [t.detected for t in times if t.detected is not None]
    progress = [t.last_success for t in times if t.last_success is not None]
    traces = [x.time for x in losses if x.cause != MACHINE_SILENT] + detected
    silent = [x.time for x in losses if x.cause == MACHINE_SILENT]
    if silent:
        traces.append(min(silent + ([max(progress)] if progress else [])))
    start = min(traces)
    first = min(losses, key=lambda x: x.time).cause if losses else COMMUNICATION

    def phase(name: str) -> float:
        return round(max(getattr(t, name) for t in times) - start, 6)

    before = [t.completed_before for t in times if t.completed_before is not None]
    after = [t.completed_after for t in times if t.completed_after is not None]
    lost_steps = max(0, max(before) - min(after)) if before and after else 0
    drains = [x.left - x.time for x in losses if x.cause == PREEMPTION and x.left is not None]
    return Outage(generation=plan.generation, lost_ranks=sorted(plan.fresh_ranks + plan.handed_over_ranks),
                  lost_stages=list(plan.hit_stages), replayed_step=plan.step, lost_steps=lost_steps, start=first,
                  method=method, drain_s=round(max(drains), 6) if drains else None,
                  # (a machine that gave notice was never silent: its drain is a phase of its own)
                  silent_s=round(max(0.0, min(detected) - start), 6) if detected and first != PREEMPTION else 0.0,
                  detected_s=round(max(detected) - start, 6) if detected else None,
                  rejoined_s=phase("rejoined"), rebuilt_s=phase("rebuilt"), resumed_s=phase("resumed"),
                  outage_s=phase("resumed"))
