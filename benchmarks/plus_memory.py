"""Peak memory per stage and step time of CheckFree+ (its route-aware 1F1B), with and without the first pair's
recomputation (checkfree.plus_recompute_edges), against DeepSpeed's stock PipelineEngine.

    OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu python benchmarks/plus_memory.py --stages 6 --blocks-per-stage 2 \\
        --out benchmarks/results/plus_memory_6stages.json
    # under DeepSpeed's activation checkpointing (every block a segment), every engine alike:
    ... --ac-interval 1 --variants stock plus --out benchmarks/results/plus_memory_ac_6stages.json

The driver starts the stock `deepspeed` launcher once per depth. Every rank builds one engine per variant (same
model, same initial weights): `stock` (DeepSpeed's PipelineEngine and 1F1B), `plus` (CheckFree+), `plus_recompute`
(plus_recompute_edges true), `plus_recompute_all` ("all"). For each micro-batch count it times rounds of one step of
each engine on the same batches, the order rotating from round to round. Memory is one step's peak above the rank's
memory just before it: VmHWM after resetting it (/proc/self/clear_refs) minus RSS on CPU, with glibc's mmap
threshold fixed so freed tensors leave RSS; max_memory_allocated minus memory_allocated on GPU. Writes per-stage
medians and ratios to stock as JSON, with what each stage holds (exact for every schedule): micro-batches of full
activations and micro-batches held as stage inputs only, and the micro-batches each stage recomputes.
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
VARIANTS = {"stock": None, "plus": False, "plus_recompute": True, "plus_recompute_all": "all"}  # -> recompute policy


def driver(args: argparse.Namespace) -> None:
    results = {}
    for stages in args.stages:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        part = Path(args.out).with_suffix(f".{stages}stages.part.json")
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **MALLOC_ENV)
        env.setdefault("DS_ACCELERATOR", "cpu")
        layers = args.blocks_per_stage * stages if args.blocks_per_stage else args.layers
        cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(stages), "--master_port", str(port),
               str(Path(__file__).resolve()), "--rank-mode", "--out", str(part), "--rounds", str(args.rounds),
               "--warmup", str(args.warmup), "--micro-batches", *map(str, args.micro_batches),
               "--seq-len", str(args.seq_len), "--d-model", str(args.d_model), "--layers", str(layers),
               "--micro-batch-size", str(args.micro_batch_size), "--ac-interval", str(args.ac_interval),
               "--variants", *args.variants]
        t0 = time.perf_counter()
        subprocess.run(cmd, env=env, cwd=REPO, check=True)
        results[str(stages)] = json.loads(part.read_text())
        results[str(stages)]["wall_s"] = round(time.perf_counter() - t0, 1)
        part.unlink()
    summary = {"benchmark": "CheckFree+ route-aware 1F1B (with and without plus_recompute_edges) vs stock "
                            "PipelineEngine: per-stage peak memory above the pre-step level, and step time "
                            "(interleaved rounds)",
               "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
               "date": time.strftime("%Y-%m-%d"), "by_stages": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    print("stages  micro-batches  variant              peak MiB  memory ratio  median step s  time ratio")
    for stages, res in results.items():
        for mbs, r in res["by_micro_batches"].items():
            for k in r["max_peak_mib"]:
                print(f"{stages:>6}  {mbs:>13}  {k:<19}  {r['max_peak_mib'][k]:>8.1f}  {r['memory_ratio'][k]:>12.3f}"
                      f"  {r['median_step_s'][k]:>13.3f}  {r['median_time_ratio'][k]:>10.3f}")
    print("per stage: peak MiB (micro-batches held with full activations / as stage inputs only)")
    for stages, res in results.items():
        for mbs, r in res["by_micro_batches"].items():
            for k in r["max_peak_mib"]:
                cells = "  ".join(f"{m:7.1f} ({f}/{i})" for m, f, i in zip(
                    r["peak_mib_per_stage"][k], r["held_full_per_stage"][k], r["held_inputs_per_stage"][k]))
                print(f"{stages:>6}  {mbs:>3}  {k:<19}  {cells}")


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
    from deepspeed_checkfree.core.recompute import held_peaks, recomputed_micro_batches
    from deepspeed_checkfree.models import gpt
    from deepspeed_checkfree.models.corpus import StepBatches, load_corpus

    torch.set_num_threads(1)
    deepspeed.init_distributed()
    cfg = gpt.GPTConfig(seq_len=args.seq_len, d_model=args.d_model, n_layers=args.layers)
    stages = dist.get_world_size()
    # Activation checkpointing as LLM pipelines use it: the transformer blocks, every ac_interval layers a segment
    # (DeepSpeed's reentrant default cannot cut a segment holding the embedding: the tokens do not require grad).
    module_kwargs = ({"activation_checkpoint_interval": args.ac_interval, "checkpointable_layers": ["Block"]}
                     if args.ac_interval else {})

    def build(policy):
        config = {"train_micro_batch_size_per_gpu": args.micro_batch_size,
                  "gradient_accumulation_steps": args.micro_batches[0], "steps_per_print": 10**9,
                  "gradient_clipping": 1.0, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
        if policy is not None:
            config["checkfree"] = {"enabled": True, "mode": "checkfree_plus", "plus_recompute_edges": policy}
        make = gpt.pipeline_module if policy is None else gpt.plus_pipeline_module
        model = make(cfg, num_stages=stages, base_seed=1234, **module_kwargs)
        engine, _, _, _ = deepspeed.initialize(model=model, config=config,
                                               model_parameters=[p for p in model.parameters() if p.requires_grad])
        return engine

    engines = {name: build(VARIANTS[name]) for name in args.variants}
    assert type(engines["stock"]).__name__ == "PipelineEngine"

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
           "activation_checkpoint_interval": args.ac_interval, "variants": list(engines),
           "memory": "VmHWM - RSS (CPU)" if on_cpu else "max_memory_allocated - memory_allocated",
           "by_micro_batches": {}}
    names = list(engines)
    for mbs in args.micro_batches:
        for engine in engines.values():
            engine.set_train_batch_size(args.micro_batch_size * mbs)
        batches = StepBatches(tokens, seq_len=cfg.seq_len, micro_batch_size=args.micro_batch_size, micro_batches=mbs)
        times = {k: [] for k in engines}
        peaks = {k: [] for k in engines}
        for i in range(args.warmup + args.rounds):
            for name in names[i % len(names):] + names[:i % len(names)]:  # each variant in each position in turn
                dist.barrier()
                t0 = time.perf_counter()
                peak = peak_step(engines[name], batches.iterator(i))
                dist.barrier()
                if i >= args.warmup:
                    times[name].append(time.perf_counter() - t0)
                    peaks[name].append(peak)
        med_peak = torch.tensor([statistics.median(peaks[k]) for k in names], dtype=torch.float64)
        gathered = [torch.zeros_like(med_peak) for _ in range(stages)]
        dist.all_gather(gathered, med_peak)
        mib = {k: [round(float(g[i]) / 2**20, 2) for g in gathered] for i, k in enumerate(names)}
        # What sets each stage's peak: the micro-batches whose activations it holds (stock 1F1B: P - s; CheckFree+:
        # exact from its instruction stream, a recomputed one counted while its backward rebuilds them) times the
        # memory of one there, plus the stage inputs of the recomputed ones.
        recomputed = {k: [sorted(recomputed_micro_batches(s, stages, mbs, VARIANTS[k])) if VARIANTS[k] is not None
                          else [] for s in range(stages)] for k in names}
        full, inputs = {}, {}
        for k in names:
            if VARIANTS[k] is None:
                full[k], inputs[k] = [min(mbs, stages - s) for s in range(stages)], [0] * stages
            else:
                held = [held_peaks(s, stages, mbs, frozenset(recomputed[k][s])) for s in range(stages)]
                full[k], inputs[k] = [h[0] for h in held], [h[1] for h in held]
        ratio = {k: [p / s for p, s in zip(times[k], times["stock"])] for k in names}
        out["by_micro_batches"][str(mbs)] = {
            "rounds": args.rounds, "peak_mib_per_stage": mib, "held_full_per_stage": full,
            "held_inputs_per_stage": inputs, "recomputed_per_stage": recomputed,
            "recomputed_forwards_fraction": {
                k: round(sum(len(r) for r in recomputed[k]) / (mbs * stages), 4) for k in names},
            "mib_per_held_micro_batch": {k: [round(m / h, 2) for m, h in zip(mib[k], full[k])] for k in names},
            "max_peak_mib": {k: max(v) for k, v in mib.items()},
            "memory_ratio": {k: round(max(mib[k]) / max(mib["stock"]), 3) for k in names},
            "median_step_s": {k: round(statistics.median(v), 4) for k, v in times.items()},
            "median_time_ratio": {k: round(statistics.median(v), 4) for k, v in ratio.items()},
            "ratio_of_medians": {k: round(statistics.median(times[k]) / statistics.median(times["stock"]), 4)
                                 for k in names},
            "step_s": {k: [round(t, 4) for t in v] for k, v in times.items()},
        }
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="benchmarks/results/plus_memory.json")
    p.add_argument("--stages", type=int, nargs="+", default=[6, 8])
    p.add_argument("--micro-batches", type=int, nargs="+", default=[8, 32])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--rounds", type=int, default=6, help="timed rounds per micro-batch count (one step per engine)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--layers", type=int, default=8, help="transformer blocks (see --blocks-per-stage)")
    p.add_argument("--blocks-per-stage", type=int, default=None, help="blocks = this x stages, overrides --layers")
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--ac-interval", type=int, default=0,
                   help="DeepSpeed activation checkpointing on every engine: blocks per segment (0: off)")
    p.add_argument("--rank-mode", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if "stock" not in args.variants:
        p.error("--variants must include stock: every ratio is to it")
    (rank_main if args.rank_mode else driver)(args)


if __name__ == "__main__":
    main()
