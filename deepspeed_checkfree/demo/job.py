"""Running the demo: its DeepSpeed config, the stock launcher over STAGES ranks of :mod:`.train` (under the
CheckFree supervisor when a trainer is to be killed), the kill, and the events at the end. Standard library only:
the ranks import torch and DeepSpeed, this process does not."""
from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import site
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from ..events import read_events, table
from ..resilience.contract import TOKEN_ENV, pid_file, ready_spare

TRAIN_SCRIPT = Path(__file__).resolve().with_name("train.py")
PACKAGE_PARENT = Path(__file__).resolve().parents[2]  # the folder this package is imported from
TIMEOUT_EXIT_CODE = 124  # as timeout(1)
END_GRACE_S = 10.0


def demo_config(mode: str = "checkfree", lose: Optional[tuple] = (2, 30), killed: bool = False) -> dict:
    """The demo's DeepSpeed config: ``mode`` (or "baseline": no CheckFree), the stage and step of the injected loss
    ``lose``, or (``killed``) none, with the short detection timeout a real kill on a CPU machine wants. The
    repository's configs/ hold the same (a test compares them)."""
    config = {
        "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 8, "steps_per_print": 1000000,
        "gradient_clipping": 1.0,
        # torch's AdamW: DeepSpeed's "AdamW" alone would JIT-compile FusedAdam on CPU the first time (about a minute)
        "optimizer": {"type": "AdamW", "params": {"lr": 0.003, "betas": [0.9, 0.95], "weight_decay": 0.01,
                                                  "torch_adam": True}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 0.003,
                                                     "warmup_num_steps": 10, "warmup_type": "linear"}},
    }
    if mode == "baseline":
        return config
    section = {"enabled": True, "mode": mode}
    if killed:
        # A step's longest legitimate wait on 2 CPU cores is well under 2 s; a dead process is noticed at once anyway.
        section.update(detection_timeout_s=2.0, join_timeout_s=120.0)
    elif lose is not None:
        section.update(strategy="gradnorm_average", lr_boost=1.1,
                       failure_injection={"at": [{"stage": lose[0], "step": lose[1]}]})
    config["checkfree"] = section
    return config


def check_args(args: argparse.Namespace) -> Optional[str]:
    """What is wrong with the demo's options (the rule and the fix), or None."""
    injected = args.mode is not None or args.lose_stage is not None or args.lose_step is not None
    if args.config is not None and injected:
        return "--config gives the whole DeepSpeed config: drop --mode, --lose-stage and --lose-step, or --config"
    if args.kill_stage is not None and (args.lose_stage is not None or args.lose_step is not None):
        return "--kill-stage loses a stage by a real kill: drop --lose-stage/--lose-step, or --kill-stage"
    if args.kill_stage is not None and args.mode == "baseline":
        return "the stock engine (--mode baseline) cannot survive a killed trainer: drop --kill-stage or --mode"
    if args.stages < 1 or args.steps < 1:
        return f"--stages and --steps must be positive, got {args.stages} and {args.steps}"
    for flag, stage in (("--lose-stage", args.lose_stage), ("--kill-stage", args.kill_stage)):
        if stage is not None and not 0 <= stage < args.stages:
            return f"{flag} {stage} is not a stage of the {args.stages}-stage pipeline (0..{args.stages - 1})"
    steps = [("--kill-step", args.kill_step)] if args.kill_stage is not None else []
    if args.kill_stage is None and args.config is None and args.mode != "baseline":
        steps.append(("--lose-step", args.lose_step or 30))
    for flag, step in steps:
        if not 0 < step < args.steps:
            return f"{flag} {step} must lie between 1 and --steps - 1 = {args.steps - 1}, or nothing is lost"
    return None


def steps_done(out: Path) -> int:
    path = out / "metrics.csv"
    return max(0, len(path.read_text().splitlines()) - 1) if path.exists() else 0


