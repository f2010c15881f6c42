"""CheckFree in the real DeepSpeed PipelineEngine: 4 real ranks on gloo, injected stage loss, exact checks.

All scenarios run in one launch (one process group, one engine per scenario) to keep the suite's wall time low;
each test then checks one behaviour on what the ranks saved.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from deepspeed_checkfree.events import read_events

from .checks import check_rebuild_exact, check_survivors_untouched, check_training_continues
from .spawn import run_ranks

pytestmark = pytest.mark.distributed

WORKER = Path(__file__).with_name("pipe_scenarios.py")


def _cf(**kw):
    return {"enabled": True, **kw}


def _lose(stage, step, **kw):
    return _cf(failure_injection={"at": [{"stage": stage, "step": step}]}, **kw)


SCENARIOS = [
    {"name": "stock", "steps": 6, "checkfree": None},
    {"name": "disabled", "steps": 6, "checkfree": {"enabled": False, "lr_boost": 2.0}},
    {"name": "enabled_no_failure", "steps": 6, "checkfree": _cf()},
    {"name": "fp32_lose2", "steps": 12, "checkfree": _lose(2, 4)},
    {"name": "fp32_lose1_boost12", "steps": 9, "checkfree": _lose(1, 4, lr_boost=1.2, norm="squared")},
    {"name": "bf16_lose2", "steps": 9, "precision": "bf16", "checkfree": _lose(2, 4)},
    {"name": "zero1_lose1", "steps": 8, "zero": 1, "checkfree": _lose(1, 3)},
    {"name": "lose_twice", "steps": 8,
     "checkfree": _cf(failure_injection={"at": [{"stage": 1, "step": 2}, {"stage": 1, "step": 5}]})},
    {"name": "lose_at_step0", "steps": 4, "checkfree": _lose(2, 0)},
    {"name": "uniform_lose1", "steps": 5, "checkfree": _lose(1, 2, strategy="uniform_average")},
    {"name": "copy_lose2", "steps": 5, "checkfree": _lose(2, 2, strategy="copy")},
    {"name": "random_lose1", "steps": 5, "checkfree": _lose(1, 2, strategy="random")},
    {"name": "two_stages", "num_stages": 2, "steps": 1, "checkfree": _cf(), "expect_error": True},
    {"name": "mismatched_layers", "model": "mismatched", "steps": 1, "checkfree": _cf(), "expect_error": True},
    {"name": "plan_names_missing_stage", "steps": 1, "checkfree": _lose(5, 1), "expect_error": True},
]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("engine")
    for sc in SCENARIOS:
        if sc["checkfree"] and sc["checkfree"].get("enabled"):
            sc["checkfree"]["events_file"] = str(out / f"{sc['name']}.events.jsonl")
    run_ranks(WORKER, 4, [str(out), json.dumps(SCENARIOS)], timeout_s=600, log_dir=out)
    recs = {sc["name"]: [torch.load(out / f"{sc['name']}-rank{r}.pt", weights_only=False) for r in range(4)]
            for sc in SCENARIOS}
    return out, recs


def test_engine_selection_follows_the_config(results):
    _, recs = results
    assert recs["stock"][0]["engine"] == "PipelineEngine"
    assert recs["disabled"][0]["engine"] == "PipelineEngine"
    assert recs["enabled_no_failure"][0]["engine"] == "CheckFreeEngine"


def test_checkfree_without_failures_trains_bit_identically_to_the_stock_engine(results):
    _, recs = results
    for r in range(4):
        assert recs["enabled_no_failure"][r]["losses"] == recs["stock"][r]["losses"]
        assert recs["disabled"][r]["losses"] == recs["stock"][r]["losses"]
        for name, p in recs["stock"][r]["final_params"].items():
            assert torch.equal(p, recs["enabled_no_failure"][r]["final_params"][name])


def test_every_stage_records_its_own_gradient_norm(results):
    _, recs = results
    norms = [recs["enabled_no_failure"][r]["norms"][-1] for r in range(4)]
    assert all(n is not None and math.isfinite(n) and n > 0 for n in norms), norms
    # DeepSpeed's own fp32 clip norm is stage 0's on every rank; ours differ per stage.
    assert len(set(norms)) == 4, norms


def test_middle_stage_2_is_rebuilt_as_the_gradnorm_blend_of_stages_1_and_3(results):
    out, recs = results
    weights = check_rebuild_exact(recs["fp32_lose2"], 2)
    check_survivors_untouched(recs["fp32_lose2"], 2)
    events = read_events(str(out / "fp32_lose2.events.jsonl"))
    assert [e["event"] for e in events] == ["stage_lost", "recovery"]
    rec = events[1]
    assert rec["stage"] == 2 and rec["step"] == 4 and rec["sources"] == [1, 3]
    assert rec["strategy"] == "gradnorm_average" and rec["fallback"] is None
    assert rec["weights"] == pytest.approx([w / sum(weights) for w in weights])
    assert rec["duration_s"] > 0 and rec["bytes_received"] > 0


def test_rebuilt_stage_has_fresh_optimizer_state_and_boosted_lr(results):
    _, recs = results
    rec = recs["fp32_lose2"]
    assert rec[2]["rebuilds"][0]["after"]["opt_state"] == {}
    assert rec[1]["rebuilds"][0]["after"]["opt_state"], "survivor keeps its Adam moments"
    for step in range(4, 12):  # the WarmupLR scheduler rewrites the LR every step; the boost must stay
        assert rec[2]["lrs"][step][0] == pytest.approx(1.1 * rec[1]["lrs"][step][0], rel=1e-12)
    for step in range(4):
        assert rec[2]["lrs"][step] == rec[1]["lrs"][step]


def test_training_continues_with_falling_loss_after_the_rebuild(results):
    _, recs = results
    check_training_continues(recs["fp32_lose2"], 4)


def test_stage_1_rebuild_with_squared_norms_and_lr_boost_1_2(results):
    _, recs = results
    rec = recs["fp32_lose1_boost12"]
    check_rebuild_exact(rec, 1, norm="squared")
    check_survivors_untouched(rec, 1)
    assert rec[1]["lrs"][-1][0] == pytest.approx(1.2 * rec[2]["lrs"][-1][0], rel=1e-12)
    check_training_continues(rec, 4)


def test_bf16_rebuild_is_exact_and_refreshes_fp32_master_weights(results):
    _, recs = results
    rec = recs["bf16_lose2"]
    check_rebuild_exact(rec, 2)
    check_survivors_untouched(rec, 2)
    assert next(iter(rec[2]["final_params"].values())).dtype == torch.bfloat16
    # Had the stale (NaN-wiped) fp32 masters survived, the next step would have written NaN into the weights.
    assert all(torch.isfinite(p.float()).all() for p in rec[2]["final_params"].values())
    check_training_continues(rec, 4)


def test_zero1_rebuild_is_exact(results):
    _, recs = results
    rec = recs["zero1_lose1"]
    check_rebuild_exact(rec, 1)
    check_survivors_untouched(rec, 1)
    assert all(torch.isfinite(p).all() for p in rec[1]["final_params"].values())
    assert all(n is not None and n > 0 for n in rec[0]["norms"])
    check_training_continues(rec, 3)


def test_second_failure_of_the_same_stage_does_not_compound_the_boost(results):
    _, recs = results
    rec = recs["lose_twice"]
    assert len(rec[1]["rebuilds"]) == 2
    assert rec[1]["lrs"][-1][0] == pytest.approx(1.1 * rec[0]["lrs"][-1][0], rel=1e-12)


def test_failure_before_any_step_falls_back_to_uniform_and_says_so(results):
    out, recs = results
    check_rebuild_exact(recs["lose_at_step0"], 2, strategy="uniform_average")
    rec = read_events(str(out / "lose_at_step0.events.jsonl"))[-1]
    assert rec["event"] == "recovery" and rec["weights"] == [0.5, 0.5]
    assert "not measured yet" in rec["fallback"] and "uniform_average" in rec["fallback"]


@pytest.mark.parametrize("name,target,strategy", [("uniform_lose1", 1, "uniform_average"),
                                                  ("copy_lose2", 2, "copy")])
def test_ablation_strategies_rebuild_exactly(results, name, target, strategy):
    _, recs = results
    check_rebuild_exact(recs[name], target, strategy=strategy)
    check_survivors_untouched(recs[name], target)


def test_random_strategy_reinitialises_without_neighbour_weights(results):
    _, recs = results
    rec = recs["random_lose1"]
    after = rec[1]["rebuilds"][0]["after"]["params"]
    before = rec[1]["rebuilds"][0]["before"]["params"]
    assert all(torch.isfinite(p).all() for p in after.values())
    assert any(not torch.equal(after[n], before[n]) for n in after)
    assert all(math.isfinite(l) for l in rec[0]["losses"])


@pytest.mark.parametrize("name,error,pattern", [
    ("two_stages", "ConfigError", r"needs num_stages >= 3; the topology has num_stages=2"),
    ("mismatched_layers", "RecoveryError",
     r"layer \d+ \(Block\) of stage \d cannot be rebuilt from layer \d+ of stage \d: parameters .*fc\.weight"),
    ("plan_names_missing_stage", "ConfigError", r"names stage 5, but the pipeline has stages 0\.\.3"),
])
def test_bad_setups_fail_with_a_clear_error_before_training(results, name, error, pattern):
    _, recs = results
    for r in range(4):
        assert recs[name][r]["error"] == error
        assert re.search(pattern, recs[name][r]["message"]), recs[name][r]["message"]
