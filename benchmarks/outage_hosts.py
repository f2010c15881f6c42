"""Outage across network hosts: one rank per machine (a network namespace on a bridge, tests/harness/netns.py), the
shipped config, one DeepSpeed node launcher per machine; a fault on rank --victim's machine, against
checkpoint-restart on a bed of the same kind in the same run (each run builds its own).

    sudo OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu python benchmarks/outage.py --hosts 4 --fault kill vanish sigterm \
        --repeat 2

Faults (each on --victim's machine once rank 0 has completed --kill-step steps):
- kill: its trainer is SIGKILLed (its supervisor replaces it from the warm spare).
- vanish: its link goes down, then every process on it is SIGKILLed (no packet tells anyone); a replacement machine
  (an extra namespace) runs the README's ``--join`` command at once.
- sigterm: every process on it gets SIGTERM at once (a preemption notice: the drain hands the stage over), SIGKILL
  after --grace seconds, then its link goes down; the replacement machine runs ``--join`` at the signal.
With --standby the replacement machine runs ``--join --standby`` from the job's start instead (for vanish and
sigterm), and the fault comes once its trainer is warm: a machine that waits for the rank to need it.
Checkpoint-restart: the stock engine under the stock node launchers saves a checkpoint every --save-every steps; the
victim's trainer is SIGKILLed at the same step (a kill is the most favourable fault for it: the others learn of it at
once); when every launcher has exited (or, after --teardown-timeout, is ended as an operator would) the same
commands start again on the same machines and resume from the latest checkpoint.

Reported per run: the wall time from the fault to the first step of the new generation (metrics.csv timestamps;
after SIGTERM the leaving rank first completes the step it is in, which the next completed step would count) beside the
outage record (events.jsonl: outage_s, start, method, phases incl. silent_s and drain_s, lost_steps); per fault, the
ratio of checkpoint-restart's median wall time to CheckFree's, and the failure-free step time (rank 0's median
before the fault) of the supervised CheckFree job against the stock job. The fault kinds alternate (--repeat
rounds), so a drift in the machine's load hits each alike. A run that fails is recorded with its error and the
others go on; the summary goes to --out (default benchmarks/results/outage_hosts<N>.json).

The lease watch cannot be switched off (every supervisor renews its lease, the leader reads them all every second),
so the step-time ratio is the whole supervision's cost (and the CheckFree engine's, 1.001x on its own:
step_time.py), not the lease watch's alone.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

import psutil

from outage import REPO, rows

from tests.harness.cluster import HostJob  # noqa: E402 (REPO is on sys.path: outage.py put it there)
from tests.harness.job import world_info  # noqa: E402
from tests.harness.netns import Hosts, netns_unavailable  # noqa: E402
from tests.harness.ports import reserve_ports  # noqa: E402
from tests.harness.ranks import cpu_env  # noqa: E402
from tests.e2e.test_optimizer_outage import wait_until_spare_ready  # noqa: E402
from deepspeed_checkfree.resilience.contract import ready_spare  # noqa: E402

SHIPPED = "checkfree_no_failure.json"
WARMUP_STEPS = 3  # left out of the failure-free step time (the first steps build and warm up)


def shipped_checkfree() -> dict:
    """The shipped config's checkfree section (HostJob raises the detection timeout for tests; this undoes it)."""
    return json.loads((REPO / "configs" / SHIPPED).read_text())["checkfree"]


def failure_free_step_s(metrics: List[dict], before: int) -> float:
    return statistics.median(float(r["step_time_s"]) for r in metrics[WARMUP_STEPS:before])


def next_step_after(metrics: List[dict], when: float) -> Optional[float]:
    later = [float(r["time"]) for r in metrics if float(r["time"]) > when]
    return min(later) - when if later else None


def leftovers(bed: Hosts) -> Dict[str, List[int]]:
    return {host.name: host.pids() for host in bed if host.pids()}


