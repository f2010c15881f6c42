"""The hook under Megatron settings beyond one plain block of layers per rank, on checkpoints real megatron-core wrote
(tests/megatron/mcore_variants.py, in the PP=2 processes): an intact checkpoint always loads exactly as without the
hook; a damaged one is rebuilt where this version can (the distributed optimizer in both formats, virtual pipeline
stages in the legacy format), and otherwise refused with an error that names the setting and the ways on.
"""
from __future__ import annotations

import io
import json
import math
import pickle
import shutil

import pytest
import torch

pytest.importorskip("megatron.core")

from deepspeed_checkfree.errors import UnsupportedSetupError  # noqa: E402
from deepspeed_checkfree.repair import repair_checkpoint  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(400)]

WAYS_ON = ("--checkfree-repair off", "--ckpt-step", "--dry-run")


def _case(out, name, world=2):
    return [json.loads((out / f"{name}-rank{r}.json").read_text()) for r in range(world)]


@pytest.mark.parametrize("name", ["distopt-legacy-intact", "distopt-torch_dist-intact", "vpp-legacy-intact",
                                  "vpp-torch_dist-intact"])
def test_an_intact_checkpoint_loads_exactly_as_saved_with_the_hook(pp2, name):
    for r in _case(pp2, name):
        assert "error" not in r, r.get("error")
        assert r["reports"] == [], "nothing may be rebuilt in an intact checkpoint"
        assert r["keys_equal"] and r["max_diff_weights"] == 0.0 and r["max_diff_moments"] == 0.0
    assert all(math.isfinite(x) for x in _case(pp2, name)[-1]["losses_after"])


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


@pytest.mark.parametrize("name", ["vpp-torch_dist-lost0", "vpp-torch_dist-lost1"])
def test_a_damaged_checkpoint_under_a_setting_not_repaired_stops_with_the_setting_and_the_ways_on(pp2, name):
    setting = "virtual_pipeline_model_parallel_size=2"
    for r in _case(pp2, name):  # every rank raises the same error
        msg = r["error"]
        assert setting in msg and "is damaged (stage" in msg
        assert all(w in msg for w in WAYS_ON), msg


@pytest.mark.parametrize("lost", [0, 1])
def test_virtual_pipeline_chunks_are_rebuilt_from_their_neighbours_in_virtual_order(pp2, lost):
    results = _case(pp2, f"vpp-legacy-lost{lost}")
    rebuilt, other = results[lost], results[1 - lost]
    assert rebuilt["max_diff_rebuilt"] == 0.0, "each chunk equals the blend of its virtual neighbours"
    assert rebuilt["moments_nonzero"] == 0
    assert other["keys_equal"] and other["max_diff_weights"] == 0.0 and other["max_diff_moments"] == 0.0
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


def _edit_args(ckpt, fmt, **changes):
    """Rewrite the saved args (what the hook reads the layout from) of every file that holds them."""
    it = next(ckpt.glob("iter_*"))
    files = [it / "common.pt"] if fmt == "torch_dist" else list(it.glob("mp_rank_*/model_optim_rng.pt"))
    for f in files:
        state = torch.load(f, weights_only=False)
        vars(state["args"]).update(changes)
        torch.save(state, f)
    return it


@pytest.mark.parametrize("fmt", ["legacy", "torch_dist"])
def test_a_custom_pipeline_layout_loads_intact_and_is_named_when_damaged(pp2, tmp_path, fmt):
    # The checkpoint is real; its args claim a custom layout (--pipeline-model-parallel-layout), which is all the
    # hook reads of that setting.
    ckpt = tmp_path / fmt
    shutil.copytree(pp2 / f"distopt-pristine-{fmt}", ckpt)
    it = _edit_args(ckpt, fmt, use_distributed_optimizer=False, pipeline_model_parallel_layout="Et*2|t*2L")
    assert not repair_checkpoint(str(ckpt), in_place=True).damaged
    for f in (it.glob("__1_*.distcp") if fmt == "torch_dist" else it.glob("mp_rank_00_001/*")):
        f.unlink()
    with pytest.raises(UnsupportedSetupError, match="pipeline_model_parallel_layout=Et\\*2\\|t\\*2L") as err:
        repair_checkpoint(str(ckpt), in_place=True)
    assert all(w in str(err.value) for w in WAYS_ON)
