"""One rank of the engine scenarios: build real DeepSpeed pipeline engines (one per scenario, sharing the process
group), train, lose stages as planned, and save what each rank saw for the tests to check.

Run by tests/distributed/test_engine_recovery.py through spawn.run_ranks; arguments: OUT_DIR SCENARIOS_JSON.
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

MODEL = gpt.GPTConfig(vocab_size=256, seq_len=32, d_model=32, n_heads=4, n_layers=8)


def ds_config(sc: dict) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": sc.get("gas", 4),
        "steps_per_print": 10**9,
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.01, "torch_adam": True}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 3e-3,
                                                     "warmup_num_steps": 6, "warmup_type": "linear"}},
        "gradient_clipping": sc.get("clip", 1.0),
    }
    if sc.get("constant_lr"):
        del cfg["scheduler"]
    if sc.get("precision") == "bf16":
        cfg["bf16"] = {"enabled": True}
    if sc.get("precision") == "fp16":
        cfg["fp16"] = {"enabled": True}
    if sc.get("zero"):
        cfg["zero_optimization"] = {"stage": sc["zero"]}
    if sc.get("checkfree") is not None:
        cfg["checkfree"] = sc["checkfree"]
    return cfg


def snapshot(engine) -> dict:
    return {
        "params": {n: p.detach().clone() for n, p in engine.module.named_parameters()},
        "opt_state": copy.deepcopy(engine.basic_optimizer.state_dict()["state"]),
        "norm": getattr(engine, "stage_grad_norm", None),
        "lrs": [g["lr"] for g in engine.basic_optimizer.param_groups],
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
              "losses": [], "lrs": [], "norms": [],
              "rebuilds": [], "replica_bytes": getattr(engine, "replica_bytes", 0),
              "initial_params": {n: p.detach().clone() for n, p in engine.module.named_parameters()}}
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
    batches = StepBatches(tokens, seq_len=MODEL.seq_len, micro_batch_size=2, micro_batches=engine.micro_batches,
                          dp_rank=engine.grid.data_parallel_id, dp_size=engine.dp_world_size)
    for step in range(sc["steps"]):
        loss = engine.train_batch(batches.iterator(step))
        record["losses"].append(float(loss))
        record["lrs"].append([g["lr"] for g in engine.basic_optimizer.param_groups])
        record["norms"].append(getattr(engine, "stage_grad_norm", None))
    record["final_params"] = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    if engine.using_bf16_optimizer or engine.zero_optimization():  # also the stock engine
        # The optimizer's fp32 master of every parameter (same order on every rank: a collective per parameter).
        record["final_masters"] = {n: safe_get_full_fp32_param(p).clone()
                                   for n, p in engine.module.named_parameters()}
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