def run_checkfree(args, work: Path, fault: str) -> dict:
    """The supervised job on ``args.hosts`` machines plus a spare one; ``fault`` on the victim's machine."""
    with Hosts(args.hosts + 1) as bed:
        job = HostJob(work, bed, SHIPPED, steps=args.steps, checkfree=shipped_checkfree(),
                      token=f"bench-{time.time_ns()}", world=args.hosts)
        try:
            victim, spare = bed[args.victim], bed[args.hosts]
            standby = args.standby and fault != "kill"
            if standby:  # the replacement machine stands by from the start, with pid files of its own
                standby_dir = work / "standby"
                job.procs[args.victim] = job.run_on(spare, args.victim, job.join_command(
                    args.victim, "--standby", "--pid-dir", str(standby_dir), master_addr=job.master_addr))
                job.host_of[args.victim] = victim
            job.wait_for_step(args.fault_step, timeout_s=300)
            if fault != "kill":  # (a machine dying inside a compiled op's first load would cost the next load 60 s)
                wait_until_spare_ready(job, args.victim)
            if standby:
                deadline = time.monotonic() + 120
                while ready_spare(str(standby_dir), args.victim) is None:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"the standby's trainer was not ready in 120 s; see {work}/job.log")
                    time.sleep(0.05)
            done_before = job.steps_done()
            preempted = None
            faulted = time.time()
            if fault == "kill":
                job.kill_trainer(args.victim)
            elif fault == "vanish":
                victim.vanish()
                if not standby:
                    job.join(args.victim, spare)
            else:
                preempted = threading.Thread(target=victim.preempt, kwargs={"grace_s": args.grace}, daemon=True)
                preempted.start()
                if not standby:
                    job.join(args.victim, spare)
            codes = job.wait(timeout_s=300, succeed=False)
            if preempted is not None:
                preempted.join()
            if codes != [0] * args.hosts:
                raise RuntimeError(f"CheckFree job exited {codes} after a {fault}; see {work}/job.log")
            metrics = job.metrics()
            records = [e for e in job.events() if e["event"] == "outage" and e["lost_ranks"] == [args.victim]]
            if len(records) != 1:
                raise RuntimeError(f"expected one outage record for rank {args.victim}, got {records}")
            record = records[0]
            resumed = [float(r["time"]) for r in metrics if int(r["step"]) == record["replayed_step"]]
            return {
                "standby": standby,
                # the first step of the new generation: after a drain, the leaving rank's last step comes first
                "wall_s_fault_to_resumed_step": resumed[0] - faulted,
                "wall_s_fault_to_next_step": next_step_after(metrics, faulted),
                "outage_record": {k: record.get(k) for k in (
                    "outage_s", "start", "method", "silent_s", "drain_s", "detected_s", "rejoined_s", "rebuilt_s",
                    "resumed_s", "lost_steps", "replayed_step")},
                "steps_completed_before_fault": done_before,
                "every_step_once": [int(r["step"]) for r in metrics] == list(range(args.steps)),
                "failure_free_step_s": failure_free_step_s(metrics, done_before),
                "exit_codes": codes, "leftover_processes": leftovers(bed),
            }
        finally:
            job.processes.end_all()
            job.close()


def trainer_of(launcher: subprocess.Popen) -> int:
    """The training script's process under a node launcher (``timeout`` -> launcher -> script)."""
    for child in psutil.Process(launcher.pid).children(recursive=True):
        cmd = child.cmdline()
        if "launch/train.py" in cmd and "deepspeed.launcher.launch" not in cmd:
            return child.pid
    raise RuntimeError(f"no training script under launcher {launcher.pid}")


def run_checkpoint_restart(args, work: Path) -> dict:
    """The stock engine and node launchers on ``args.hosts`` machines; a trainer kill, teardown, relaunch."""
    out, ckpt = work / "out", work / "ckpt"
    out.mkdir(parents=True, exist_ok=True)
    log = open(work / "job.log", "w")
    env = cpu_env()
    info = world_info(args.hosts)
    with Hosts(args.hosts) as bed:
        def launch() -> list:
            ports = reserve_ports(2)
            procs = [bed[r].popen(
                ["timeout", "-s", "KILL", "300", sys.executable, "-u", "-m", "deepspeed.launcher.launch",
                 f"--world_info={info}", f"--node_rank={r}", f"--master_addr={bed[0].address}",
                 f"--master_port={ports.port}", "launch/train.py", "--deepspeed_config",
                 str(REPO / "configs" / "baseline.json"), "--steps", str(args.steps), "--out", str(out),
                 "--ckpt-dir", str(ckpt), "--save-every", str(args.save_every)],
                env={**env, "GLOO_SOCKET_IFNAME": bed[r].ifname}, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL) for r in range(args.hosts)]
            ports.release()
            return procs

        procs = launch()
        deadline = time.monotonic() + 300
        while len(rows(out)) < args.fault_step:
            if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
                raise RuntimeError(f"stock job did not reach step {args.fault_step}; see {work}/job.log")
            time.sleep(0.02)
        victim = trainer_of(procs[args.victim])
        done_before = len(rows(out))
        killed = time.time()
        bed[args.victim].kill(victim)
        forced = False
        try:
            for p in procs:
                p.wait(timeout=max(0.1, killed + args.teardown_timeout - time.time()))
        except subprocess.TimeoutExpired:  # a rank that waits for ever: the operator ends the job
            forced = True
            for host in bed:
                host.kill_all()
        torn_down = time.time()
        last_ckpt = int((ckpt / "latest").read_text().strip().replace("step", ""))
        procs = launch()  # the operator starts the same commands again; they resume from the latest checkpoint
        codes = [p.wait(timeout=300) for p in procs]
        if codes != [0] * args.hosts:
            raise RuntimeError(f"restarted stock job exited {codes}; see {work}/job.log")
        metrics = rows(out)
        return {"wall_s_fault_to_next_step": next_step_after(metrics, killed), "teardown_s": torn_down - killed,
                "teardown_forced": forced, "steps_completed_before_fault": done_before,
                "resumed_from_step": last_ckpt, "lost_steps": done_before - last_ckpt,
                "failure_free_step_s": failure_free_step_s(metrics, done_before),
                "leftover_processes": leftovers(bed)}


