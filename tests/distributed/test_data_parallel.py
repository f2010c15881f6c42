"""CheckFree with data parallelism: 3 pipeline stages x 2 data-parallel replicas on 6 real ranks (gloo).

Every data-parallel replica of the lost stage is rebuilt from the neighbours in its own data-parallel column; the
replicas see different data, so this also checks that the per-stage norms (and hence the weights) agree across
columns, that the replicas stay bit-identical afterwards, and that ZeRO-1's partitioned fp32 masters are refreshed.
"""
from __future__ import annotations

import math

import pytest
import torch

from deepspeed_checkfree.events import read_events

from ..harness.oracle import (check_loss_falls, check_masters_refreshed, check_recorded_rebuild,
                              check_stage_norms_measured, rebuild_snapshots, split_columns)
from ..harness.ranks import run_scenarios
from ..harness.scenarios import WORKER, checkfree, lose

pytestmark = pytest.mark.distributed

STAGES, DP = 3, 2
BLOCKS = 9  # three per stage, so the expected blend pairs blocks one to one
FAIL_STEP = 3
PIPE = {"num_stages": STAGES, "n_layers": BLOCKS}
SCENARIOS = [
    {"name": "dp2_stock", **PIPE, "steps": 4, "checkfree": None},
    {"name": "dp2_no_failure", **PIPE, "steps": 4, "checkfree": checkfree()},
    {"name": "dp2_lose1", **PIPE, "steps": 8, "checkfree": lose(1, FAIL_STEP)},
    {"name": "dp2_zero1_lose1", **PIPE, "steps": 8, "zero": 1, "checkfree": lose(1, FAIL_STEP)},
]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dp")
    return out, run_scenarios(WORKER, STAGES * DP, SCENARIOS, out)


def _columns(recs):
    return split_columns(recs, STAGES, DP)


def _replicas_identical(recs, key="final_params"):
    for stage in range(STAGES):
        a, b = (col[stage] for col in _columns(recs))
        assert a[key].keys() == b[key].keys()
        for name, p in a[key].items():
            assert torch.equal(p, b[key][name]), f"stage {stage} {name} differs between data-parallel replicas"


def test_checkfree_with_data_parallelism_trains_like_the_stock_engine(results):
    _, recs = results
    for r in range(STAGES * DP):
        assert recs["dp2_no_failure"][r]["engine"] == "CheckFreeEngine"
        assert recs["dp2_no_failure"][r]["losses"] == recs["dp2_stock"][r]["losses"]
        assert recs["dp2_no_failure"][r]["grad_square_sums"] == recs["dp2_stock"][r]["grad_square_sums"]
        for name, p in recs["dp2_stock"][r]["final_params"].items():
            assert torch.equal(p, recs["dp2_no_failure"][r]["final_params"][name])
    # The stage norm is that of the data-parallel-averaged gradient: the same on both replicas of a stage.
    for col_a, col_b in zip(*_columns(recs["dp2_no_failure"])):
        assert col_a["norms"] == col_b["norms"] and all(n > 0 for n in col_a["norms"])


@pytest.mark.parametrize("name,partitioned", [("dp2_no_failure", False), ("dp2_lose1", False),
                                              ("dp2_zero1_lose1", True)])
def test_stage_gradient_norm_is_the_norm_of_the_data_parallel_averaged_gradient(results, name, partitioned):
    # Under ZeRO-1 each replica holds half the gradient: the stage norm combines both halves.
    _, recs = results
    check_stage_norms_measured(recs[name], STAGES, DP, partitioned=partitioned)


@pytest.mark.parametrize("name", ["dp2_lose1", "dp2_zero1_lose1"])
def test_every_replica_of_the_lost_stage_is_rebuilt_exactly_from_its_column(results, name):
    out, recs = results
    weights = [check_recorded_rebuild(col, 1) for col in _columns(recs[name])]
    assert weights[0] == weights[1], "both replicas must weigh their neighbours alike"
    for col in _columns(recs[name]):
        assert col[1]["lrs"][-1][0] == pytest.approx(1.1 * col[0]["lrs"][-1][0], rel=1e-12)
        if name == "dp2_zero1_lose1":
            check_masters_refreshed(rebuild_snapshots(col)[1][1])
    _replicas_identical(recs[name])
    if name == "dp2_zero1_lose1":
        _replicas_identical(recs[name], key="final_masters")
    events = read_events(str(out / f"{name}.events.jsonl"))
    # One record per lost stage, not per replica.
    assert [e["event"] for e in events] == ["stage_lost", "recovery"]
    assert events[1]["sources"] == [0, 2] and events[1]["step"] == FAIL_STEP


@pytest.mark.parametrize("name", ["dp2_lose1", "dp2_zero1_lose1"])
def test_data_parallel_training_continues_after_the_rebuild(results, name):
    _, recs = results
    for col in _columns(recs[name]):
        assert all(torch.isfinite(p).all() for p in col[1]["final_params"].values())
        assert all(math.isfinite(n) for n in col[1]["norms"][FAIL_STEP:])
        check_loss_falls(col[0]["losses"], since=FAIL_STEP)
