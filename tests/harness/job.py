"""A training job as the e2e tests run it: launch/train.py under ``-m deepspeed_checkfree.supervisor``, its config and
output files, every process it starts (tracked by pid), and what it wrote (metrics, events, pid files).

How the launchers start is the caller's: tests/e2e/test_process_loss.py starts the stock launchers on this machine,
:mod:`.cluster` one DeepSpeed node launcher per network-namespace machine.
"""
from __future__ import annotations

import base64
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from deepspeed_checkfree.events import read_events
from deepspeed_checkfree.resilience.contract import pid_file, started_file, supervisor_pid_file

from .ports import reserve_ports
from .processes import ProcessTracker
from .ranks import REPO, cpu_env, require_multi_process_marker

STEPS = 22
DETECTION_TIMEOUT_S = 4.0
BIN = Path(sys.executable).parent


def world_info(nodes: int) -> str:
    """The DeepSpeed node launcher's ``--world_info``: ``nodes`` machines of one rank each."""
    return base64.urlsafe_b64encode(json.dumps({f"node{i}": [0] for i in range(nodes)}).encode()).decode()


class Job:
    """A training job's config, output, environment and processes (the launchers in :attr:`procs`).

    Args:
        tmp: the job's own directory (config, ``out/``, ``job.log``).
        config: a file of ``configs/``; ``checkfree`` and ``deepspeed`` update its sections.
        processes: the tracker of the job's processes (default: a new one).
        script: the training script (the project's, or one written like a user's).
    """

    def __init__(self, tmp: Path, config: str, checkfree: Optional[dict] = None, token: str = "e2e-token-1234",
                 steps: int = STEPS, deepspeed: Optional[dict] = None, world: int = 4, train_args: Sequence[str] = (),
                 accelerator: str = "cpu", dumps: bool = True, store: Optional[str] = None,
                 supervisor_args: Sequence[str] = (), extra_env: Optional[Dict[str, str]] = None,
                 processes: Optional[ProcessTracker] = None, script: str = "launch/train.py") -> None:
        require_multi_process_marker()
        self.steps, self.world = steps, world
        cfg = {**json.loads((REPO / "configs" / config).read_text()), **(deepspeed or {})}
        # Several ranks share 2 cores here: a timeout well above a step's longest wait keeps false alarms away.
        cfg["checkfree"]["detection_timeout_s"] = DETECTION_TIMEOUT_S
        cfg["checkfree"].update(checkfree or {})
        cfg["checkfree"].setdefault("events_file", str(tmp / "out" / "events.jsonl"))
        self.cfg = cfg
        self.out = tmp / "out"
        self.pid_dir = self.out / "pids"
        self.config = tmp / config
        self.config.write_text(json.dumps(cfg))
        self.ports = reserve_ports(2)  # MASTER_PORT, and the CheckFree store on MASTER_PORT + 1
        self.port = self.ports.port
        self.processes = processes or ProcessTracker()
        self.token = token
        self.env = cpu_env({"CHECKFREE_JOB_TOKEN": token, **({"CHECKFREE_DUMP_DIR": str(self.out / "dumps")}
                                                                if dumps else {})})
        if store is not None:  # the supervisors' --store default, and the joiners'
            self.env["CHECKFREE_STORE"] = store
        self.env.update(extra_env or {})
        if accelerator != "cpu":  # DeepSpeed detects the accelerator, and the trainer takes its backend (NCCL)
            del self.env["DS_ACCELERATOR"]
        self.train_args = [script, "--deepspeed_config", str(self.config), "--steps", str(steps),
                           "--out", str(self.out), *train_args]
        # What a launcher runs as --module / -m.
        self.supervisor_module = ["deepspeed_checkfree.supervisor", "--pid-dir", str(self.pid_dir),
                                  *supervisor_args, *self.train_args]
        self.log = open(tmp / "job.log", "w+")
        self.procs: List[subprocess.Popen] = []  # the launchers: the job is over when they have exited

    def start(self, cmd: Sequence[str], env: Optional[Dict[str, str]] = None, new_session: bool = False,
              **kwargs) -> subprocess.Popen:
        """Start a process of this job on this machine (tracked, with everything it starts)."""
        kwargs.setdefault("stdout", self.log)
        kwargs.setdefault("stderr", subprocess.STDOUT)
        return self.processes.popen(cmd, env=env or self.env, cwd=REPO, start_new_session=new_session, **kwargs)

    def join_command(self, rank: int, *extra: str, master_addr: str = "127.0.0.1") -> List[str]:
        """The README's command for a new machine that takes over ``rank`` of the running job."""
        return [sys.executable, "-m", "deepspeed_checkfree.supervisor", "--join", "--rank", str(rank),
                "--world-size", str(self.world), "--master-addr", master_addr, "--master-port", str(self.port),
                *extra, *self.train_args]

    # pids -------------------------------------------------------------------------------------------------------

    def trainer_pid(self, rank: int) -> int:
        """The pid of ``rank``'s active trainer (its supervisor's ``--pid-dir`` file)."""
        return int(Path(pid_file(str(self.pid_dir), rank)).read_text())

    def supervisor_pid(self, rank: int) -> int:
        return int(Path(supervisor_pid_file(str(self.pid_dir), rank)).read_text())

    def started(self, rank: int) -> List[tuple]:
        """(role, pid) of every process ``rank``'s supervisors started, themselves included."""
        path = Path(started_file(str(self.pid_dir), rank))
        return [(line.split()[0], int(line.split()[1])) for line in path.read_text().splitlines()] \
            if path.exists() else []

    def kill_trainer(self, rank: int) -> None:
        os.kill(self.trainer_pid(rank), signal.SIGKILL)

    # progress ---------------------------------------------------------------------------------------------------

    def steps_done(self) -> int:
        path = self.out / "metrics.csv"
        return max(0, len(path.read_text().splitlines()) - 1) if path.exists() else 0

    def wait_for_step(self, step: int, timeout_s: float = 240) -> float:
        """Wait until ``step`` steps are done (metrics.csv rows); return the time.monotonic() it was seen."""
        deadline = time.monotonic() + timeout_s
        while self.steps_done() < step:
            assert all(p.poll() is None for p in self.procs), self.tail()
            assert time.monotonic() < deadline, f"no step {step} after {timeout_s} s\n{self.tail()}"
            time.sleep(0.05)
        return time.monotonic()

    def wait_until(self, what, timeout_s: float, message: str) -> float:
        """Wait until ``what()`` holds; fail with ``message`` (and the log's tail) after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while not what():
            assert time.monotonic() < deadline, f"{message} (after {timeout_s} s)\n{self.tail()}"
            time.sleep(0.1)
        return time.monotonic()

    def step_after(self, when: float) -> Optional[float]:
        """The wall time (``time.time()``) the first step completed after ``when`` (metrics.csv); None if none did:
        ``step_after(t) - t`` is an outage as the user sees it."""
        later = [float(row["time"]) for row in self.metrics() if float(row["time"]) > when]
        return min(later) if later else None

    def wait(self, timeout_s: float = 300, succeed: bool = True) -> List[int]:
        """Wait for the launchers to exit (and, with ``succeed``, assert they all exited 0); return their codes."""
        deadline = time.monotonic() + timeout_s
        for p in self.procs:
            try:
                p.wait(timeout=max(1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise AssertionError(f"job did not finish in {timeout_s} s\n{self.tail()}")
        self.processes.finished = True
        trainers = {int(f.read_text()) for f in self.pid_dir.glob("rank*.pid") if ".spare." not in f.name}
        assert trainers and trainers <= set(self.processes.seen), "the job's trainers were tracked by pid"
        codes = [p.returncode for p in self.procs]
        if succeed:
            assert all(c == 0 for c in codes), f"exit codes {codes}\n{self.tail()}"
        return codes

    def close(self) -> None:
        """Free the job's ports and log (its processes are ended by the fixture, by pid)."""
        self.ports.release()
        self.log.close()

    def tail(self, n: int = 6000) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-n:]

    # what the job wrote -----------------------------------------------------------------------------------------

    def metrics(self) -> List[dict]:
        return list(csv.DictReader(open(self.out / "metrics.csv")))

    def events(self) -> List[dict]:
        """The job's event records so far (none before the first is written: the file does not exist yet)."""
        path = self.out / "events.jsonl"
        return read_events(str(path)) if path.exists() else []
