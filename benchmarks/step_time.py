"""Failure-free step time of the CheckFree engine against DeepSpeed's stock PipelineEngine, interleaved in one run.

    OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu deepspeed --num_gpus 4 benchmarks/step_time.py --steps 40

Both engines train the same model (same initial weights) on the same batches in the same processes; every round
times one step of each, in alternating order, so machine noise hits both alike. Rank 0 prints per-engine medians
and the median of the per-round ratios (CheckFree / stock), and writes them as JSON to --out.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from deepspeed import ops as ds_ops
from deepspeed.accelerator import get_accelerator

if get_accelerator().device_name() == "cpu":
    ds_ops.__compatible_ops__["deepspeed_shm_comm"] = False  # avoid a ~100 s JIT build nobody uses

import deepspeed  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import deepspeed_checkfree  # noqa: E402,F401
from deepspeed_checkfree.models import gpt  # noqa: E402
from deepspeed_checkfree.models.corpus import StepBatches, load_corpus  # noqa: E402


def ds_config(checkfree: dict | None, precision: str) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 8, "steps_per_print": 10**9,
        "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
    }
    if precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    if checkfree is not None:
        cfg["checkfree"] = checkfree
    return cfg


def build(cfg: gpt.GPTConfig, stages: int, config: dict, plus: bool = False):
    make = gpt.plus_pipeline_module if plus else gpt.pipeline_module
    model = make(cfg, num_stages=stages, base_seed=1234)
    engine, _, _, _ = deepspeed.initialize(model=model, config=config,
                                           model_parameters=[p for p in model.parameters() if p.requires_grad])
    return engine


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=40, help="timed rounds (one step of each engine per round)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--stages", type=int, default=4)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--mode", choices=["checkfree", "checkfree_plus"], default="checkfree")
    p.add_argument("--out", default="benchmarks/results/step_time.json")
    p.add_argument("--local_rank", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    deepspeed.init_distributed()

    cfg = gpt.GPTConfig(seq_len=args.seq_len, d_model=args.d_model, n_layers=args.layers)
    stock = build(cfg, args.stages, ds_config(None, args.precision))
    checkfree = build(cfg, args.stages, ds_config({"enabled": True, "mode": args.mode}, args.precision),
                      plus=args.mode == "checkfree_plus")
    model_bytes = torch.tensor([sum(p.numel() * p.element_size() for p in stock.module.parameters()),
                                checkfree.replica_bytes], dtype=torch.int64)
    dist.all_reduce(model_bytes)
    assert type(stock).__name__ == "PipelineEngine" and type(checkfree).__name__ == "CheckFreeEngine"
    batches = StepBatches(load_corpus(), seq_len=cfg.seq_len, micro_batch_size=4, micro_batches=8)

    times = {"stock": [], "checkfree": []}
    engines = {"stock": stock, "checkfree": checkfree}
    for i in range(args.warmup + args.steps):
        order = ("stock", "checkfree") if i % 2 == 0 else ("checkfree", "stock")
        for name in order:
            dist.barrier()
            t0 = time.perf_counter()
            engines[name].train_batch(batches.iterator(i))
            dist.barrier()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)

    if dist.get_rank() == 0:
        ratios = [c / s for c, s in zip(times["checkfree"], times["stock"])]
        result = {
            "benchmark": "failure-free step time, CheckFree engine vs stock PipelineEngine (interleaved)",
            "mode": args.mode, "precision": args.precision, "stages": args.stages, "world_size": dist.get_world_size(),
            "model": {"d_model": cfg.d_model, "layers": cfg.n_layers, "seq_len": cfg.seq_len},
            "rounds": args.steps, "median_step_s": {k: statistics.median(v) for k, v in times.items()},
            "median_ratio": statistics.median(ratios),
            "model_bytes": int(model_bytes[0]), "replica_bytes": int(model_bytes[1]),
            "ratio_of_medians": statistics.median(times["checkfree"]) / statistics.median(times["stock"]),
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2), flush=True)


if __name__ == "__main__":
    main()
