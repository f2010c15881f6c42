"""One rank of the engine scenarios: build real DeepSpeed pipeline engines (one per scenario, sharing the process
group), train, lose stages as planned, and save what each rank saw for the tests to check.

Besides the library's own numbers, each rank measures its gradient itself at every optimizer step (before DeepSpeed
clips it or the optimizer consumes it), so the tests can check the library's per-stage norm against it.

Run through tests/harness/ranks.run_scenarios; arguments: OUT_DIR SCENARIOS_JSON.
"""
from __future__ import annotations

import copy
import dataclasses
import gc
import json
import logging
import os
import sys
from pathlib import Path

import torch

from deepspeed import ops as ds_ops

# The CPU-only shm all-reduce op would be JIT-compiled (~100 s) at init; training never uses it.
ds_ops.__compatible_ops__["deepspeed_shm_comm"] = False

import deepspeed  # noqa: E402
from deepspeed.pipe import LayerSpec, PipelineModule  # noqa: E402
from deepspeed.utils import safe_get_full_fp32_param  # noqa: E402

import deepspeed_checkfree  # noqa: E402,F401  (registers the engine)
from deepspeed_checkfree.models import gpt  # noqa: E402
from deepspeed_checkfree.models.corpus import StepBatches, load_corpus  # noqa: E402

from tests.harness.scenarios import MICRO_BATCH, MODEL, ds_config  # noqa: E402


def wrapped(engine) -> bool:
    """bf16 and ZeRO keep fp32 master weights of their own (the stock engine has no CheckFree helper for this)."""
    return bool(engine.using_bf16_optimizer or engine.zero_optimization())


def full_masters(engine):
    """The optimizer's fp32 master of every parameter (the same order on every rank: a collective per parameter
    over the data-parallel group), or None without a wrapping optimizer."""
    if not wrapped(engine):
        return None
    return {n: safe_get_full_fp32_param(p).clone() for n, p in engine.module.named_parameters()}


def gradient_square_sum(engine) -> float:
    """This rank's accumulated (data-parallel-averaged) gradient at the optimizer step, squared L2 norm in fp64,
    read where DeepSpeed keeps it: ``p.grad`` (fp32), the bf16 optimizer's flat gradient-accumulation buffers (in
    the accumulation dtype: bf16 unless data_types.grad_accum_dtype says otherwise), or, under ZeRO-1, this
    data-parallel rank's averaged gradient partitions (``p.grad`` is already cleared there)."""
    if engine.using_bf16_optimizer:
        tensors = list(engine.optimizer.fp32_groups_gradients_flat)
    elif engine.zero_optimization():
        tensors = [g for grads in engine.optimizer.averaged_gradients.values() for g in grads if g is not None]
    else:
        tensors = [p.grad for p in engine.module.parameters() if p.grad is not None]
    return float(sum(t.detach().double().pow(2).sum() for t in tensors)) if tensors else 0.0


def snapshot(engine) -> dict:
    return {
        "step": engine.global_steps,
        "params": {n: p.detach().clone() for n, p in engine.module.named_parameters()},
        "opt_state": copy.deepcopy(engine.basic_optimizer.state_dict()["state"]),
        "norm": getattr(engine, "stage_grad_norm", None),
        "lrs": [g["lr"] for g in engine.basic_optimizer.param_groups],
        "masters": full_masters(engine),
    }


def build_model(sc: dict):
    num_stages = sc.get("num_stages", 4)
    if sc.get("model") == "mismatched":
        # Stage 2's two blocks (blocks 4 and 5) are narrower: they cannot be averaged with stages 1 and 3.
        narrow = dataclasses.replace(MODEL, mlp_ratio=2)
        specs = [LayerSpec(gpt.Embedding, MODEL),
                 *[LayerSpec(gpt.Block, narrow if i in (4, 5) else MODEL) for i in range(MODEL.n_layers)],
                 LayerSpec(gpt.Head, MODEL)]
        return PipelineModule(layers=specs, num_stages=num_stages, loss_fn=gpt.lm_loss,
                              partition_method="type:Block")
    if sc.get("model") in ("plus", "plus_tied"):
        return gpt.plus_pipeline_module(MODEL, num_stages=num_stages, tie_embeddings=sc["model"] == "plus_tied")
    return gpt.pipeline_module(dataclasses.replace(MODEL, n_layers=sc.get("n_layers", MODEL.n_layers)),
                               num_stages=num_stages)


