"""The hook under Megatron settings beyond one plain block of layers per rank, on checkpoints real megatron-core wrote
(tests/megatron/mcore_variants.py, in the PP=2 processes): an intact checkpoint always loads exactly as without the
hook; a damaged one is rebuilt where this version can (the distributed optimizer and virtual pipeline stages, in
both formats), and otherwise refused with an error that names the setting and the ways on (a custom layout).
"""
from __future__ import annotations

import io
import json
import math
import pickle

import pytest
import torch

pytest.importorskip("megatron.core")


pytestmark = [pytest.mark.distributed, pytest.mark.timeout(400)]

WAYS_ON = ("--checkfree-repair off", "--ckpt-step", "--dry-run")


def _case(out, name, world=2):
    return [json.loads((out / f"{name}-rank{r}.json").read_text()) for r in range(world)]


@pytest.mark.parametrize("name", ["distopt-legacy-intact", "distopt-torch_dist-intact", "vpp-legacy-intact",
                                  "vpp-torch_dist-intact", "layout-legacy-intact", "layout-torch_dist-intact"])
def test_an_intact_checkpoint_loads_exactly_as_saved_with_the_hook(pp2, name):
    for r in _case(pp2, name):
        assert "error" not in r, r.get("error")
        assert r["reports"] == [], "nothing may be rebuilt in an intact checkpoint"
        assert r["keys_equal"] and r["max_diff_weights"] == 0.0 and r["max_diff_moments"] == 0.0
    assert all(math.isfinite(x) for x in _case(pp2, name)[-1]["losses_after"])
    if name.startswith("distopt"):  # the layout the hook records for a later rebuild
        fmt = name.split("-")[1]
        assert {p.name for p in (pp2 / name / "iter_0000002" / "checkfree").glob("distopt_layout_*")} == \
            {"distopt_layout_stage_000_tp_00.json", "distopt_layout_stage_001_tp_00.json"}, fmt


@pytest.mark.parametrize("fmt", ["legacy", "torch_dist"])
@pytest.mark.parametrize("lost", [0, 1])
def test_distributed_optimizer_stage_is_rebuilt_with_a_fresh_sharded_state_and_others_untouched(pp2, fmt, lost):
    results = _case(pp2, f"distopt-{fmt}-lost{lost}")
    rebuilt, other = results[lost], results[1 - lost]
    assert "error" not in rebuilt, rebuilt.get("error")
    # Megatron's loader copies the optimizer's fp32 main parameters over the weights: equal to the expected rebuild
    # only if the buckets hold the rebuilt weights exactly where this stage's layout puts them.
    assert rebuilt["max_diff_rebuilt"] == 0.0
    assert rebuilt["moments_nonzero"] == 0, "fresh Adam moments from the files"
    assert other["keys_equal"] and other["max_diff_weights"] == 0.0 and other["max_diff_moments"] == 0.0
    # ... and step 0 in the rebuilt stage's parameter groups, 2 (the steps trained) elsewhere. (megatron.core 0.16.1
    # with torch's Adam restores a dp_reshardable step from the optimizer it loads into, so this is read from disk.)
    assert _stored_steps(pp2 / f"distopt-{fmt}-lost{lost}", fmt) == {lost: [0.0], 1 - lost: [2.0]}
    if fmt == "legacy":
        assert rebuilt["adam_steps"] == [0.0] and other["adam_steps"] == [2.0]
    assert all(math.isfinite(x) for x in results[-1]["losses_after"])


@pytest.mark.parametrize("fmt", ["legacy", "torch_dist"])
def test_a_damaged_checkpoint_under_a_setting_not_repaired_stops_with_the_setting_and_the_ways_on(pp2, fmt):
    for r in _case(pp2, f"layout-{fmt}-lost1"):  # every rank raises the same error, from the hook itself
        msg = r["error"]
        assert "pipeline_model_parallel_layout=Et*2|t*2L" in msg and "is damaged (stage 1:" in msg
        assert all(w in msg for w in WAYS_ON), msg
    for r in _case(pp2, f"layout-{fmt}-intact"):
        assert r["reports"] == [] and r["max_diff_weights"] == 0.0


@pytest.mark.parametrize("fmt", ["legacy", "torch_dist"])
@pytest.mark.parametrize("lost", [0, 1])
def test_virtual_pipeline_chunks_are_rebuilt_from_their_neighbours_in_virtual_order(pp2, lost, fmt):
    results = _case(pp2, f"vpp-{fmt}-lost{lost}")
    rebuilt, other = results[lost], results[1 - lost]
    assert rebuilt["max_diff_rebuilt"] == 0.0, "each chunk equals the blend of its virtual neighbours"
    # Fresh moments from the files, except that torch_dist keeps the tied output layer's moments once, under stage
    # 0's embedding: a rebuilt last stage loads those two (the hook then resets them with the rest).
    assert rebuilt["moments_nonzero"] == (2 if fmt == "torch_dist" and lost == 1 else 0)
    assert other["keys_equal"] and other["max_diff_weights"] == 0.0
    # torch_dist stores the tied output layer's Adam moments once, with stage 0's embedding: they restart with it.
    if not (fmt == "torch_dist" and lost == 0):
        assert other["max_diff_moments"] == 0.0
    # PP=2 x 2 chunks = 4 virtual stages: rank r's chunk c is virtual stage 2c + r.
    chunks = rebuilt["reports"][0]["rebuilds"][0]["chunks"]
    expected = {0: [(0, [[1, 0]]), (2, [[1, 0], [1, 1]])], 1: [(1, [[0, 0], [0, 1]]), (3, [[0, 1]])]}[lost]
    assert [(c["virtual_stage"], c["sources"]) for c in chunks] == expected
    assert [(p["virtual_stage"], p["sources"]) for p in rebuilt["plan"]] == expected
    assert all(math.isfinite(x) for x in results[-1]["losses_after"])


def _stored_steps(ckpt, fmt):
    """Each stage's saved Adam step counts (the distributed optimizer keeps them in its parameter groups)."""
    it = ckpt / "iter_0000002"
    if fmt == "legacy":
        return {s: sorted({g["step"] for g in torch.load(it / f"mp_rank_00_{s:03d}" / "model_optim_rng.pt",
                                                          weights_only=False)["optimizer"]["optimizer"]["param_groups"]})
                for s in (0, 1)}
    md = pickle.loads((it / ".metadata").read_bytes())
    out = {}
    for index, info in md.storage_data.items():
        if index.offset is None and index.fqn.endswith(".optimizer/shard_0_1"):
            with open(it / info.relative_path, "rb") as f:
                f.seek(info.offset)
                (groups,) = torch.load(io.BytesIO(f.read(info.length)), weights_only=False)
            out[int(index.fqn.split("dp_group_idx_")[1].split(".")[0])] = sorted({g["step"] for g in
                                                                                 groups["param_groups"]})
    return out
