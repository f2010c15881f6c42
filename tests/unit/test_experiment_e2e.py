"""`checkfree experiment` end to end on the shipped smoke config (seconds): CSV, summary, plots, report-only."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from deepspeed_checkfree.cli import main
from deepspeed_checkfree.experiment.config import load_experiment
from deepspeed_checkfree.experiment.report import CSV_COLUMNS

SMOKE = Path(__file__).resolve().parents[2] / "configs" / "experiments" / "smoke.yaml"


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    assert main(["experiment", str(SMOKE), "--out", str(out), "--no-progress"]) == 0
    return out


def test_writes_the_csv_summary_and_plots(smoke_run, capsys):
    out = smoke_run
    for name in ("results.csv", "summary.json", "summary.md", "comparison.png", "loss_vs_iteration.png",
                 "loss_vs_wallclock.png", "config.yaml", "clock.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cfg = load_experiment(SMOKE)
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert list(rows[0]) == CSV_COLUMNS
    names = [s.name for s in cfg.strategies]
    assert sorted({r["strategy"] for r in rows}) == sorted(names)
    assert len(rows) == len(names) * cfg.training.iterations
    for r in rows:
        assert math.isfinite(float(r["train_loss"])) and float(r["wall_clock_s"]) > 0
    # Modelled wall-clock only moves forward; failures so far only grow.
    for name in names:
        mine = [r for r in rows if r["strategy"] == name]
        assert all(float(a["wall_clock_s"]) < float(b["wall_clock_s"]) for a, b in zip(mine, mine[1:]))
        assert all(int(a["failures"]) <= int(b["failures"]) for a, b in zip(mine, mine[1:]))


def test_summary_has_final_losses_time_to_target_and_ratios(smoke_run):
    summary = json.loads((smoke_run / "summary.json").read_text())
    rows = summary["strategies"]
    assert summary["failure_plan"], "the smoke plan has failures"
    assert rows["no_failure"]["failures"] == 0
    assert all(r["failures"] == len(sum((lost for _, lost in summary["failure_plan"]), []))
               for n, r in rows.items() if n != "no_failure")
    assert all(math.isfinite(r["final_val_loss"]) for r in rows.values())
    assert rows["no_failure"]["time_to_target_h"] is not None
    # Redundant computation trains exactly like no_failure, on slower iterations.
    assert rows["redundant"]["final_val_loss"] == rows["no_failure"]["final_val_loss"]
    assert rows["redundant"]["time_to_target_h"] > rows["no_failure"]["time_to_target_h"]
    assert rows["no_failure"]["speedup_vs_redundant"] > 1.0
    assert summary["baselines"] == {"checkpoint": "checkpoint_10", "redundant": "redundant"}
    table = (smoke_run / "summary.md").read_text()
    assert "| strategy | failures | final val loss" in table and "`gradnorm_average`" in table


def test_report_only_rewrites_the_results_from_raw_records(smoke_run):
    (smoke_run / "summary.json").unlink()
    assert main(["experiment", str(SMOKE), "--out", str(smoke_run), "--report-only", "--no-plots"]) == 0
    assert json.loads((smoke_run / "summary.json").read_text())["strategies"]


def test_overrides_and_bad_configs(tmp_path, capsys):
    out = tmp_path / "one"
    assert main(["experiment", str(SMOKE), "--out", str(out), "--no-progress", "--no-plots", "--iterations", "6",
                 "--strategies", "no_failure,copy"]) == 0
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert {r["strategy"] for r in rows} == {"no_failure", "copy"} and len(rows) == 12
    bad = tmp_path / "bad.yaml"
    bad.write_text("experiment:\n  trainig: {}\n")
    assert main(["experiment", str(bad), "--out", str(tmp_path / "x")]) == 2
    assert "Did you mean 'training'" in capsys.readouterr().err
