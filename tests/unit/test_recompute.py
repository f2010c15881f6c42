"""Which micro-batches the CheckFree+ first pair recomputes (checkfree.plus_recompute_edges): pure, on the same
instruction streams the engine runs."""
from __future__ import annotations

import itertools

import pytest

from deepspeed_checkfree.core.recompute import held_peaks, recomputed_micro_batches, stock_first_stage_held
from deepspeed_checkfree.core.schedule import max_in_flight

DEPTHS = range(4, 13)
COUNTS = [2, 3, 5, 6, 7, 8, 9, 11, 16, 17, 32, 64]


@pytest.mark.parametrize("stages", DEPTHS)
@pytest.mark.parametrize("mbs", COUNTS)
def test_without_recomputation_the_stream_holds_exactly_max_in_flight(stages, mbs):
    # The recomputation plan reads the held micro-batches from the instruction stream; the schedule's bound says
    # the same independently.
    for s in range(stages):
        assert held_peaks(s, stages, mbs, frozenset()) == (max_in_flight(s, stages, mbs), 0)


@pytest.mark.parametrize("stages", DEPTHS)
@pytest.mark.parametrize("mbs", COUNTS)
def test_recomputing_the_planned_micro_batches_holds_no_more_than_stock_1f1b(stages, mbs):
    budget = stock_first_stage_held(stages, mbs)
    for s in range(stages):
        recomputed = recomputed_micro_batches(s, stages, mbs, True)
        full, inputs = held_peaks(s, stages, mbs, recomputed)
        assert full <= budget, (s, full, budget)
        if s >= 2:
            assert not recomputed  # only the first pair holds more than stock's first stage
        assert inputs <= len(recomputed)


@pytest.mark.parametrize("stages,mbs", [(5, 8), (6, 8), (6, 10), (7, 9), (8, 10)])
def test_the_plan_recomputes_the_fewest_micro_batches_that_reach_the_budget(stages, mbs):
    budget = stock_first_stage_held(stages, mbs)
    for s in (0, 1):
        plan = recomputed_micro_batches(s, stages, mbs, True)
        fewer = [set(c) for k in range(len(plan)) for c in itertools.combinations(range(mbs), k)]
        assert not any(held_peaks(s, stages, mbs, frozenset(c))[0] <= budget for c in fewer), (s, plan)


def test_how_many_are_recomputed_at_the_benchmarked_depths():
    # 4 stages hold stock's level already; 6 and 8 stages with 32 micro-batches recompute 8 and 6 of them.
    assert [len(recomputed_micro_batches(s, 4, 32, True)) for s in range(4)] == [0, 0, 0, 0]
    assert [len(recomputed_micro_batches(s, 6, 32, True)) for s in (0, 1)] == [8, 8]
    assert [len(recomputed_micro_batches(s, 8, 32, True)) for s in (0, 1)] == [6, 6]


@pytest.mark.parametrize("stages", [4, 6, 8])
def test_all_recomputes_every_micro_batch_of_the_first_pair_only(stages):
    for s in range(stages):
        plan = recomputed_micro_batches(s, stages, 7, "all")
        assert plan == (frozenset(range(7)) if s in (0, 1) else frozenset())
        if s in (0, 1):
            # one micro-batch's activations at a time (the one whose backward runs), the others as inputs
            assert held_peaks(s, stages, 7, plan) == (1, max_in_flight(s, stages, 7))


def test_off_recomputes_nothing_and_a_bad_policy_is_refused():
    assert all(not recomputed_micro_batches(s, 6, 32, False) for s in range(6))
    with pytest.raises(ValueError, match="false, true or 'all'"):
        recomputed_micro_batches(0, 6, 32, "some")
