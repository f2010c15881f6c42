"""Push detection under gloo: cut this rank's connections of a failed generation, so that every peer still waiting
on this rank leaves its wait at once.

gloo has no abort that wakes a pending operation (``ProcessGroupGloo.abort`` does not, measured with torch 2.13),
and a group's connections close only when its last reference goes, which inside DeepSpeed never happens (its
communication layer keeps references to the world group that nothing can release). Shutting the connected sockets
down does what closing them would: the peer's pending send, receive or collective on that pair fails at once with
"Connection closed by peer", and it then cuts its own connections in turn, so the failure reaches every rank of the
generation within milliseconds instead of after ``detection_timeout_s``.

A generation's connections are the connected TCP sockets this process opened since the generation started to
form, less those to or from the job's store (whose ports are given). Listening sockets are never touched: gloo
aborts the process when its listener fails. Sockets are found through ``/proc/self/fd``; where that does not exist
(not Linux) there is nothing to cut, and peers learn of the failure at their timeout as before.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Collection, Dict, Optional

logger = logging.getLogger(__name__)

_FD_DIR = "/proc/self/fd"

# Backends whose pending operations end when their connections are cut (measured). Others (NCCL) are aborted
# through their own API instead (:func:`deepspeed_checkfree.pipe.ds_internals.abort_world`).
CUT_BACKENDS = frozenset({"gloo"})


def open_sockets() -> Dict[int, int]:
    """This process's sockets: inode -> file descriptor (empty where ``/proc/self/fd`` does not exist)."""
    found: Dict[int, int] = {}
    try:
        fds = os.listdir(_FD_DIR)
    except OSError:
        return found
    for fd in fds:
        try:
            target = os.readlink(f"{_FD_DIR}/{fd}")
        except OSError:  # closed since listdir
            continue
        if target.startswith("socket:["):
            found[int(target[len("socket:["):-1])] = int(fd)
    return found


def _still(fd: int, inode: int) -> bool:
    """Whether ``fd`` is still the socket ``inode`` (a closed descriptor's number is reused)."""
    try:
        return os.readlink(f"{_FD_DIR}/{fd}") == f"socket:[{inode}]"
    except OSError:
        return False


def _shut_down(fd: int, keep_ports: Collection[int]) -> bool:
    """Shut down the connected TCP socket ``fd`` unless it is a listener or one of the store's; True if it was."""
    try:
        sock = socket.socket(fileno=os.dup(fd))  # a duplicate: closing it leaves ``fd`` open
    except OSError:
        return False
    try:
        if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET, socket.AF_INET6):
            return False
        try:
            peer_port = sock.getpeername()[1]
        except OSError:  # not connected: a listener (gloo aborts the process if its listener fails)
            return False
        if peer_port in keep_ports or sock.getsockname()[1] in keep_ports:
            return False
        sock.shutdown(socket.SHUT_RDWR)
        return True
    except OSError:  # already shut down by the peer
        return False
    finally:
        sock.close()


class GenerationConnections:
    """The connections one generation's process groups open, cut at most once.

    Create it just before the generation's process group forms; :meth:`cut` then shuts down every connected socket
    opened since, except the store's. After the first cut (by the failure handler or by the death watch, from any
    thread) later cuts do nothing, so a late death-watch call cannot reach the next generation's connections.

    Args:
        keep_ports: ports of the job's store (its connections carry the membership, and must survive the cut).
    """

    def __init__(self, keep_ports: Collection[int]) -> None:
        self.keep_ports = frozenset(keep_ports)
        self._before = set(open_sockets())
        self._lock = threading.Lock()
        self.cut_count: Optional[int] = None  # None until cut

    def cut(self) -> int:
        """Shut down the generation's connections (the first call only); returns how many were shut down."""
        with self._lock:
            if self.cut_count is not None:
                return 0
            count = 0
            for inode, fd in open_sockets().items():
                if inode not in self._before and _still(fd, inode) and _shut_down(fd, self.keep_ports):
                    count += 1
            self.cut_count = count
        logger.info("cut %d connections of the failed generation", count)
        return count
