"""In-place recovery in the real DeepSpeed PipelineEngine: survivors keep their engine through a re-formed world,
a replacement builds its engine in the solo world and re-binds. Real ranks on gloo; the re-formations are driven by
the worker (tests/distributed/in_place_worker.py), so the results can be compared bit for bit with an uninterrupted
run of the same steps and data. (Real SIGKILLs of the same path: tests/e2e/test_process_loss.py.)
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from ..harness.ranks import run_scenarios
from ..harness.scenarios import checkfree

pytestmark = pytest.mark.distributed

WORKER = Path(__file__).with_name("in_place_worker.py")
PIPE4 = {"num_stages": 4, "steps": 6, "transient_at": 2, "checkfree": checkfree()}
FOUR = [
    {"name": "fp32_transient", **PIPE4},
    {"name": "bf16_transient", **PIPE4, "precision": "bf16"},
    {"name": "zero1_transient", **PIPE4, "zero": 1},
    {"name": "fp32_replace2", **PIPE4, "replace_at": 4, "victim": 2},
    {"name": "bf16_replace1", **PIPE4, "precision": "bf16", "replace_at": 4, "victim": 1},
]
# 3 stages x 2 data-parallel replicas, fp32: rank 3 (stage 1, replica 1) replaced and restored from rank 2.
SIX = [{"name": "dp2_replace_replica", "num_stages": 3, "n_layers": 9, "steps": 6, "transient_at": 2,
        "replace_at": 4, "victim": 3, "restore": "replica", "checkfree": checkfree()}]


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    return run_scenarios(WORKER, 4, FOUR, tmp_path_factory.mktemp("in_place4"), timeout_s=400)


@pytest.fixture(scope="module")
def six(tmp_path_factory):
    return run_scenarios(WORKER, 6, SIX, tmp_path_factory.mktemp("in_place6"), timeout_s=400)


def bit_identical(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.parametrize("name", ["fp32_transient", "bf16_transient", "zero1_transient"])
def test_a_survivor_re_binds_in_place_and_trains_on_bit_identically(four, name):
    for r, rec in enumerate(four[name]):
        assert rec["stale_after_rebind"] == [], f"rank {r} still holds a group of the old world"
        assert rec["tensors_kept"], f"rank {r}: a stage tensor moved, i.e. it was copied, across the re-formation"
        assert rec["losses"] == rec["reference_losses"], r
        assert bit_identical(rec["final_params"], rec["reference_params"]), r


@pytest.mark.parametrize("name,stage", [("fp32_replace2", 2), ("bf16_replace1", 1)])
def test_a_replacement_built_in_the_solo_world_joins_and_its_stage_is_rebuilt(four, name, stage):
    recs = four[name]
    for r, rec in enumerate(recs):
        assert rec["survivor_tensors_kept"], f"survivor rank {r} copied its stage"
        assert all(math.isfinite(x) for x in rec["losses"]) and len(rec["losses"]) == 6
        assert rec["losses"][:4] == rec["reference_losses"][:4]
        expected = [[stage - 1, stage + 1]] if r == stage else []  # (one rank per stage here)
        assert [x["sources"] for x in rec["recoveries"]] == expected, (r, rec["recoveries"])
    assert len({tuple(rec["losses"]) for rec in recs}) == 1, "every rank reports the same loss"
    assert recs[0]["losses"][-1] < recs[0]["losses"][0]


def test_a_replica_replaced_in_place_ends_bit_identical_to_an_uninterrupted_run(six):
    for r, rec in enumerate(six["dp2_replace_replica"]):
        assert rec["survivor_tensors_kept"]
        assert rec["losses"] == rec["reference_losses"], r
        assert bit_identical(rec["final_params"], rec["reference_params"]), f"rank {r} differs from the reference"