def detached_copy(obj):
    """A deep copy in which every tensor is a detached clone (state dicts hold non-leaf views)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: detached_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(detached_copy(v) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):  # (the engine's StageState and its progress)
        return dataclasses.replace(obj, **{f.name: detached_copy(getattr(obj, f.name))
                                           for f in dataclasses.fields(obj) if f.init})
    return copy.deepcopy(obj)


def put_one_stage_ahead(engine, batches, step: int, ahead_stage: int, record: dict) -> None:
    """The state a failure between two ranks' optimizer steps leaves: every rank runs ``step``, then all but
    ``ahead_stage`` go back to their state before it (kept in memory), and every rank prepares to replay it."""
    behind = engine.stage_id != ahead_stage
    saved = detached_copy(engine.stage_state()) if behind else None
    engine.train_batch(batches.iterator(step))
    if behind:
        engine.load_stage_state(saved)
    record["before_replay"] = snapshot(engine)
    engine.replay_from(step)


def run(sc: dict, tokens, out: Path, rank: int) -> None:
    torch.manual_seed(0)
    model = build_model(sc)
    try:
        engine, _, _, _ = deepspeed.initialize(model=model, config=ds_config(sc),
                                               model_parameters=[p for p in model.parameters() if p.requires_grad])
    except Exception as err:  # the bad-input scenarios expect a clear error before training starts
        if "expect_error" not in sc:
            raise
        torch.save({"error": type(err).__name__, "message": str(err)}, out / f"{sc['name']}-rank{rank}.pt")
        return
    record = {"engine": type(engine).__name__, "stage": engine.stage_id, "dp_id": engine.grid.data_parallel_id,
              "losses": [], "lrs": [], "norms": [], "grad_square_sums": [],
              "rebuilds": [], "replica_bytes": getattr(engine, "replica_bytes", 0),
              "initial_params": {n: p.detach().clone() for n, p in engine.module.named_parameters()}}

    # DeepSpeed's OptimizerStep calls self._take_model_step, which clips (fp32) and steps: measure just before.
    take_model_step = engine._take_model_step

    def measured_model_step(lr_kwargs):
        record["grad_square_sums"].append(gradient_square_sum(engine))
        return take_model_step(lr_kwargs)

    engine._take_model_step = measured_model_step
    if hasattr(engine, "lose_and_rebuild"):
        real = engine.lose_and_rebuild

        def spy(lost, cause):
            before = snapshot(engine)
            result = real(lost, cause)
            after = snapshot(engine)
            record["rebuilds"].append({"step": engine.global_steps, "lost": list(lost), "before": before,
                                       "after": after, "recovery": engine.recoveries[-1] if result else None})
            return result

        engine.lose_and_rebuild = spy
    batches = StepBatches(tokens, seq_len=MODEL.seq_len, micro_batch_size=MICRO_BATCH,
                          micro_batches=engine.micro_batches, dp_rank=engine.grid.data_parallel_id,
                          dp_size=engine.dp_world_size)
    ahead = sc.get("ahead")  # {"stage": s, "step": k}: stage s applies step k, the others are rolled back
    restores = sc.get("restore", [])  # [{"rank": r, "step": k}]: rank r loses its stage, copied from its replica
    for step in range(sc["steps"]):
        for lost in (r["rank"] for r in restores if r["step"] == step):
            replicas = engine.grid.get_data_parallel_group_ranks()
            if lost in replicas:  # a collective of the lost rank's data-parallel group
                engine.restore_from_replica(min(r for r in replicas if r != lost), [lost], cause="injected")
        if ahead and step == ahead["step"]:
            put_one_stage_ahead(engine, batches, step, ahead["stage"], record)
        loss = engine.train_batch(batches.iterator(step))
        if ahead and step == ahead["step"]:
            record["after_replay"] = snapshot(engine)
        record["losses"].append(float(loss))
        record["lrs"].append([g["lr"] for g in engine.basic_optimizer.param_groups])
        record["norms"].append(getattr(engine, "stage_grad_norm", None))
    assert len(record["grad_square_sums"]) == sc["steps"] + bool(ahead), "one optimizer step per train_batch"
    record["recoveries"] = list(getattr(engine, "recoveries", []))
    record["final_step"] = engine.global_steps
    record["adam_steps"] = sorted({int(st["step"]) for st in engine.basic_optimizer.state.values()})
    record["final_params"] = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    record["final_masters"] = full_masters(engine)
    if sc.get("checkpoint"):
        # Save with DeepSpeed's own checkpointing, load into a freshly built engine, and record what came back.
        ckpt = out / f"ckpt-{sc['name']}"
        engine.save_checkpoint(str(ckpt), tag="t")
        fresh_model = build_model(sc)
        fresh, _, _, _ = deepspeed.initialize(model=fresh_model, config=ds_config(sc), model_parameters=[
            p for p in fresh_model.parameters() if p.requires_grad])
        fresh.load_checkpoint(str(ckpt), tag="t")
        record["reloaded_params"] = {n: p.detach().clone() for n, p in fresh.module.named_parameters()}
        record["reloaded_loss"] = float(fresh.train_batch(batches.iterator(sc["steps"])))
        del fresh, fresh_model
    torch.save(record, out / f"{sc['name']}-rank{rank}.pt")
    del engine, model
    gc.collect()


def main() -> None:
    out, scenarios = Path(sys.argv[1]), json.loads(sys.argv[2])
    logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s %(message)s")
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    rank = int(os.environ["RANK"])
    tokens = load_corpus()
    for sc in scenarios:
        run(sc, tokens, out, rank)


if __name__ == "__main__":
    main()
