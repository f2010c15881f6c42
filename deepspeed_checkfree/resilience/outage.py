"""The outage record of a re-formation: every rank's phase times gathered after the first step of the new
generation (``session``: the :class:`~.session.JobSession` of this rank), and the lowest surviving rank (it knows
the generation that failed) writes the record
(:func:`~deepspeed_checkfree.core.rejoin.measure_outage` says how it is measured)."""
from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any, List, Optional

import torch.distributed as dist

from ..core.rejoin import Loss, RankTimes, RejoinPlan, measure_outage
from ..events import identity

logger = logging.getLogger("deepspeed_checkfree.resilience.session")


def losses_of(session: Any, plan: RejoinPlan) -> List[Loss]:
    """The records of the trainers this failure lost: for each fresh or handed-over rank, the incarnations
    since the one that trained in this rank's previous generation."""
    records = []
    for r in plan.fresh_ranks + plan.handed_over_ranks:
        first = session.previous[r].incarnation if r in session.previous else session.members[r].incarnation - 1
        for i in range(max(0, first), session.members[r].incarnation):
            death = session.membership.death(r, i)
            if death is not None:
                records.append(Loss(time=death.time, cause=death.cause, left=death.left))
    return records


def method_of(session: Any, plan: RejoinPlan) -> str:
    if plan.handed_over_ranks and not plan.lost_stages and not plan.replicated_stages:
        return "exact hand-over"
    if plan.lost_stages:
        return session.config.strategy if session.config.mode == "checkfree" or all(
            0 < s < session.engine.num_stages - 1 for s in plan.lost_stages) else "copy"
    if plan.replicated_stages:
        return "data_parallel_replica"
    return "none"


def report_outage(session: Any, mine: RankTimes) -> None:
    """After the first step of a new generation: gather every rank's phase times; the lowest surviving rank
    that was in the generation that failed writes the outage record (:func:`~deepspeed_checkfree.core.rejoin.
    measure_outage` says how it is measured)."""
    plan = session.plan
    times: List[Optional[RankTimes]] = [None] * session.world_size
    dist.all_gather_object(times, mine)
    # (a rank that took a stage over is a survivor of the plan, but a new process: it never saw the failed one)
    writer = min((r for r in plan.survivor_ranks if r not in plan.handed_over_ranks), default=plan.survivor_ranks[0])
    if session.rank != writer:
        return
    outage = measure_outage(plan, times, losses_of(session, plan), method_of(session, plan))
    logger.warning("%s outage of generation %d: %.2f s, started by %s (silent %.2f, detected %.2f, re-joined "
                   "%.2f, rebuilt %.2f, resumed %.2f), replayed step %d, lost steps %d, %s",
                   identity(step=plan.step, rank=session.rank), plan.generation, outage.outage_s, outage.start,
                   outage.silent_s, outage.detected_s or 0.0, outage.rejoined_s, outage.rebuilt_s,
                   outage.resumed_s, plan.step, outage.lost_steps, outage.method)
    session.events.write("outage", **asdict(outage))
