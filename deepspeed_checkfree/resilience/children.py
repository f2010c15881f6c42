"""The processes a supervisor starts: its rank's active trainer and the warm spare that replaces it, each with its
heartbeat pipe, and the pid files a user (or a test) finds them by.

``--pid-dir DIR`` makes the supervisor write ``DIR/rank<R>.pid`` (the active trainer), ``DIR/rank<R>.spare.pid``
(the warm spare, while there is one), ``DIR/supervisor<R>.pid`` and ``DIR/rank<R>.started`` (one ``ROLE PID`` line
for every process it started, so nothing it started can go unnoticed).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Dict, List, Optional

from .contract import (PID_DIR_ENV, activation_line, pid_file, remove_pid_file, spare_pid_file, started_file,
                       trainer_env, write_pid_file)
from .heartbeat import HeartbeatPipe


def cause_of(returncode: int) -> str:
    """An exit code in words: "signal 9 (SIGKILL)", "exit code 78"."""
    if returncode < 0:
        try:
            return f"signal {-returncode} ({signal.Signals(-returncode).name})"
        except ValueError:
            return f"signal {-returncode}"
    return f"exit code {returncode}"


class Child:
    """A trainer process the supervisor started, active or a warm spare, and its heartbeat pipe."""

    def __init__(self, popen: subprocess.Popen, pipe: HeartbeatPipe, spare: bool) -> None:
        self.popen, self.pipe, self.spare = popen, pipe, spare
        self.pid = popen.pid

    def poll(self) -> Optional[int]:
        return self.popen.poll()

    def send(self, sig: int) -> None:
        try:
            self.popen.send_signal(sig)
        except (ProcessLookupError, OSError):
            pass

    def end(self, grace_s: float, sig: int = signal.SIGTERM) -> None:
        """Make the process exit: a spare by closing its stdin, an active trainer by ``sig``; SIGKILL after
        ``grace_s``. Returns once it is reaped."""
        if self.popen.poll() is None:
            try:
                if self.spare and self.popen.stdin is not None and not self.popen.stdin.closed:
                    self.popen.stdin.close()  # an unneeded spare exits when its stdin closes
                elif grace_s > 0:
                    self.popen.send_signal(sig)
                else:
                    self.popen.kill()
                self.popen.wait(timeout=grace_s)
            except (subprocess.TimeoutExpired, BrokenPipeError, OSError):
                self.popen.kill()
                self.popen.wait()
        self.pipe.close()

    def activate(self, incarnation: int) -> bool:
        """Make this warm spare the trainer of ``incarnation``; False if it could not be told (it died)."""
        try:
            self.popen.stdin.write(activation_line(incarnation))
            self.popen.stdin.flush()
            self.popen.stdin.close()
        except (BrokenPipeError, OSError, ValueError):
            return False
        self.spare = False
        return True


class Launcher:
    """Starts the training script for one rank, as its active trainer or as a warm spare.

    Args:
        script, script_args: the training script and its arguments.
        env: the trainer's variables (:func:`~.contract.trainer_env`'s arguments but ``incarnation``, ``spare`` and
            ``heartbeat_fd``).
        rank: for the pid files.
        pid_dir: ``--pid-dir`` (None: no files).
        extra_env: more variables for the trainer (e.g. the network interface the supervisor chose).
    """

    def __init__(self, script: str, script_args: List[str], env: Dict, rank: int, pid_dir: Optional[str],
                 extra_env: Optional[Dict[str, str]] = None) -> None:
        self.script, self.script_args, self.env, self.rank, self.pid_dir = script, script_args, env, rank, pid_dir
        self.extra_env = dict(extra_env or {})
        if pid_dir:
            self.extra_env[PID_DIR_ENV] = pid_dir  # (a warm spare says there when it is ready)

    def start(self, incarnation: Optional[int]) -> Child:
        """Start the trainer script: active with ``incarnation``, or as a warm spare (``None``)."""
        # (the script runs through the drop-in's runner: a plain script survives a loss as the explicit API does)
        cmd = [sys.executable, "-u", "-m", "deepspeed_checkfree.resilience.run_script", self.script, *self.script_args]
        spare = incarnation is None
        pipe = HeartbeatPipe()
        env = dict(os.environ, **self.extra_env, **trainer_env(
            **self.env, incarnation=0 if spare else incarnation, spare=spare, heartbeat_fd=pipe.write_fd))
        popen = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE if spare else subprocess.DEVNULL, text=True,
                                 pass_fds=(pipe.write_fd,))
        pipe.started()
        self.record("spare" if spare else "trainer", popen.pid)
        if spare:
            self.announce_spare(popen.pid)
        return Child(popen, pipe, spare)

    def record(self, role: str, pid: int) -> None:
        if self.pid_dir:
            os.makedirs(self.pid_dir, exist_ok=True)
            with open(started_file(self.pid_dir, self.rank), "a") as f:
                f.write(f"{role} {pid}\n")

    def announce_active(self, pid: int) -> None:
        if self.pid_dir:
            write_pid_file(pid_file(self.pid_dir, self.rank), pid)

    def announce_spare(self, pid: Optional[int]) -> None:
        if self.pid_dir:
            if pid is None:
                remove_pid_file(spare_pid_file(self.pid_dir, self.rank))
            else:
                write_pid_file(spare_pid_file(self.pid_dir, self.rank), pid)
