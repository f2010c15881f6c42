"""The experiment file: schema, strategy names, failure plans (seeded, identical for every strategy, rates
converted as documented), and the wall-clock model's arithmetic."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from deepspeed_checkfree.errors import ConfigError
from deepspeed_checkfree.experiment.clock import GIB, ClockModel, pipelined_iteration, timeline
from deepspeed_checkfree.experiment.config import (DEFAULT_STRATEGIES, load_experiment, parse_experiment,
                                                   select_strategies)
from deepspeed_checkfree.core.failures import hourly_rate_to_probability

REPO = Path(__file__).resolve().parents[2]
EXPERIMENTS = sorted((REPO / "configs" / "experiments").glob("*.yaml"))


def _cfg(**sections):
    base = {"model": {"num_stages": 6}, "training": {"iterations": 2000}}
    for k, v in sections.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
    return parse_experiment(base)


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_shipped_experiment_configs_load(path):
    cfg = load_experiment(path)
    assert cfg.strategies and cfg.failure_plan().num_stages == cfg.model.num_stages


def test_there_is_a_cpu_reproduction_and_the_papers_three_settings():
    names = {p.stem for p in EXPERIMENTS}
    assert {"cpu_reproduction", "paper_124m", "paper_500m", "paper_1_5b"} <= names


def test_default_strategies_are_the_papers_comparison():
    cfg = _cfg()
    assert [s.name for s in cfg.strategies] == DEFAULT_STRATEGIES
    kinds = {s.name: (s.kind, s.mode, s.strategy) for s in cfg.strategies}
    assert kinds["gradnorm_average"] == ("checkfree", "checkfree", "gradnorm_average")
    assert kinds["checkfree_plus"] == ("checkfree", "checkfree_plus", "gradnorm_average")
    assert kinds["copy"][2] == "copy" and kinds["random"][2] == "random"
    ckpt = next(s for s in cfg.strategies if s.kind == "checkpoint")
    assert ckpt.every == 50


def test_strategy_shorthands_and_mappings_expand():
    cfg = _cfg(strategies=["no_failure", "checkpoint_10", {"kind": "checkpoint", "every": 100},
                           {"kind": "checkfree", "mode": "checkfree_plus", "strategy": "copy"}])
    assert [s.name for s in cfg.strategies] == ["no_failure", "checkpoint_10", "checkpoint_100",
                                                "checkfree_plus_copy"]
    assert [s.every for s in cfg.strategies[1:3]] == [10, 100]


@pytest.mark.parametrize("bad, words", [
    ({"modle": {}}, ["unknown key 'modle'", "Did you mean 'model'"]),
    ({"training": {"iteratons": 5}}, ["Did you mean 'iterations'"]),
    ({"strategies": ["gradnorm_avg"]}, ["unknown strategy", "gradnorm_average"]),
    ({"strategies": ["copy", "copy"]}, ["unique", "copy"]),
    ({"failures": {"hourly_rate": 0.1}}, ["iteration time", "failures.iteration_time_s"]),
    ({"failures": {"probability": 0.1, "hourly_rate": 0.1}}, ["not both"]),
    ({"failures": {"stages": "all", "probability": 0.01}}, ["edge stage", "failures.stages: middle"]),
    ({"failures": {"at": [{"stage": 9, "iteration": 1}]}}, ["stage 9", "0..5"]),
    ({"model": {"num_stages": 3}, "strategies": ["checkfree_plus", "no_failure"]}, ["num_stages >= 4"]),
    ({"model": {"d_model": 60, "n_heads": 4}}, ["even size"]),
    ({"strategies": ["gradnorm_average"]}, ["target_loss", "no_failure"]),
])
def test_bad_experiments_are_rejected_with_the_rule_and_the_fix(bad, words):
    with pytest.raises(ConfigError) as err:
        _cfg(**bad)
    for w in words:
        assert w in str(err.value)


def test_file_without_the_experiment_key_is_rejected(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("enabled: true\n")
    with pytest.raises(ConfigError, match="top-level 'experiment:'"):
        load_experiment(p)
    with pytest.raises(ConfigError, match="cannot read"):
        load_experiment(tmp_path / "missing.yaml")


def test_select_strategies_keeps_file_order_and_rejects_unknown_names():
    cfg = select_strategies(_cfg(), ["random", "no_failure"])
    assert [s.name for s in cfg.strategies] == ["no_failure", "random"]
    with pytest.raises(ConfigError, match="does not define"):
        select_strategies(_cfg(), ["nope"])


# ---------------------------------------------------------------------------------------------------------------
# Failure plans
# ---------------------------------------------------------------------------------------------------------------


def test_failure_plan_is_deterministic_per_seed_and_differs_between_seeds():
    a = _cfg(failures={"probability": 0.01, "seed": 5}).failure_plan().schedule(range(2000))
    b = _cfg(failures={"probability": 0.01, "seed": 5}).failure_plan().schedule(range(2000))
    c = _cfg(failures={"probability": 0.01, "seed": 6}).failure_plan().schedule(range(2000))
    assert a == b and a != c
    assert 40 <= sum(len(lost) for _, lost in a) <= 120  # 4 middle stages x 2000 x 0.01 = 80 expected
    assert all(set(lost) <= {1, 2, 3, 4} for _, lost in a)


def test_failure_plan_does_not_depend_on_the_strategies_or_the_evaluation_order():
    one = _cfg(failures={"probability": 0.01, "seed": 5}, strategies=["no_failure", "copy"]).failure_plan()
    other = _cfg(failures={"probability": 0.01, "seed": 5},
                 strategies=["no_failure", "checkpoint_10", "redundant", "random"]).failure_plan()
    forward = [one.failures_at(i) for i in range(500)]
    backward = [other.failures_at(i) for i in reversed(range(500))][::-1]
    assert forward == backward


def test_hourly_rates_convert_as_documented():
    cfg = _cfg(failures={"hourly_rate": 0.10, "iteration_time_s": 20.0})
    assert cfg.failure_probability() == pytest.approx(1 - 0.9 ** (20 / 3600))
    # The paper's hand mapping: 10%/h -> 0.0006 at the 124M model's ~20 s iterations.
    assert cfg.failure_probability() == pytest.approx(0.0006, rel=0.05)
    # 500M: 10%/h -> 0.002 at 60-90 s iterations.
    assert hourly_rate_to_probability(0.10, 75.0) == pytest.approx(0.002, rel=0.15)
    # Without failures.iteration_time_s the wall clock's given iteration time is used.
    via_clock = _cfg(failures={"hourly_rate": 0.10}, wall_clock={"iteration_time_s": 20.0})
    assert via_clock.failure_probability() == cfg.failure_probability()


def test_explicit_failures_are_added_to_the_random_ones():
    cfg = _cfg(failures={"at": [{"stage": 2, "iteration": 7}, {"stage": 3, "iteration": 7}]})
    assert cfg.failure_plan().schedule(range(2000)) == [(7, (2, 3))]


# ---------------------------------------------------------------------------------------------------------------
# Wall-clock model
# ---------------------------------------------------------------------------------------------------------------


def _clock(**kw):
    base = dict(iteration_s=10.0, compute_s=6.0, stage_bytes=GIB / 10, optimizer_state_factor=2.0,
                transfer_bytes_s=GIB / 10, checkpoint_bytes_s=GIB / 10, restart_s=5.0)
    return ClockModel(**{**base, **kw})


def test_iteration_costs_per_strategy():
    c = _clock()
    assert c.iteration_seconds("no_failure") == c.iteration_seconds("checkpoint") == 10.0
    assert c.iteration_seconds("redundant") == pytest.approx(10.0 + 6.0 / 3)  # one extra forward
    assert c.iteration_seconds("checkfree", "checkfree_plus") == 10.0
    assert _clock(plus_slowdown=1.03).iteration_seconds("checkfree", "checkfree_plus") == pytest.approx(10.3)


def test_recovery_and_checkpoint_costs():
    c = _clock()  # one stage = 1 s over either link; weights + Adam moments = 3 s
    assert c.checkpoint_seconds() == pytest.approx(3.0)
    assert _clock(checkpoint_blocking=False).checkpoint_seconds() == 0.0
    # A checkpoint that does not block still takes its write time (what the summary reports).
    assert _clock(checkpoint_blocking=False).checkpoint_write_seconds() == pytest.approx(3.0)
    assert c.recovery_seconds("checkpoint") == pytest.approx(5.0 + 3.0)
    assert c.recovery_seconds("redundant") == pytest.approx(5.0 + 3.0)
    assert c.recovery_seconds("checkfree", 2) == pytest.approx(5.0 + 2.0)  # two neighbours' weights
    assert c.recovery_seconds("checkfree", 1) == pytest.approx(5.0 + 1.0)  # copy
    assert c.recovery_seconds("checkfree", 0) == pytest.approx(5.0)  # random


def test_timeline_adds_iterations_saves_and_recoveries():
    c = _clock()
    records = [{"lost": ()}, {"lost": (), "checkpoint_saved": True}, {"lost": (2,)}, {"lost": ()}]
    assert timeline(records, "checkpoint", "checkfree", c) == pytest.approx([10, 23, 41, 51])
    records = [{"lost": ()}, {"lost": (2,), "weight_copies": 2}]
    assert timeline(records, "checkfree", "checkfree", c) == pytest.approx([10, 27])


def test_pipelined_iteration_from_a_sequential_measurement():
    parts = pipelined_iteration(sequential_step_s=1.6, num_stages=4, micro_batches=4, activation_bytes=GIB / 100,
                                stage_bytes=GIB / 10, activation_bytes_s=GIB / 10, gradient_bytes_s=GIB / 5,
                                data_parallel=2)
    assert parts["compute_s"] == pytest.approx((4 + 4 - 1) * 1.6 / 16)
    assert parts["activation_s"] == pytest.approx(2 * (4 + 4 - 2) * 0.1)
    assert parts["gradient_s"] == pytest.approx(2 * 0.5 * 0.5)
    assert parts["iteration_s"] == pytest.approx(sum(v for k, v in parts.items() if k != "iteration_s"))
    assert math.isclose(pipelined_iteration(1.0, 4, 4, 0, 0, 1, 1, 1)["gradient_s"], 0.0)
