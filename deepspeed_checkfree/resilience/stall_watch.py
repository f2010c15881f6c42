"""A watch on the supervisor's loop: the loop renews the rank's lease and, on the leader, watches every other
lease, so a loop that stops turning (blocked in a call, starved of CPU) goes unnoticed by everyone and costs the
job its detection of silent machines. A daemon thread says so, with the loop thread's Python stack, once the loop
has been still for ``limit_s``, and says again when it turns."""
from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
import traceback
from typing import Callable, Iterator, Optional

from ..events import EventLog

logger = logging.getLogger("deepspeed_checkfree.supervisor")


def stalled_for(last_turn: Optional[float], now: float, limit_s: float) -> Optional[float]:
    """How long a watched loop has been still, when that is over ``limit_s``; None otherwise (or when not watched)."""
    if last_turn is None or now - last_turn <= limit_s:
        return None
    return now - last_turn


class StallWatch:
    """Call :meth:`turn` on every pass of the loop, inside :meth:`watching`.

    Args:
        limit_s: stillness after which the loop counts as stalled.
        on_stall: called (from the watch's thread) with the seconds still and the loop thread's stack.
        on_resume: called (from the loop's thread) with the seconds the stall lasted, when the loop turns again.
    """

    def __init__(self, limit_s: float, on_stall: Callable[[float, str], None],
                 on_resume: Callable[[float], None]) -> None:
        self.limit_s, self.on_stall, self.on_resume = limit_s, on_stall, on_resume
        self._last: Optional[float] = None
        self._thread_id: Optional[int] = None
        self._reported_at: Optional[float] = None  # the last turn before the stall that was reported
        self._closed = threading.Event()
        threading.Thread(target=self._run, name="checkfree-stall-watch", daemon=True).start()

    @contextlib.contextmanager
    def watching(self) -> Iterator["StallWatch"]:
        self._thread_id, self._last = threading.get_ident(), time.monotonic()
        try:
            yield self
        finally:
            self._last = None

    def turn(self) -> None:
        if self._last is None:
            return  # (not inside watching())
        now = time.monotonic()
        reported, last = self._reported_at, self._last
        if reported is not None and reported == last:
            self._reported_at = None
            self.on_resume(now - last)
        self._last = now

    def close(self) -> None:
        self._closed.set()

    def _run(self) -> None:
        while not self._closed.wait(min(1.0, self.limit_s / 4)):
            last = self._last
            still = stalled_for(last, time.monotonic(), self.limit_s)
            if still is None or self._reported_at == last:
                continue
            self._reported_at = last
            frame = sys._current_frames().get(self._thread_id)
            self.on_stall(still, "".join(traceback.format_stack(frame)) if frame is not None else "(thread gone)")


def supervisor_stall_watch(lease_timeout_s: float, events: EventLog, rank: int, prefix: str,
                           leading: Callable[[], bool]) -> StallWatch:
    """The watch on a supervisor's loop: stalled after half the lease timeout (its lease is then at risk), with a
    log line and a ``supervisor_stalled`` event (the stack included), and ``supervisor_resumed`` after."""

    def stalled(still_s: float, stack: str) -> None:
        lead = leading()
        logger.warning("%s this supervisor's loop has not turned for %.1f s (half the lease timeout, --lease-timeout="
                       "%g s): meanwhile it renews no lease%s. It is at:\n%s", prefix, still_s, lease_timeout_s,
                       " and watches no other supervisor's" if lead else "", stack.rstrip())
        events.write("supervisor_stalled", rank=rank, still_s=round(still_s, 3), leading=lead, stack=stack[-4000:])

    def resumed(still_s: float) -> None:
        logger.warning("%s this supervisor's loop turns again after %.1f s", prefix, still_s)
        events.write("supervisor_resumed", rank=rank, still_s=round(still_s, 3))

    return StallWatch(lease_timeout_s / 2, stalled, resumed)
