"""CheckFree+ in the real DeepSpeed PipelineEngine: out-of-order micro-batches against a single-process reference,
(de)embedding replicas, first/last stage recovery, and DeepSpeed checkpoints. 4 and 6 real ranks on gloo."""
from __future__ import annotations

import math

import pytest
import torch

from deepspeed_checkfree.core.schedule import route
from deepspeed_checkfree.events import read_events
from deepspeed_checkfree.models import gpt
from deepspeed_checkfree.models.corpus import StepBatches, load_corpus
from deepspeed_checkfree.pipe.plus_module import EMBED_KEY, HEAD_KEY

from ..harness import oracle
from ..harness.oracle import check_loss_falls, check_recorded_rebuild, check_stage_norms_measured
from ..harness.ranks import run_scenarios
from ..harness.scenarios import LR, MICRO_BATCH, MODEL, WORKER, check_clear_error, lose, norm_tolerance, plus

pytestmark = pytest.mark.distributed

REF_STEPS = 3
MICRO_BATCHES = 4


def _lose(stage, step):
    return lose(stage, step, mode="checkfree_plus")


REFERENCE = {"model": "plus", "steps": REF_STEPS, "clip": 0.0, "constant_lr": True, "checkfree": plus()}
SCENARIOS_4 = [
    {"name": "ref4", **REFERENCE},
    {"name": "lose0", "model": "plus", "steps": 10, "checkfree": _lose(0, 3)},
    {"name": "lose3", "model": "plus", "steps": 10, "checkfree": _lose(3, 3)},
    {"name": "ckpt4", "model": "plus", "steps": 3, "checkpoint": True, "checkfree": plus()},
    {"name": "tied4", "model": "plus_tied", "steps": 8, "checkfree": _lose(3, 4)},
    {"name": "lose0_bf16", "model": "plus", "precision": "bf16", "steps": 8, "checkfree": _lose(0, 3)},
    {"name": "lose3_zero1", "model": "plus", "zero": 1, "steps": 8, "checkfree": _lose(3, 3)},
    {"name": "plus_needs_plus_module", "steps": 1, "checkfree": plus(), "expect_error": True},
    {"name": "plus_needs_two_micro_batches", "model": "plus", "gas": 1, "steps": 1, "checkfree": plus(),
     "expect_error": True},
    {"name": "plus_refuses_fp16", "model": "plus", "precision": "fp16", "steps": 1, "checkfree": plus(),
     "expect_error": True},
]
SCENARIOS_6 = [{"name": "ref6", "num_stages": 6, **REFERENCE},
               {"name": "lose5_of_6", "num_stages": 6, "model": "plus", "steps": 8, "checkfree": _lose(5, 3)}]


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    out = tmp_path_factory.mktemp("plus4")
    return out, run_scenarios(WORKER, 4, SCENARIOS_4, out)


@pytest.fixture(scope="module")
def six(tmp_path_factory):
    out = tmp_path_factory.mktemp("plus6")
    return out, run_scenarios(WORKER, 6, SCENARIOS_6, out)


def _stage_parts(params: dict):
    """(embedding params, [block param dicts in order], head params) of one stage's named parameters."""
    return oracle.stage_parts(params, EMBED_KEY, HEAD_KEY)


def reference_model(recs, num_stages):
    """The demo GPT as standalone modules, initialised from every stage's recorded initial parameters: the
    embedding (stage 0), each stage's blocks, the head (stage P-1), and all their parameters in that order."""
    embed, head = gpt.Embedding(MODEL), gpt.Head(MODEL)
    stages = []
    for s in range(num_stages):
        emb_p, block_ps, head_p = oracle.stage_parts(recs[s]["initial_params"], EMBED_KEY, HEAD_KEY)
        if s == 0:
            embed.load_state_dict(emb_p)
        if s == num_stages - 1:
            head.load_state_dict(head_p)
        blocks = []
        for bp in block_ps:
            b = gpt.Block(MODEL)
            b.load_state_dict(bp)
            blocks.append(b)
        stages.append(blocks)
    params = list(embed.parameters()) + [p for st in stages for b in st for p in b.parameters()] + \
        list(head.parameters())
    return embed, stages, head, params


