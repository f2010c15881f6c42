"""Knowing, by pid, every process a test's job started, so the test ends exactly those and can tell whether any
outlived the job.

A job's processes are found two ways: a background thread walks the process tree under the processes the test
started (launcher, supervisors, trainers, spares, ranks), and every process the job starts inherits a tag unique to
this job in its environment, so one that was re-parented before the walk saw it is still found. Nothing is
matched by name or command line; processes are ended by pid (psutil checks the start time, so a reused pid is
never hit).
"""
from __future__ import annotations

import subprocess
import threading
import time
import uuid
from typing import Dict, List, Sequence

import psutil

TAG_ENV = "CHECKFREE_TEST_JOB"


class ProcessTracker:
    """The processes of one job: start them with :meth:`popen` (or :meth:`adopt` one), end them with
    :meth:`end_all`."""

    def __init__(self, interval_s: float = 0.2) -> None:
        self.tag = uuid.uuid4().hex
        self.finished = False  # set by whoever saw the job end by itself: only then can a process be "left over"
        self.seen: Dict[int, psutil.Process] = {}
        self._roots: List[psutil.Process] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._interval_s = interval_s
        self._thread = threading.Thread(target=self._watch, name="process-tracker", daemon=True)
        self._thread.start()

    def env(self, env: Dict[str, str]) -> Dict[str, str]:
        """``env`` with this job's tag, for every process of the job."""
        return {**env, TAG_ENV: self.tag}

    def popen(self, cmd: Sequence[str], env: Dict[str, str], **kwargs) -> subprocess.Popen:
        proc = subprocess.Popen(list(cmd), env=self.env(env), **kwargs)
        self.adopt(proc.pid)
        return proc

    def adopt(self, pid: int) -> None:
        """Track ``pid`` (a process the test started) and everything below it."""
        try:
            proc = psutil.Process(pid)
        except psutil.NoSuchProcess:
            return
        with self._lock:
            self._roots.append(proc)
            self.seen.setdefault(pid, proc)

    def sample(self, scan_environ: bool = False) -> None:
        """Record the current descendants of the roots (and, with ``scan_environ``, every tagged process)."""
        with self._lock:
            roots = list(self._roots)
        found: List[psutil.Process] = []
        for root in roots:
            try:
                if root.is_running():
                    found.extend(root.children(recursive=True))
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        if scan_environ:
            for proc in psutil.process_iter():
                try:
                    if proc.environ().get(TAG_ENV) == self.tag:
                        found.append(proc)
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
                    continue
        with self._lock:
            for proc in found:
                self.seen.setdefault(proc.pid, proc)

    def _watch(self) -> None:
        n = 0
        while not self._stop.wait(self._interval_s):
            self.sample(scan_environ=n % 10 == 0)
            n += 1

    def alive(self) -> List[psutil.Process]:
        """The recorded processes still running (the same processes: a reused pid does not count)."""
        with self._lock:
            procs = list(self.seen.values())
        out = []
        for p in procs:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
            except psutil.NoSuchProcess:
                continue
        return out

    def leftovers(self, grace_s: float = 10.0) -> List[str]:
        """After the job finished: the recorded processes still running once ``grace_s`` has passed, described."""
        deadline = time.monotonic() + grace_s
        while True:
            self.sample(scan_environ=True)
            left = self.alive()
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        return [describe(p) for p in left]

    def end_all(self) -> None:
        """SIGKILL every recorded process that still runs, by pid, until none of the job's is left; stop watching."""
        for _ in range(5):
            self.sample(scan_environ=True)
            left = self.alive()
            if not left:
                break
            for p in left:
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass
            psutil.wait_procs(left, timeout=5)
        self._stop.set()


def describe(p: psutil.Process) -> str:
    try:
        return f"pid {p.pid} (ppid {p.ppid()}): {' '.join(p.cmdline())[:300]}"
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return f"pid {p.pid}"


LEFTOVER = ("LEFTOVER PROCESSES: the job finished but these processes it started still ran after the grace period "
            "(now ended by pid). This is a real finding about the library's process handling (orphan policy), not a "
            "test failure to retry:\n")


def close_all(trackers: Sequence[ProcessTracker], grace_s: float = 10.0) -> List[str]:
    """End every process of ``trackers`` by pid; return the leftovers of those whose job had finished."""
    left: List[str] = []
    for t in trackers:
        if t.finished:
            left += t.leftovers(grace_s)
        t.end_all()
    return left
