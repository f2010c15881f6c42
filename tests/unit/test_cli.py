"""The `checkfree` command."""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from deepspeed_checkfree.cli import main
from deepspeed_checkfree.events import EventLog

REPO = Path(__file__).resolve().parents[2]


def test_events_table_and_json(tmp_path, capsys):
    log = EventLog(str(tmp_path / "ev.jsonl"))
    log.write("stage_lost", step=3, stage=2, cause="injected")
    log.write("recovery", step=3, stage=2, strategy="gradnorm_average", sources=[1, 3], weights=[0.25, 0.75],
              duration_s=0.01)
    assert main(["events", str(tmp_path / "ev.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "gradnorm_average" in out and "0.250,0.750" in out
    assert main(["events", "--json", str(tmp_path / "ev.jsonl")]) == 0
    assert [r["event"] for r in json.loads(capsys.readouterr().out)] == ["stage_lost", "recovery"]


def test_events_on_a_missing_file_is_a_clear_error(tmp_path, capsys):
    assert main(["events", str(tmp_path / "nope.jsonl")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_version_prints_the_package_version(capsys):
    import deepspeed_checkfree
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"checkfree {deepspeed_checkfree.__version__}"


def test_the_version_is_defined_once():
    """setup.py reads the version from the package, so the wheel and ``checkfree --version`` agree."""
    import deepspeed_checkfree
    assert "version=read_version()" in (REPO / "setup.py").read_text()
    assert re.fullmatch(r"\d+\.\d+\.\d+", deepspeed_checkfree.__version__)


OUTAGE = {"generation": 1, "lost_ranks": [2], "lost_stages": [2], "replayed_step": 25, "lost_steps": 0,
          "start": "trainer death", "detected_s": 0.003, "rejoined_s": 0.513, "rebuilt_s": 0.527, "resumed_s": 0.768,
          "outage_s": 0.768}


def test_events_table_shows_the_outage_and_its_phases(tmp_path, capsys):
    log = EventLog(str(tmp_path / "ev.jsonl"))
    log.write("failure_detected", step=25, stage=1, rank=1, generation=0, error="Connection reset by peer")
    log.write("outage", **OUTAGE)
    assert main(["events", str(tmp_path / "ev.jsonl")]) == 0
    header, detected, outage = capsys.readouterr().out.splitlines()
    assert header.split() == ["step", "event", "rank", "stage", "seconds", "details"]
    assert detected.split()[:4] == ["25", "failure_detected", "1", "1"] and "Connection reset by peer" in detected
    assert outage.split()[:5] == ["25", "outage", "2", "2", "0.768"]  # replayed step, lost rank and stage, outage
    assert "detected 0.003, re-joined 0.513, rebuilt 0.527, resumed 0.768 s after the trainer death" in outage
    assert "0 lost steps" in outage


EVENTS_WITHOUT_TORCH = """
import sys
from deepspeed_checkfree import cli
code = cli.main(["events", sys.argv[1]])
print("LOADED", sorted(m for m in ("torch", "deepspeed", "numpy") if m in sys.modules), code)
"""


def test_events_runs_without_torch(tmp_path):
    EventLog(str(tmp_path / "ev.jsonl")).write("outage", **OUTAGE)
    out = subprocess.run([sys.executable, "-c", EVENTS_WITHOUT_TORCH, str(tmp_path / "ev.jsonl")],
                         capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == "LOADED [] 0", out.stdout
    assert "0.768" in out.stdout


def demo_args(*argv: str):
    from deepspeed_checkfree.demo import add_arguments
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_demo_command_line():
    from deepspeed_checkfree.demo.job import check_args
    assert check_args(demo_args()) is None
    assert check_args(demo_args("--mode", "checkfree_plus", "--lose-stage", "3", "--lose-step", "5")) is None
    assert check_args(demo_args("--kill-stage", "2", "--kill-step", "10", "--steps", "20")) is None
    assert check_args(demo_args("--config", "my.json", "--steps", "5")) is None  # (no injected loss to place)
    for argv, says in [(["--config", "x.json", "--mode", "baseline"], "drop --mode"),
                       (["--kill-stage", "2", "--lose-stage", "1"], "--kill-stage loses a stage by a real kill"),
                       (["--kill-stage", "1", "--mode", "baseline"], "cannot survive a killed trainer"),
                       (["--lose-stage", "4"], "--lose-stage 4 is not a stage of the 4-stage pipeline (0..3)"),
                       (["--steps", "20"], "--lose-step 30 must lie between 1 and --steps - 1 = 19"),
                       (["--kill-stage", "2", "--kill-step", "0"], "--kill-step 0 must lie between 1")]:
        assert says in check_args(demo_args(*argv)), argv


def test_the_demo_returns_2_with_the_reason_on_bad_options(tmp_path, capsys):
    assert main(["demo", "--lose-stage", "7", "--out", str(tmp_path / "out")]) == 2
    assert "--lose-stage 7 is not a stage" in capsys.readouterr().err
    assert not (tmp_path / "out").exists(), "nothing was started or written"


@pytest.mark.parametrize("config, demo", [
    ("checkfree_middle.json", dict(mode="checkfree", lose=(2, 30))),
    ("checkfree_plus_first.json", dict(mode="checkfree_plus", lose=(0, 30))),
    ("baseline.json", dict(mode="baseline")),
    ("checkfree_no_failure.json", dict(mode="checkfree", killed=True)),
    ("checkfree_plus_no_failure.json", dict(mode="checkfree_plus", killed=True)),
])
def test_the_installed_demo_trains_with_the_repositorys_demo_configs(config, demo):
    from deepspeed_checkfree.core.config import CheckFreeConfig
    from deepspeed_checkfree.demo.job import demo_config

    def normalised(ds_config: dict) -> dict:
        ds_config = dict(ds_config)
        if "checkfree" in ds_config:
            ds_config["checkfree"] = CheckFreeConfig.from_ds_config(ds_config).model_dump()
        return ds_config

    assert normalised(demo_config(**demo)) == normalised(json.loads((REPO / "configs" / config).read_text()))


def test_a_warm_spare_counts_as_ready_only_while_its_ready_file_names_the_current_spare(tmp_path):
    """What `checkfree demo --kill-stage` waits for before its kill (and the e2e tests before theirs)."""
    from deepspeed_checkfree.resilience.contract import ready_spare, spare_pid_file, spare_ready_file, write_pid_file
    pids = str(tmp_path / "pids")
    assert ready_spare(pids, 2) is None  # nothing started yet
    write_pid_file(spare_pid_file(pids, 2), 4242)
    assert ready_spare(pids, 2) is None  # still preparing
    write_pid_file(spare_ready_file(pids, 2), 4242)
    assert ready_spare(pids, 2) == 4242
    write_pid_file(spare_pid_file(pids, 2), 4343)  # activated; the next spare is starting
    assert ready_spare(pids, 2) is None
