"""Offline repair of one lost stage of a realistic-size checkpoint: time and bytes read against the whole checkpoint.

    OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu python benchmarks/repair.py --work /tmp/repair-bench

Generates, once, 4-stage checkpoints written by the real frameworks on CPU (megatron-core GPTModel, hidden 512,
8 layers, vocab 16384, saved in Megatron's legacy and torch_dist layouts with the CheckFree sidecar; a DeepSpeed
CheckFree pipeline engine saved with ``engine.save_checkpoint``), each after one training step so Adam moments exist.
Then, per format: copy the checkpoint, delete stage 2's shard, evict the checkpoint's files from the page cache
(``posix_fadvise(DONTNEED)``), and time ``repair_checkpoint(..., in_place=True)`` while counting bytes three ways: the
repair's own ledger, the process's block-device reads (``/proc/self/io`` read_bytes) and its read() calls (rchar).
For scale it also times a cold ``read()`` of the two neighbours' whole shards, and a repair into a new directory
(which copies the surviving stages). Writes benchmarks/results/repair_<format>.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

HIDDEN, LAYERS, HEADS, VOCAB, SEQ, STAGES = 512, 8, 8, 16384, 64, 4
LOST = 2


# ---------------------------------------------------------------------------------------------------------------
# Generation (one rank of a 4-rank job; heavy imports inside: dist_checkpointing spawns a process that imports us)
# ---------------------------------------------------------------------------------------------------------------


def megatron_rank(out: str) -> None:
    import torch
    import torch.distributed as dist

    from tests.megatron import cpu_patches  # CPU-only monkeypatches (test code, not the library)

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    cpu_patches.apply()
    from megatron.core import dist_checkpointing, parallel_state as ps, tensor_parallel
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.transformer_config import TransformerConfig

    from deepspeed_checkfree.megatron.checkpoint import CheckFreeState, record_norms_around_step, save_checkfree_state

    ps.initialize_model_parallel(1, STAGES)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    stage, rank = ps.get_pipeline_model_parallel_rank(), dist.get_rank()
    cfg = TransformerConfig(num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS,
                            pipeline_model_parallel_size=STAGES, use_cpu_initialization=True,
                            gradient_accumulation_fusion=False, pipeline_dtype=torch.float32, hidden_dropout=0.0,
                            attention_dropout=0.0, bias_dropout_fusion=False, persist_layer_norm=False,
                            masked_softmax_fusion=False, apply_rope_fusion=False)
    model = GPTModel(config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=VOCAB,
                     max_sequence_length=SEQ, pre_process=ps.is_pipeline_first_stage(),
                     post_process=ps.is_pipeline_last_stage(), position_embedding_type="rope",
                     share_embeddings_and_output_weights=True)
    ddp = DistributedDataParallel(cfg, DistributedDataParallelConfig(), model)
    cfg.finalize_model_grads_func = finalize_model_grads
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-4, min_lr=1e-5, clip_grad=0.0), [ddp])
    state = CheckFreeState()
    record_norms_around_step(opt, [ddp], state)

    def forward_step(data_iterator, m):
        toks = next(data_iterator)
        out = m(toks[:, :-1], torch.arange(SEQ).unsqueeze(0), None, labels=toks[:, 1:])
        return out, lambda t: (t.float().mean(), {})

    get_forward_backward_func()(forward_step_func=forward_step,
                                data_iterator=iter([torch.randint(0, VOCAB, (1, SEQ + 1),
                                                                  generator=torch.Generator().manual_seed(0))]),
                                model=[ddp], num_microbatches=1, seq_length=SEQ, micro_batch_size=1,
                                forward_only=False)
    opt.step()
    args = argparse.Namespace(num_layers=LAYERS, hidden_size=HIDDEN, pipeline_model_parallel_size=STAGES,
                              tensor_model_parallel_size=1, untie_embeddings_and_output_weights=False,
                              position_embedding_type="rope", use_distributed_optimizer=False)
    it = "iter_0000001"
    legacy = os.path.join(out, "megatron_legacy", it)
    path = os.path.join(legacy, f"mp_rank_00_{stage:03d}", "model_optim_rng.pt")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"args": args, "checkpoint_version": 3.0, "iteration": 1,
                "model": model.state_dict_for_save_checkpoint(), "optimizer": opt.state_dict(),
                "rng_state": [{"torch_rng_state": torch.get_rng_state()}]}, path)
    dist_dir = os.path.join(out, "megatron_torch_dist", it)
    if rank == 0:
        os.makedirs(dist_dir, exist_ok=True)
        for fmt in ("megatron_legacy", "megatron_torch_dist"):
            with open(os.path.join(out, fmt, "latest_checkpointed_iteration.txt"), "w") as f:
                f.write("1")
    dist.barrier()
    save_checkfree_state(legacy, [ddp], state, 1)
    sd = {"model": model.sharded_state_dict()}
    sd["optimizer"] = opt.sharded_state_dict(sd)
    sd.update(args=argparse.Namespace(**{**vars(args), "ckpt_format": "torch_dist"}), iteration=1)
    dist_checkpointing.save(sd, dist_dir)
    save_checkfree_state(dist_dir, [ddp], state, 1)
    dist.destroy_process_group()


def deepspeed_rank(out: str) -> None:
    import torch
    from deepspeed import ops as ds_ops

    ds_ops.__compatible_ops__["deepspeed_shm_comm"] = False
    import deepspeed

    import deepspeed_checkfree  # noqa: F401
    from deepspeed_checkfree.models import gpt
    from deepspeed_checkfree.models.corpus import StepBatches, load_corpus
    from deepspeed_checkfree.repair.ds_pipeline import checkpoint_client_state

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    cfg = gpt.GPTConfig(vocab_size=VOCAB, seq_len=SEQ, d_model=HIDDEN, n_heads=HEADS, n_layers=LAYERS)
    model = gpt.pipeline_module(cfg, STAGES)
    engine, *_ = deepspeed.initialize(model=model, config={
        "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 2, "steps_per_print": 10**9,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
        "checkfree": {"enabled": True, "mode": "checkfree"}}, model_parameters=list(model.parameters()))
    batches = StepBatches(load_corpus(), seq_len=SEQ, micro_batch_size=1, micro_batches=engine.micro_batches)
    engine.train_batch(batches.iterator(0))
    engine.save_checkpoint(os.path.join(out, "deepspeed"), tag="step1", client_state=checkpoint_client_state(engine))


def generate(work: Path, timeout_s: float) -> None:
    from tests.distributed.spawn import run_ranks

    for fmt, worker in (("megatron_torch_dist", "megatron"), ("deepspeed", "deepspeed")):
        if (work / fmt).exists():
            continue
        t0 = time.time()
        run_ranks(Path(__file__), STAGES, ["--work", str(work), "--_worker", worker], timeout_s=timeout_s,
                  log_dir=work)
        print(f"generated {worker} checkpoints in {time.time() - t0:.1f} s", flush=True)


# ---------------------------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------------------------


def io_counters() -> dict:
    with open("/proc/self/io") as f:
        return {k: int(v) for k, v in (line.split(": ") for line in f)}


def evict(path: Path) -> None:
    for dirpath, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def dir_bytes(path: Path) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def lose_stage(ckpt: Path, fmt: str, stage_files: dict) -> None:
    for rel in stage_files[LOST]:
        p = ckpt / rel
        if p.exists():
            p.unlink()


def measure(work: Path, fmt: str, check_values: bool = False) -> dict:
    from deepspeed_checkfree.repair import IOLedger, open_checkpoint, repair_checkpoint

    pristine = work / fmt
    ledger = IOLedger()
    handler = open_checkpoint(fmt, str(pristine), None, ledger)
    found = handler.inspect()
    iter_rel = Path(handler.iter_dir).relative_to(pristine)
    stage_files = {s: [str(iter_rel / f) for f in fs] for s, fs in found.stage_files.items()}
    sources = handler.plan(LOST, "gradnorm_average").sources
    source_bytes = sum(os.path.getsize(pristine / f) for s in sources for f in stage_files[s])
    lost_bytes = sum(os.path.getsize(pristine / f) for f in stage_files[LOST])
    total = dir_bytes(pristine / iter_rel)

    # Baseline: a cold read() of the two neighbours' whole shards.
    evict(pristine)
    t0 = time.perf_counter()
    for s in sources:
        for f in stage_files[s]:
            with open(pristine / f, "rb") as fh:
                while fh.read(1 << 24):
                    pass
    read_neighbours_s = time.perf_counter() - t0

    runs = {}
    for mode in ("in_place", "in_place_warm_cache", "output"):
        ckpt = work / f"run-{fmt}"
        out = work / f"run-{fmt}-out"
        shutil.rmtree(ckpt, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(pristine, ckpt)
        lose_stage(ckpt, fmt, stage_files)
        if mode == "in_place_warm_cache":  # everything in the page cache: the repair's time without disk reads
            for dirpath, _, files in os.walk(ckpt):
                for name in files:
                    with open(os.path.join(dirpath, name), "rb") as fh:
                        while fh.read(1 << 24):
                            pass
        else:
            evict(ckpt)
        before = io_counters()
        t0 = time.perf_counter()
        # The rebuild alone: the NaN/inf scan (on by default) reads every stage once more; --value-check times it.
        report = repair_checkpoint(str(ckpt), in_place=mode != "output",
                                   output=str(out) if mode == "output" else None, check_values=check_values)
        seconds = time.perf_counter() - t0
        after = io_counters()
        (rebuild,) = report.rebuilds
        runs[mode] = {"seconds": round(seconds, 3), "ledger_bytes_read": report.bytes_read,
                      "disk_read_bytes": after["read_bytes"] - before["read_bytes"],
                      "read_call_bytes": after["rchar"] - before["rchar"],
                      "bytes_written": report.bytes_written, "bytes_copied": report.bytes_copied,
                      "bytes_checked": report.bytes_checked,
                      "sources": list(rebuild.sources), "weights": [round(w, 4) for w in rebuild.weights]}
        shutil.rmtree(ckpt, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
    return {"benchmark": "offline repair of one lost stage (checkfree repair)", "format": fmt,
            "model": {"hidden": HIDDEN, "layers": LAYERS, "vocab": VOCAB, "stages": STAGES, "lost_stage": LOST},
            "checkpoint_bytes": total, "lost_stage_bytes": lost_bytes, "neighbour_shards_bytes": source_bytes,
            "cold_read_of_neighbour_shards_s": round(read_neighbours_s, 3), "repair": runs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/checkfree-repair-bench", help="where checkpoints are generated (~2 GB)")
    p.add_argument("--results", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--formats", nargs="+", default=["megatron_legacy", "megatron_torch_dist", "deepspeed"])
    p.add_argument("--timeout-s", type=float, default=900, help="hard limit on the generating ranks")
    p.add_argument("--value-check", action="store_true",
                   help="time the repair with its NaN/inf scan of every stage (the default of checkfree repair and "
                        "of the hook); without it, the rebuild alone")
    p.add_argument("--_worker", choices=["megatron", "deepspeed"], help=argparse.SUPPRESS)
    args = p.parse_args()
    work = Path(args.work)
    if args._worker == "megatron":
        return megatron_rank(str(work))
    if args._worker == "deepspeed":
        return deepspeed_rank(str(work))
    work.mkdir(parents=True, exist_ok=True)
    generate(work, args.timeout_s)
    mib = 2 ** 20
    print(f"{'format':<20} {'ckpt MiB':>9} {'lost MiB':>9} {'nbrs MiB':>9} {'ledger MiB':>10} {'disk MiB':>9} "
          f"{'repair s':>9} {'warm s':>7} {'cold read s':>11} {'+copy s':>8}")
    for fmt in args.formats:
        r = measure(work, fmt, args.value_check)
        Path(args.results).mkdir(parents=True, exist_ok=True)
        with open(Path(args.results) / f"repair_{fmt}.json", "w") as f:
            json.dump(r, f, indent=2)
        ip = r["repair"]["in_place"]
        print(f"{fmt:<20} {r['checkpoint_bytes'] / mib:9.1f} {r['lost_stage_bytes'] / mib:9.1f} "
              f"{r['neighbour_shards_bytes'] / mib:9.1f} {ip['ledger_bytes_read'] / mib:10.1f} "
              f"{ip['disk_read_bytes'] / mib:9.1f} {ip['seconds']:9.2f} "
              f"{r['repair']['in_place_warm_cache']['seconds']:7.2f} "
              f"{r['cold_read_of_neighbour_shards_s']:11.2f} "
              f"{r['repair']['output']['seconds']:8.2f}", flush=True)


if __name__ == "__main__":
    main()
