"""CheckFree with data parallelism: 3 pipeline stages x 2 data-parallel replicas on 6 real ranks (gloo).

Every data-parallel replica of the lost stage is rebuilt from the neighbours in its own data-parallel column; the
replicas see different data, so this also checks that the per-stage norms (and hence the weights) agree across
columns, that the replicas stay bit-identical afterwards, and that ZeRO-1's partitioned fp32 masters are refreshed.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from deepspeed_checkfree.events import read_events

from .checks import check_rebuild_exact, check_survivors_untouched, check_training_continues
from .spawn import run_ranks

pytestmark = pytest.mark.distributed

WORKER = Path(__file__).with_name("pipe_scenarios.py")
STAGES, DP = 3, 2
BLOCKS = 9  # three per stage, so the expected blend pairs blocks one to one
FAIL_STEP = 3
PIPE = {"num_stages": STAGES, "n_layers": BLOCKS}


def _lose(stage, step, **kw):
    return {"enabled": True, "failure_injection": {"at": [{"stage": stage, "step": step}]}, **kw}


SCENARIOS = [
    {"name": "dp2_stock", **PIPE, "steps": 4, "checkfree": None},
    {"name": "dp2_no_failure", **PIPE, "steps": 4, "checkfree": {"enabled": True}},
    {"name": "dp2_lose1", **PIPE, "steps": 8, "checkfree": _lose(1, FAIL_STEP)},
    {"name": "dp2_zero1_lose1", **PIPE, "steps": 8, "zero": 1, "checkfree": _lose(1, FAIL_STEP)},
]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dp")
    for sc in SCENARIOS:
        if sc["checkfree"] and "failure_injection" in sc["checkfree"]:
            sc["checkfree"]["events_file"] = str(out / f"{sc['name']}.events.jsonl")
    world = STAGES * DP
    run_ranks(WORKER, world, [str(out), json.dumps(SCENARIOS)], timeout_s=600, log_dir=out)
    recs = {sc["name"]: [torch.load(out / f"{sc['name']}-rank{r}.pt", weights_only=False) for r in range(world)]
            for sc in SCENARIOS}
    return out, recs


def _columns(recs):
    """Per data-parallel replica, its ranks' records in stage order."""
    cols = {}
    for rec in recs:
        cols.setdefault(rec["dp_id"], {})[rec["stage"]] = rec
    assert sorted(cols) == list(range(DP)) and all(sorted(c) == list(range(STAGES)) for c in cols.values())
    return [[cols[d][s] for s in range(STAGES)] for d in range(DP)]


def _replicas_identical(recs, key="final_params"):
    for stage in range(STAGES):
        a, b = (col[stage] for col in _columns(recs))
        for name, p in a[key].items():
            assert torch.equal(p, b[key][name]), f"stage {stage} {name} differs between data-parallel replicas"


def test_checkfree_with_data_parallelism_trains_like_the_stock_engine(results):
    _, recs = results
    for r in range(STAGES * DP):
        assert recs["dp2_no_failure"][r]["engine"] == "CheckFreeEngine"
        assert recs["dp2_no_failure"][r]["losses"] == recs["dp2_stock"][r]["losses"]
        for name, p in recs["dp2_stock"][r]["final_params"].items():
            assert torch.equal(p, recs["dp2_no_failure"][r]["final_params"][name])
    # The stage norm is that of the data-parallel-averaged gradient: the same on both replicas of a stage.
    for col_a, col_b in zip(*_columns(recs["dp2_no_failure"])):
        assert col_a["norms"] == col_b["norms"] and all(n > 0 for n in col_a["norms"])


@pytest.mark.parametrize("name", ["dp2_lose1", "dp2_zero1_lose1"])
def test_every_replica_of_the_lost_stage_is_rebuilt_exactly_from_its_column(results, name):
    out, recs = results
    weights = [check_rebuild_exact(col, 1) for col in _columns(recs[name])]
    assert weights[0] == weights[1], "both replicas must weigh their neighbours alike"
    for col in _columns(recs[name]):
        check_survivors_untouched(col, 1)
        assert col[1]["rebuilds"][0]["after"]["opt_state"] == {}
        assert col[1]["lrs"][-1][0] == pytest.approx(1.1 * col[0]["lrs"][-1][0], rel=1e-12)
    _replicas_identical(recs[name])
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
        check_training_continues(col, FAIL_STEP)
