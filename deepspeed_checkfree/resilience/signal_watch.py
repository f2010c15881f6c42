"""The supervisor's ear for the job-wide signals: a thread that waits for the next one (a stop, a fresh start, a
rank recorded lost) with one blocking request at a time on a store connection of its own, so a quiet job costs the
store nothing, and leaves what it heard for the supervisor's loop."""
from __future__ import annotations

import threading
from typing import List, Optional

from .membership import Membership

SIGNAL_WAIT_S = 60.0  # one blocking wait for the next job-wide signal


class SignalWatch:
    """A thread that waits for the job-wide signals (stop, fresh start, a rank lost) with one blocking request at a
    time on a store connection of its own, and leaves what it saw for the supervisor's loop."""

    def __init__(self, membership: Membership, seen: int) -> None:
        self.membership, self.seen = membership, seen
        self.stop = False
        self.fresh_start = 0
        self.lost: List[dict] = []
        self.drains: List[int] = []  # ranks told to drain (`checkfree drain`)
        self.error: Optional[BaseException] = None
        self.closed = False
        self._lock = threading.Lock()
        threading.Thread(target=self._run, name="checkfree-signals", daemon=True).start()

    def close(self) -> None:
        """Stop listening: the blocked wait ends now (see :meth:`.DeadlineStore.close`)."""
        self.closed = True
        close = getattr(self.membership.store, "close", None)
        if close is not None:
            close()

    def _run(self) -> None:
        while not self.closed:
            try:
                self.seen, signal_ = self.membership.next_signal(self.seen, SIGNAL_WAIT_S)
            except Exception as err:  # noqa: BLE001 - the store is lost: the supervisor's loop reports it
                if not self.closed:
                    self.error = err
                return
            if signal_ is None:
                continue
            with self._lock:
                kind = signal_.get("kind")
                if kind == "stop":
                    self.stop = True
                elif kind == "fresh_start":
                    self.fresh_start = max(self.fresh_start, int(signal_.get("epoch", 0)))
                elif kind == "lost":
                    self.lost.append(signal_)
                elif kind == "drain":
                    self.drains.append(int(signal_.get("rank", -1)))
