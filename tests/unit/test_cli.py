"""The `checkfree` command."""
from __future__ import annotations

import json

from deepspeed_checkfree.cli import main
from deepspeed_checkfree.events import EventLog


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
