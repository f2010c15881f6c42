"""Starting the ``deepspeed`` backend: ``num_stages`` local processes of :mod:`.engine_worker` (env://
rendezvous, one thread each), every strategy in one launch, each rank under a hard timeout."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List

from ..errors import CheckFreeError
from .config import ExperimentConfig, to_dict
from .strategies import StrategyResult

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_on_engine(cfg: ExperimentConfig, out: Path, advance: Callable[[int], None], timeout_s: float = 3600.0,
                  threads: int = 1) -> Dict[str, StrategyResult]:
    """Train every strategy of ``cfg`` on the real engine with ``cfg.model.num_stages`` ranks on this machine.

    Args:
        cfg: the experiment.
        out: output directory; ranks' logs go to ``out/logs``, checkpoints of the checkpointing strategy to
            ``out/ckpt-*`` (removed afterwards).
        advance: progress callback (iterations done).
        timeout_s: every rank is killed after this long.
        threads: torch threads per rank.

    Raises:
        CheckFreeError: a rank failed or the timeout expired (the message points at the logs).
    """
    out = Path(out)
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    job = out / "engine_job.json"
    job.write_text(json.dumps({"config": to_dict(cfg), "out": str(out), "threads": threads,
                               "strategies": [s.name for s in cfg.strategies]}))
    world = cfg.model.num_stages
    port = _free_port()
    procs: List[subprocess.Popen] = []
    files = []
    for rank in range(world):
        env = dict(os.environ)
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS=str(threads),
                   PYTHONUNBUFFERED="1",
                   PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
        env.setdefault("DS_ACCELERATOR", "cpu" if not _has_cuda() else "cuda")
        log = open(logs / f"rank{rank}.log", "w")
        files.append(log)
        procs.append(subprocess.Popen([sys.executable, "-m", "deepspeed_checkfree.experiment.engine_worker",
                                       str(job)], env=env, stdout=subprocess.PIPE if rank == 0 else log,
                                      stderr=subprocess.STDOUT, text=True, cwd=str(out)))

    def pump() -> None:  # rank 0's output: progress lines to the bar, everything to its log
        assert procs[0].stdout is not None
        for line in procs[0].stdout:
            files[0].write(line)
            if line.startswith("progress "):
                advance(int(line.split()[-1]))

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout_s
    failed = None
    try:
        while any(p.poll() is None for p in procs):
            bad = [r for r, p in enumerate(procs) if p.poll() not in (None, 0)]
            if bad:
                failed = f"rank(s) {bad} exited with {[procs[r].returncode for r in bad]}"
                break
            if time.monotonic() > deadline:
                failed = f"timeout after {timeout_s:.0f} s"
                break
            time.sleep(0.2)
        if failed is None:
            bad = [r for r, p in enumerate(procs) if p.returncode != 0]
            failed = f"rank(s) {bad} exited with {[procs[r].returncode for r in bad]}" if bad else None
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            p.wait()
        reader.join(timeout=5)
        for f in files:
            f.close()
    if failed:
        tail = (logs / "rank0.log").read_text()[-3000:]
        raise CheckFreeError(f"the deepspeed backend failed: {failed}. Logs: {logs}/rank*.log. Rank 0 ends "
                             f"with:\n{tail}")
    results = {}
    for spec in cfg.strategies:
        path = out / f"engine-{spec.name}.json"
        results[spec.name] = StrategyResult.from_dict(json.loads(path.read_text()))
        path.unlink()
    return results


def _has_cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch is a dependency
        return False
