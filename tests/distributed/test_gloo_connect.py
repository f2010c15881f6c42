"""gloo's connect is bounded (``ds_internals.bound_gloo_connect``): a group whose peer died right after publishing
its address fails within 5x the pair timeout, not 5x the group's timeout, whichever side of the pair the survivor
is; groups of living ranks form as before and carry the timeout they were created with."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from ..harness.ranks import run_ranks

pytestmark = [pytest.mark.distributed]

WORKER = Path(__file__).with_name("gloo_connect_worker.py")


def results(scenario: str, tmp_path) -> dict:
    outputs = run_ranks(WORKER, 2, [scenario], timeout_s=120, log_dir=tmp_path)
    found = [json.loads(line[len("RESULT "):]) for out in outputs for line in out.splitlines()
             if line.startswith("RESULT ")]
    return {r["rank"]: r for r in found}


def test_a_peer_that_dies_after_publishing_its_address_fails_the_group_within_the_connect_bound(tmp_path):
    survivor = results("dead_peer", tmp_path)[0]
    assert survivor["error"] is not None, "the group cannot work without its peer"
    # 5 x 0.5 s pair timeout (+ start-up slack on a loaded machine); the 60 s group timeout would give 60 or 300 s.
    assert survivor["failed_after_s"] < 15, survivor


def test_groups_of_living_ranks_form_and_wait_for_a_late_peer_with_their_own_timeout(tmp_path):
    ranks = results("living", tmp_path)
    assert sorted(ranks) == [0, 1]
    assert all(r["sum"] == 4.0 for r in ranks.values()), ranks
