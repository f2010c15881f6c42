"""The demo's training script, one process per rank: a small GPT on DeepSpeed's pipeline engine, trained on the
shipped public-domain corpus, CheckFree from the config. ``checkfree demo`` runs it; so does the stock launcher:

    OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu deepspeed --num_gpus 4 launch/train.py \
        --deepspeed_config configs/checkfree_middle.json --steps 60 --out runs/demo

(``launch/train.py`` runs this from a clone; on CPU, DeepSpeed counts one "device", so --num_gpus N is what starts
N ranks.) Prints the loss per step on rank 0, writes ``metrics.csv`` and, when CheckFree is enabled,
``events.jsonl`` into ``--out``. Works unchanged on GPUs with NCCL (the backend is the accelerator's unless
--backend says otherwise). On CPU it turns off DeepSpeed's shm all-reduce op, which training never uses and which
DeepSpeed would JIT-compile at init the first time on a machine (minutes).

To survive real process loss, start it through the supervisor (and set CHECKFREE_JOB_TOKEN):

    deepspeed --num_gpus 4 --module deepspeed_checkfree.supervisor launch/train.py --deepspeed_config ...

An error that is not a lost peer (an invalid config, a bug in a step) stops the job with exit code 78 and a
``stopped`` event, under the supervisor or not. The --inject-* and --die-at flags inject faults.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    # Run by path (the launcher's and the supervisor's way): import the package from the folder that holds it (a
    # clone or site-packages), not this file's own folder.
    sys.path[0] = str(Path(__file__).resolve().parents[2])

import argparse  # noqa: E402
import csv  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import time  # noqa: E402

import deepspeed  # noqa: E402
import torch  # noqa: E402
from deepspeed.accelerator import get_accelerator  # noqa: E402

import deepspeed_checkfree  # noqa: E402,F401  (registers the CheckFree engine with deepspeed.initialize)
from deepspeed_checkfree.core.config import CheckFreeConfig  # noqa: E402
from deepspeed_checkfree.models import gpt  # noqa: E402
from deepspeed_checkfree.models.corpus import StepBatches, load_corpus, split_corpus  # noqa: E402
from deepspeed_checkfree.pipe.selector import disable_shm_comm_op  # noqa: E402
from deepspeed_checkfree.resilience.contract import incarnation_from_env, is_spare, supervised  # noqa: E402
from deepspeed_checkfree.resilience.stopping import ScriptGuard  # noqa: E402
from deepspeed_checkfree.resilience.trainer import ResilientTrainer  # noqa: E402

if get_accelerator().device_name() == "cpu":
    disable_shm_comm_op()  # (before the first init_distributed)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train a small GPT with DeepSpeed's pipeline engine on the shipped corpus, "
                                "CheckFree from the config (one process per rank; see checkfree demo).")
    p.add_argument("--steps", type=int, default=int(os.environ.get("STEPS", 60)), help="optimizer steps to run")
    p.add_argument("--stages", type=int, default=int(os.environ.get("STAGES", 4)), help="pipeline stages")
    p.add_argument("--out", default=os.environ.get("OUT", "runs/train"), help="output directory")
    p.add_argument("--corpus", default=None, help="text file (.txt or .txt.xz); default: the shipped corpus")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--layers", type=int, default=8, help="transformer blocks (a multiple of --stages)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seed", type=int, default=1234, help="model initialisation and data order seed")
    p.add_argument("--backend", default=None, help="torch.distributed backend (default: the accelerator's)")
    p.add_argument("--ckpt-dir", default=None, help="checkpoint-restart baseline (not under the supervisor): resume "
                   "from the latest DeepSpeed checkpoint here, and save one every --save-every steps")
    p.add_argument("--save-every", type=int, default=0, help="steps between checkpoints (with --ckpt-dir)")
    p.add_argument("--inject-error", default=None, metavar="RANK:STEP",
                   help="raise an AssertionError in step STEP on RANK, every time (a deterministic bug)")
    p.add_argument("--inject-comm-error", default=None, metavar="RANK:STEP",
                   help="raise a transient communication error (DistNetworkError) once in step STEP on RANK")
    p.add_argument("--die-at", action="append", default=[], metavar="PHASE:RANK",
                   help="the first trainer of RANK SIGKILLs itself in PHASE: 'startup' (before joining the job) or "
                        "'build' (inside the first engine build); repeatable")
    p.add_argument("--save-weights", default=None, metavar="DIR",
                   help="after the last step, save each rank's stage weights to DIR/rank<R>.pt (to compare runs)")
    p.add_argument("--min-step-s", type=float, default=0.0, metavar="SECONDS",
                   help="pace the steps: each takes at least this long (to watch a demo, or to leave a test time "
                        "to act while the job trains)")
    p.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)),
                   help="set by the deepspeed launcher")
    deepspeed.add_config_arguments(p)
    return p.parse_args(argv)


def _rank_step(value):
    return tuple(int(x) for x in value.split(":")) if value else (None, None)


def _die_at(args, phase: str, rank: int) -> None:
    """--die-at: a real SIGKILL of this (first, active) trainer in ``phase``."""
    if f"{phase}:{rank}" in args.die_at and not is_spare() and incarnation_from_env() == 0:
        print(f"--die-at {phase}:{rank}: trainer pid {os.getpid()} kills itself", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    rank = int(os.environ.get("RANK", "0"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # Any error from here on that is not a lost peer stops the job (exit code 78) instead of being respawned.
    guard = ScriptGuard(rank, events_file=str(out / "events.jsonl"))
    with guard:
        run(args, guard, rank, out)


def run(args, guard: ScriptGuard, rank: int, out: Path) -> None:
    torch.manual_seed(args.seed)
    if not args.deepspeed_config:
        sys.exit("pass --deepspeed_config CONFIG.json (see configs/)")
    with open(args.deepspeed_config) as f:
        ds_config = json.load(f)
    cf = ds_config.get("checkfree")
    if isinstance(cf, dict) and cf.get("events_file"):
        guard.events_file = cf["events_file"]
    # Parsed here, so that an invalid section stops the job before any engine exists (ConfigError, exit code 78).
    checkfree = CheckFreeConfig.from_ds_config(ds_config)
    if checkfree.enabled:
        # A section given as a YAML/JSON file path becomes the parsed section, with the same default events file
        # as an inline one.
        section = json.loads(checkfree.model_dump_json())
        section["events_file"] = checkfree.events_file or guard.events_file
        guard.events_file = section["events_file"]
        ds_config["checkfree"] = section
    _die_at(args, "startup", rank)
    error_rank, error_step = _rank_step(args.inject_error)
    comm_rank, comm_step = _rank_step(args.inject_comm_error)
    injected = set()

    cfg = gpt.GPTConfig(vocab_size=256, seq_len=args.seq_len, d_model=args.d_model, n_heads=args.heads,
                        n_layers=args.layers)
    plus = checkfree.mode == "checkfree_plus"
    train_tokens, _ = split_corpus(load_corpus(args.corpus))

    def build_engine():
        model = (gpt.plus_pipeline_module if plus else gpt.pipeline_module)(cfg, num_stages=args.stages,
                                                                             base_seed=args.seed)
        _die_at(args, "build", rank)
        engine, _, _, _ = deepspeed.initialize(model=model, config=ds_config,
                                               model_parameters=[p for p in model.parameters() if p.requires_grad])
        # Batches are addressed by (step, micro-batch): a replayed step sees exactly the data it saw before.
        engine.checkfree_batches = StepBatches(
            train_tokens, seq_len=cfg.seq_len, micro_batch_size=engine.train_micro_batch_size_per_gpu(),
            micro_batches=engine.micro_batches, seed=args.seed, dp_rank=engine.grid.data_parallel_id,
            dp_size=engine.dp_world_size)
        if rank == 0:
            print(f"engine={type(engine).__name__} stages={engine.num_stages} dp={engine.dp_world_size} "
                  f"steps={args.steps}", flush=True)
        return engine

    clock = {"t": time.perf_counter()}
    metrics = {}

    def train_step(engine, step):
        clock["t"] = time.perf_counter()
        if (rank, step) == (error_rank, error_step):
            raise AssertionError(f"injected deterministic error in step {step} on rank {rank} (--inject-error)")
        if (rank, step) == (comm_rank, comm_step) and "comm" not in injected:
            injected.add("comm")
            raise torch.distributed.DistNetworkError(f"injected transient communication error in step {step} on "
                                                     f"rank {rank} (--inject-comm-error)")
        loss = float(engine.train_batch(engine.checkfree_batches.iterator(step)))
        time.sleep(max(0.0, args.min_step_s - (time.perf_counter() - clock["t"])))
        return loss

    def on_step(engine, step, loss):
        dt = time.perf_counter() - clock["t"]
        if rank != 0:
            return
        if not metrics:
            # Opened at the first step, so a warm spare never touches it; a replacement of rank 0 appends.
            metrics["file"] = open(out / "metrics.csv", "a", newline="")
            metrics["csv"] = csv.writer(metrics["file"])
            if metrics["file"].tell() == 0:
                metrics["csv"].writerow(["step", "loss", "step_time_s", "lr", "time"])
        metrics["csv"].writerow([step, f"{loss:.6f}", f"{dt:.4f}", engine.get_lr()[0], f"{time.time():.3f}"])
        metrics["file"].flush()
        print(f"step {step:4d} loss {loss:.4f} time {dt * 1000:.0f} ms", flush=True)

    if supervised():
        # Started by `-m deepspeed_checkfree.supervisor`: survive the loss of any rank's process.
        engine = ResilientTrainer(build_engine, ds_config, backend=args.backend).train(args.steps, train_step,
                                                                                      on_step)
    else:
        deepspeed.init_distributed(dist_backend=args.backend)
        engine = build_engine()
        if args.ckpt_dir and os.path.exists(os.path.join(args.ckpt_dir, "latest")):
            engine.load_checkpoint(args.ckpt_dir)  # the alternative users have today: roll back and resume
        for step in range(engine.global_steps, args.steps):
            on_step(engine, step, train_step(engine, step))
            if args.ckpt_dir and args.save_every and (step + 1) % args.save_every == 0:
                engine.save_checkpoint(args.ckpt_dir, tag=f"step{step + 1}")
    if metrics:
        metrics["file"].close()
    if args.save_weights:
        os.makedirs(args.save_weights, exist_ok=True)
        torch.save({n: p.detach().cpu() for n, p in engine.module.named_parameters()},
                   os.path.join(args.save_weights, f"rank{rank}.pt"))
    if rank == 0:
        print(f"done: {args.steps} steps; metrics in {out / 'metrics.csv'}", flush=True)


if __name__ == "__main__":
    main()
