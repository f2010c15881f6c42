"""The distributed optimizer's fresh state of a rebuilt stage, from a recorded bucket layout (no Megatron import): the
weights at their recorded places, zero moments, step 0, and the objects a torch_dist checkpoint keeps per group.
The same code on checkpoints real megatron-core wrote is in tests/megatron/test_megatron_settings.py."""
from __future__ import annotations

import io

import pytest
import torch

from deepspeed_checkfree.errors import RecoveryError
from deepspeed_checkfree.repair.base import IOLedger
from deepspeed_checkfree.repair.megatron_dist.distopt import DistOptItems, dp_group_of
from deepspeed_checkfree.repair.megatron_distopt import (dtype_key, fresh_steps, legacy_param_state, per_bucket_numel,
                                                        read_distopt_layout, require_layout, write_distopt_layouts)

F32 = "(torch.float32, torch.float32)"
# One buffer, two buckets: a 2x3 weight at [64, 70) after a 4-element bias at [0, 4) (alignment padding between).
LAYOUT = [{"dp_group_idx": 5, "buffers": [{"gbuf": 0, "chunk": 0, "dtype": F32, "buckets": [
    {"numel": 128, "numel_unpadded": 70, "params": [
        {"name": "b", "start": 0, "end": 4, "shape": [4], "key": "k.b", "offset": [0]},
        {"name": "w", "start": 64, "end": 70, "shape": [2, 3], "key": "k.w", "offset": [0, 0]}]},
    {"numel": 128, "numel_unpadded": 5, "params": [
        {"name": "e", "start": 0, "end": 5, "shape": [5], "key": None, "offset": None}]}]}]}]
TENSORS = {"b": torch.arange(4.0), "w": torch.arange(6.0).reshape(2, 3) + 10, "e": torch.full((5,), 7.0)}


def test_the_legacy_param_state_puts_each_weight_where_the_layout_says_and_zeroes_the_moments():
    state = legacy_param_state(LAYOUT, lambda chunk, e: TENSORS[e["name"]])
    world = state[0][dtype_key(F32)]
    assert state["buckets_coalesced"] and world["numel_unpadded"] == 75
    assert torch.equal(world["param"][:4], TENSORS["b"]) and torch.equal(world["param"][64:70], TENSORS["w"].view(-1))
    assert torch.equal(world["param"][70:], TENSORS["e"]) and not world["param"][4:64].any()
    assert not world["exp_avg"].any() and not world["exp_avg_sq"].any()


def test_a_tensor_that_does_not_fit_its_recorded_place_is_refused():
    with pytest.raises(RecoveryError, match="expects 6"):
        legacy_param_state(LAYOUT, lambda chunk, e: torch.zeros(7) if e["name"] == "w" else TENSORS[e["name"]])


def test_fresh_steps_zeroes_every_parameter_groups_step_and_nothing_else():
    src = [{"param_groups": [{"lr": 0.1, "step": 12.0}, {"lr": 0.1, "step": 12.0}]}]
    out = fresh_steps(src)
    assert [g["step"] for g in out[0]["param_groups"]] == [0.0, 0.0] and out[0]["param_groups"][0]["lr"] == 0.1
    assert src[0]["param_groups"][0]["step"] == 12.0  # a copy


def test_torch_dist_items_of_a_rebuilt_group_come_from_its_layout_and_the_source_groups_objects():
    def encode(obj):
        buf = io.BytesIO()
        torch.save(obj, buf)
        return buf.getvalue()

    stored = {"optimizer.distributed.dp_group_idx_4.optimizer": encode([{"param_groups": [{"step": 3.0}]}]),
              "optimizer.distributed.dp_group_idx_4.per_bucket_numel": encode([[{dtype_key(F32): [1, 2]}]])}
    items = DistOptItems({5: LAYOUT[0]}, {5: 4}, lambda g, c, e: TENSORS[e["name"]], stored.__getitem__)
    key = f"optimizer.distributed.dp_group_idx_5.gbuf_idx_0.dtype_{F32}.bucket_idx_0.param"
    assert dp_group_of(key)[0] == 5
    assert torch.equal(items.tensor(key, [64], [6], torch.float32), TENSORS["w"].view(-1))
    assert not items.tensor(key.replace(".param", ".exp_avg"), [0], [4], torch.float32).any()
    groups = torch.load(io.BytesIO(items.object_bytes("optimizer.distributed.dp_group_idx_5.optimizer")),
                        weights_only=False)
    assert groups == [{"param_groups": [{"step": 0.0}]}]
    numel = torch.load(io.BytesIO(items.object_bytes("optimizer.distributed.dp_group_idx_5.per_bucket_numel")),
                       weights_only=False)
    assert numel == [per_bucket_numel(LAYOUT[0], unpadded=False)] == [[{dtype_key(F32): [128, 128]}]]


def test_a_stages_layout_is_found_in_its_neighbours_record_when_its_own_is_lost(tmp_path):
    write_distopt_layouts(str(tmp_path), 1, 0, {0: [{"dp_group_idx": 0}], 1: [{"dp_group_idx": 1}],
                                                2: LAYOUT})
    assert read_distopt_layout(str(tmp_path), 2, 0, IOLedger()) == LAYOUT
    assert read_distopt_layout(str(tmp_path), 2, 1, IOLedger()) is None
    with pytest.raises(RecoveryError, match="no record of its bucket layout.*--checkfree-repair off"):
        require_layout(str(tmp_path), 3, 0, IOLedger())