def child_env(out: Path) -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # one thread per rank: the ranks share the machine's cores
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault(TOKEN_ENV, secrets.token_hex(16))  # every rank (and a machine that joins) presents it
    # The launcher's processes import this package too (the supervisor by name): from where this one came, also when
    # that is a clone or a --target folder rather than site-packages.
    site_dirs = {Path(p).resolve() for p in [*site.getsitepackages(), site.getusersitepackages()]}
    if PACKAGE_PARENT not in site_dirs:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGE_PARENT), env.get("PYTHONPATH")]))
    return env


class _Ended(Exception):
    """The demo was told to end (SIGTERM, SIGHUP)."""


def _raise_ended(signum, frame) -> None:
    raise _Ended(signal.Signals(signum).name)


def _end(proc: subprocess.Popen) -> None:
    """End the launcher and every process it started (they share its session): SIGTERM, then SIGKILL."""
    for sig, wait_s in ((signal.SIGTERM, END_GRACE_S), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def run_demo(args: argparse.Namespace) -> int:
    """Run the demo with the options of :func:`deepspeed_checkfree.demo.add_arguments`; return its exit code."""
    problem = check_args(args)
    if problem:
        print(f"checkfree demo: error: {problem}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("events.jsonl", "metrics.csv"):
        (out / stale).unlink(missing_ok=True)
    killing = args.kill_stage is not None
    if args.config is not None:
        config = Path(args.config)
    else:
        mode = args.mode or "checkfree"
        lose = (args.lose_stage if args.lose_stage is not None else 0 if mode == "checkfree_plus" else 2,
                args.lose_step or 30)
        config = out / "ds_config.json"
        config.write_text(json.dumps(demo_config(mode, lose, killed=killing), indent=2) + "\n")
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(args.stages), "--master_port",
           str(args.master_port)]  # the stock `deepspeed` launcher (on CPU --num_gpus starts that many ranks)
    if killing:
        cmd += ["--module", "deepspeed_checkfree.supervisor", "--pid-dir", str(out / "pids")]
    cmd += [str(TRAIN_SCRIPT), "--deepspeed_config", str(config), "--steps", str(args.steps), "--stages",
            str(args.stages), "--out", str(out)]
    print("+ " + " ".join(cmd), flush=True)
    previous = {sig: signal.signal(sig, _raise_ended) for sig in (signal.SIGTERM, signal.SIGHUP)}
    proc = subprocess.Popen(cmd, env=child_env(out), start_new_session=True)
    deadline, killed, waiting = time.monotonic() + args.timeout, not killing, False
    try:
        while proc.poll() is None:
            if time.monotonic() > deadline:
                print(f"checkfree demo: still running after --timeout {args.timeout:g} s: ending it", file=sys.stderr)
                _end(proc)
                return TIMEOUT_EXIT_CODE
            done = steps_done(out)
            if not killed and done >= args.kill_step:
                # The kill waits for the stage's warm spare (on a new install the first imports compile, for tens
                # of seconds), unless the job is about to end without it.
                ready = ready_spare(str(out / "pids"), args.kill_stage) is not None
                if ready or done >= args.steps - 5:
                    pid = int(Path(pid_file(str(out / "pids"), args.kill_stage)).read_text())  # (rank = stage)
                    print(f">>> kill -9 of stage {args.kill_stage}'s trainer (pid {pid}) after step {done - 1}"
                          + ("" if ready else ": its warm spare is not ready yet, so the outage includes the start "
                             "of a new process"), flush=True)
                    os.kill(pid, signal.SIGKILL)
                    killed = True
                elif not waiting:
                    print(f">>> step {args.kill_step}: waiting for stage {args.kill_stage}'s warm spare to be ready "
                          f"before the kill", flush=True)
                    waiting = True
            time.sleep(0.1)
    except (KeyboardInterrupt, _Ended) as why:
        _end(proc)
        return 128 + (signal.SIGINT if isinstance(why, KeyboardInterrupt) else signal.SIGTERM)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if (out / "events.jsonl").exists() and (out / "events.jsonl").stat().st_size:
        print(f"--- events ({out / 'events.jsonl'}) ---")
        print(table(read_events(str(out / "events.jsonl"))))
    return proc.returncode
