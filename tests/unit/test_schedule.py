"""The CheckFree+ schedule: routes, roles, completeness, the in-flight bound and the idealised step length (the
blocking-send simulation of every depth and micro-batch count is in test_schedule_deadlock.py)."""
from __future__ import annotations

import pytest
from deepspeed.runtime.pipe.schedule import BackwardPass, ForwardPass, LoadMicroBatch, OptimizerStep, RecvActivation

from deepspeed_checkfree.core.schedule import (DURATION, CheckFreePlusTrainSchedule, data_stages, max_in_flight,
                                               pass_clocks, role, route, route_hops)


def test_routes_swap_the_edge_pairs_on_odd_micro_batches():
    assert route(0, 4) == (0, 1, 2, 3)
    assert route(1, 4) == (1, 0, 3, 2)
    assert route(3, 6) == (1, 0, 2, 3, 5, 4)
    assert route(2, 6) == (0, 1, 2, 3, 4, 5)


def test_roles():
    assert role(1, 1, 4).is_first and role(2, 1, 4).is_last
    assert role(0, 1, 4).prev_stage == 1 and role(0, 1, 4).next_stage == 3
    assert role(0, 1, 6).next_stage == 2 and role(3, 1, 6).next_stage == 5


def test_hops_include_non_adjacent_pairs_for_more_than_four_stages():
    assert (0, 2) in route_hops(6) and (3, 5) in route_hops(6) and (2, 0) in route_hops(6)
    assert (0, 3) not in route_hops(6)
    assert route_hops(4) == {(0, 1), (1, 0), (1, 2), (2, 1), (2, 3), (3, 2), (0, 3), (3, 0)}


def test_too_few_stages_or_micro_batches_are_rejected():
    with pytest.raises(ValueError, match="num_stages >= 4"):
        route(0, 3)
    with pytest.raises(ValueError, match="gradient_accumulation_steps >= 2"):
        CheckFreePlusTrainSchedule(1, 4, 0)


def _programs(stages, mbs):
    return {s: [c for step in CheckFreePlusTrainSchedule(mbs, stages, s).steps() for c in step] for s in range(stages)}


@pytest.mark.parametrize("stages", [4, 5, 6, 8])
@pytest.mark.parametrize("mbs", [2, 3, 4, 8])
def test_every_micro_batch_visits_every_stage_once_forward_and_backward(stages, mbs):
    progs = _programs(stages, mbs)
    for s, prog in progs.items():
        fwd = [c.micro_batch_id for c in prog if isinstance(c, ForwardPass)]
        bwd = [c.micro_batch_id for c in prog if isinstance(c, BackwardPass)]
        assert sorted(fwd) == list(range(mbs)) and sorted(bwd) == list(range(mbs))
        for mb in range(mbs):
            f = next(i for i, c in enumerate(prog) if isinstance(c, ForwardPass) and c.micro_batch_id == mb)
            b = next(i for i, c in enumerate(prog) if isinstance(c, BackwardPass) and c.micro_batch_id == mb)
            assert f < b
        assert isinstance(prog[-1], OptimizerStep)
        loads = [c.micro_batch_id for c in prog if isinstance(c, LoadMicroBatch)]
        assert loads == (list(range(mbs)) if s in data_stages(stages) else [])


def test_backwards_interleave_with_forwards_once_the_pipeline_is_full():
    """1F1B, not GPipe: with many micro-batches, stage 0 runs its first backward long before its last forward."""
    prog = _programs(6, 32)[0]
    first_bwd = next(i for i, c in enumerate(prog) if isinstance(c, BackwardPass))
    last_fwd = max(i for i, c in enumerate(prog) if isinstance(c, ForwardPass))
    assert first_bwd < last_fwd
    assert sum(isinstance(c, ForwardPass) for c in prog[:first_bwd]) == max_in_flight(0, 6, 32)


@pytest.mark.parametrize("stages,expected", [(4, [4, 4, 2, 2]), (5, [6, 6, 4, 2, 2]), (6, [8, 8, 5, 4, 2, 2]),
                                             (7, [9, 9, 6, 5, 4, 2, 2])])
def test_the_in_flight_bound_per_stage(stages, expected):
    assert [max_in_flight(s, stages, 64) for s in range(stages)] == expected
    assert [max_in_flight(s, stages, 3) for s in range(stages)] == [min(3, e) for e in expected]
    # DeepSpeed's 1F1B holds stages - stage_id: one more in the middle, on the first pair none for 4 stages, one
    # for 5 and two from 6 on.
    assert max(expected) - stages == {4: 0, 5: 1}.get(stages, 2)
    assert all(expected[s] == stages - s + 1 for s in range(2, stages - 2))


def test_an_odd_depth_with_two_more_micro_batches_than_stages_holds_one_less_on_the_first_pair():
    assert [max_in_flight(s, 7, 9) for s in (0, 1)] == [8, 8]
    assert [max_in_flight(s, 7, 10) for s in (0, 1)] == [9, 9]
    assert [max_in_flight(s, 6, 8) for s in (0, 1)] == [8, 8]


@pytest.mark.parametrize("stages", [4, 5, 6, 8])
def test_buffers_do_not_grow_with_the_micro_batch_count(stages):
    small = [CheckFreePlusTrainSchedule(16, stages, s).num_pipe_buffers() for s in range(stages)]
    large = [CheckFreePlusTrainSchedule(64, stages, s).num_pipe_buffers() for s in range(stages)]
    assert small == large
    assert all(n <= max_in_flight(s, stages, 64) + 1 for s, n in enumerate(large))


def test_instructions_name_their_micro_batch_and_a_slot_below_the_buffer_count():
    for s in range(6):
        sched = CheckFreePlusTrainSchedule(9, 6, s)
        for c in [c for step in sched.steps() for c in step]:
            if hasattr(c, "buffer_id"):
                assert 0 <= c.micro_batch_id < 9
                # A read-and-drop load (the stage neither embeds that micro-batch nor computes its loss) has none.
                assert (c.buffer_id is None and isinstance(c, LoadMicroBatch)) or \
                    0 <= c.buffer_id < sched.num_pipe_buffers()


def test_planned_step_length_is_within_four_clocks_of_deepspeeds_1f1b():
    """On the plan's clocks (a forward one, a backward two) DeepSpeed's 1F1B takes 3 (M + P - 1)."""
    for stages in range(4, 17):
        for mbs in (2, 3, 8, 9, 32, 64):
            clocks = max(t + DURATION[kind] for (kind, _, _), t in pass_clocks(mbs, stages).items())
            stock = 3 * (mbs + stages - 1)
            assert clocks <= stock + 4, (stages, mbs)
            if stages == 4:
                assert clocks <= stock


def test_the_swapped_pair_computes_concurrently_on_the_first_two_stages_of_four():
    """With 4 stages the odd route permutes every position: stage 0 embeds micro-batch 0 while stage 1 embeds
    micro-batch 1, so neither rank's first pass waits for a receive."""
    progs = _programs(4, 4)
    for s in (0, 1):
        first_pass = next(c for c in progs[s] if isinstance(c, ForwardPass))
        before = progs[s][:progs[s].index(first_pass)]
        assert not any(isinstance(c, RecvActivation) for c in before)
        assert first_pass.micro_batch_id == s
