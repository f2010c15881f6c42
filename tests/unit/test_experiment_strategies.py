"""The strategies on the simulated pipeline: CheckFree rebuilds with the recovery module's math, checkpointing
really rolls back, redundant computation never loses work, and every strategy meets the same failures."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from deepspeed_checkfree.experiment.config import parse_experiment
from deepspeed_checkfree.experiment.simulated import SimulatedPipeline
from deepspeed_checkfree.experiment.strategies import needs_mode, run_strategy
from deepspeed_checkfree.pipe.plus_module import EMBED_KEY
from deepspeed_checkfree.core.recovery import blend, plan_recovery, source_weights
from deepspeed_checkfree.core.schedule import route

TINY = {"model": {"num_stages": 4, "d_model": 16, "n_heads": 2, "seq_len": 16},
        "training": {"iterations": 12, "micro_batch_size": 2, "micro_batches": 2, "eval_every": 4,
                     "eval_batches": 1, "lr": 3e-3}}


def _cfg(failures=None, strategies=None, **training):
    data = {**TINY, "training": {**TINY["training"], **training}}
    if failures is not None:
        data["failures"] = failures
    if strategies is not None:
        data["strategies"] = strategies
    return parse_experiment(data)


def _run(cfg, name):
    spec = next(s for s in cfg.strategies if s.name == name)
    pipe = SimulatedPipeline(cfg, *needs_mode(spec))
    return pipe, run_strategy(cfg, spec, pipe, cfg.failure_plan())


def test_pipelines_start_from_the_same_weights_whatever_the_mode():
    cfg = _cfg()
    a, b = SimulatedPipeline(cfg), SimulatedPipeline(cfg, "checkfree_plus")
    for s in range(4):
        pa, pb = a.named_stage_params(s), b.named_stage_params(s)
        for name, value in pa.items():
            assert torch.equal(value, pb[name])
    # CheckFree+ adds the replicas: stage 1 holds the embedding, stage 2 the head, equal to the originals.
    assert torch.equal(b.named_stage_params(1)["embed.tok.weight"], b.named_stage_params(0)["embed.tok.weight"])
    assert torch.equal(b.named_stage_params(2)["head.lm.weight"], b.named_stage_params(3)["head.lm.weight"])


def test_checkfree_rebuild_is_the_gradnorm_blend_of_the_neighbours():
    cfg = _cfg()
    pipe = SimulatedPipeline(cfg)
    for step in range(3):
        pipe.train_step(step)
    before = {s: {n: p.detach().clone() for n, p in pipe.named_stage_params(s).items()} for s in range(4)}
    opt_before = {s: len(pipe.optimizers[s].state) for s in range(4)}
    norms = list(pipe.grad_norms)
    pipe.lose_and_rebuild([2], step=3)
    plan = plan_recovery([2], 4)[0]
    weights, fallback = source_weights(plan, [norms[1], norms[3]])
    assert plan.sources == (1, 3) and fallback is None
    # Computed independently: block2 <- blend(block1, block3) with weights |g| + eps.
    for name, value in pipe.named_stage_params(2).items():
        param = name.split(".", 1)[1]
        want = blend([before[1][f"block1.{param}"], before[3][f"block3.{param}"]], weights)
        assert torch.equal(value, want), name
    for s in (0, 1, 3):  # the other stages are bit-identical, their optimizer state untouched
        for name, value in pipe.named_stage_params(s).items():
            assert torch.equal(value, before[s][name])
        assert len(pipe.optimizers[s].state) == opt_before[s] > 0
    assert len(pipe.optimizers[2].state) == 0
    assert [g["lr"] for g in pipe.optimizers[2].param_groups] == [pytest.approx(3e-3 * 1.1)]
    assert math.isfinite(pipe.train_step(3))


def test_copy_and_random_ablations():
    cfg = _cfg()
    pipe = SimulatedPipeline(cfg, strategy="copy")
    pipe.train_step(0)
    prev = {n.split(".", 1)[1]: p.detach().clone() for n, p in pipe.named_stage_params(1).items()}
    pipe.lose_and_rebuild([2], step=1)
    for name, value in pipe.named_stage_params(2).items():
        assert torch.equal(value, prev[name.split(".", 1)[1]])
    rnd = SimulatedPipeline(cfg, strategy="random")
    rnd.train_step(0)
    rnd.lose_and_rebuild([2], step=1)
    values = list(rnd.named_stage_params(2).values())
    assert all(torch.isfinite(v).all() for v in values)
    fresh = SimulatedPipeline(cfg, strategy="random")
    assert not all(torch.equal(v, w) for v, w in zip(values, fresh.named_stage_params(2).values()))


def test_per_stage_clip_scales_each_stage_and_records_the_clipped_norm():
    free = SimulatedPipeline(_cfg(per_stage_clip=None))
    free.train_step(0)
    norms = list(free.grad_norms)
    clip = sorted(norms)[1]  # some stages above it, some below: each stage is clipped on its own
    clipped = SimulatedPipeline(_cfg(per_stage_clip=clip))
    clipped.train_step(0)
    assert any(n > clip for n in norms) and any(n < clip for n in norms)
    for s, n in enumerate(norms):
        scale = min(1.0, clip / (n + 1e-6))
        assert clipped.grad_norms[s] == pytest.approx(n * scale, rel=1e-5), s
        for a, b in zip(free.stage_params(s), clipped.stage_params(s)):
            assert torch.allclose(b.grad, a.grad * scale, rtol=1e-5, atol=1e-9), s


def test_random_rebuild_is_the_same_everywhere_for_a_step_and_differs_between_steps():
    cfg = _cfg()
    rebuilt = []
    for step in (1, 1, 2):
        pipe = SimulatedPipeline(cfg, strategy="random")
        pipe.train_step(0)
        pipe.lose_and_rebuild([2], step=step)
        rebuilt.append([v.detach().clone() for v in pipe.named_stage_params(2).values()])
    assert all(torch.equal(a, b) for a, b in zip(rebuilt[0], rebuilt[1]))
    assert not all(torch.equal(a, b) for a, b in zip(rebuilt[0], rebuilt[2]))


def test_checkfree_plus_rebuilds_the_first_stage_as_a_copy_and_keeps_the_embedding():
    cfg = _cfg(failures={"stages": "all"}, strategies=["no_failure", "checkfree_plus"])
    pipe = SimulatedPipeline(cfg, "checkfree_plus")
    for step in range(2):
        pipe.train_step(step)
    stage1 = {n: p.detach().clone() for n, p in pipe.named_stage_params(1).items()}
    pipe.lose_and_rebuild([0], step=2)
    for name, value in pipe.named_stage_params(0).items():
        assert torch.equal(value, stage1[name.replace("block0", "block1")]), name
    assert pipe.tied_authority == {EMBED_KEY: 1}
    pipe.train_step(2)
    # After the rebuild the surviving copy is authoritative and the copies stay identical.
    assert torch.equal(pipe.named_stage_params(0)["embed.tok.weight"], pipe.named_stage_params(1)["embed.tok.weight"])


def test_checkfree_plus_routes_follow_the_schedule():
    cfg = _cfg(strategies=["no_failure", "checkfree_plus"])
    pipe = SimulatedPipeline(cfg, "checkfree_plus")
    order = []
    hooks = [blk.register_forward_hook(lambda m, i, o, s=s: order.append(s))
             for s in range(4) for blk in pipe.blocks(s)]
    pipe.train_step(0)
    for h in hooks:
        h.remove()
    assert order == [*route(0, 4), *route(1, 4)] == [0, 1, 2, 3, 1, 0, 3, 2]


def test_checkpointing_rolls_back_weights_and_optimizer_to_the_checkpoint():
    cfg = _cfg()
    pipe = SimulatedPipeline(cfg)
    pipe.train_step(0)
    pipe.train_step(1)
    pipe.save_checkpoint(2)
    saved = pipe.checkpoint()
    for step in range(2, 5):
        pipe.train_step(step)
    assert pipe.rollback([1]) == 2
    for s in range(4):
        for value, want in zip(pipe.stage_params(s), saved["params"][s]):
            assert torch.equal(value, want)
        got, want = pipe.optimizers[s].state_dict()["state"], saved["optimizers"][s]["state"]
        assert got.keys() == want.keys()
        for k in got:
            assert int(got[k]["step"]) == int(want[k]["step"]) == 2
            assert torch.equal(got[k]["exp_avg"], want[k]["exp_avg"])
            assert torch.equal(got[k]["exp_avg_sq"], want[k]["exp_avg_sq"])


def test_checkpoint_strategy_loses_the_work_since_the_last_checkpoint():
    cfg = _cfg(failures={"at": [{"stage": 2, "iteration": 7}]}, strategies=["no_failure", "checkpoint_4"])
    _, res = _run(cfg, "checkpoint_4")
    steps = [r.step for r in res.records]
    assert steps == [0, 1, 2, 3, 4, 5, 6, 4, 5, 6, 7, 8]  # failure before iteration 7: back to the step-4 save
    assert [r.checkpoint_saved for r in res.records].count(True) == 2  # after steps 4 and 8 (not 4 twice)
    # The re-executed steps see the same weights and data as the first time: identical losses.
    first = {r.step: r.train_loss for r in res.records[:7]}
    for r in res.records[7:10]:
        assert r.train_loss == first[r.step]
    _, base = _run(cfg, "no_failure")
    assert [r.train_loss for r in base.records[:7]] == [r.train_loss for r in res.records[:7]]


def test_redundant_computation_never_loses_work():
    cfg = _cfg(failures={"at": [{"stage": 1, "iteration": 3}, {"stage": 2, "iteration": 8}]},
               strategies=["no_failure", "redundant", "gradnorm_average"])
    red_pipe, red = _run(cfg, "redundant")
    base_pipe, base = _run(cfg, "no_failure")
    cf_pipe, cf = _run(cfg, "gradnorm_average")
    assert [r.train_loss for r in red.records] == [r.train_loss for r in base.records]
    assert [r.val_loss for r in red.records] == [r.val_loss for r in base.records]
    a, b = red_pipe.state_arrays(), base_pipe.state_arrays()
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert red.records[-1].failures == 2
    # CheckFree does lose something at a failure (the control for this test).
    assert cf.records[3].train_loss != base.records[3].train_loss


def test_every_strategy_meets_the_same_failures():
    cfg = _cfg(failures={"probability": 0.15, "seed": 3})
    lost = {}
    for spec in cfg.strategies:
        _, res = _run(cfg, spec.name)
        assert len(res.records) == 12 and res.stopped is None
        lost[spec.name] = [r.lost for r in res.records]
    expected = [cfg.failure_plan().failures_at(i) for i in range(12)]
    assert any(expected)
    for name, seen in lost.items():
        assert seen == (expected if name != "no_failure" else [()] * 12), name


def test_an_unrecoverable_failure_stops_that_strategy_only():
    cfg = _cfg(failures={"stages": "all", "at": [{"stage": 0, "iteration": 5}, {"stage": 1, "iteration": 5}]},
               strategies=["no_failure", "checkfree_plus", "checkpoint_4"])
    _, plus = _run(cfg, "checkfree_plus")
    assert len(plus.records) == 5 and "embedding" in plus.stopped
    _, ckpt = _run(cfg, "checkpoint_4")
    assert len(ckpt.records) == 12 and ckpt.stopped is None