def _reference_run(recs, num_stages, steps):
    """Train the same model in one process, routing micro-batches exactly as CheckFree+ does; returns the losses,
    the trained modules, and per step each stage's gradient norm (its blocks, plus the embedding on stages 0 and 1
    and the head on stages P-2 and P-1: each replica's gradient is the sum over both copies, as the reference's)."""
    torch.manual_seed(0)
    embed, stages, head, params = reference_model(recs, num_stages)
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.01)
    batches = StepBatches(load_corpus(), seq_len=MODEL.seq_len, micro_batch_size=MICRO_BATCH,
                          micro_batches=MICRO_BATCHES)
    losses, norms = [], []
    for step in range(steps):
        opt.zero_grad()
        total = 0.0
        for mb in range(MICRO_BATCHES):
            x, y = batches.get(step, mb)
            h = embed(x)
            for s in route(mb, num_stages):
                for b in stages[s]:
                    h = b(h)
            loss = gpt.lm_loss(head(h), y)
            (loss / MICRO_BATCHES).backward()
            total += loss.item()

        def sq(modules):
            return sum(float(p.grad.double().pow(2).sum()) for m in modules for p in m.parameters())

        norms.append([math.sqrt(sq(stages[s]) + (sq([embed]) if s in (0, 1) else 0.0)
                                + (sq([head]) if s in (num_stages - 2, num_stages - 1) else 0.0))
                      for s in range(num_stages)])
        opt.step()
        losses.append(total / MICRO_BATCHES)
    return losses, embed, stages, head, norms


def _check_against_reference(recs, num_stages):
    losses, embed, stages, head, norms = _reference_run(recs, num_stages, REF_STEPS)
    assert recs[0]["losses"] == pytest.approx(losses, rel=1e-5, abs=1e-6)
    # The per-stage gradient norm, against one computed from the reference's gradients (no clipping here).
    for s in range(num_stages):
        assert recs[s]["norms"] == pytest.approx([n[s] for n in norms], rel=1e-4), f"stage {s}"
    for s in range(num_stages):
        emb_p, block_ps, head_p = _stage_parts(recs[s]["final_params"])
        assert len(block_ps) == len(stages[s])
        for bp, ref in zip(block_ps, stages[s]):
            for n, p in ref.named_parameters():
                got, want = bp[n], p.detach()
                if n == "qkv.bias":
                    # The key bias has an exactly-zero true gradient (softmax ignores a constant added to every
                    # score); Adam turns its rounding noise into +-lr steps. Compare the query and value parts.
                    d = MODEL.d_model
                    got, want = torch.cat([got[:d], got[2 * d:]]), torch.cat([want[:d], want[2 * d:]])
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        for got, ref in ((emb_p, embed), (head_p, head)):
            for n, p in ref.named_parameters():
                if n in got:
                    torch.testing.assert_close(got[n], p.detach(), rtol=1e-4, atol=1e-5)


def test_four_stage_swaps_match_a_single_process_reference(four):
    _, recs = four
    assert [r["engine"] for r in recs["ref4"]] == ["CheckFreeEngine"] * 4
    _check_against_reference(recs["ref4"], 4)


def test_six_stage_swaps_match_a_single_process_reference(six):
    _, recs = six
    _check_against_reference(recs["ref6"], 6)


TRAINED = [("four", 4, sc) for sc in SCENARIOS_4 if "expect_error" not in sc] + [("six", 6, sc) for sc in SCENARIOS_6]


@pytest.mark.parametrize("launch,stages,sc", TRAINED, ids=[sc["name"] for _, _, sc in TRAINED])
def test_every_stage_records_the_norm_of_its_own_gradient_with_replicas(request, launch, stages, sc):
    # fp32, bf16 and ZeRO-1, with the (de)embedding replicas' reduced gradients, before and after edge rebuilds.
    _, recs = request.getfixturevalue(launch)
    check_stage_norms_measured(recs[sc["name"]], stages=stages, rel=norm_tolerance(sc))


def _assert_replicas_identical(recs, num_stages, which="final_params"):
    emb0, _, _ = _stage_parts(recs[0][which])
    emb1, _, _ = _stage_parts(recs[1][which])
    _, _, head_a = _stage_parts(recs[num_stages - 2][which])
    _, _, head_b = _stage_parts(recs[num_stages - 1][which])
    assert emb0 and head_a and emb0.keys() == emb1.keys() and head_a.keys() == head_b.keys()
    for a, b in ((emb0, emb1), (head_a, head_b)):
        for n in a:
            assert torch.equal(a[n], b[n]), f"replica {n} differs from its original"


def test_replicas_stay_bit_identical_to_their_originals(four, six):
    _assert_replicas_identical(four[1]["ref4"], 4)
    _assert_replicas_identical(six[1]["ref6"], 6)


def test_replica_memory_is_reported(four):
    _, recs = four
    sizes = [recs["ref4"][r]["replica_bytes"] for r in range(4)]
    emb = (MODEL.vocab_size + MODEL.seq_len) * MODEL.d_model * 4
    head = (2 * MODEL.d_model + MODEL.d_model * MODEL.vocab_size) * 4
    assert sizes == [0, emb, head, 0]


