"""The trainer's heartbeat to its supervisor, both ends: a thread in the trainer writes one line per beat on a pipe,
and the supervisor kills a trainer whose beats stop for longer than the timeout they carry (a frozen or stopped
process: it never rejoins with stale state). The same thread ends the trainer when its supervisor is gone, so no
trainer trains on unsupervised.
"""
from __future__ import annotations

import logging
import math
import os
import signal
import sys
import threading
from typing import Optional

from ..core.fault_policy import heartbeat_overdue
from .contract import HEARTBEAT_FD_ENV, SUPERVISOR_PID_ENV, heartbeat_line, last_heartbeat_timeout

logger = logging.getLogger(__name__)


class Heartbeat:
    """Trainer side: beats every ``interval_s`` from a daemon thread (so a main thread blocked in a collective still
    beats; a stopped or frozen process does not).

    Args:
        fd: the pipe's write end (from ``$CHECKFREE_HEARTBEAT_FD``).
        interval_s: seconds between beats.
        timeout_s: the silence after which the supervisor may kill this trainer as hung.
        supervisor_pid: this trainer's supervisor; when it is gone the trainer ends itself at once.
    """

    def __init__(self, fd: int, interval_s: float, timeout_s: float, supervisor_pid: Optional[int]) -> None:
        self.fd, self.interval_s, self.timeout_s, self.supervisor_pid = fd, interval_s, timeout_s, supervisor_pid
        os.set_blocking(fd, False)  # a stalled reader must never block the beating thread
        self.thread = threading.Thread(target=self._run, name="checkfree-heartbeat", daemon=True)
        self.done = threading.Event()

    @classmethod
    def from_env(cls, interval_s: float, timeout_s: float) -> Optional["Heartbeat"]:
        """The heartbeat the supervisor asked for in the environment, started; None if it asked for none."""
        fd = os.environ.get(HEARTBEAT_FD_ENV)
        if fd is None:
            return None
        pid = os.environ.get(SUPERVISOR_PID_ENV)
        beat = cls(int(fd), interval_s, timeout_s, int(pid) if pid else None)
        beat.thread.start()
        return beat

    def set_timeout(self, timeout_s: float) -> None:
        """From the next beat on, the supervisor may kill this trainer after ``timeout_s`` of silence (a start-up
        allowance until the trainer's first completed step, ``detection_timeout_s`` from then on)."""
        self.timeout_s = timeout_s

    def finish(self) -> None:
        """The trainer is done (finished or stopping): tell the supervisor not to judge its silence any more, since
        the interpreter's shutdown may take longer than the timeout."""
        self.done.set()
        try:
            os.write(self.fd, heartbeat_line(math.inf))
        except OSError:
            pass

    def _run(self) -> None:
        while not self.done.is_set():
            line = heartbeat_line(self.timeout_s)
            if self.supervisor_pid is not None and os.getppid() != self.supervisor_pid:
                self._orphaned(f"its supervisor (pid {self.supervisor_pid}) is gone")
            try:
                os.write(self.fd, line)
            except BlockingIOError:
                pass  # the supervisor is slow to read: its problem, not a reason to stop beating
            except BrokenPipeError:
                self._orphaned("its supervisor closed the heartbeat pipe (it died)")
            self.done.wait(self.interval_s)

    def _orphaned(self, why: str) -> None:
        # No cleanup: the main thread may be blocked in a collective. Exiting closes this rank's connections, so its
        # peers notice at once; the job handles the rank like a lost machine.
        print(f"[checkfree] trainer pid {os.getpid()} ends itself: {why}, and a trainer must not train on "
              f"unsupervised", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


class HeartbeatPipe:
    """Supervisor side: the pipe of one trainer process, and what its beats said."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        self.last_beat: Optional[float] = None  # time.monotonic() of the last beat
        self.timeout_s: Optional[float] = None
        self.done = False  # the trainer said it finished (or is stopping)

    def started(self) -> None:
        """The child holds the write end now: close ours (the child then sees a broken pipe if we die)."""
        if self.write_fd is not None:
            os.close(self.write_fd)
            self.write_fd = None

    def poll(self, now: float) -> Optional[float]:
        """Read the beats that arrived; return the seconds of silence if the trainer is overdue (hung), else None."""
        data = b""
        while self.read_fd is not None:
            try:
                chunk = os.read(self.read_fd, 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            data += chunk
        timeout = last_heartbeat_timeout(data)
        if timeout is not None:
            self.last_beat, self.timeout_s = now, timeout
            self.done = self.done or math.isinf(timeout)
        return heartbeat_overdue(now, self.last_beat, self.timeout_s)

    def close(self) -> None:
        for fd in (self.read_fd, self.write_fd):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.read_fd = self.write_fd = None
