"""Rejoin decisions and the outage record, with no process: who restores what from whom, which step is replayed."""
from __future__ import annotations

from dataclasses import asdict
from typing import Dict, Iterable

import pytest

from deepspeed_checkfree.core.rejoin import (MACHINE_SILENT, PREEMPTION, TRAINER_DEATH, Loss, MemberInfo, RankTimes,
                                             ReplicaRestore, joining_generation, measure_outage, missing_members,
                                             plan_rejoin)
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
                              "from (the job had completed steps). Restart from a checkpoint.")


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


def test_a_trainer_joins_the_latest_generation_unless_it_has_formed():
    assert joining_generation(latest_generation=-1, latest_formed=False) == 0, "the job's first trainers"
    # A rank died mid-training: its generation formed long ago; the survivors move to the next one.
    assert joining_generation(latest_generation=5, latest_formed=True) == 6
    # A rank died before its generation formed (at start-up): the others still wait in that one.
    assert joining_generation(latest_generation=0, latest_formed=False) == 0
    assert joining_generation(latest_generation=3, latest_formed=False) == 3


def test_every_rank_fresh_before_the_first_step_is_a_fresh_start_and_after_it_an_error():
    plan = plan_rejoin(2, members(4, fresh=range(4)), FOUR_STAGES, job_has_progress=False)
    assert plan.cold_start and plan.fresh_ranks == (0, 1, 2, 3) and plan.lost_stages == ()
    with pytest.raises(RecoveryError, match=r"every rank lost its state \(ranks \[0, 1, 2, 3\]\).*completed steps"):
        plan_rejoin(2, members(4, fresh=range(4)), FOUR_STAGES, job_has_progress=True)


# The outage record --------------------------------------------------------------------------------------------

def times(detected=None, last_success=None, arrived=0.0, rejoined=0.0, rebuilt=0.0, resumed=0.0,
          completed_before=None, completed_after=None) -> RankTimes:
    return RankTimes(detected=detected, last_success=last_success, arrived=arrived, rejoined=rejoined,
                     rebuilt=rebuilt, resumed=resumed, completed_before=completed_before,
                     completed_after=completed_after)


def deaths(*when):
    return [Loss(time=t, cause=TRAINER_DEATH) for t in when]


def test_detections_before_the_recorded_deaths_date_the_outage_to_the_microsecond():
    # Sockets close before the supervisor reaps its child: both neighbours detect before either death is recorded,
    # 30 microseconds apart (two adjacent kills). The record stays ordered and positive.
    plan = plan_rejoin(3, members(4, fresh=[1, 2]), FOUR_STAGES)
    t0 = 1000.0
    gathered = [times(detected=t0 + 0.000030 * (r == 3), last_success=t0 - 1, arrived=t0 + 1, rejoined=t0 + 2,
                      rebuilt=t0 + 3, resumed=t0 + 4) if r in (0, 3) else
                times(arrived=t0 + 1, rejoined=t0 + 2, rebuilt=t0 + 3, resumed=t0 + 4) for r in range(4)]
    rec = measure_outage(plan, gathered, deaths(t0 + 0.004, t0 + 0.009), "gradnorm_average")
    assert rec.start == "trainer death" and rec.silent_s == 0.0
    assert 0 < rec.detected_s <= rec.rejoined_s <= rec.rebuilt_s <= rec.resumed_s == rec.outage_s
    assert rec.detected_s == pytest.approx(0.00003, abs=1e-6)


def test_outage_starts_at_the_trainer_death_and_its_phases_end_at_the_slowest_rank():
    plan = plan_rejoin(1, members(4, fresh=[2], default_steps=8), FOUR_STAGES)
    gathered = [times(detected=100.5, last_success=99.0, arrived=101.0, rejoined=102.0, rebuilt=103.0, resumed=104.0),
                times(detected=100.2, last_success=99.5, arrived=101.5, rejoined=102.5, rebuilt=103.25, resumed=104.5),
                times(arrived=101.0, rejoined=102.75, rebuilt=103.5, resumed=104.25),  # the replacement
                times(detected=100.75, last_success=99.0, arrived=101.0, rejoined=102.0, rebuilt=103.0,
                      resumed=104.0)]
    out = measure_outage(plan, gathered, deaths(100.0), "gradnorm_average")
    assert out.start == "trainer death" and out.method == "gradnorm_average"
    assert (out.generation, out.lost_ranks, out.lost_stages, out.replayed_step, out.lost_steps) == (1, [2], [2], 8, 0)
    assert (out.silent_s, out.detected_s, out.rejoined_s, out.rebuilt_s, out.resumed_s, out.outage_s) == \
        (0.2, 0.75, 2.75, 3.5, 4.5, 4.5)


