"""Push detection where closing connections is not enough: a thread that watches the job's death records.

Under gloo a dead process's connections close and the failing ranks let go of their groups, so every rank leaves
its wait at once (see :func:`deepspeed_checkfree.pipe.ds_internals.release_process_groups`). NCCL has no such
cascade: a collective with a dead peer waits for the watchdog. There this thread, on seeing a member of the
current generation replaced (its supervisor saw the trainer exit and moved the rank's incarnation on), aborts the
generation's communicators (``ncclCommAbort``), which makes the pending operation fail at once. The pipeline's
point-to-point communicators are among them; an abort that itself hangs (a known NCCL behaviour with p2p
communicators in flight) is left to the watchdog, which ``detection_timeout_s`` bounds.
"""
from __future__ import annotations

import logging
import threading
from typing import Callable, List, Optional

logger = logging.getLogger(__name__)


class DeathWatch:
    """Calls ``abort()`` once when ``dead_members()`` names a member, between ``arm`` and ``disarm``.

    Args:
        dead_members: the ranks of the armed generation's members that have died.
        abort: aborts the current world's communicators.
        interval_s: how often to look.
    """

    def __init__(self, abort: Callable[[], None], interval_s: float = 0.05) -> None:
        self.abort, self.interval_s = abort, interval_s
        self._dead: Optional[Callable[[], List[int]]] = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.fired: List[int] = []
        self.thread = threading.Thread(target=self._run, name="checkfree-death-watch", daemon=True)
        self.thread.start()

    def arm(self, dead_members: Callable[[], List[int]]) -> None:
        with self._lock:
            self._dead, self.fired = dead_members, []

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
                self._dead, self.fired = None, dead
            logger.warning("ranks %s died: aborting this generation's communicators", dead)
            self.abort()
