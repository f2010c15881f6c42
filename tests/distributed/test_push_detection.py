"""Push detection between real gloo ranks: a rank blocked on a live peer leaves its wait within a fraction of a
second of a death, through the death watch (a supervisor's death record) or through the cascade of cut
connections, never after the group's 60 s timeout. (The same inside DeepSpeed with real SIGKILLs:
tests/e2e/test_process_loss.py.)"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from ..harness.ranks import run_ranks

pytestmark = [pytest.mark.distributed,
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the cut reads /proc/self/fd")]

WORKER = Path(__file__).with_name("push_detection_worker.py")


def waits(scenario: str, tmp_path) -> dict:
    outputs = run_ranks(WORKER, 3, [scenario], timeout_s=90, log_dir=tmp_path)
    results = [json.loads(line[len("RESULT "):]) for out in outputs for line in out.splitlines()
               if line.startswith("RESULT ")]
    return {r["rank"]: r["after_event_s"] for r in results}


def test_a_death_record_ends_the_wait_of_ranks_that_only_wait_on_live_peers(tmp_path):
    waited = waits("death_record", tmp_path)
    # Rank 2 records its death 1 s in; ranks 0 and 1 wait on each other, and each leaves at once (not before).
    assert waited[0] is not None and waited[1] is not None, waited
    assert 0.0 <= waited[0] < 1.0 and 0.0 <= waited[1] < 1.0, waited


def test_a_failing_rank_cutting_its_connections_reaches_a_rank_two_hops_away(tmp_path):
    waited = waits("cascade", tmp_path)
    # Rank 2 fails 1 s in; rank 1 (waiting on it) and rank 0 (waiting on rank 1) both leave at once (not before).
    assert waited[0] is not None and waited[1] is not None, waited
    assert 0.0 <= waited[1] < 1.0 and 0.0 <= waited[0] < 1.0, waited
