"""Push detection: a thread that waits for the current generation's abort record and aborts the generation's
communication when it appears.

A dead process's connections close, so its neighbours fail at once; a rank that waits on a live peer (a
non-neighbour), or on a machine that vanished without closing anything, would wait for its timeout. The abort
record (:meth:`~deepspeed_checkfree.resilience.membership.Membership.abort`) is written by whoever learns first
that the generation failed: the supervisor that saw its trainer exit, the leader that saw a machine's lease go
silent, a leaving rank, or any trainer that detected the failure itself. The thread waits on that one key with one
blocking request (TCPStore's ``get``, an etcd watch), so a quiet job costs the store nothing, and it wakes within a
round trip of the write; it then aborts the generation, which makes the pending operation fail at once:

- gloo: the generation's connections are cut (:mod:`.connection_cut`), since gloo's own abort does not wake a
  pending operation;
- NCCL: the generation's communicators are aborted (``ncclCommAbort``). An abort that itself hangs (a known NCCL
  behaviour with p2p communicators in flight) is left to the watchdog, which ``detection_timeout_s`` bounds.
"""
from __future__ import annotations

import json
import logging
import threading
from typing import Callable, Optional

from .contract import abort_key
from .membership import Membership
from .store_access import wait_for

logger = logging.getLogger(__name__)

WAIT_S = 600.0  # one blocking wait; every generation that ends writes its abort record, which ends the wait


class DeathWatch:
    """Calls the armed ``abort()`` once when the armed generation's abort record appears, between ``arm`` and
    ``disarm``.

    Args:
        membership: a view of the job on a store connection of its own (the thread blocks in it).
        wait_s: how long one blocking wait lasts before it is renewed.
    """

    def __init__(self, membership: Membership, wait_s: float = WAIT_S) -> None:
        self.membership, self.wait_s = membership, wait_s
        self._generation: Optional[int] = None
        self._abort: Optional[Callable[[], None]] = None
        self._lock = threading.Lock()
        self._armed = threading.Event()
        self._stop = threading.Event()
        self.fired: Optional[dict] = None  # the abort record that fired it, for the armed generation
        self.thread = threading.Thread(target=self._run, name="checkfree-death-watch", daemon=True)
        self.thread.start()

    def arm(self, generation: int, abort: Callable[[], None]) -> None:
        """Watch ``generation``: when its abort record appears, call ``abort()`` (from this thread)."""
        with self._lock:
            self._generation, self._abort, self.fired = generation, abort, None
            self._armed.set()

    def disarm(self) -> None:
        with self._lock:
            self._generation = None
            self._armed.clear()

    def close(self, join_s: float = 0.0) -> None:
        """Stop watching (waiting up to ``join_s`` for the thread to leave its current wait)."""
        self._stop.set()
        self._armed.set()
        if join_s > 0:
            self.thread.join(join_s)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._armed.wait()
            with self._lock:
                generation = self._generation
            if generation is None or self._stop.is_set():
                continue
            try:
                value = wait_for(self.membership.store, self.membership.key(abort_key(generation)), self.wait_s)
            except Exception as err:  # noqa: BLE001 - the store is lost: the main thread will hear of it
                logger.debug("death watch: the store did not answer (%s)", err)
                self._stop.wait(1.0)
                continue
            if value is None:
                continue
            with self._lock:
                if self._generation != generation:
                    continue  # disarmed meanwhile (this rank's own failure handling wrote the record)
                self.fired, abort = json.loads(value), self._abort
                self._generation = None
                self._armed.clear()
            logger.warning("generation %d was aborted (%s): aborting this rank's communication of it", generation,
                           self.fired.get("reason"))
            abort()


def aborted_reader(membership: Membership, generation: int) -> Callable[[], Optional[dict]]:
    """What a generation's rendezvous store polls: the generation's abort record (one request), None while it
    stands."""
    return lambda: membership.abort_reason(generation)
