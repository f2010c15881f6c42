"""Start N real ranks of a worker script on this machine (env:// rendezvous), each under a hard timeout, and read
back what the ranks of a scenario launch saved.

Every process a launch starts is tracked by pid (:mod:`.processes`) and ended by pid; a launch that succeeds
must leave none running.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from .ports import reserve_ports
from .processes import LEFTOVER, ProcessTracker

REPO = Path(__file__).resolve().parents[2]
MULTI_PROCESS_MARKERS = ("distributed", "e2e")

# The markers of the test being set up or run; set by tests/conftest.py (None outside pytest).
current_markers: Optional[set] = None


def require_multi_process_marker() -> None:
    """A test that starts processes must say so with a marker, so ``-m "not distributed and not e2e"`` is the
    fast tier."""
    if current_markers is not None and not set(MULTI_PROCESS_MARKERS) & current_markers:
        raise AssertionError(f"this test starts processes: mark it {' or '.join(MULTI_PROCESS_MARKERS)}")


def cpu_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """Environment for CPU ranks: one thread each (2 cores shared by several ranks), DeepSpeed's CPU accelerator,
    this checkout first on the path (spawned processes import the code under test, not an installed copy), and
    DeepSpeed's shm all-reduce op off (its JIT build takes minutes on a new machine, pipelines never use it, and a
    build interrupted by a test's kill leaves a lock that every later process waits on)."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", CHECKFREE_DISABLE_SHM_COMM="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
    env.update(extra or {})
    return env


def run_ranks(script: Path, world_size: int, args: Sequence[str] = (), timeout_s: float = 240,
              log_dir: Optional[Path] = None) -> List[str]:
    """Run ``script`` as ``world_size`` ranks; return each rank's combined output.

    Every process is killed when the timeout expires, so a hung collective fails one test instead of CI.

    Raises:
        AssertionError: a rank exited non-zero, the timeout expired (with the ranks' output tails), or a process
            the ranks started outlived them.
    """
    require_multi_process_marker()
    ports = reserve_ports(2)
    tracker = ProcessTracker()
    procs, logs = [], []
    timed_out = False
    try:
        for rank in range(world_size):
            env = cpu_env(dict(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                               LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                               MASTER_PORT=str(ports.port)))
            log = open((log_dir or Path(os.environ.get("TMPDIR", "/tmp"))) / f"rank{rank}-{ports.port}.log", "w+")
            logs.append(log)
            procs.append(tracker.popen([sys.executable, str(script), *args], env=env, stdout=log,
                                       stderr=subprocess.STDOUT, cwd=str(REPO)))
        deadline = time.monotonic() + timeout_s
        # Poll every rank: when one fails, the others would only wait for it until their own timeouts.
        while any(p.poll() is None for p in procs):
            if any(p.returncode not in (None, 0) for p in procs):
                break
            if time.monotonic() > deadline:
                timed_out = True
                break
            time.sleep(0.1)
        failed = [r for r, p in enumerate(procs) if p.poll() != 0]
        left = [] if timed_out or failed else tracker.leftovers(grace_s=10)
    finally:
        tracker.end_all()
        for p in procs:
            p.wait()
        ports.release()
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    if timed_out or failed:
        tails = "\n".join(f"--- rank {r} (rc={procs[r].returncode}) ---\n{outputs[r][-4000:]}"
                          for r in range(world_size))
        why = f"timeout after {timeout_s} s" if timed_out else f"ranks {failed} failed"
        raise AssertionError(f"{why}\n{tails}")
    assert not left, LEFTOVER + "\n".join(left)
    return outputs


def run_scenarios(worker: Path, world_size: int, scenarios: List[dict], out: Path,
                  timeout_s: float = 600) -> Dict[str, List[dict]]:
    """Run every scenario in one launch of ``world_size`` ranks of ``worker`` (one process group, one engine per
    scenario); return, per scenario name, each rank's saved record in rank order.

    Each scenario with CheckFree enabled writes its events to ``out/<name>.events.jsonl``.
    """
    for sc in scenarios:
        cf = sc.get("checkfree")
        if cf and cf.get("enabled"):
            cf["events_file"] = str(out / f"{sc['name']}.events.jsonl")
    run_ranks(worker, world_size, [str(out), json.dumps(scenarios)], timeout_s=timeout_s, log_dir=out)
    return {sc["name"]: [torch.load(out / f"{sc['name']}-rank{r}.pt", weights_only=False) for r in range(world_size)]
            for sc in scenarios}