def _check_copy_rebuild(recs, target, step):
    """An edge stage rebuilt as an exact copy of its neighbour, (de)embedding replica included; the other stages
    untouched; training goes on."""
    check_recorded_rebuild(recs, target, strategy="copy", expect_replica=True)
    check_loss_falls(recs[0]["losses"], since=step)


def test_lost_first_stage_is_rebuilt_as_an_exact_copy_of_stage_1(four):
    out, recs = four
    _check_copy_rebuild(recs["lose0"], 0, 3)
    rec = read_events(str(out / "lose0.events.jsonl"))[-1]
    assert rec["event"] == "recovery" and rec["strategy"] == "copy" and rec["sources"] == [1]
    assert rec["weights"] == [1.0]
    # The rebuilt copy has a fresh optimizer and a boosted LR; the survivor's embedding stays authoritative.
    _assert_replicas_identical(recs["lose0"], 4)


def test_lost_last_stage_is_rebuilt_as_an_exact_copy_of_stage_p_minus_2(four):
    _, recs = four
    _check_copy_rebuild(recs["lose3"], 3, 3)
    _assert_replicas_identical(recs["lose3"], 4)


def test_lost_last_of_six_stages_is_copied_from_stage_4(six):
    _, recs = six
    _check_copy_rebuild(recs["lose5_of_6"], 5, 3)
    _assert_replicas_identical(recs["lose5_of_6"], 6)


def test_deepspeed_checkpoint_saves_and_loads_embedding_and_head(four):
    out, recs = four
    files = sorted(p.name for p in (out / "ckpt-ckpt4" / "t").glob("layer_*"))
    # every layer with parameters is written, the replicas on stages 1 and P-2 included
    n_layers = 2 + 2 + MODEL.n_layers
    assert len(files) == n_layers, files
    for r in range(4):
        final, reloaded = recs["ckpt4"][r]["final_params"], recs["ckpt4"][r]["reloaded_params"]
        assert final.keys() == reloaded.keys()
        for n in final:
            assert torch.equal(final[n], reloaded[n]), f"rank {r} {n} not restored"
    assert math.isfinite(recs["ckpt4"][0]["reloaded_loss"])


@pytest.mark.parametrize("name,error,pattern", [
    ("plus_needs_plus_module", "UnsupportedSetupError", r"checkfree_plus_module"),
    ("plus_needs_two_micro_batches", "ConfigError", r"gradient_accumulation_steps >= 2; the config has 1"),
    ("plus_refuses_fp16", "UnsupportedSetupError", r"not fp16.*Use bf16 or fp32"),
])
def test_bad_checkfree_plus_setups_fail_before_training(four, name, error, pattern):
    _, recs = four
    check_clear_error(recs[name], error, pattern)


def test_tied_input_output_embeddings_keep_working_and_stay_identical_on_all_four_holders(four):
    _, recs = four
    rec = recs["tied4"]
    copies = [{n: p for n, p in rec[r]["final_params"].items() if n.startswith("tied_modules.embed.")}
              for r in range(4)]
    assert copies[0] and all(c.keys() == copies[0].keys() for c in copies)
    for c in copies[1:]:
        for n, p in c.items():
            assert torch.equal(p, copies[0][n]), f"tied copy {n} diverged"
    # The lost last stage is a copy of stage 2: its blocks and its holder of the tied embedding.
    check_recorded_rebuild(rec, 3, strategy="copy", expect_replica=True)
    losses = rec[0]["losses"]
    assert all(math.isfinite(l) for l in losses) and losses[-1] < losses[0]


@pytest.mark.parametrize("name,target,dtype", [("lose0_bf16", 0, torch.bfloat16), ("lose3_zero1", 3, torch.float32)])
def test_edge_rebuild_under_bf16_and_zero1_keeps_weights_and_fp32_masters_of_the_copies_identical(
        four, name, target, dtype):
    _, recs = four
    rec = recs[name]
    assert next(iter(rec[0]["final_params"].values())).dtype == dtype
    _check_copy_rebuild(rec, target, 3)  # survivors' fp32 masters included
    oracle.check_masters_refreshed(oracle.rebuild_snapshots(rec)[1][target])
    _assert_replicas_identical(rec, 4)
    # The optimizer's fp32 masters of the copies agree too: the rebuilt copy's fresh optimizer and boosted LR
    # are overridden by the surviving copy after every step, masters included.
    _assert_replicas_identical(rec, 4, which="final_masters")
    masters = rec[target]["final_masters"]
    assert all(torch.isfinite(m).all() for m in masters.values())
