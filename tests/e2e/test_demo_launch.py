"""The demo end to end: launch/demo.sh starts 4 ranks with the stock deepspeed launcher, a stage is lost at a
planned step, rebuilt from its neighbours, and training runs to the last step."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from deepspeed_checkfree.events import read_events

from ..harness.oracle import check_loss_falls
from ..harness.ports import reserve_ports
from ..harness.processes import LEFTOVER, ProcessTracker, close_all
from ..harness.ranks import REPO, cpu_env, require_multi_process_marker

pytestmark = pytest.mark.e2e

STEPS = 14
FAIL_STEP = 6


@pytest.fixture
def demo(tmp_path):
    """Run launch/demo.sh on a config with a planned loss; every process it starts is tracked and, at the end,
    ended by pid; none may outlive the finished demo."""
    trackers = []

    def run(config_name: str, lost_stage: int) -> Path:
        require_multi_process_marker()
        cfg = json.loads((REPO / "configs" / config_name).read_text())
        cfg["checkfree"]["failure_injection"] = {"at": [{"stage": lost_stage, "step": FAIL_STEP}]}
        cfg["scheduler"]["params"]["warmup_num_steps"] = 3
        config = tmp_path / config_name
        config.write_text(json.dumps(cfg))
        out = tmp_path / "out"
        tracker = ProcessTracker()
        trackers.append(tracker)
        with reserve_ports(2) as ports:
            env = cpu_env(dict(CONFIG=str(config), STEPS=str(STEPS), OUT=str(out), MASTER_PORT=str(ports.port),
                               PYTHON_BIN=sys.executable, TIMEOUT_S="300"))
            proc = tracker.popen(["bash", str(REPO / "launch" / "demo.sh")], env=env, cwd=REPO,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            stdout, stderr = proc.communicate(timeout=360)
        tracker.finished = True
        # bash, timeout, the deepspeed runner, its node launcher and the 4 ranks (at least)
        assert len(tracker.seen) >= 8, f"only {len(tracker.seen)} processes of the demo were tracked"
        assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
        assert "done: 14 steps" in stdout
        return out

    yield run
    left = close_all(trackers)
    assert not left, LEFTOVER + "\n".join(left)


def check_run(out: Path, lost_stage: int, sources: list, strategy: str) -> None:
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == list(range(STEPS))
    losses = [float(r["loss"]) for r in rows]
    check_loss_falls(losses, since=FAIL_STEP, window=3)
    check_loss_falls(losses[:FAIL_STEP + 3], since=0, window=3)
    events = read_events(str(out / "events.jsonl"))
    assert [e["event"] for e in events] == ["stage_lost", "recovery"]
    rec = events[1]
    assert (rec["stage"], rec["step"], rec["sources"], rec["strategy"]) == (lost_stage, FAIL_STEP, sources, strategy)
    assert rec["lr_after"][0] > 0 and rec["duration_s"] > 0


def test_demo_loses_middle_stage_and_keeps_training(demo):
    out = demo("checkfree_middle.json", 2)
    check_run(out, 2, [1, 3], "gradnorm_average")


def test_demo_loses_first_stage_under_checkfree_plus(demo):
    out = demo("checkfree_plus_first.json", 0)
    check_run(out, 0, [1], "copy")


def test_the_demo_runs_from_an_installed_wheel_without_the_repository(tmp_path):
    """``checkfree demo`` from a wheel built from this tree, installed into a folder of its own (``pip install
    --target``; torch and DeepSpeed come from the test's environment), run from a folder outside the repository
    with only that folder on the path: the training script, the model and the corpus ship in the package."""
    require_multi_process_marker()
    src = tmp_path / "src"  # (built from a copy, so the build leaves nothing in the repository)
    src.mkdir()
    for name in ("setup.py", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "deepspeed_checkfree", src / "deepspeed_checkfree",
                    ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)],
                   check=True, timeout=300, cwd=tmp_path)
    wheel, = (tmp_path / "dist").glob("deepspeed_checkfree-*.whl")
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, timeout=300,
                   cwd=tmp_path)
    checkfree = [sys.executable, str(site / "bin" / "checkfree")]  # the wheel's console script
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(site), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    version = subprocess.run([*checkfree, "--version"], env=env, cwd=cwd, capture_output=True, text=True,
                             timeout=60, check=True).stdout.split()
    assert version[0] == "checkfree" and wheel.name.startswith(f"deepspeed_checkfree-{version[1]}-")

    tracker = ProcessTracker()
    try:
        with reserve_ports(2) as ports:
            proc = tracker.popen([*checkfree, "demo", "--steps", "10", "--lose-step", "5", "--out", "out",
                                  "--master-port", str(ports.port), "--timeout", "300"],
                                 env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            output, _ = proc.communicate(timeout=360)
        tracker.finished = True
    finally:
        left = close_all([tracker])
    assert proc.returncode == 0, output[-5000:]
    assert not left, LEFTOVER + "\n".join(left)
    assert f"{site / 'deepspeed_checkfree' / 'demo' / 'train.py'} --deepspeed_config" in output, \
        "every rank ran the installed training script"
    # (the venv may live inside the repository, as CI's does: only the package must not come from there)
    assert str(REPO / "deepspeed_checkfree") not in output and str(REPO / "launch") not in output
    assert "done: 10 steps" in output and "rebuilt by gradnorm_average from stage 1" in output
    rows = list(csv.DictReader(open(cwd / "out" / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == list(range(10))
    events = read_events(str(cwd / "out" / "events.jsonl"))
    assert [(e["event"], e["stage"], e["step"]) for e in events] == [("stage_lost", 2, 5), ("recovery", 2, 5)]
    assert "recovery" in output.split("--- events")[-1], "the demo ends with the events table"