def test_a_silent_machine_dates_its_outage_from_its_last_lease_renewal_or_the_last_step_and_the_silence_is_a_phase():
    # Rank 1's machine vanished: its supervisor last renewed at 48.5; the survivors last completed a step at 49.0
    # and 49.2; the leader recorded the loss and every rank's death watch fired at 53.5.
    plan = plan_rejoin(2, members(4, fresh=[1]), FOUR_STAGES)
    gathered = [times(detected=53.5, last_success=49.0, resumed=55.0), times(resumed=55.5),
                times(detected=53.6, last_success=49.2, resumed=55.0), times(detected=53.55, resumed=55.25)]
    out = measure_outage(plan, gathered, [Loss(time=48.5, cause=MACHINE_SILENT)], "gradnorm_average")
    assert out.start == "machine silent"
    assert (out.silent_s, out.detected_s, out.outage_s) == (5.0, 5.1, 7.0)
    # A renewal after the survivors' last step: the step dates it.
    out = measure_outage(plan, gathered, [Loss(time=50.0, cause=MACHINE_SILENT)], "gradnorm_average")
    assert (out.silent_s, out.outage_s) == (4.3, 6.3)


def test_outage_without_a_recorded_loss_starts_at_the_first_detection():
    # A transient error, or a partition shorter than the lease timeout: nothing was lost, the detections date it.
    plan = plan_rejoin(2, members(4), FOUR_STAGES)
    gathered = [times(detected=50.25, last_success=49.0, resumed=53.0), times(resumed=53.5),
                times(detected=50.5, last_success=49.0, resumed=53.0), times(detected=54.0, resumed=53.25)]
    out = measure_outage(plan, gathered, [], "none")
    assert out.start == "communication failure" and out.silent_s == 0.0
    assert out.detected_s == 3.75 and out.outage_s == out.resumed_s == 3.25


def test_lost_steps_are_counted_from_the_steps_the_ranks_report_across_the_failure():
    plan = plan_rejoin(1, members(4, fresh=[2], default_steps=8), FOUR_STAGES)
    # Rank 3 had applied step 8 already (it replays it without applying it again): nothing is lost.
    sound = [times(detected=1.0, resumed=2.0, **{"completed_before": b, "completed_after": 9})
             for b in (8, 8, None, 9)]
    assert measure_outage(plan, sound, deaths(0.5), "gradnorm_average").lost_steps == 0
    # A survivor that came back one step behind what the job had applied would lose it.
    behind = [times(detected=1.0, resumed=2.0, completed_before=9, completed_after=9),
              times(detected=1.0, resumed=2.0, completed_before=8, completed_after=8)]
    assert measure_outage(plan, behind, deaths(0.5), "gradnorm_average").lost_steps == 1


def test_outage_record_keeps_the_event_field_order():
    plan = plan_rejoin(1, members(6, fresh=[3]), THREE_BY_TWO)
    out = measure_outage(plan, [times(detected=1.0, last_success=0.5, resumed=2.0)] * 6, deaths(0.75),
                         "data_parallel_replica")
    assert list(asdict(out)) == ["generation", "lost_ranks", "lost_stages", "replayed_step", "lost_steps", "start",
                                 "method", "drain_s", "silent_s", "detected_s", "rejoined_s", "rebuilt_s",
                                 "resumed_s", "outage_s"]
    assert out.lost_stages == [1], "a stage restored from its replica was hit too"
    assert out.start == "trainer death" and out.outage_s == 1.25


def test_a_generation_forms_when_every_ranks_active_trainer_has_arrived_and_never_for_a_ghost():
    here = members(3)
    assert missing_members(here, {0: 0, 1: 0, 2: 0}, 3) == []
    assert missing_members({0: here[0], 2: here[2]}, {0: 0, 1: 0, 2: 0}, 3) == [1], "rank 1 has not arrived"
    # Rank 2's trainer of incarnation 0 arrived, then died: its supervisor moved the rank on to incarnation 1.
    assert missing_members(here, {0: 0, 1: 0, 2: 1}, 3) == [2]
    assert missing_members(here, {}, 3) == [], "no incarnation recorded counts as the first"


def test_a_rank_that_took_its_predecessors_exact_state_is_hit_but_nothing_is_rebuilt():
    here = members(4, default_steps=8)
    here[2] = MemberInfo(rank=2, fresh=False, completed_steps=9, incarnation=2, pid=7, took_over="exact hand-over")
    plan = plan_rejoin(3, here, FOUR_STAGES)
    assert plan.handed_over_ranks == (2,) and plan.hit_stages == (2,) and plan.lost_stages == ()
    assert plan.fresh_ranks == () and plan.step == 8, "the others replay step 8; rank 2 applied it before leaving"
    gathered = [times(detected=101.0, last_success=100.0, resumed=103.0)] * 4
    out = measure_outage(plan, gathered, [Loss(time=100.5, cause=PREEMPTION, left=100.9)], "exact hand-over")
    assert (out.start, out.method, out.lost_ranks, out.drain_s) == ("preemption notice", "exact hand-over", [2], 0.4)
    assert out.outage_s == 2.5
