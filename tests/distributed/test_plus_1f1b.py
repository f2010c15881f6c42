"""CheckFree+ under its route-aware 1F1B schedule in the real DeepSpeed PipelineEngine (4, 5 and 6 gloo ranks): the
same mathematics as a single-process route reference for even and odd micro-batch counts (odd ones also under bf16
and ZeRO-1), under DeepSpeed's activation checkpointing (reentrant and not) and with the first pair recomputing
micro-batches (checkfree.plus_recompute_edges), activations bounded per stage whatever the micro-batch count, and
additional losses aggregated over both loss ranks."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deepspeed_checkfree.core.recompute import recomputed_micro_batches
from deepspeed_checkfree.core.schedule import CheckFreePlusTrainSchedule, max_in_flight, route
from deepspeed_checkfree.models import gpt
from deepspeed_checkfree.models.corpus import StepBatches, load_corpus
from deepspeed_checkfree.pipe.plus_module import EMBED_KEY, HEAD_KEY

from ..harness import oracle
from ..harness.ranks import run_scenarios
from .test_plus import _assert_replicas_identical, reference_model
from ..harness.scenarios import LR, MICRO_BATCH, MODEL, plus

pytestmark = pytest.mark.distributed

WORKER = Path(__file__).with_name("plus_1f1b_worker.py")
SCENARIOS_4 = [
    {"name": "m8", "num_stages": 4, "gas": 8, "steps": 3},
    {"name": "m5", "num_stages": 4, "gas": 5, "steps": 3},
    {"name": "m16", "num_stages": 4, "gas": 16, "steps": 1},
    {"name": "aux", "num_stages": 4, "gas": 4, "steps": 2, "aux": "same"},
    {"name": "aux_mismatch", "num_stages": 4, "gas": 4, "steps": 1, "aux": "mismatch", "expect_error": True},
    # Odd micro-batch counts (three normal routes, two swapped) under the mixed-precision optimizers.
    {"name": "m5_bf16", "num_stages": 4, "gas": 5, "steps": 2, "precision": "bf16"},
    {"name": "m5_zero1", "num_stages": 4, "gas": 5, "steps": 3, "zero": 1},
    # DeepSpeed's activation checkpointing: every layer a segment with its default (reentrant) checkpoint, and two
    # layers a segment with the non-reentrant one.
    {"name": "m5_ac1", "num_stages": 4, "gas": 5, "steps": 2, "ac_interval": 1},
    {"name": "m6_ac2_nonreentrant", "num_stages": 4, "gas": 6, "steps": 2, "ac_interval": 2, "use_reentrant": False},
    # Every micro-batch of stages 0 and 1 recomputed (4 stages already hold stock's level, so true recomputes none).
    {"name": "m5_recompute_all", "num_stages": 4, "gas": 5, "steps": 2, "cf": {"plus_recompute_edges": "all"}},
    {"name": "m5_zero1_recompute_all", "num_stages": 4, "gas": 5, "steps": 2, "zero": 1,
     "cf": {"plus_recompute_edges": "all"}},
]
# Five stages run their own plan (one middle stage; W = 6 on the first pair).
SCENARIOS_5 = [{"name": "m7", "num_stages": 5, "gas": 7, "steps": 2}]
SCENARIOS_6 = [{"name": "m7", "num_stages": 6, "gas": 7, "steps": 3},
               {"name": "m16", "num_stages": 6, "gas": 16, "steps": 1},
               # The first pair recomputes 4 of 16 micro-batches each (the hops 0->2 and 3->5 carry their gradients).
               {"name": "m16_recompute", "num_stages": 6, "gas": 16, "steps": 2, "cf": {"plus_recompute_edges": True}},
               # Both at once: the recomputed micro-batches run the stage, segments and all, inside one checkpoint.
               {"name": "m9_ac1_recompute", "num_stages": 6, "gas": 9, "steps": 2, "ac_interval": 1,
                "cf": {"plus_recompute_edges": True}}]
RECOMPUTING = [("four", 4, sc) for sc in SCENARIOS_4 if "cf" in sc] + \
    [("six", 6, sc) for sc in SCENARIOS_6 if "cf" in sc]
CHECKPOINTING = [("four", 4, sc) for sc in SCENARIOS_4 if "ac_interval" in sc] + \
    [("six", 6, sc) for sc in SCENARIOS_6 if "ac_interval" in sc]


def _launch(tmp_path_factory, world, scenarios):
    out = tmp_path_factory.mktemp(f"plus1f1b{world}")
    return run_scenarios(WORKER, world, [{**sc, "checkfree": plus(**sc.get("cf", {}))} for sc in scenarios], out)


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    return _launch(tmp_path_factory, 4, SCENARIOS_4)


@pytest.fixture(scope="module")
def five(tmp_path_factory):
    return _launch(tmp_path_factory, 5, SCENARIOS_5)


@pytest.fixture(scope="module")
def six(tmp_path_factory):
    return _launch(tmp_path_factory, 6, SCENARIOS_6)


def _stage_parts(params: dict):
    """(embedding params, [block param dicts in order], head params) of one stage's named parameters."""
    return oracle.stage_parts(params, EMBED_KEY, HEAD_KEY)


