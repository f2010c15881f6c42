"""A data-parallel replica's optimizer state crosses to a restored rank as the source's own tensors (real gloo
ranks: the source, the restored rank and a bystander replica that must stay untouched)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from ..harness.ranks import run_ranks

pytestmark = pytest.mark.distributed

WORKER = Path(__file__).with_name("state_broadcast_worker.py")


def test_the_restored_rank_gets_the_exact_state_and_a_bystander_keeps_its_own(tmp_path):
    outputs = run_ranks(WORKER, 3, [], timeout_s=120, log_dir=tmp_path)
    results = {r["rank"]: r for out in outputs for line in out.splitlines() if line.startswith("RESULT ")
               for r in [json.loads(line[len("RESULT "):])]}
    assert results[1]["equal_to_source"] and results[1]["steps_equal"], results[1]
    assert results[2]["unchanged"] and results[2]["state"] is None, results[2]
    assert results[0]["state"] is None
    # The moments of a 2048x1024 layer (two 8 MiB tensors) are sent by the source as they are.
    assert results[0]["moved"] == results[1]["moved"] > 16 * 2**20
