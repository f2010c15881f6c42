"""Outage and lost work after a real `kill -9` of a middle stage: CheckFree recovery against checkpoint-restart.

    OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu python benchmarks/outage.py --kill-step 25 --save-every 10

Both runs train the same 4-stage model on the same data with the stock `deepspeed` launcher, and the trainer of
stage 2 is SIGKILLed once rank 0 has completed --kill-step steps:
- CheckFree: the job runs under `-m deepspeed_checkfree.supervisor`; the survivors keep their state, a spare
  replaces the dead trainer, the stage is rebuilt from its neighbours and the interrupted step is replayed.
- Checkpoint-restart (what users do today): the stock engine saves a DeepSpeed checkpoint every --save-every steps;
  the launcher tears the job down when the rank dies, and it is started again with the same command, which
  resumes from the latest checkpoint.
Outage = kill until the first step completes again (timestamps of metrics.csv). Lost steps = completed steps
that had to be computed again. Prints and writes a JSON summary.

With --store etcd://..., the CheckFree job is also run with its coordination state in that etcd cluster, alternating
with the embedded store --repeat times, and both outages are reported (--only-stores skips the other runs):

    python benchmarks/outage.py --store etcd://127.0.0.1:2379,127.0.0.1:2381,127.0.0.1:2383 --only-stores --repeat 3

With --hosts N --fault kill|vanish|sigterm, both jobs run across N machines (network namespaces; needs root), one rank
each, --repeat times, and the fault is a trainer kill, a silent vanish of the machine or SIGTERM to all its
processes (benchmarks/outage_hosts.py says how):

    python benchmarks/outage.py --hosts 4 --fault kill vanish sigterm --repeat 2
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO))  # run from a clone without installing
from deepspeed_checkfree.resilience.contract import TOKEN_ENV, pid_file  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rows(out: Path) -> list:
    path = out / "metrics.csv"
    return list(csv.DictReader(open(path))) if path.exists() else []


def wait_rows(out: Path, n: int, proc: subprocess.Popen, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while len(rows(out)) < n:
        if proc.poll() is not None:
            raise RuntimeError(f"job exited with {proc.returncode} before step {n}; see {out}/job.log")
        if time.monotonic() > deadline:
            raise RuntimeError(f"no step {n} after {timeout_s} s")
        time.sleep(0.02)


def env() -> dict:
    # A token per run: an etcd store keeps a finished run's keys under its token.
    e = dict(os.environ, OMP_NUM_THREADS="1", **{TOKEN_ENV: f"benchmark-token-{time.time_ns()}"})
    e.setdefault("DS_ACCELERATOR", "cpu")
    return e


def train_cmd(config: str, out: Path, steps: int, extra: list) -> list:
    return ["launch/train.py", "--deepspeed_config", config, "--steps", str(steps), "--out", str(out), *extra]


def run_checkfree(args, out: Path, store: str = None) -> dict:
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "4", "--master_port", str(free_port()), "--module",
           "deepspeed_checkfree.supervisor", "--pid-dir", str(out / "pids"), *(["--store", store] if store else []),
           *train_cmd(args.checkfree_config, out, args.steps, [])]
    log = open(out / "job.log", "w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=log, stderr=subprocess.STDOUT)
    wait_rows(out, args.kill_step, proc)
    os.kill(int(Path(pid_file(str(out / "pids"), 2)).read_text()), signal.SIGKILL)
    killed = time.time()
    done_before = len(rows(out))
    if proc.wait(timeout=900) != 0:
        raise RuntimeError(f"CheckFree job failed; see {out}/job.log")
    r = rows(out)
    resumed = min(float(x["time"]) for x in r[done_before:])
    outage_events = [json.loads(line) for line in open(out / "events.jsonl") if '"outage"' in line]
    return {"outage_s": resumed - killed, "outage_event_s": outage_events[0]["outage_s"],
            "phases_s": {k: outage_events[0][k] for k in ("detected_s", "rejoined_s", "rebuilt_s", "resumed_s")},
            "steps_completed_before_kill": done_before, "lost_steps": len(r) - args.steps,
            "step_time_s": statistics.median(float(x["step_time_s"]) for x in r),
            "final_loss": float(r[-1]["loss"])}


def peak_rss_bytes(pid: int) -> int:
    """The process's peak resident set (VmHWM) so far."""
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


