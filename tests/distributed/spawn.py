"""Start N real ranks of a worker script on this machine (env:// rendezvous), each under a hard timeout."""
from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A free port below the kernel's ephemeral range, and the one after it (the CheckFree store uses port + 1).

    Ports the kernel hands out to outgoing connections (gloo opens many) come from the ephemeral range, so a port
    picked there could be taken between this check and the rank binding it.
    """
    low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    for _ in range(200):
        port = rng.randrange(10000, max(10002, low - 2))
        try:
            for p in (port, port + 1):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port pair found below the ephemeral range")


def cpu_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """Environment for CPU ranks: one thread each (2 cores shared by several ranks), DeepSpeed's CPU accelerator."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
    env.update(extra or {})
    return env


def run_ranks(script: Path, world_size: int, args: Sequence[str] = (), timeout_s: float = 240,
              log_dir: Optional[Path] = None) -> List[str]:
    """Run ``script`` as ``world_size`` ranks; return each rank's combined output.

    Every rank is killed when the timeout expires, so a hung collective fails one test instead of CI.

    Raises:
        AssertionError: a rank exited non-zero or the timeout expired (with the ranks' output tails).
    """
    port = free_port()
    procs = []
    logs = []
    for rank in range(world_size):
        env = cpu_env(dict(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                           LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)))
        log_path = (log_dir or Path(os.environ.get("TMPDIR", "/tmp"))) / f"rank{rank}-{port}.log"
        log = open(log_path, "w+")
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, str(script), *args], env=env, stdout=log,
                                      stderr=subprocess.STDOUT, cwd=str(REPO)))
    deadline = time.monotonic() + timeout_s
    timed_out = False
    # Poll every rank: when one fails, the others would only wait for it until their own timeouts.
    while any(p.poll() is None for p in procs):
        if any(p.returncode not in (None, 0) for p in procs):
            break
        if time.monotonic() > deadline:
            timed_out = True
            break
        time.sleep(0.1)
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    failed = [r for r, p in enumerate(procs) if p.returncode != 0]
    if timed_out or failed:
        tails = "\n".join(f"--- rank {r} (rc={procs[r].returncode}) ---\n{outputs[r][-4000:]}"
                          for r in range(world_size))
        raise AssertionError(f"{'timeout after ' + str(timeout_s) + ' s' if timed_out else 'ranks ' + str(failed) + ' failed'}"
                             f"\n{tails}")
    return outputs
