"""The recovery decisions and math, without processes."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from deepspeed_checkfree.errors import RecoveryError
from deepspeed_checkfree.core.recovery import (RecoveryPlan, blend, blend_state, layer_signature,
                                          match_layers, plan_recovery, reinitialize, source_weights)


# --- which sources -------------------------------------------------------------------------------------------

def test_middle_stage_is_planned_from_both_neighbours():
    (plan,) = plan_recovery([2], 5)
    assert plan == RecoveryPlan(2, (1, 3), "gradnorm_average", (1, 1))


@pytest.mark.parametrize("stage", [0, 3])
def test_edge_stage_under_plain_checkfree_says_checkfree_plus_is_needed(stage):
    with pytest.raises(RecoveryError, match="checkfree_plus"):
        plan_recovery([stage], 4)


def test_edge_stages_are_copied_from_their_partner_under_checkfree_plus():
    plans = {p.target: p for p in plan_recovery([0, 5], 6, mode="checkfree_plus")}
    assert plans[0] == RecoveryPlan(0, (1,), "copy", (1,))
    assert plans[5] == RecoveryPlan(5, (4,), "copy", (1,))
    assert plan_recovery([1], 6, mode="checkfree_plus")[0].sources == (0,)
    assert plan_recovery([4], 6, mode="checkfree_plus")[0].sources == (5,)
    assert plan_recovery([2], 6, mode="checkfree_plus")[0].sources == (1, 3)


def test_losing_both_copies_of_the_embedding_is_a_clear_error():
    with pytest.raises(RecoveryError, match="only two copies of the embedding"):
        plan_recovery([0, 1], 6, mode="checkfree_plus")


def test_adjacent_lost_stages_interpolate_between_nearest_survivors():
    plans = plan_recovery([2, 3], 6)
    assert plans[0] == RecoveryPlan(2, (1, 4), "gradnorm_average", (1, 2))
    assert plans[1] == RecoveryPlan(3, (1, 4), "gradnorm_average", (2, 1))


def test_adjacent_lost_stages_stop_when_configured():
    with pytest.raises(RecoveryError, match="on_adjacent_failure='stop'"):
        plan_recovery([2, 3], 6, on_adjacent_failure="stop")


def test_all_stages_lost_is_an_error():
    with pytest.raises(RecoveryError, match="all 4 stages"):
        plan_recovery(range(4), 4, mode="checkfree_plus")


def test_strategy_selection():
    assert plan_recovery([2], 4, strategy="copy")[0] == RecoveryPlan(2, (1,), "copy", (1,))
    assert plan_recovery([2], 4, strategy="random")[0] == RecoveryPlan(2, (), "random")
    assert plan_recovery([2], 4, strategy="uniform_average")[0].sources == (1, 3)


def test_nonexistent_stage_is_an_error():
    with pytest.raises(RecoveryError, match="stage 7 does not exist"):
        plan_recovery([7], 4)


# --- weights --------------------------------------------------------------------------------------------------

def test_gradnorm_weights_are_norm_plus_eps():
    plan = RecoveryPlan(2, (1, 3), "gradnorm_average", (1, 1))
    weights, fallback = source_weights(plan, [0.5, 2.0], eps=1e-4)
    assert weights == (0.5 + 1e-4, 2.0 + 1e-4) and fallback is None


def test_squared_norm_weights():
    plan = RecoveryPlan(2, (1, 3), "gradnorm_average", (1, 1))
    weights, _ = source_weights(plan, [0.5, 2.0], eps=1e-4, norm="squared")
    assert weights == (0.25 + 1e-4, 4.0 + 1e-4)


@pytest.mark.parametrize("bad", [0.0, math.nan, math.inf, None])
def test_unusable_norm_falls_back_to_uniform_and_says_why(bad):
    plan = RecoveryPlan(2, (1, 3), "gradnorm_average", (1, 1))
    weights, fallback = source_weights(plan, [bad, 1.0])
    assert weights == (1.0, 1.0)
    assert "stage 1" in fallback and "uniform_average" in fallback


def test_interpolation_weights_favour_the_nearer_survivor():
    plan = RecoveryPlan(2, (1, 4), "gradnorm_average", (1, 2))
    weights, _ = source_weights(plan, [1.0, 1.0], eps=0.0)
    assert weights == (2.0, 1.0)
    uniform, _ = source_weights(RecoveryPlan(2, (1, 4), "uniform_average", (1, 2)), [None, None])
    assert uniform == (2.0, 1.0)


def test_copy_and_random_weights():
    assert source_weights(RecoveryPlan(0, (1,), "copy", (1,)), [3.0]) == ((1.0,), None)
    assert source_weights(RecoveryPlan(0, (), "random"), []) == ((), None)


# --- blending -------------------------------------------------------------------------------------------------

def test_blend_matches_the_paper_formula_exactly_in_fp32():
    a, b = torch.randn(4, 5), torch.randn(4, 5)
    wa, wb = 0.3 + 1e-4, 1.7 + 1e-4
    assert torch.equal(blend([a, b], [wa, wb]), (wa * a + wb * b) / (wa + wb))


def test_blend_keeps_dtype_and_device_and_computes_in_fp32():
    a = torch.randn(8, dtype=torch.bfloat16)
    b = torch.randn(8, dtype=torch.bfloat16)
    out = blend([a, b], [1.0, 3.0])
    assert out.dtype == torch.bfloat16 and out.device == a.device
    assert torch.equal(out, ((1.0 * a.float() + 3.0 * b.float()) / 4.0).to(torch.bfloat16))
    assert blend([a.double(), b.double()], [1.0, 1.0]).dtype == torch.float64


def test_blend_copy_is_exact():
    a = torch.randn(3, 3)
    assert torch.equal(blend([a], [1.0]), a)


def test_blend_rejects_bad_weights():
    with pytest.raises(ValueError, match="sum to a positive"):
        blend([torch.ones(1), torch.ones(1)], [0.0, 0.0])
    with pytest.raises(ValueError, match="one weight per tensor"):
        blend([torch.ones(1)], [1.0, 1.0])


# --- matching layers ------------------------------------------------------------------------------------------

class Block(nn.Module):
    def __init__(self, d=4):
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.ln = nn.LayerNorm(d)


class Embed(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(10, 4)


def sig(*layers):
    return tuple(layer_signature(name, mod, key) for name, mod, key in layers)


def test_blocks_match_by_type_and_order_skipping_other_layer_types():
    target = sig(("3", Block(), None), ("4", Block(), None))
    source = sig(("0", Embed(), None), ("1", Block(), None), ("2", Block(), None))
    m = match_layers(target, source, 1, 0)
    assert ("3.fc.weight", "1.fc.weight") in m.pairs and ("4.ln.bias", "2.ln.bias") in m.pairs
    assert all(not s.startswith("0.") for _, s in m.pairs)
    assert m.note is None


def test_unequal_block_counts_map_by_relative_position_and_say_so():
    target = sig(("4", Block(), None), ("5", Block(), None))
    source = sig(("1", Block(), None), ("2", Block(), None), ("3", Block(), None))
    m = match_layers(target, source, 2, 1)
    assert ("4.fc.weight", "1.fc.weight") in m.pairs and ("5.fc.weight", "3.fc.weight") in m.pairs
    assert "relative position" in m.note


def test_mismatched_shapes_name_the_parameters():
    target = sig(("3", Block(4), None))
    source = sig(("1", Block(8), None))
    with pytest.raises(RecoveryError, match=r"fc\.weight.*\[4, 4\].*\[8, 8\]"):
        match_layers(target, source, 2, 1)


def test_missing_layer_type_is_a_clear_error():
    with pytest.raises(RecoveryError, match="has none"):
        match_layers(sig(("3", Block(), None)), sig(("0", Embed(), None)), 1, 0)


def test_tied_layers_match_by_key():
    target = sig(("tied_modules.embed", Embed(), "embed"), ("2", Block(), None))
    source = sig(("tied_modules.embed", Embed(), "embed"), ("1", Block(), None))
    m = match_layers(target, source, 1, 0)
    assert ("tied_modules.embed.tok.weight", "tied_modules.embed.tok.weight") in m.pairs
    with pytest.raises(RecoveryError, match="tied layer 'embed'"):
        match_layers(target, sig(("1", Block(), None)), 1, 2)


def test_blend_state_follows_mappings():
    m = match_layers(sig(("3", Block(), None)), sig(("1", Block(), None)))
    m2 = match_layers(sig(("3", Block(), None)), sig(("5", Block(), None)))
    s1 = {k: torch.ones_like(v) for k, v in Block().state_dict().items()}
    s1 = {f"1.{k}": v for k, v in s1.items()}
    s2 = {f"5.{k}": 3 * torch.ones_like(v) for k, v in Block().state_dict().items()}
    out = blend_state([s1, s2], [m, m2], [1.0, 1.0])
    assert set(out) == {f"3.{k}" for k in Block().state_dict()}
    assert all(torch.equal(v, 2 * torch.ones_like(v)) for v in out.values())


def test_reinitialize_is_seeded_and_leaves_global_rng_alone():
    a, b = Block(), Block()
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    reinitialize([a], seed=5)
    reinitialize([b], seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a.fc.weight, b.fc.weight)


def test_clip_stage_grads_scales_in_place_and_returns_the_clipped_norm():
    from deepspeed_checkfree.core.recovery import clip_stage_grads_
    grads = [torch.full((3,), 3.0), torch.full((4,), 4.0)]
    norm = torch.linalg.vector_norm(torch.cat(grads))
    clipped = clip_stage_grads_(grads, norm, 1.0)
    assert torch.allclose(torch.linalg.vector_norm(torch.cat(grads)), torch.tensor(1.0), atol=1e-5)
    assert torch.allclose(clipped, torch.tensor(1.0), atol=1e-5)
    small = [torch.full((2,), 0.1)]
    n = torch.linalg.vector_norm(small[0])
    assert torch.equal(clip_stage_grads_(small, n, 1.0), n) and torch.equal(small[0], torch.full((2,), 0.1))


def test_tied_authorities_follow_the_copy_source_of_an_edge_rebuild_only():
    from deepspeed_checkfree.core.recovery import LayerSignature, tied_authorities
    sigs = {s: (LayerSignature(f"L{s}", "Block", (("w", (2,), "torch.float32"),), None),) for s in range(4)}
    sigs[0] = sigs[0] + (LayerSignature("tied_modules.checkfree_embed", "Embed", (("w", (2,), "torch.float32"),), "checkfree_embed"),)
    sigs[1] = sigs[1] + (LayerSignature("tied_modules.checkfree_embed", "Embed", (("w", (2,), "torch.float32"),), "checkfree_embed"),)
    plus = plan_recovery([0], 4, "checkfree_plus")
    assert tied_authorities(plus, sigs) == {"checkfree_embed": 1}
    assert tied_authorities(plan_recovery([2], 4, "checkfree"), sigs) == {}