def _reference(recs, num_stages, micro_batches, steps, dp_size=1):
    """Train the same model in one process, every micro-batch on its CheckFree+ route, in micro-batch order, each
    of ``dp_size`` data-parallel replicas' micro-batches in turn (their gradients averaged, as DeepSpeed does).
    Returns per-step mean losses and mean squared logits, and the final embedding, stages and head."""
    embed, stages, head, params = reference_model(recs, num_stages)
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.01)
    replicas = [StepBatches(load_corpus(), seq_len=MODEL.seq_len, micro_batch_size=MICRO_BATCH,
                            micro_batches=micro_batches, dp_rank=d, dp_size=dp_size) for d in range(dp_size)]
    count = micro_batches * dp_size
    losses, logit_sq = [], []
    for step in range(steps):
        opt.zero_grad()
        total = total_sq = 0.0
        for batches in replicas:
            for mb in range(micro_batches):
                x, y = batches.get(step, mb)
                h = embed(x)
                for s in route(mb, num_stages):
                    for b in stages[s]:
                        h = b(h)
                logits = head(h)
                loss = gpt.lm_loss(logits, y)
                (loss / count).backward()
                total += loss.item()
                total_sq += logits.detach().pow(2).mean().item()
        opt.step()
        losses.append(total / count)
        logit_sq.append(total_sq / count)
    return losses, logit_sq, embed, stages, head


def _check_against_reference(recs, num_stages, micro_batches, steps, dp_size=1, atol=1e-5):
    """``recs``: one pipeline's records in stage order (one data-parallel column of ``dp_size``); ``atol`` on the
    weights."""
    losses, _, embed, stages, head = _reference(recs, num_stages, micro_batches, steps, dp_size)
    for r in range(num_stages):  # every rank reports the same step loss
        assert recs[r]["losses"] == pytest.approx(losses, rel=1e-5, abs=1e-6)
    for s in range(num_stages):
        emb_p, block_ps, head_p = _stage_parts(recs[s]["final_params"])
        for bp, ref in zip(block_ps, stages[s]):
            for n, p in ref.named_parameters():
                got, want = bp[n], p.detach()
                if n == "qkv.bias":
                    # The key bias has an exactly-zero true gradient (softmax ignores a constant added to every
                    # score); Adam turns its rounding noise into +-lr steps. Compare the query and value parts.
                    d = MODEL.d_model
                    got, want = torch.cat([got[:d], got[2 * d:]]), torch.cat([want[:d], want[2 * d:]])
                torch.testing.assert_close(got, want, rtol=1e-4, atol=atol)
        for got, ref in ((emb_p, embed), (head_p, head)):
            for n, p in ref.named_parameters():
                if n in got:
                    torch.testing.assert_close(got[n], p.detach(), rtol=1e-4, atol=atol)


@pytest.mark.parametrize("name,micro_batches", [("m8", 8), ("m5", 5)])
def test_four_stage_1f1b_matches_the_single_process_route_reference(four, name, micro_batches):
    _check_against_reference(four[name], 4, micro_batches, 3)


def test_five_stage_1f1b_matches_the_reference_and_holds_its_bound(five):
    recs = five["m7"]
    _check_against_reference(recs, 5, 7, 2)
    for s in range(5):
        assert recs[s]["held_peak"] == [max_in_flight(s, 5, 7)] * 2, f"stage {s}: held {recs[s]['held_peak']}"


def test_six_stage_1f1b_with_an_odd_micro_batch_count_matches_the_reference(six):
    _check_against_reference(six["m7"], 6, 7, 3)


def test_odd_micro_batch_count_under_zero1_matches_the_single_process_route_reference(four):
    assert next(iter(four["m5_zero1"][0]["final_params"].values())).dtype == torch.float32
    _check_against_reference(four["m5_zero1"], 4, 5, 3)


