"""Rejoin decisions and the outage record, with no process: who restores what from whom, which step is replayed."""
from __future__ import annotations

from dataclasses import asdict
from typing import Dict, Iterable

import pytest

from deepspeed_checkfree.core.rejoin import (MemberInfo, RankTimes, ReplicaRestore, joining_generation,
                                             measure_outage, plan_rejoin)
from deepspeed_checkfree.errors import RecoveryError

FOUR_STAGES = {r: r for r in range(4)}
# 3 stages x 2 data-parallel replicas, as DeepSpeed's pipe x data topology numbers them: rank = 2 * stage + replica.
THREE_BY_TWO = {r: r // 2 for r in range(6)}


def members(world: int, fresh: Iterable[int] = (), steps: Dict[int, int] = None, default_steps: int = 8,
            incarnation: int = 0) -> Dict[int, MemberInfo]:
    fresh, steps = set(fresh), steps or {}
    return {r: MemberInfo(rank=r, fresh=r in fresh, completed_steps=0 if r in fresh else steps.get(r, default_steps),
                          incarnation=incarnation + (r in fresh), pid=1000 + r) for r in range(world)}


def test_generation_zero_with_every_rank_fresh_is_a_cold_start():
    plan = plan_rejoin(0, members(4, fresh=range(4)), FOUR_STAGES)
    assert plan.cold_start
    assert plan.fresh_ranks == (0, 1, 2, 3) and plan.survivor_ranks == ()
    assert plan.schedule_source is None and plan.hit_stages == plan.lost_stages == plan.replicated_stages == ()
    assert plan.replica_restore(0, [0]) is None


def test_one_middle_rank_lost_is_rebuilt_from_neighbours_and_its_step_replayed():
    plan = plan_rejoin(3, members(4, fresh=[2], default_steps=8), FOUR_STAGES)
    assert not plan.cold_start and plan.generation == 3
    assert plan.fresh_ranks == (2,) and plan.survivor_ranks == (0, 1, 3)
    assert plan.step == 8 and plan.schedule_source == 0
    assert plan.hit_stages == (2,) and plan.lost_stages == (2,) and plan.replicated_stages == ()
    assert all(plan.replica_restore(s, [s]) is None for s in range(4)), "no replica: nothing is copied"


def test_every_rank_lost_after_generation_zero_has_nothing_to_rebuild_from():
    with pytest.raises(RecoveryError) as err:
        plan_rejoin(2, members(4, fresh=range(4)), FOUR_STAGES)
    assert str(err.value) == ("generation 2: every rank lost its state (ranks [0, 1, 2, 3]); nothing to rebuild "
                              "from. Restart from a checkpoint.")


def test_a_rank_one_step_ahead_replays_the_step_and_a_rank_behind_gives_the_schedule_state():
    # Ranks 0 and 1 had applied step 8 when stage 2 died; rank 3 had not: the job replays step 8, and the schedule
    # state of that step comes from rank 3, the only survivor that has not applied it yet.
    plan = plan_rejoin(1, members(4, fresh=[2], steps={0: 9, 1: 9, 3: 8}), FOUR_STAGES)
    assert plan.step == 8 and plan.schedule_source == 3
    # Among survivors equally behind, the lowest rank is the source.
    assert plan_rejoin(1, members(4, fresh=[2], steps={0: 9, 1: 8, 3: 8}), FOUR_STAGES).schedule_source == 1


def test_a_stage_with_a_surviving_replica_is_restored_from_it():
    plan = plan_rejoin(1, members(6, fresh=[3]), THREE_BY_TWO)
    assert plan.hit_stages == (1,) and plan.replicated_stages == (1,) and plan.lost_stages == ()
    assert plan.replica_restore(1, [2, 3]) == ReplicaRestore(source_rank=2, restored_ranks=(3,))
    assert plan.replica_restore(0, [0, 1]) is None and plan.replica_restore(2, [4, 5]) is None


def test_a_stage_that_lost_every_replica_is_rebuilt_from_neighbours():
    plan = plan_rejoin(2, members(6, fresh=[2, 3]), THREE_BY_TWO)
    assert plan.hit_stages == (1,) and plan.replicated_stages == () and plan.lost_stages == (1,)
    assert plan.replica_restore(1, [2, 3]) is None


def test_replica_restore_and_neighbour_rebuild_in_one_generation():
    # Stage 0 keeps rank 1 as replica of rank 0; stage 2 lost both replicas.
    plan = plan_rejoin(1, members(6, fresh=[0, 4, 5]), THREE_BY_TWO)
    assert plan.replicated_stages == (0,) and plan.lost_stages == (2,)
    assert plan.replica_restore(0, [0, 1]) == ReplicaRestore(source_rank=1, restored_ranks=(0,))


def test_two_adjacent_stages_lost_at_once_are_both_left_to_the_neighbour_rebuild():
    plan = plan_rejoin(1, members(4, fresh=[2, 1]), FOUR_STAGES)
    assert plan.fresh_ranks == (1, 2) and plan.survivor_ranks == (0, 3)
    assert plan.hit_stages == plan.lost_stages == (1, 2)


def test_a_replacement_joins_the_generation_after_its_ranks_last():
    assert joining_generation(incarnation=0, last_generation=-1) == 0
    assert joining_generation(incarnation=1, last_generation=0) == 1
    assert joining_generation(incarnation=3, last_generation=5) == 6
    # A first trainer starts at generation 0 whatever the store says.
    assert joining_generation(incarnation=0, last_generation=4) == 0


# The outage record --------------------------------------------------------------------------------------------

def times(detected=None, last_success=None, arrived=0.0, rejoined=0.0, rebuilt=0.0, resumed=0.0) -> RankTimes:
    return RankTimes(detected=detected, last_success=last_success, arrived=arrived, rejoined=rejoined,
                     rebuilt=rebuilt, resumed=resumed)


def test_outage_starts_at_the_trainer_death_and_its_phases_end_at_the_slowest_rank():
    plan = plan_rejoin(1, members(4, fresh=[2], default_steps=8), FOUR_STAGES)
    gathered = [times(detected=100.5, last_success=99.0, arrived=101.0, rejoined=102.0, rebuilt=103.0, resumed=104.0),
                times(detected=100.2, last_success=99.5, arrived=101.5, rejoined=102.5, rebuilt=103.25, resumed=104.5),
                times(arrived=101.0, rejoined=102.75, rebuilt=103.5, resumed=104.25),  # the replacement
                times(detected=100.75, last_success=99.0, arrived=101.0, rejoined=102.0, rebuilt=103.0,
                      resumed=104.0)]
    # 98.0 is an earlier death of that rank, before the last completed steps: not this outage's.
    out = measure_outage(plan, gathered, death_times=[98.0, 100.0])
    assert out.start == "trainer death"
    assert (out.generation, out.lost_ranks, out.lost_stages, out.replayed_step, out.lost_steps) == (1, [2], [2], 8, 0)
    assert (out.detected_s, out.rejoined_s, out.rebuilt_s, out.resumed_s, out.outage_s) == (0.75, 2.75, 3.5, 4.5,
                                                                                              4.5)


def test_outage_without_a_seen_death_starts_at_the_first_detection():
    # A whole node vanished: no supervisor recorded a death, the survivors' detections date the start.
    plan = plan_rejoin(2, members(4, fresh=[1]), FOUR_STAGES)
    gathered = [times(detected=50.25, last_success=49.0, resumed=53.0), times(resumed=53.5),
                times(detected=50.5, last_success=49.0, resumed=53.0), times(detected=54.0, resumed=53.25)]
    out = measure_outage(plan, gathered, death_times=[])
    assert out.start == "first detection (no supervisor saw a death)"
    assert out.detected_s == 3.75 and out.outage_s == out.resumed_s == 3.25


def test_outage_record_keeps_the_event_field_order():
    plan = plan_rejoin(1, members(6, fresh=[3]), THREE_BY_TWO)
    out = measure_outage(plan, [times(detected=1.0, last_success=0.5, resumed=2.0)] * 6, [0.75])
    assert list(asdict(out)) == ["generation", "lost_ranks", "lost_stages", "replayed_step", "lost_steps", "start",
                                 "detected_s", "rejoined_s", "rebuilt_s", "resumed_s", "outage_s"]
    assert out.lost_stages == [1], "a stage restored from its replica was hit too"
    assert out.start == "trainer death" and out.outage_s == 1.25
