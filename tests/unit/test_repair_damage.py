"""What counts as damage and what repair does about it, on the synthetic checkpoints of test_repair.py: non-finite
tensors are damage in every format; settings repair cannot rebuild under never stop an intact checkpoint; the
iteration to repair is the one Megatron will load (``--ckpt-step``, ``checkfree repair --iteration N``).
No process group, no Megatron import.
"""
from __future__ import annotations

import argparse
import os
import shutil

import pytest
import torch

from deepspeed_checkfree import cli
from deepspeed_checkfree.errors import RecoveryError, UnsupportedSetupError
from deepspeed_checkfree.megatron.training_hook import load_targets
from deepspeed_checkfree.repair import repair_checkpoint
from deepspeed_checkfree.repair.base import nonfinite_problem
from deepspeed_checkfree.repair.megatron_common import MegatronLayout, virtual_layer_counts
from tests.unit.test_repair import IT, lose, lose_ds, make_deepspeed, make_megatron, shard


def _poison(path: str, key: str, nbytes: int = 4096) -> None:
    """Overwrite bytes inside one tensor's record, as a bad disk would: the file still loads."""
    state = torch.load(path, weights_only=False)
    target = state["model"][key] if "model" in state else state[key]
    target.view(-1)[: max(1, nbytes // target.element_size())] = float("nan")
    torch.save(state, path)


@pytest.fixture
def mega(tmp_path):
    root = str(tmp_path / "ckpt")
    return root, make_megatron(root)


def test_nonfinite_problem_names_the_tensors_and_counts_the_bad_elements():
    ok, nbytes = nonfinite_problem({"a": torch.ones(4), "b": [torch.arange(3)]})
    assert ok is None and nbytes == 16  # integer tensors are not scanned
    problem, _ = nonfinite_problem({"m": {"w": torch.tensor([1.0, float("inf"), float("nan")])}})
    assert problem == "has non-finite values in m.w (2 of 3 elements)"


def test_a_legacy_shard_full_of_nan_is_damage_and_is_rebuilt(mega, tmp_path):
    root, models = mega
    _poison(shard(root, 2), "decoder.layers.0.mlp.linear_fc1.weight")
    report = repair_checkpoint(root, output=str(tmp_path / "out"))
    assert list(report.damaged) == [2] and "non-finite" in report.damaged[2]
    assert "decoder.layers.0.mlp.linear_fc1.weight" in report.damaged[2]
    assert report.bytes_checked > 0
    rebuilt = torch.load(shard(str(tmp_path / "out"), 2), weights_only=False)["model"]
    assert all(torch.isfinite(v).all() for v in rebuilt.values() if isinstance(v, torch.Tensor))


def test_the_value_scan_can_be_turned_off(mega):
    root, _ = mega
    _poison(shard(root, 2), "decoder.layers.0.mlp.linear_fc1.weight")
    report = repair_checkpoint(root, dry_run=True, check_values=False)
    assert not report.damaged and report.bytes_checked == 0


def test_a_rebuild_from_a_neighbour_holding_nan_is_refused_before_anything_is_written(mega, tmp_path):
    root, _ = mega
    lose(root, 2)
    _poison(shard(root, 1), "decoder.layers.1.mlp.linear_fc2.weight")
    out = tmp_path / "out"
    # Both 1 and 2 are damaged now, and they are adjacent: refused as such.
    with pytest.raises(RecoveryError, match="stages 1 and 2 are both damaged"):
        repair_checkpoint(root, output=str(out))
    # Not scanning, the rebuild itself is checked and refused.
    with pytest.raises(RecoveryError, match="rebuilt stage 2 would be damaged too"):
        repair_checkpoint(root, output=str(out), check_values=False)
    assert not (out / f"iter_{IT:07d}" / "mp_rank_00_002" / "model_optim_rng.pt").exists()


def test_a_deepspeed_layer_file_with_nan_inside_is_found(tmp_path, capsys):
    root = str(tmp_path / "ds")
    make_deepspeed(root)
    path = os.path.join(root, "t3", "layer_07-model_states.pt")
    _poison(path, "fc.weight")
    assert torch.load(path)["fc.weight"].isnan().any()  # still loads: only the values tell
    assert cli.main(["repair", root, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "Nothing to do" not in out and "stage 2:" in out and "layer_07-model_states.pt" in out
    assert "fc.weight" in out and "would rebuild stage 2" in out


@pytest.mark.parametrize("setting", [dict(account_for_embedding_in_pipeline_split=True),
                                     dict(pipeline_model_parallel_layout="Et*2|t*2|t*2|t*2L"),
                                     dict(expert_model_parallel_size=2)],
                         ids=["embedding-in-split", "custom-layout", "expert-parallel"])
def test_settings_repair_cannot_handle_matter_only_when_a_stage_is_damaged(tmp_path, setting):
    root = str(tmp_path / "ckpt")
    make_megatron(root)
    for s in range(4):
        state = torch.load(shard(root, s), weights_only=False)
        vars(state["args"]).update(setting, num_layers=8)
        torch.save(state, shard(root, s))
        if "expert_model_parallel_size" in setting:  # Megatron names expert-parallel shards mp_rank_TT_PPP_EEE
            d = os.path.dirname(shard(root, s))
            os.rename(d, d + "_000")
            shutil.copytree(d + "_000", d + "_001")
    intact = repair_checkpoint(root, in_place=True)
    assert not intact.damaged and not intact.rebuilds
    shutil.rmtree(os.path.join(root, f"iter_{IT:07d}", "mp_rank_00_001" + ("_001" if "expert_model_parallel_size"
                                                                            in setting else "")))
    (name, value), = setting.items()
    with pytest.raises(UnsupportedSetupError) as err:
        repair_checkpoint(root, in_place=True)
    msg = str(err.value)
    assert f"{name}={value}" in msg and "stage 1:" in msg
    assert "--checkfree-repair off" in msg and "--ckpt-step" in msg and "--dry-run" in msg


def test_the_iteration_named_is_repaired_not_the_latest(mega, tmp_path, capsys):
    root, _ = mega
    older = os.path.join(root, "iter_0000002")
    shutil.copytree(os.path.join(root, f"iter_{IT:07d}"), older)
    shutil.rmtree(os.path.join(older, "mp_rank_00_002"))
    assert not repair_checkpoint(root, dry_run=True).damaged  # the latest (5) is intact
    report = repair_checkpoint(root, dry_run=True, tag="2")
    assert report.iteration == "2" and list(report.damaged) == [2]
    os.remove(os.path.join(root, "latest_checkpointed_iteration.txt"))  # --ckpt-step loads without a tracker too
    assert cli.main(["repair", root, "--iteration", "2", "--in-place"]) == 0
    assert "rebuilt stage 2" in capsys.readouterr().out
    assert os.path.exists(os.path.join(older, "mp_rank_00_002", "model_optim_rng.pt"))
    with pytest.raises(RecoveryError, match="is iteration 2, not the iteration 3"):
        repair_checkpoint(older, dry_run=True, tag="3")


def _margs(**kw):
    base = dict(load=None, ckpt_step=None, pretrained_checkpoint=None, non_persistent_ckpt_type=None,
                non_persistent_global_ckpt_dir=None)
    return argparse.Namespace(**{**base, **kw})


def _tracker(d, it):
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write(str(it))


def test_load_targets_follow_megatrons_choice_of_iteration(tmp_path):
    load = str(tmp_path / "ckpt")
    assert load_targets(_margs(load=load)) == []  # nothing to load: Megatron starts from scratch
    assert load_targets(_margs(load=load, ckpt_step=4)) == [(load, "4")]
    _tracker(load, 10)
    assert load_targets(_margs(load=load)) == [(load, "10")]
    assert load_targets(_margs(load=load, ckpt_step=4)) == [(load, "4")]
    np_dir = os.path.join(load, "non_persistent")
    _tracker(np_dir, 12)
    assert load_targets(_margs(load=load)) == [(load, "10")]  # non-persistent checkpoints not enabled
    assert load_targets(_margs(load=load, non_persistent_ckpt_type="global")) == [(np_dir, "12")]
    assert load_targets(_margs(load=load, non_persistent_ckpt_type="global", ckpt_step=14)) == [(load, "14")]
    pre = str(tmp_path / "pretrained")
    _tracker(pre, "release")
    assert load_targets(_margs(load=str(tmp_path / "none"), pretrained_checkpoint=pre)) == [(pre, "release")]
    assert load_targets(_margs(load=load, pretrained_checkpoint=pre)) == [(load, "10")]


def test_virtual_pipeline_layers_are_interleaved_in_virtual_stage_order():
    # 4 ranks x 2 chunks of 8 layers each rank... (16 layers): virtual stage v = chunk * 4 + rank, 2 layers each.
    assert virtual_layer_counts(16, 4, 2) == [2] * 8
    assert virtual_layer_counts(12, 3, 2, first=2, last=2) == [1, 4, 1, 1, 4, 1]
    args = argparse.Namespace(num_layers=16, pipeline_model_parallel_size=4, virtual_pipeline_model_parallel_size=2,
                              tensor_model_parallel_size=1, use_distributed_optimizer=True)
    lay = MegatronLayout.from_args(args, "x")
    assert lay.num_virtual == 8 and lay.stage_of_layer(9) == 0 and lay.virtual_of_layer(9) == 4
    assert lay.distributed_optimizer and lay.unsupported == ()


def test_deepspeed_zero_files_matter_only_when_a_stage_is_damaged(tmp_path):
    root = str(tmp_path / "ds")
    make_deepspeed(root)
    torch.save({}, os.path.join(root, "t3", "zero_pp_rank_0_mp_rank_00_optim_states.pt"))
    assert not repair_checkpoint(root, dry_run=True).damaged
    lose_ds(root, 2, [6, 7, 8])
    with pytest.raises(UnsupportedSetupError, match="zero_optimization"):
        repair_checkpoint(root, dry_run=True)
