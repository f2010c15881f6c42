"""The one way the tests pick TCP ports: a block of consecutive ports below the kernel's ephemeral range, reserved
across every test process on this machine by a file lock.

Why not "bind port 0, close, reuse it": the kernel picks that port from the ephemeral range, where it also hands
out the source ports of outgoing connections (gloo opens many), so it can be taken again before the rank binds it.
Below that range only explicit binds compete; the lock keeps concurrent test runs (several people share this
machine) off each other's blocks. A block stays reserved until released or until the test process exits (the
kernel drops the lock then, even after a crash).
"""
from __future__ import annotations

import fcntl
import os
import random
import socket
import tempfile
import time
from pathlib import Path
from typing import List, Optional

LOCK_DIR = Path(tempfile.gettempdir()) / "checkfree-test-ports"
LOWEST = 10000  # well above the well-known and registered services that might run here


def ephemeral_range() -> tuple:
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        low, high = (int(x) for x in f.read().split())
    return low, high


class PortBlock:
    """``count`` consecutive ports starting at ``port``, locked for this process until :meth:`release`."""

    def __init__(self, port: int, locks: List[int]) -> None:
        self.port = port
        self._locks: Optional[List[int]] = locks

    def release(self) -> None:
        for fd in self._locks or ():
            os.close(fd)  # closing the descriptor drops its lock
        self._locks = None

    def __enter__(self) -> "PortBlock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _lock(port: int) -> Optional[int]:
    fd = os.open(LOCK_DIR / f"{port}.lock", os.O_CREAT | os.O_RDWR, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def reserve_ports(count: int = 2) -> PortBlock:
    """Reserve ``count`` consecutive free ports below the ephemeral range (a job's MASTER_PORT and the CheckFree
    store on MASTER_PORT + 1 need two).

    Raises:
        RuntimeError: no free block was found.
    """
    LOCK_DIR.mkdir(parents=True, exist_ok=True)
    low, _ = ephemeral_range()
    if low - count <= LOWEST:
        raise RuntimeError(f"the ephemeral range starts at {low}: no room for test ports above {LOWEST}")
    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    for _ in range(500):
        first = rng.randrange(LOWEST, low - count)
        locks: List[int] = []
        for port in range(first, first + count):
            fd = _lock(port)
            if fd is None:
                break
            locks.append(fd)
            if not _bindable(port):
                break
        else:
            return PortBlock(first, locks)
        for fd in locks:
            os.close(fd)
    raise RuntimeError(f"no block of {count} free ports found in [{LOWEST}, {low})")


_HELD: List[PortBlock] = []


def free_port(count: int = 2) -> int:
    """The first port of a block reserved for the rest of this process (for callers that cannot release it)."""
    block = reserve_ports(count)
    _HELD.append(block)
    return block.port
