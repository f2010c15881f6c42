"""DeepSpeed pipeline checkpoints written by the real CheckFree engine (4 ranks, CPU/gloo): lose one stage's files,
``checkfree repair`` them offline, load with DeepSpeed's own ``engine.load_checkpoint`` and check that the rebuilt
stage equals the blend (middle, plain CheckFree) or copy (first/last, CheckFree+) of its neighbours' saved weights,
that the other stages are unchanged, and that training continues.

Lives next to the Megatron tests because it exercises the same offline repair; all scenarios share one set of ranks.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.distributed.spawn import run_ranks

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(400)]

WORKER = Path(__file__).with_name("ds_worker.py")
SCENARIOS = [
    {"name": "plain-middle", "model": "plain", "lost": 2, "record": True},
    {"name": "plus-first", "model": "plus", "lost": 0, "record": False},
    {"name": "plus-last", "model": "plus", "lost": 3, "record": True},
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ds-repair")
    run_ranks(WORKER, 4, [json.dumps({"out": str(out), "scenarios": SCENARIOS})], timeout_s=300, log_dir=out)
    return out


@pytest.mark.parametrize("sc", SCENARIOS, ids=[s["name"] for s in SCENARIOS])
def test_deepspeed_engine_resumes_from_a_repaired_checkpoint(runs, sc):
    results = [json.loads((runs / f"{sc['name']}-rank{r}.json").read_text()) for r in range(4)]
    lost = sc["lost"]
    rebuilt = results[lost]
    assert rebuilt["max_diff_rebuilt"] == 0.0
    assert rebuilt["optimizer_state_entries"] == 0
    assert all(r["max_diff_others"] == 0.0 for r in results if r["stage"] != lost)
    assert all(r["global_steps"] == 3 for r in results)
    assert all(math.isfinite(x) for x in results[0]["losses_after"])
    report = next(r["report"] for r in results if "report" in r)
    (rb,) = report["rebuilds"]
    if sc["model"] == "plain":
        n = rebuilt["norms"]
        w_prev, w_next = n[lost - 1] + 1e-4, n[lost + 1] + 1e-4
        assert rb["strategy"] == "gradnorm_average" and rb["sources"] == [lost - 1, lost + 1]
        assert rb["weights"] == pytest.approx([w_prev / (w_prev + w_next), w_next / (w_prev + w_next)])
    else:
        assert rb["strategy"] == "copy" and rb["sources"] == [1 if lost == 0 else 2]
