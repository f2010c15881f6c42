"""Sweeps over failure rates and seeds (the paper's Table 2 and ablation): the sweep section, the paper's clock,
rates and seeds applied per run, aggregation over seeds with bounds for targets never reached, and a tiny sweep
end to end (seconds)."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from deepspeed_checkfree.cli import main
from deepspeed_checkfree.errors import ConfigError
from deepspeed_checkfree.experiment import aggregate
from deepspeed_checkfree.experiment.clock import timeline
from deepspeed_checkfree.experiment.config import parse_experiment
from deepspeed_checkfree.experiment.runner import measure_clock
from deepspeed_checkfree.experiment.strategies import Record, StrategyResult
from deepspeed_checkfree.experiment.sweep import jobs, load_sweep, parse_seeds, parse_sweep

REPO = Path(__file__).resolve().parents[2]
TABLE2 = REPO / "configs" / "experiments" / "paper_table2.yaml"
ABLATION = REPO / "configs" / "experiments" / "paper_ablation.yaml"
SMOKE = REPO / "configs" / "experiments" / "smoke.yaml"


def _tiny(**sweep):
    base = yaml.safe_load(SMOKE.read_text())["experiment"]
    base["training"] = {**base["training"], "iterations": 12, "eval_every": 4}
    base["failures"] = {"stages": "middle"}
    base["strategies"] = ["no_failure", "gradnorm_average", "checkpoint_5", "redundant"]
    base["wall_clock"] = {"iteration_time_s": 10.0, "stage_bytes": 1.0e6, "checkfree_recovery_s": 3.0}
    section = {"seeds": [0, 1], "rates": [{"hourly_rate": 0.5, "probability": 0.05},
                                          {"hourly_rate": 0.9, "probability": 0.15}]}
    section.update(sweep)
    return {"sweep": section, "experiment": base}


# ---------------------------------------------------------------------------------------------------------------
# The shipped reproductions
# ---------------------------------------------------------------------------------------------------------------

def test_table2_runs_three_rates_with_the_papers_probabilities_and_at_least_three_seeds():
    sweep = load_sweep(TABLE2)
    assert len(sweep.section.seeds) >= 3
    p = {r.key: r.probability for r in sweep.section.rates}
    assert p == {"5": 0.0009, "10": 0.002, "16": 0.004}  # gensyn-ai/CheckFree 500M_config.json
    names = [s.name for s in sweep.runs[0].cfg.strategies]
    assert {"no_failure", "checkfree_plus_no_failure", "gradnorm_average", "checkfree_plus", "redundant"} <= set(names)
    assert [s.every for s in sweep.runs[0].cfg.strategies if s.kind == "checkpoint"] == [100]
    for run in sweep.runs:
        assert run.cfg.failure_probability() == p[run.rate.key]


def test_table2_uses_the_papers_clock():
    sweep = load_sweep(TABLE2)
    by_rate = {}
    for run in sweep.runs:
        by_rate.setdefault(run.rate.key, measure_clock(run.cfg))
    c5, c16 = by_rate["5"], by_rate["16"]
    assert c5.iteration_seconds("checkfree") == 91.32 and c16.iteration_seconds("checkfree") == 92.12
    assert c5.iteration_seconds("checkpoint") == 91.35 and c16.iteration_seconds("checkpoint") == 92.14
    assert c5.iteration_seconds("redundant") == c16.iteration_seconds("redundant") == 151.04
    assert c5.recovery_seconds("checkfree", 2) == 30.0 and c5.recovery_seconds("redundant") == 0.0
    # Checkpointing: restart, then the stage's weights and Adam moments over 0.1 GiB/s (rolled-back work is
    # re-executed iterations, counted by the timeline).
    assert c5.recovery_seconds("checkpoint") == pytest.approx(30.0 + 3 * 3.33e8 / (0.1 * 1024 ** 3))
    assert c5.checkpoint_seconds() == 0.0  # in the 91.35 s iteration


def test_ablation_is_16_percent_edges_never_fail_four_rebuilds_three_seeds():
    sweep = load_sweep(ABLATION)
    assert [r.key for r in sweep.section.rates] == ["16"] and len(sweep.section.seeds) >= 3
    cfg = sweep.runs[0].cfg
    assert cfg.failure_probability() == 0.004
    assert 0 not in cfg.failure_stages() and cfg.model.num_stages - 1 not in cfg.failure_stages()
    assert {s.strategy for s in cfg.strategies if s.kind == "checkfree"} == {
        "random", "copy", "uniform_average", "gradnorm_average"}


# ---------------------------------------------------------------------------------------------------------------
# Rates, seeds and bad input
# ---------------------------------------------------------------------------------------------------------------

def test_each_seed_sets_initialisation_data_and_plan_and_failure_free_runs_train_once_per_seed():
    sweep = parse_sweep(_tiny())
    assert len(sweep.runs) == 4
    run = next(r for r in sweep.runs if r.seed == 1)
    assert run.cfg.training.seed == run.cfg.data.seed == run.cfg.failures.seed == 1
    plans = {(r.rate.key, r.seed): r.cfg.failure_plan().schedule(range(200)) for r in sweep.runs}
    assert plans[("50", 0)] != plans[("50", 1)]
    todo = jobs(sweep)
    assert sum(1 for _, n in todo if n == "no_failure") == 2  # once per seed, not per rate
    assert sum(1 for _, n in todo if n == "gradnorm_average") == 4


def test_a_rate_without_probability_uses_the_documented_conversion():
    data = _tiny(rates=[{"hourly_rate": 0.1}])
    data["experiment"]["failures"]["iteration_time_s"] = 72.0
    cfg = parse_sweep(data).runs[0].cfg
    assert cfg.failure_probability() == pytest.approx(1 - 0.9 ** (72 / 3600))


def test_overrides_select_seeds_and_rates():
    sweep = parse_sweep(_tiny(), seeds=parse_seeds("3-4,7"), rates=["90"])
    assert [(r.rate.key, r.seed) for r in sweep.runs] == [("90", 3), ("90", 4), ("90", 7)]
    assert parse_seeds("0,1,2") == [0, 1, 2]


@pytest.mark.parametrize("mutate, words", [
    (lambda d: d.__setitem__("sweep", {**d["sweep"], "seed": [1]}), "Did you mean 'seeds'"),
    (lambda d: d["sweep"]["rates"].append({"hourly_rate": 0.5}), "each hourly_rate must appear once"),
    (lambda d: d["sweep"].__setitem__("seeds", [1, 1]), "seeds must be distinct"),
    (lambda d: d["experiment"]["wall_clock"].__setitem__("strategy_iteration_time_s", {"checkpointing": 9.0}),
     "Did you mean 'checkpoint'"),
    (lambda d: d["sweep"]["rates"][0].__setitem__("wall_clock", {"iteration_tme_s": 9.0}),
     "Did you mean 'iteration_time_s'"),
    (lambda d: d["sweep"]["rates"][0].__setitem__("paper", {"hours": {"checkfree": 1.0}}),
     "does not run"),
    (lambda d: d["experiment"].__setitem__("strategies", ["no_failure", "gradnorm_avg"]),
     "Did you mean 'gradnorm_average'"),
])
def test_bad_sweeps_are_rejected_with_the_rule(mutate, words):
    data = _tiny()
    mutate(data)
    with pytest.raises(ConfigError, match=words):
        parse_sweep(data)


def test_unknown_rates_and_bad_seeds_are_errors():
    with pytest.raises(ConfigError, match=r"--rates \['20'\] are not rates.*\['50', '90'\]"):
        parse_sweep(_tiny(), rates=["20"])
    with pytest.raises(ConfigError, match="integers separated by commas"):
        parse_seeds("a,b")


def test_seeds_and_rates_need_a_sweep_file(tmp_path, capsys):
    assert main(["experiment", str(SMOKE), "--out", str(tmp_path / "x"), "--seeds", "0,1"]) == 2
    assert "need a 'sweep:' section" in capsys.readouterr().err


def test_unknown_top_level_keys_are_rejected(tmp_path):
    from deepspeed_checkfree.experiment.config import load_experiment
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**_tiny(), "sweeep": {}}))
    with pytest.raises(ConfigError, match="unknown top-level keys"):
        load_experiment(path)


# ---------------------------------------------------------------------------------------------------------------
# Clock and aggregation arithmetic
# ---------------------------------------------------------------------------------------------------------------

def test_stated_iteration_times_and_flat_recovery_replace_the_modelled_ones():
    cfg = parse_experiment({"model": {"num_stages": 6}, "strategies": ["checkfree_plus_no_failure", "redundant"],
                            "report": {"target_loss": 1.0},
                            "wall_clock": {"iteration_time_s": 10.0, "stage_bytes": 1e6,
                                           "strategy_iteration_time_s": {"checkfree_plus": 11.0, "redundant": 20.0},
                                           "checkfree_recovery_s": 4.0, "redundant_recovery_s": 0.0}})
    c = measure_clock(cfg)
    records = [{"lost": ()}, {"lost": (2,), "weight_copies": 2}, {"lost": ()}]
    assert timeline(records, "checkfree", "checkfree", c) == pytest.approx([10, 24, 34])
    assert timeline(records, "checkfree", "checkfree_plus", c) == pytest.approx([11, 26, 37])
    assert timeline(records, "no_failure", "checkfree_plus", c) == pytest.approx([11, 22, 33])  # never recovers
    assert timeline(records, "redundant", "checkfree", c) == pytest.approx([20, 40, 60])


def test_stats_and_ratio_bounds():
    s = aggregate.stats([1.0, 2.0, 3.0])
    assert (s["mean"], s["std"], s["min"], s["max"], s["n"]) == (2.0, 1.0, 1.0, 3.0, 3)
    assert aggregate.stats([5.0])["std"] == 0.0

    def row(t, run=10.0):
        return {"time_to_target_h": t, "modelled_hours": run}
    exact = aggregate.ratio_stats([(row(2.0), row(4.0)), (row(3.0), row(4.0))])
    assert exact["mean"] == pytest.approx(0.625) and exact["bound"] is None
    assert aggregate.ratio_stats([(row(None), row(4.0))])["bound"] == ">="  # numerator never got there
    low = aggregate.ratio_stats([(row(2.0), row(None, 8.0))])
    assert low["bound"] == "<=" and low["mean"] == pytest.approx(0.25)
    assert aggregate.ratio_stats([(row(None), row(None))])["bound"] == "n/a"
    assert aggregate.ratio_stats([(row(None), row(4.0)), (row(2.0), row(None))])["bound"] == "n/a"


def _run_summary(seed, rows):
    strategies = {}
    for name, (kind, loss, t) in rows.items():
        strategies[name] = {"label": name, "kind": kind, "failures": 2, "final_val_loss": loss,
                            "time_to_target_h": t, "modelled_hours": 10.0, "stopped": None}
    return {"strategies": strategies, "target_loss": 1.5, "target_rule": "rule"}


def test_rate_summary_marks_targets_not_reached_and_missing_results():
    sweep = parse_sweep(_tiny())
    rate = sweep.section.rates[0]
    runs = [r for r in sweep.runs if r.rate.key == rate.key]
    rows0 = {"no_failure": ("no_failure", 1.0, 4.0), "gradnorm_average": ("checkfree", 1.1, 5.0),
             "checkpoint_5": ("checkpoint", 1.2, None), "redundant": ("redundant", 1.0, 6.0)}
    rows1 = {k: v for k, v in rows0.items() if k != "redundant"}
    out = aggregate.rate_summary(rate, [(runs[0], _run_summary(0, rows0)), (runs[1], _run_summary(1, rows1))],
                                 [s.name for s in runs[0].cfg.strategies])
    ck = out["strategies"]["checkpoint_5"]
    assert ck["reached"] == 0 and ck["seeds"] == 2 and ck["time_to_target_h"]["mean"] == 10.0
    assert out["strategies"]["redundant"]["missing_seeds"] == [1]
    cf = out["strategies"]["gradnorm_average"]
    assert cf["perplexity"]["mean"] == pytest.approx(math.exp(1.1))
    assert cf["perplexity_excess_pct"]["mean"] == pytest.approx(100 * (math.exp(0.1) - 1))
    ratios = {(r["numerator"], r["denominator"]): r["ours"] for r in out["time_ratios"]}
    assert ratios[("gradnorm_average", "checkpoint_5")]["bound"] == "<="
    assert ratios[("gradnorm_average", "redundant")]["n"] == 1  # only the seed that has it
    md = aggregate.markdown({"name": "x", "seeds": [0, 1], "seed_sets": ["training"], "iterations": 12,
                             "failure_stages": [1, 2], "rates": [out]})
    assert "not reached in 2 of 2 seeds" in md and "no result for seeds [1]" in md
    assert "| `gradnorm_average` / `checkpoint_5` | <= 0.50" in md
    assert md.count("`checkpoint_5`)") == 1  # every strategy has its row


def test_results_that_disagree_with_the_seeds_failure_plan_are_an_error():
    run = parse_sweep(_tiny(rates=[{"hourly_rate": 0.9, "probability": 0.3}])).runs[0]
    plan = run.cfg.failure_plan().schedule(range(12))
    assert plan
    right = StrategyResult("gradnorm_average", [Record(i, i, 1.0, lost=dict(plan).get(i, ())) for i in range(12)])
    aggregate.check_failure_plans(run, {"gradnorm_average": right})
    wrong = StrategyResult("gradnorm_average", [Record(i, i, 1.0) for i in range(12)])
    with pytest.raises(ConfigError, match="disagree on the failure plan"):
        aggregate.check_failure_plans(run, {"gradnorm_average": wrong})


def test_band_is_mean_min_max_on_the_common_range():
    grid, mean, lo, hi = aggregate.band([([0, 10], [2.0, 1.0]), ([0, 5, 12], [4.0, 3.0, 1.0])], points=3)
    assert grid == [0, 5, 10]
    assert mean == pytest.approx([3.0, 2.25, (1.0 + 3.0 - 2.0 * 5 / 7) / 2])
    assert lo[0] == 2.0 and hi[0] == 4.0


# ---------------------------------------------------------------------------------------------------------------
# End to end (in process)
# ---------------------------------------------------------------------------------------------------------------

def test_a_tiny_sweep_writes_the_aggregated_summary_and_report_only_rewrites_it(tmp_path, capsys):
    cfg_path = tmp_path / "sweep.yaml"
    cfg_path.write_text(yaml.safe_dump(_tiny()))
    out = tmp_path / "out"
    assert main(["experiment", str(cfg_path), "--out", str(out), "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [r["key"] for r in summary["rates"]] == ["50", "90"]
    for rate in summary["rates"]:
        assert list(rate["strategies"]) == ["no_failure", "gradnorm_average", "checkpoint_5", "redundant"]
        assert all(r["seeds"] == 2 for r in rate["strategies"].values())
        nf = rate["strategies"]["no_failure"]
        assert nf["failures"]["mean"] == 0 and nf["final_val_loss"]["n"] == 2
        # Redundant computation trains exactly like no_failure.
        assert rate["strategies"]["redundant"]["final_val_loss"]["values"] == nf["final_val_loss"]["values"]
    assert summary["rates"][1]["strategies"]["gradnorm_average"]["failures"]["mean"] > 0
    rows = list(csv.DictReader(open(out / "evaluations.csv")))
    assert len(rows) == 2 * 2 * 4 * 3  # rates x seeds x strategies x evaluations
    for name in ("summary.md", "loss_vs_hours.png", "loss_vs_iteration.png"):
        assert (out / name).stat().st_size > 0
    assert (out / "runs" / "rate_90pct_seed1" / "summary.md").is_file()
    md = (out / "summary.md").read_text()
    (out / "summary.md").unlink()
    assert main(["experiment", str(cfg_path), "--out", str(out), "--report-only", "--no-plots"]) == 0
    assert (out / "summary.md").read_text() == md


def test_an_interrupted_sweep_trains_only_what_is_missing(tmp_path, monkeypatch):
    from deepspeed_checkfree.experiment import runner
    from deepspeed_checkfree.experiment.sweep import run_sweep

    data = _tiny(seeds=[0], rates=[{"hourly_rate": 0.9, "probability": 0.15}])
    data["experiment"]["strategies"] = ["no_failure", "gradnorm_average"]
    data["experiment"]["training"]["iterations"] = 4
    out = tmp_path / "out"
    run_sweep(parse_sweep(data), out, progress=False, plots=False)
    raw = out / "runs" / "rate_90pct_seed0" / "raw"
    (raw / "gradnorm_average.json").unlink()
    trained = []
    real = runner.simulate_strategy
    monkeypatch.setattr(runner, "simulate_strategy", lambda cfg, name, p=None: trained.append(name) or real(cfg, name, p))
    run_sweep(parse_sweep(data), out, progress=False, plots=False)
    assert trained == ["gradnorm_average"] and (raw / "gradnorm_average.json").is_file()
    # A changed run config invalidates that run's raw results.
    data["experiment"]["training"]["lr"] = 1e-3
    trained.clear()
    run_sweep(parse_sweep(data), out, progress=False, plots=False)
    assert sorted(trained) == ["gradnorm_average", "no_failure"]