def attempt(name: str, work: Path, fn) -> dict:
    """One run in a fresh folder; a run that fails is recorded with its error (the others still run)."""
    subprocess.run(["rm", "-rf", str(work)], check=True)
    work.mkdir(parents=True)
    try:
        result = {**fn(work), "workdir": str(work)}
    except Exception as err:  # noqa: BLE001 (a benchmark reports what failed and goes on)
        result = {"error": f"{type(err).__name__}: {err}", "workdir": str(work)}
    print(name, json.dumps(result), flush=True)
    return result


def median_of(results: List[dict], key: str) -> Optional[float]:
    values = [r[key] for r in results if "error" not in r and r.get(key) is not None]
    return statistics.median(values) if values else None


def main_hosts(args) -> None:
    why = netns_unavailable()
    if why is not None:
        print(f"SKIPPED: --hosts runs the job on network namespaces, which this process cannot make: {why}. "
              f"Run it as root (CAP_NET_ADMIN, CAP_SYS_ADMIN) with iproute2 installed.")
        return
    work = REPO / args.workdir / f"hosts{args.hosts}_{time.strftime('%H%M%S')}"
    baseline: List[dict] = []
    faults: Dict[str, List[dict]] = {}
    if args.append and (REPO / args.out).exists():  # the runs of earlier sessions count too
        before = json.loads((REPO / args.out).read_text())
        baseline, faults = before["checkpoint_restart_runs"], before["checkfree_runs"]
    baseline += [attempt(f"checkpoint_restart {i}", work / f"checkpoint_restart_{i}",
                         lambda w: run_checkpoint_restart(args, w)) for i in range(args.baseline_runs)]
    for i in range(args.repeat):  # the kinds alternate, so load drifts hit each alike
        for fault in args.fault:
            faults.setdefault(fault, []).append(attempt(f"checkfree {fault} {i}", work / f"{fault}_{i}",
                                                        lambda w: run_checkfree(args, w, fault)))
            write_summary(args, baseline, faults)  # after every run: a cut-short session keeps what it measured


def resumed_from_saved(run: dict) -> float:
    """The fault-to-resumed-step wall time of a run saved without it: the fault was ``wall_s_fault_to_next_step``
    before the first step completed after it (its metrics.csv is in the run's folder)."""
    metrics = rows(Path(run["workdir"]) / "out")
    faulted = min(float(r["time"]) for r in metrics[run["steps_completed_before_fault"]:]) - \
        run["wall_s_fault_to_next_step"]
    step = run["outage_record"]["replayed_step"]
    return next(float(r["time"]) for r in metrics if int(r["step"]) == step) - faulted


def write_summary(args, baseline: List[dict], faults: Dict[str, List[dict]]) -> None:
    restart_s = median_of(baseline, "wall_s_fault_to_next_step")
    stock_step_s = median_of(baseline, "failure_free_step_s")
    table = {}
    for fault, runs in faults.items():
        ok = [r for r in runs if "error" not in r]
        for r in ok:  # (runs of an earlier version of this script: the same figure, from what they saved)
            r.setdefault("wall_s_fault_to_resumed_step", resumed_from_saved(r))
        wall = median_of(ok, "wall_s_fault_to_resumed_step")
        table[fault] = {
            "runs": len(runs), "failed_runs": len(runs) - len(ok),
            "wall_s_fault_to_resumed_step": [r["wall_s_fault_to_resumed_step"] for r in ok],
            "wall_s_fault_to_next_step": [r["wall_s_fault_to_next_step"] for r in ok],
            "outage_s": [r["outage_record"]["outage_s"] for r in ok],
            "median_wall_s": wall,
            "checkpoint_restart_over_checkfree": restart_s / wall if restart_s and wall else None,
            "step_time_supervised_over_stock": (median_of(ok, "failure_free_step_s") / stock_step_s
                                                if stock_step_s and ok else None),
        }
    summary = {
        "benchmark": f"outage across {args.hosts} network-namespace hosts, a fault on rank {args.victim}'s machine "
                     f"after {args.fault_step} of {args.steps} steps: CheckFree (shipped config, supervisor) vs "
                     f"checkpoint-restart (stock engine and launchers, checkpoint every {args.save_every} steps, "
                     f"trainer kill, relaunch) on beds of the same kind in the same run",
        "hosts": args.hosts, "steps": args.steps, "fault_step": args.fault_step,
        "checkpoint_restart": {"runs": len(baseline), "median_wall_s": restart_s,
                               "median_failure_free_step_s": stock_step_s},
        "table": table,
        "step_time_note": "the lease watch cannot be disabled by config: the supervised job's failure-free step "
                          "time (rank 0's median before the fault, over the runs) is compared with the stock "
                          "launcher's and engine's in the same run",
        "checkpoint_restart_runs": baseline, "checkfree_runs": faults,
    }
    path = REPO / args.out
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({"checkpoint_restart": summary["checkpoint_restart"], "table": table}, indent=2))