def middle_stage_state_bytes(d_model: int, layers: int, stages: int) -> int:
    """Weights plus Adam's two moments (fp32) of one middle stage of launch/train.py's model."""
    from deepspeed_checkfree.models import gpt
    block = gpt.Block(gpt.GPTConfig(vocab_size=256, seq_len=16, d_model=d_model, n_heads=4, n_layers=layers))
    return 3 * 4 * sum(p.numel() for p in block.parameters()) * (layers // stages)


def run_memory(args, out: Path) -> dict:
    """Survivors' peak memory across a recovery: the peak RSS of stages 1 and 3 (a middle stage and the last) just
    before stage 2 is killed (their steady-state training peak) and two steps after training resumed. In-place
    recovery keeps each survivor's engine, so the second peak should not exceed the first by more than the
    transfers of the rebuild."""
    size = ["--d-model", str(args.memory_d_model), "--seq-len", "16"]
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "4", "--master_port", str(free_port()), "--module",
           "deepspeed_checkfree.supervisor", "--pid-dir", str(out / "pids"),
           *train_cmd(args.checkfree_config, out, args.memory_steps, size)]
    log = open(out / "job.log", "w")
    # glibc raises its mmap threshold each time a large block is freed, after which the steady peak RSS keeps
    # growing for several steps; a fixed threshold makes RSS follow what is allocated (as the CUDA allocator's
    # max_memory_allocated does).
    proc = subprocess.Popen(cmd, cwd=REPO, env=dict(env(), MALLOC_MMAP_THRESHOLD_=str(128 * 1024)), stdout=log,
                            stderr=subprocess.STDOUT)
    kill_at = args.memory_steps // 2
    wait_rows(out, kill_at, proc)
    survivors = {r: int(Path(pid_file(str(out / "pids"), r)).read_text()) for r in (1, 3)}
    before = {r: peak_rss_bytes(pid) for r, pid in survivors.items()}
    os.kill(int(Path(pid_file(str(out / "pids"), 2)).read_text()), signal.SIGKILL)
    done_before = len(rows(out))
    wait_rows(out, done_before + 2, proc)
    after = {r: peak_rss_bytes(pid) for r, pid in survivors.items()}
    if proc.wait(timeout=900) != 0:
        raise RuntimeError(f"CheckFree job failed; see {out}/job.log")
    state = middle_stage_state_bytes(args.memory_d_model, 8, 4)
    excess = {r: after[r] - before[r] for r in survivors}
    outage = [json.loads(line) for line in open(out / "events.jsonl") if '"outage"' in line][0]
    return {"d_model": args.memory_d_model, "stage_state_bytes": state, "steady_peak_rss_bytes": before,
            "recovery_peak_rss_bytes": after, "excess_bytes": excess,
            "excess_over_stage_state": {r: e / state for r, e in excess.items()},
            "phases_s": {k: outage[k] for k in ("detected_s", "rejoined_s", "rebuilt_s", "resumed_s")}}


def run_checkpoint_restart(args, out: Path) -> dict:
    ckpt = out / "ckpt"
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "4", "--master_port", str(free_port()),
           *train_cmd(args.baseline_config, out, args.steps,
                      ["--ckpt-dir", str(ckpt), "--save-every", str(args.save_every)])]
    log = open(out / "job.log", "w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    wait_rows(out, args.kill_step, proc)
    victim = subprocess.run(["pgrep", "-f", f"local_rank=2 --deepspeed_config {args.baseline_config} .*{out}"],
                            capture_output=True, text=True).stdout.split()
    os.kill(int(victim[0]), signal.SIGKILL)
    killed = time.time()
    done_before = len(rows(out))
    proc.wait(timeout=300)  # the launcher notices the dead rank and tears the whole job down
    torn_down = time.time()
    last_ckpt = int((ckpt / "latest").read_text().strip().replace("step", ""))
    # The operator (here: this script) starts the same command again; it resumes from the latest checkpoint.
    cmd[cmd.index("--master_port") + 1] = str(free_port())
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=log, stderr=subprocess.STDOUT)
    if proc.wait(timeout=900) != 0:
        raise RuntimeError(f"restarted job failed; see {out}/job.log")
    r = rows(out)
    resumed = min(float(x["time"]) for x in r[done_before:])
    return {"outage_s": resumed - killed, "teardown_s": torn_down - killed,
            "steps_completed_before_kill": done_before, "resumed_from_step": last_ckpt,
            "lost_steps": done_before - last_ckpt,
            "step_time_s": statistics.median(float(x["step_time_s"]) for x in r),
            "final_loss": float(r[-1]["loss"]), "checkpoint_bytes": sum(
                f.stat().st_size for f in (ckpt / f"step{last_ckpt}").rglob("*") if f.is_file())}


