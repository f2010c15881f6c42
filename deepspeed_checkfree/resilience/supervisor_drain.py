"""A supervisor's drain: what it does on a preemption notice (SIGTERM, SIGINT, ``checkfree drain``) for its rank.
The trainer's side, the hand-over itself, is :mod:`.drain`."""
from __future__ import annotations

import logging
import signal
import time
from typing import Optional

from ..core.rejoin import PREEMPTION
from .children import cause_of
from .contract import LEFT_EXIT_CODE

logger = logging.getLogger("deepspeed_checkfree.supervisor")


class Draining:
    """The supervisor's part of a drain (a base of :class:`~.supervisor.Supervisor`, which has the attributes
    used here)."""

    drain_at: Optional[float] = None  # when a preemption notice came (SIGTERM, SIGINT, checkfree drain)
    drain_why = ""

    def note_drain(self, why: str) -> None:
        """A preemption notice (the first one counts; later ones change nothing, only SIGKILL cuts a drain
        short)."""
        if self.drain_at is None:
            self.drain_at, self.drain_why = time.time(), why
        else:
            logger.warning("%s %s: already draining (%.1f s left of --drain-timeout); SIGKILL ends it at once",
                           self._prefix(), why, self.drain_at + self.args.drain_timeout - time.time())

    def _drain(self, incarnation: int) -> int:
        """A preemption notice: the trainer finishes its step and hands its stage over (:mod:`.drain`) within
        --drain-timeout of the notice; this supervisor keeps the lease meanwhile, then ends. A drain that misses its
        deadline is a machine loss, recorded here so that a replacement is admitted at once."""
        deadline = self.drain_at + self.args.drain_timeout
        if self.server is not None:
            return self._stop(f"rank 0's machine got a preemption notice ({self.drain_why}), and it hosts the job's "
                              f"embedded store, which the job cannot outlive: run the job with --store etcd://... to "
                              f"survive the loss of any machine, rank 0's included", None)
        logger.warning("%s preemption notice (%s): the trainer hands its stage over at its next step boundary, "
                       "within %.1f s", self._prefix(), self.drain_why, deadline - time.time())
        self.events.write("drain", rank=self.rank, notice=self.drain_at, why=self.drain_why, deadline=deadline)
        try:
            self.membership.record_draining(self.rank, self.drain_at, deadline, self.owner)
        except (RuntimeError, OSError) as err:
            logger.error("%s could not record the drain: %s", self._prefix(), err)
        if self.spare is not None:
            self.spare.end(grace_s=0)
            self.spare = None
            self.launcher.announce_spare(None)
        self.active.send(signal.SIGTERM)  # (it may have had it already: the same notice twice changes nothing)
        while self.active.poll() is None and time.time() < deadline:
            self._store_tick(time.monotonic())
            time.sleep(0.05)
        rc = self.active.poll()
        if rc == LEFT_EXIT_CODE:
            logger.warning("%s the trainer left the job and handed its stage over. The job goes on without this "
                           "machine: start a replacement on a new machine (it takes the stage over exactly): %s",
                           self._prefix(), self.join_command(self.rank))
            self.events.write("drained", rank=self.rank, drain_s=round(time.time() - self.drain_at, 3))
            return 0
        if rc == 0:
            return 0  # the job finished meanwhile
        if rc is None:
            self.active.end(grace_s=0)
        why = "the drain missed its deadline" if rc is None else f"the trainer exited ({cause_of(rc)}) while draining"
        try:  # (unless the trainer recorded its leaving already) the rank is free for a replacement at once
            if not self.membership.lost_machines([self.rank]):
                self.membership.record_machine_loss(self.rank, incarnation, PREEMPTION, self.owner, self.drain_at,
                                                    self.membership.last_generations()[self.rank])
        except (RuntimeError, OSError) as err:
            logger.error("%s could not record the loss: %s", self._prefix(), err)
        logger.error("%s %s: the stage was not handed over and is rebuilt from its neighbours when a replacement "
                     "joins: %s", self._prefix(), why, self.join_command(self.rank))
        self.events.write("drain_missed", rank=self.rank, reason=why)
        return 128 + signal.SIGTERM