def test_odd_micro_batch_count_under_bf16_tracks_the_fp32_reference_and_keeps_the_copies_identical(four):
    recs = four["m5_bf16"]
    assert next(iter(recs[0]["final_params"].values())).dtype == torch.bfloat16
    losses, _, _, _, _ = _reference(recs, 4, 5, 2)
    for r in range(4):
        # bf16 activations against an fp32 reference from the same (bf16) weights: a wrongly scaled or dropped
        # micro-batch (one of five moves the mean by ~20%) is far outside this tolerance.
        assert recs[r]["losses"] == pytest.approx(losses, rel=1e-2), f"rank {r}"
    _assert_replicas_identical(recs, 4)


@pytest.mark.parametrize("world", [4, 6])
def test_activations_held_per_stage_stay_within_the_bound_whatever_the_micro_batch_count(four, six, world):
    recs = (four if world == 4 else six)["m16"]
    for s in range(world):
        bound = max_in_flight(s, world, 16)
        assert recs[s]["held_peak"] == [bound], f"stage {s}: held {recs[s]['held_peak']}, bound {bound}"
        assert recs[s]["buffers"] == CheckFreePlusTrainSchedule(16, world, s).num_pipe_buffers() <= bound + 1
    # All 16 were held before; now at most the depth (4 stages), or the depth plus two on the first pair (the least
    # any period-6 plan holds there: tests/unit/test_schedule_bound.py).
    assert max(r["held_peak"][0] for r in recs) == (4 if world == 4 else world + 2)


def test_additional_losses_are_aggregated_over_both_loss_ranks_on_every_rank(four):
    recs = four["aux"]
    _, logit_sq, _, _, _ = _reference(recs, 4, 4, 2)
    for r in range(4):
        got = [a["logit_sq"] for a in recs[r]["additional"]]
        assert got == pytest.approx(logit_sq, rel=1e-5), f"rank {r}"


def test_additional_losses_that_differ_between_stages_fail_on_every_rank_with_the_rule(four):
    for r in range(4):
        rec = four["aux_mismatch"][r]
        assert rec["error"] == "UnsupportedSetupError"
        assert "get_additional_losses() of the model must return the same loss names" in rec["message"]


@pytest.mark.parametrize("launch,stages,sc", RECOMPUTING + CHECKPOINTING,
                         ids=[sc["name"] for _, _, sc in RECOMPUTING + CHECKPOINTING])
def test_recomputation_and_activation_checkpointing_keep_the_routes_of_the_single_process_reference(
        request, launch, stages, sc):
    recs = request.getfixturevalue(launch)[sc["name"]]
    _check_against_reference(recs, stages, sc["gas"], sc["steps"])
    _assert_replicas_identical(recs, stages)
    for s in range(stages):  # the schedule is unchanged: the same micro-batches in flight
        assert recs[s]["held_peak"] == [max_in_flight(s, stages, sc["gas"])] * sc["steps"], f"stage {s}"


@pytest.mark.parametrize("launch,stages,sc", RECOMPUTING, ids=[sc["name"] for _, _, sc in RECOMPUTING])
def test_the_first_pair_runs_the_forward_again_for_exactly_the_planned_micro_batches(request, launch, stages, sc):
    recs = request.getfixturevalue(launch)[sc["name"]]
    policy, m = sc["cf"]["plus_recompute_edges"], sc["gas"]
    for s in range(stages):
        planned = recomputed_micro_batches(s, stages, m, policy)
        assert recs[s]["recomputed"] == sorted(planned)
        assert bool(planned) == (s in (0, 1)), f"stage {s} recomputes {sorted(planned)}"
        # A block runs once per micro-batch (twice under activation checkpointing), once more per recomputed one:
        # the stage's first run keeps nothing, its second (in the backward) runs the checkpointing segments as usual.
        want = (2 * m if sc.get("ac_interval") else m) + len(planned)
        assert recs[s]["block_forwards"] == [want] * sc["steps"], f"stage {s}"


@pytest.mark.parametrize("launch,stages,sc", CHECKPOINTING, ids=[sc["name"] for _, _, sc in CHECKPOINTING])
def test_activation_checkpointing_recomputes_every_block_with_the_configured_checkpoint(request, launch, stages, sc):
    recs = request.getfixturevalue(launch)[sc["name"]]
    want = "non_reentrant_checkpoint" if sc.get("use_reentrant") is False else "checkpoint"
    for s in range(stages):
        assert recs[s]["checkpoint_func"] == want
        recomputed = len(recs[s]["recomputed"])  # the first pair's, with plus_recompute_edges too
        assert recs[s]["block_forwards"] == [2 * sc["gas"] + recomputed] * sc["steps"], f"stage {s}"
