"""Stopping the job on an error that is not a lost peer: one log line and one ``stopped`` event naming the cause,
the job-wide stop in the store (every other rank and supervisor then ends too), and exit code 78, on which no
supervisor respawns anything. :class:`ScriptGuard` does the same for errors a training script raises outside
:class:`~deepspeed_checkfree.resilience.trainer.ResilientTrainer` (a config file it parses itself, for instance).
"""
from __future__ import annotations

import logging
import os
import sys
from typing import NoReturn, Optional

from ..core.fault_policy import COMMUNICATION, CONFIG, PROGRAM, classify
from ..events import EventLog, identity
from .contract import STOPPED_EXIT_CODE, is_spare, supervised
from .coordination import trainer_store
from .membership import JobStopped, Membership, job_token

logger = logging.getLogger(__name__)


def stop_reason(err: BaseException, kind: str, *, rank: int, stage: Optional[int] = None,
                step: Optional[int] = None) -> str:
    """The cause of a stop in words a user can act on."""
    if kind == CONFIG:
        return f"configuration error: {err}"
    if kind == PROGRAM:
        where = f"rank {rank}" + (f", stage {stage}" if stage is not None else "")
        when = f"in step {step}" if step is not None else "before training"
        return (f"{type(err).__name__}: {err} ({when}, {where}). It is not a communication failure, so CheckFree "
                f"does not recover it (a replay would raise it again): fix the cause (the traceback is in rank "
                f"{rank}'s log) and launch the job again.")
    return str(err)


def stop_job(err: BaseException, kind: str, *, rank: int, events: EventLog, membership: Optional[Membership],
             stage: Optional[int] = None, step: Optional[int] = None, generation: Optional[int] = None) -> NoReturn:
    """Log ``err``, record ``stopped``, stop the job for every rank (through ``membership``) and exit with 78."""
    reason = stop_reason(err, kind, rank=rank, stage=stage, step=step)
    cause = "peer_stopped" if isinstance(err, JobStopped) else kind
    logger.error("%s stopping the job: %s", identity(stage, rank, step), reason,
                 exc_info=err if kind == PROGRAM else None)
    events.write("stopped", rank=rank, stage=stage, step=step, generation=generation, cause=cause, reason=reason)
    if membership is not None and cause != "peer_stopped":
        try:
            membership.stop(rank, cause, reason)
        except Exception as store_err:  # noqa: BLE001 - the stop is also seen by the supervisor from the exit code
            logger.error("%s could not publish the stop to the job's store: %s", identity(rank=rank), store_err)
    sys.stdout.flush()
    sys.stderr.flush()
    raise SystemExit(STOPPED_EXIT_CODE) from err


class ScriptGuard:
    """Wrap a training script's ``main`` so that an error outside the trainer stops the job instead of looping::

        guard = ScriptGuard(rank, events_file="out/events.jsonl")
        with guard:
            ...   # parse the config (may set guard.events_file), build, ResilientTrainer(...).train(...)

    Under the supervisor, any exception that is not a communication failure stops the job (exit code 78, nothing
    respawned). Without it, a config error exits with its message and 78 as well, and anything else propagates.
    A warm spare that was never activated only exits (its supervisor then keeps no spare).
    """

    def __init__(self, rank: int, events_file: Optional[str] = None) -> None:
        self.rank = rank
        self.events_file = events_file

    def __enter__(self) -> "ScriptGuard":
        return self

    def __exit__(self, exc_type, err, tb) -> bool:
        if err is None or not isinstance(err, Exception):
            return False  # SystemExit, KeyboardInterrupt: as they are
        kind = classify(err)
        if not supervised():
            if kind != CONFIG:
                return False
            print(f"error: {err}", file=sys.stderr, flush=True)
            EventLog(self.events_file).write("stopped", rank=self.rank, cause=kind,
                                             reason=stop_reason(err, kind, rank=self.rank))
            raise SystemExit(STOPPED_EXIT_CODE) from err
        if kind == COMMUNICATION:
            return False  # a lost peer outside a generation: the supervisor starts a replacement
        if is_spare():
            logger.error("%s warm spare cannot start: %s", identity(rank=self.rank), err)
            raise SystemExit(STOPPED_EXIT_CODE) from err
        stop_job(err, kind, rank=self.rank, events=EventLog(self.events_file), membership=self._membership())

    def _membership(self) -> Optional[Membership]:
        try:
            store = trainer_store(job_token(), timeout_s=10)
            return Membership(store, job_token(), self.rank, int(os.environ["WORLD_SIZE"]), join_timeout_s=10)
        except Exception as store_err:  # noqa: BLE001 - the supervisor still sees exit code 78
            logger.error("%s cannot reach the job's store to stop the job: %s", identity(rank=self.rank), store_err)
            return None