def compare_stores(args, work: Path) -> None:
    """The CheckFree outage with the embedded store and with the etcd store, alternating, in one session."""
    outages = {"embedded": [], "etcd": []}
    for i in range(args.repeat):
        for name, store in (("embedded", None), ("etcd", args.store)):
            out = work / f"store_{name}_{i}"
            subprocess.run(["rm", "-rf", str(out)], check=True)
            out.mkdir(parents=True)
            res = run_checkfree(args, out, store=store)
            outages[name].append(round(res["outage_s"], 3))
            print(name, json.dumps(res), flush=True)
    summary = {"benchmark": "outage after kill -9 of stage 2 (4 stages, CPU): embedded store vs etcd (3 members)",
               "outage_s": outages, "median_s": {k: statistics.median(v) for k, v in outages.items()}}
    summary["etcd_minus_embedded_s"] = summary["median_s"]["etcd"] - summary["median_s"]["embedded"]
    path = REPO / Path(args.out).with_name("outage_stores.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--kill-step", type=int, default=25, help="kill after rank 0 has completed this many steps")
    p.add_argument("--save-every", type=int, default=10, help="checkpoint interval of the baseline")
    p.add_argument("--checkfree-config", default="configs/checkfree_no_failure.json")
    p.add_argument("--baseline-config", default="configs/baseline.json")
    p.add_argument("--workdir", default="runs/bench_outage")
    p.add_argument("--out", default="benchmarks/results/outage.json")
    p.add_argument("--memory-d-model", type=int, default=1024, help="d_model of the survivors' memory run")
    p.add_argument("--memory-steps", type=int, default=16)
    p.add_argument("--only", choices=("checkfree", "checkpoint_restart", "memory"),
                   help="run just this one and print it (no summary is written)")
    p.add_argument("--store", default=None, help="also run CheckFree on this etcd store (etcd://...)")
    p.add_argument("--only-stores", action="store_true", help="with --store: only the embedded-vs-etcd runs")
    p.add_argument("--repeat", type=int, default=1, help="with --store: runs of each store, alternating; with "
                   "--hosts: pairs of runs (CheckFree, checkpoint-restart)")
    p.add_argument("--hosts", type=int, default=None, help="run across this many network-namespace machines")
    p.add_argument("--fault", choices=("kill", "vanish", "sigterm"), nargs="+", default=["kill"], help="with "
                   "--hosts: the faults on the victim's machine (a trainer kill, a silent vanish, SIGTERM to all its "
                   "processes), each --repeat times, alternating")
    p.add_argument("--baseline-runs", type=int, default=1, help="with --hosts: checkpoint-restart runs")
    p.add_argument("--append", action="store_true", help="with --hosts: add this session's runs to those of --out")
    p.add_argument("--victim", type=int, default=2, help="with --hosts: the rank whose machine the fault hits")
    p.add_argument("--grace", type=float, default=30.0, help="with --fault sigterm: SIGKILL after this many seconds")
    p.add_argument("--standby", action="store_true", help="with --hosts: the replacement machine stands by from the "
                   "job's start (--join --standby) instead of joining at the fault")
    p.add_argument("--teardown-timeout", type=float, default=60.0, help="with --hosts: checkpoint-restart's "
                   "operator ends the stock job this long after the kill if a rank still waits")
    args = p.parse_args()
    if args.hosts:
        from outage_hosts import main_hosts  # (the same folder)
        args.fault_step = args.kill_step
        if args.out == p.get_default("out"):
            args.out = f"benchmarks/results/outage_hosts{args.hosts}.json"
        main_hosts(args)
        return
    work = REPO / args.workdir
    if args.store:
        compare_stores(args, work)
        if args.only_stores:
            return
    results = {}
    runs = (("checkfree", run_checkfree), ("checkpoint_restart", run_checkpoint_restart), ("memory", run_memory))
    for name, fn in runs:
        if args.only not in (None, name):
            continue
        out = work / name
        subprocess.run(["rm", "-rf", str(out)], check=True)
        out.mkdir(parents=True)
        results[name] = fn(args, out)
        print(name, json.dumps(results[name]), flush=True)
    if args.only:
        return
    cf, ck = results["checkfree"], results["checkpoint_restart"]
    step = statistics.median([cf["step_time_s"], ck["step_time_s"]])
    summary = {
        "benchmark": "outage after kill -9 of stage 2 (4 stages, CPU): CheckFree vs checkpoint-restart",
        "kill_after_steps": args.kill_step, "checkpoint_every": args.save_every,
        "checkfree": cf, "checkpoint_restart": ck,
        "outage_ratio": ck["outage_s"] / cf["outage_s"],
        "memory": results["memory"],
        "lost_work_s": {"checkfree": cf["outage_s"] + cf["lost_steps"] * step,
                        "checkpoint_restart": ck["outage_s"] + ck["lost_steps"] * step},
    }
    summary["lost_work_ratio"] = summary["lost_work_s"]["checkpoint_restart"] / summary["lost_work_s"]["checkfree"]
    Path(REPO / args.out).parent.mkdir(parents=True, exist_ok=True)
    (REPO / args.out).write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
