"""Peak memory per stage and step time of CheckFree+ (its route-aware 1F1B) against DeepSpeed's stock PipelineEngine.

    OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu python benchmarks/plus_memory.py --out benchmarks/results/plus_memory.json

The driver starts the stock `deepspeed` launcher once per depth (4 and 6 stages). Every rank builds both engines
(same model, same initial weights) and, for 8 and then 32 micro-batches, times rounds of one step of each engine in
alternating order on the same batches. Memory is one step's peak above the rank's memory just before it: VmHWM
after resetting it (/proc/self/clear_refs) minus RSS on CPU, with glibc's mmap threshold fixed so freed tensors
leave RSS; max_memory_allocated minus memory_allocated on GPU. Writes per-stage medians and ratios as JSON, with
the micro-batches of activations each stage holds (exact for both schedules) and the memory per held micro-batch.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Large tensors from mmap, returned to the OS when freed: without it glibc keeps freed activations resident and the
# memory before a step already contains the previous step's peak.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def driver(args: argparse.Namespace) -> None:
    results = {}
    for stages in args.stages:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        part = Path(args.out).with_suffix(f".{stages}stages.json")
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **MALLOC_ENV)
        env.setdefault("DS_ACCELERATOR", "cpu")
        cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(stages), "--master_port", str(port),
               str(Path(__file__).resolve()), "--rank-mode", "--out", str(part), "--rounds", str(args.rounds),
               "--warmup", str(args.warmup), "--micro-batches", *map(str, args.micro_batches),
               "--seq-len", str(args.seq_len), "--d-model", str(args.d_model), "--layers", str(args.layers),
               "--micro-batch-size", str(args.micro_batch_size)]
        t0 = time.perf_counter()
        subprocess.run(cmd, env=env, cwd=REPO, check=True)
        results[str(stages)] = json.loads(part.read_text())
        results[str(stages)]["wall_s"] = round(time.perf_counter() - t0, 1)
        part.unlink()
    summary = {"benchmark": "CheckFree+ route-aware 1F1B vs stock PipelineEngine: per-stage peak memory above the "
                            "pre-step level, and step time (interleaved rounds)", "by_stages": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    print("stages  micro-batches  peak MiB stock / plus (max over stages)  memory ratio  step s stock / plus  "
          "time ratio")
    for stages, res in results.items():
        for mbs, r in res["by_micro_batches"].items():
            print(f"{stages:>6}  {mbs:>13}  {r['max_peak_mib']['stock']:>10.1f} / {r['max_peak_mib']['plus']:<8.1f}"
                  f"                {r['memory_ratio']:>12.3f}  {r['median_step_s']['stock']:.3f} / "
                  f"{r['median_step_s']['plus']:.3f}       {r['median_time_ratio']:.3f}")
    print("per stage: peak MiB (micro-batches held)")
    for stages, res in results.items():
        for mbs, r in res["by_micro_batches"].items():
            for k in ("stock", "plus"):
                cells = "  ".join(f"{m:7.1f} ({h})" for m, h in zip(r["peak_mib_per_stage"][k],
                                                                 r["held_micro_batches_per_stage"][k]))
                print(f"{stages:>6}  {mbs:>3}  {k:<5}  {cells}")


def rank_main(args: argparse.Namespace) -> None:
    import torch
    from deepspeed import ops as ds_ops
    from deepspeed.accelerator import get_accelerator

    on_cpu = get_accelerator().device_name() == "cpu"
    if on_cpu:
        ds_ops.__compatible_ops__["deepspeed_shm_comm"] = False  # avoid a ~100 s JIT build nobody uses
    import deepspeed
    import torch.distributed as dist

    import deepspeed_checkfree  # noqa: F401  (registers the engine)
    from deepspeed_checkfree.core.schedule import max_in_flight
    from deepspeed_checkfree.models import gpt
    from deepspeed_checkfree.models.corpus import StepBatches, load_corpus

    torch.set_num_threads(1)
    deepspeed.init_distributed()
    cfg = gpt.GPTConfig(seq_len=args.seq_len, d_model=args.d_model, n_layers=args.layers)
    stages = dist.get_world_size()

    def build(plus: bool):
        config = {"train_micro_batch_size_per_gpu": args.micro_batch_size,
                  "gradient_accumulation_steps": args.micro_batches[0], "steps_per_print": 10**9,
                  "gradient_clipping": 1.0, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
        if plus:
            config["checkfree"] = {"enabled": True, "mode": "checkfree_plus"}
        make = gpt.plus_pipeline_module if plus else gpt.pipeline_module
        model = make(cfg, num_stages=stages, base_seed=1234)
        engine, _, _, _ = deepspeed.initialize(model=model, config=config,
                                               model_parameters=[p for p in model.parameters() if p.requires_grad])
        return engine

    engines = {"stock": build(False), "plus": build(True)}
    assert type(engines["stock"]).__name__ == "PipelineEngine" and type(engines["plus"]).__name__ == "CheckFreeEngine"

    def rss_bytes() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def peak_step(engine, data) -> float:
        """One step; returns its peak memory above the level just before it, in bytes."""
        if on_cpu:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := current RSS
            before = rss_bytes()
        else:
            get_accelerator().reset_peak_memory_stats()
            before = get_accelerator().memory_allocated()
        engine.train_batch(data)
        if on_cpu:
            with open("/proc/self/status") as f:
                hwm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
            return hwm - before
        return get_accelerator().max_memory_allocated() - before

    tokens = load_corpus()
    out = {"stages": stages, "world_size": stages,
           "model": {"d_model": cfg.d_model, "layers": cfg.n_layers, "seq_len": cfg.seq_len,
                     "micro_batch_size": args.micro_batch_size},
           "memory": "VmHWM - RSS (CPU)" if on_cpu else "max_memory_allocated - memory_allocated",
           "by_micro_batches": {}}
    for mbs in args.micro_batches:
        for engine in engines.values():
            engine.set_train_batch_size(args.micro_batch_size * mbs)
        batches = StepBatches(tokens, seq_len=cfg.seq_len, micro_batch_size=args.micro_batch_size, micro_batches=mbs)
        times = {k: [] for k in engines}
        peaks = {k: [] for k in engines}
        for i in range(args.warmup + args.rounds):
            for name in (("stock", "plus") if i % 2 == 0 else ("plus", "stock")):
                dist.barrier()
                t0 = time.perf_counter()
                peak = peak_step(engines[name], batches.iterator(i))
                dist.barrier()
                if i >= args.warmup:
                    times[name].append(time.perf_counter() - t0)
                    peaks[name].append(peak)
        med_peak = torch.tensor([statistics.median(peaks["stock"]), statistics.median(peaks["plus"])],
                                dtype=torch.float64)
        gathered = [torch.zeros_like(med_peak) for _ in range(stages)]
        dist.all_gather(gathered, med_peak)
        mib = {k: [round(float(g[i]) / 2**20, 2) for g in gathered] for i, k in enumerate(("stock", "plus"))}
        ratios = [p / s for p, s in zip(times["plus"], times["stock"])]
        # What dominates each stage's peak: the micro-batches whose activations it holds (stock 1F1B: P - s, and
        # CheckFree+: max_in_flight, both exact) times the memory of one of them there.
        held = {"stock": [min(mbs, stages - s) for s in range(stages)],
                "plus": [max_in_flight(s, stages, mbs) for s in range(stages)]}
        out["by_micro_batches"][str(mbs)] = {
            "rounds": args.rounds, "peak_mib_per_stage": mib, "held_micro_batches_per_stage": held,
            "mib_per_held_micro_batch": {k: [round(m / h, 2) for m, h in zip(mib[k], held[k])] for k in mib},
            "max_peak_mib": {k: max(v) for k, v in mib.items()},
            "memory_ratio": round(max(mib["plus"]) / max(mib["stock"]), 3),
            "median_step_s": {k: round(statistics.median(v), 4) for k, v in times.items()},
            "median_time_ratio": round(statistics.median(ratios), 4),
            "ratio_of_medians": round(statistics.median(times["plus"]) / statistics.median(times["stock"]), 4),
            "step_s": {k: [round(t, 4) for t in v] for k, v in times.items()},
        }
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
        print(json.dumps(out, indent=2), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="benchmarks/results/plus_memory.json")
    p.add_argument("--stages", type=int, nargs="+", default=[4, 6])
    p.add_argument("--micro-batches", type=int, nargs="+", default=[8, 32])
    p.add_argument("--rounds", type=int, default=6, help="timed rounds per micro-batch count (one step per engine)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--rank-mode", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    (rank_main if args.rank_mode else driver)(args)


if __name__ == "__main__":
    main()
