"""A bound on torch's wait for a compiled op's build lock.

torch builds a JIT extension (DeepSpeed's FusedAdam, the CPU shm comm op) under a lock file in its build
directory (``torch.utils.cpp_extension`` through ``FileBaton``): the builder creates the file, keeps it open, and
removes it when done; every other process that loads the op waits while the file exists, with no deadline. A
trainer or warm spare killed mid-build (a machine's first FusedAdam build is the likeliest moment for a fault test
or a spot reclaim to land) leaves the file behind, and every later engine build on that machine waits forever.

:class:`BoundedBaton` waits as torch's does while a process holds the lock open. A lock that nothing on this
machine holds and whose build directory has not changed for ``quiet_s`` (a builder on another machine that shares
the directory writes into it as it compiles) is left over: it is removed and the op built by the load that found
it, whether it found it at its start or while it waited.
"""
from __future__ import annotations

import fcntl
import logging
import os
import time
from pathlib import Path
from typing import List

from torch.utils.file_baton import FileBaton

from . import ds_internals

logger = logging.getLogger("deepspeed_checkfree.pipe.op_build_lock")

QUIET_S = 60.0  # how long a held-by-no-one lock's build directory must be unchanged before the lock is stale
CHECKER = "lock.check"  # the file whose lock one process at a time holds to check and remove a left-over lock


def holders(path: str) -> List[int]:
    """The pids of this machine's processes that have ``path`` open (those the caller may read ``/proc`` of)."""
    target = os.path.realpath(path)
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fds = os.scandir(f"/proc/{entry.name}/fd")
            with fds:
                if any(os.readlink(fd.path) == target for fd in fds):
                    found.append(int(entry.name))
        except OSError:  # (the process ended, or its fds are not ours to read)
            continue
    return found


def last_change(directory: str) -> float:
    """The newest modification time of the files in ``directory`` (but the checker's lock)."""
    times = [0.0]
    for entry in os.scandir(directory):
        try:
            if entry.name != CHECKER:
                times.append(entry.stat().st_mtime)
        except FileNotFoundError:
            continue
    return max(times)


class StaleBuildLock(RuntimeError):
    """A build lock was found left over and removed while this process waited on it: the op is loaded anew."""


class BoundedBaton(FileBaton):
    """torch's ``FileBaton`` that takes over a left-over lock (see the module's docstring)."""

    quiet_s = QUIET_S

    def _remove_if_stale(self) -> bool:
        """Remove the lock if it is left over; one process of this machine at a time checks and removes (the
        checker's lock), so that none removes a lock another has just taken over."""
        directory = os.path.dirname(self.lock_file_path)
        with open(os.path.join(directory, CHECKER), "a") as checker:
            fcntl.flock(checker, fcntl.LOCK_EX)
            try:
                quiet_for = time.time() - last_change(directory)
            except FileNotFoundError:
                return False
            # Left over: its directory quiet long enough, and no process holding it open (read only then).
            if quiet_for < self.quiet_s or not os.path.exists(self.lock_file_path) or holders(self.lock_file_path):
                return False
            logger.warning("Removing the build lock %s: no process on this machine holds it and its directory has "
                           "not changed for %.0f s (a build was killed midway). The op is built anew.",
                           self.lock_file_path, quiet_for)
            Path(self.lock_file_path).unlink(missing_ok=True)
            return True

    def try_acquire(self) -> bool:
        if super().try_acquire():
            return True
        return self._remove_if_stale() and bool(super().try_acquire())

    def wait(self) -> None:
        while os.path.exists(self.lock_file_path):
            if self._remove_if_stale():
                raise StaleBuildLock(self.lock_file_path)
            time.sleep(self.wait_seconds)


def bound_build_lock_wait() -> None:
    """Make torch's JIT extension loads (every compiled op DeepSpeed builds) take over a build lock left by a
    killed build, instead of waiting for it forever. Idempotent."""
    ds_internals.retry_jit_load_on(StaleBuildLock, BoundedBaton)
