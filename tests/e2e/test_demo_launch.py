"""The demo end to end: launch/demo.sh starts 4 ranks with the stock deepspeed launcher, a stage is lost at a
planned step, rebuilt from its neighbours, and training runs to the last step."""
from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from deepspeed_checkfree.events import read_events

from ..distributed.spawn import REPO, cpu_env, free_port

pytestmark = pytest.mark.e2e

STEPS = 14
FAIL_STEP = 6


def run_demo(tmp_path: Path, config_name: str, lost_stage: int) -> Path:
    cfg = json.loads((REPO / "configs" / config_name).read_text())
    cfg["checkfree"]["failure_injection"] = {"at": [{"stage": lost_stage, "step": FAIL_STEP}]}
    cfg["scheduler"]["params"]["warmup_num_steps"] = 3
    config = tmp_path / config_name
    config.write_text(json.dumps(cfg))
    out = tmp_path / "out"
    env = cpu_env(dict(CONFIG=str(config), STEPS=str(STEPS), OUT=str(out), MASTER_PORT=str(free_port()),
                       PYTHON_BIN=sys.executable, TIMEOUT_S="300"))
    proc = subprocess.run(["bash", str(REPO / "launch" / "demo.sh")], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=360)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "done: 14 steps" in proc.stdout
    return out


def check_run(out: Path, lost_stage: int, sources: list, strategy: str) -> None:
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == list(range(STEPS))
    losses = [float(r["loss"]) for r in rows]
    assert all(math.isfinite(l) for l in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[FAIL_STEP:FAIL_STEP + 3]) / 3 < sum(losses[:3]) / 3, losses
    events = read_events(str(out / "events.jsonl"))
    assert [e["event"] for e in events] == ["stage_lost", "recovery"]
    rec = events[1]
    assert (rec["stage"], rec["step"], rec["sources"], rec["strategy"]) == (lost_stage, FAIL_STEP, sources, strategy)
    assert rec["lr_after"][0] > 0 and rec["duration_s"] > 0


def test_demo_loses_middle_stage_and_keeps_training(tmp_path):
    out = run_demo(tmp_path, "checkfree_middle.json", 2)
    check_run(out, 2, [1, 3], "gradnorm_average")


def test_demo_loses_first_stage_under_checkfree_plus(tmp_path):
    out = run_demo(tmp_path, "checkfree_plus_first.json", 0)
    check_run(out, 0, [1], "copy")
