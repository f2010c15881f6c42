"""Push detection: a thread that watches the job's death records and aborts the generation a dead member was in.

A dead process's connections close, so its neighbours fail at once; a rank that waits on a live peer (a
non-neighbour) would wait for its timeout. This thread, on seeing a member of the current generation replaced (its
supervisor saw the trainer exit and moved the rank's incarnation on), aborts the generation, which makes the
pending operation fail at once:

- gloo: the generation's connections are cut (:mod:`.connection_cut`), since gloo's own abort does not wake a
  pending operation;
- NCCL: the generation's communicators are aborted (``ncclCommAbort``). The pipeline's point-to-point
  communicators are among them; an abort that itself hangs (a known NCCL behaviour with p2p communicators in
  flight) is left to the watchdog, which ``detection_timeout_s`` bounds.
"""
from __future__ import annotations

import logging
import threading
from typing import Callable, List, Mapping, Optional

from .generation_store import replaced_members

logger = logging.getLogger(__name__)


class DeathWatch:
    """Calls the armed ``abort()`` once when ``dead_members()`` names a member, between ``arm`` and ``disarm``.

    Args:
        abort: aborts the current world (default for :meth:`arm`).
        interval_s: how often to look.
    """

    def __init__(self, abort: Optional[Callable[[], None]] = None, interval_s: float = 0.05) -> None:
        self.abort, self.interval_s = abort, interval_s
        self._dead: Optional[Callable[[], List[int]]] = None
        self._abort = abort
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.fired: List[int] = []
        self.thread = threading.Thread(target=self._run, name="checkfree-death-watch", daemon=True)
        self.thread.start()

    def arm(self, dead_members: Callable[[], List[int]], abort: Optional[Callable[[], None]] = None) -> None:
        """Watch a generation: ``dead_members()`` gives its members that have died, ``abort()`` aborts it."""
        with self._lock:
            self._dead, self.fired = dead_members, []
            self._abort = abort or self.abort

    def disarm(self) -> None:
        with self._lock:
            self._dead = None

    def close(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            with self._lock:
                dead_members = self._dead
                if dead_members is None:
                    continue
                try:
                    dead = dead_members()
                except Exception:  # noqa: BLE001 - the store is unreachable: the main thread will hear of it
                    continue
                if not dead:
                    continue
                self._dead, self.fired, abort = None, dead, self._abort
            logger.warning("ranks %s died: aborting this generation's communication", dead)
            abort()


def deaths_since_arrival(arrived: Mapping[int, int], moves: Callable[[], int],
                         incarnation: Callable[[int], Optional[int]]) -> Callable[[], List[int]]:
    """What a death watch polls for a generation: the members whose incarnation moved on since they arrived
    (``arrived``: rank -> incarnation). It reads one counter per poll (``moves()``: how often any incarnation moved)
    and each member's incarnation (``incarnation(rank)``) only when that counter changed, so a poll costs one store
    round trip however large the world. (Supervisors bump the counter after moving the incarnation, so a change it
    misses between two polls is found by the next one.)"""
    seen: List[Optional[int]] = [None]

    def dead_members() -> List[int]:
        count = moves()
        if count == seen[0]:
            return []
        seen[0] = count
        return replaced_members(arrived, incarnation)

    return dead_members
