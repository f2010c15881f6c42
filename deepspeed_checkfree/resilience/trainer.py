"""The trainer side of surviving real process loss: form the process group per generation, keep the stage's state
in memory across a failure, rebuild lost stages from their neighbours, and replay the interrupted step.

A training script hands over two functions and the step count::

    trainer = ResilientTrainer(build_engine, ds_config)  # build_engine() -> engine from deepspeed.initialize
    trainer.train(num_steps, lambda engine, step: engine.train_batch(batches.iterator(step)))

and is started by the per-rank supervisor (``python -m deepspeed_checkfree.supervisor``), which respawns it when
it dies. Data must be addressable by step (the replayed step sees the same batches). Only a communication failure
is recovered; any other exception stops the whole job with exit code 78 (see
:mod:`deepspeed_checkfree.core.fault_policy`).
"""
from __future__ import annotations

import logging
import os
from typing import Callable, Optional

from ..core.config import CheckFreeConfig
from ..core.fault_policy import COMMUNICATION, classify
from ..errors import CheckFreeError
from ..events import EventLog, identity
from ..pipe import ds_internals
from ..pipe.engine import CheckFreeEngine
from .contract import incarnation_from_env, is_spare, supervised
from .coordination import check_trainer_store
from .heartbeat import Heartbeat
from .membership import Fenced
from .drain import DrainRequest
from .session import JobSession, LeaveNow
from .trainer_process import default_backend, end_fenced, end_left, wait_as_spare
from .stopping import stop_job

logger = logging.getLogger(__name__)


class ResilientTrainer:
    """Runs ``train_step`` for every step, surviving the loss of any rank's process or machine.

    Args:
        build_engine: builds the model and returns ``deepspeed.initialize(...)[0]`` (a ``CheckFreeEngine``); called
            once per generation in which this rank holds no state, in the world it is to run in.
        ds_config: the DeepSpeed config dict the engine is built with (its ``"checkfree"`` section gives the
            detection and join timeouts before any engine exists).
        backend: torch.distributed backend (default: the DeepSpeed accelerator's, e.g. NCCL on GPUs, gloo on CPU).
    """

    def __init__(self, build_engine: Callable[[], CheckFreeEngine], ds_config: dict,
                 backend: Optional[str] = None) -> None:
        if not supervised():
            raise CheckFreeError("ResilientTrainer runs under the CheckFree supervisor: launch the script as "
                                 "`deepspeed --num_gpus N -m deepspeed_checkfree.supervisor SCRIPT ARGS` (or with "
                                 "torchrun), which starts and respawns it")
        from . import drop_in
        drop_in.stand_aside()  # (this script forms and re-forms the job itself)
        self.build_engine = build_engine
        self.config = CheckFreeConfig.from_ds_config(ds_config)
        check_trainer_store(self.config.store)
        self.backend = default_backend(backend)
        self.rank = int(os.environ["RANK"])
        self.world_size = int(os.environ["WORLD_SIZE"])
        self.events = EventLog(self.config.events_file)
        built = None
        if is_spare():
            built = wait_as_spare(self.config, ds_config, self._build_solo)
        self.incarnation = incarnation_from_env()
        # From now on the supervisor may kill this trainer if it stops beating (hung), and it ends itself if the
        # supervisor goes away; a SIGTERM (a preemption notice) makes it leave at its next step boundary, handing
        # its stage over.
        self.heartbeat = Heartbeat.from_env(self.config.heartbeat_s, self.config.detection_timeout_s)
        self.drain = DrainRequest().install()
        self.session: Optional[JobSession] = None
        self._built = built
        self.step: Optional[int] = None

    def _build_solo(self) -> CheckFreeEngine:
        ds_internals.form_solo_world(self.rank, self.world_size)
        import deepspeed
        import torch.distributed as dist
        deepspeed.init_distributed(dist_backend=self.backend)
        try:
            return self.build_engine()
        finally:
            dist.destroy_process_group()

    @property
    def engine(self) -> Optional[CheckFreeEngine]:
        return self.session.engine if self.session is not None else self._built

    @property
    def generation(self) -> int:
        return self.session.generation if self.session is not None else -1

    def train(self, num_steps: int, train_step: Callable[[CheckFreeEngine, int], object],
              on_step: Optional[Callable[[CheckFreeEngine, int, object], None]] = None) -> CheckFreeEngine:
        """Run steps ``0..num_steps-1`` (continuing where the job is), replaying a step a failure interrupted.

        Args:
            num_steps: total optimizer steps of the job.
            train_step: runs one step, e.g. ``engine.train_batch(batches.iterator(step))``; returns the loss.
            on_step: called after each completed step with (engine, step, loss).

        Returns:
            The engine of the last generation.
        """
        try:
            return self._train(num_steps, train_step, on_step)  # (it tells the heartbeat it finished)
        except Fenced as err:
            end_fenced(err, self.rank, self.events, self.heartbeat)
        except LeaveNow:
            end_left(self.session, self.heartbeat)
        except Exception as err:  # noqa: BLE001 - every exception that reaches here stops the job, with its cause
            kind = classify(err)
            if kind == COMMUNICATION:
                raise  # outside a generation (the job's store is gone): the supervisor decides
            engine = self.engine
            if self.heartbeat is not None:
                self.heartbeat.finish()
            stop_job(err, kind, rank=self.rank, stage=engine.stage_id if engine is not None else None,
                     step=self.step, events=self.events,
                     membership=self.session.membership if self.session is not None else None,
                     generation=self.generation)

    def _train(self, num_steps: int, train_step: Callable[[CheckFreeEngine, int], object],
               on_step: Optional[Callable[[CheckFreeEngine, int, object], None]]) -> CheckFreeEngine:
        session = JobSession(self.config, self.backend, self.rank, self.world_size, self.incarnation,
                             self.build_engine, self.events, self.heartbeat, engine=self._built, drain=self.drain)
        self.session = session
        interrupted: Optional[int] = None  # the step a failure interrupted on this rank
        while True:
            session.arrive()
            try:
                step = self.step = session.resume()
                engine = session.engine
                if interrupted is not None and on_step is not None:
                    for done in range(interrupted, step):  # (at most one: a rank is at most one step ahead)
                        self._report_lost_loss(engine, done, on_step)
                interrupted = None
                while step < num_steps:
                    loss = train_step(engine, step)
                    session.step_done()
                    if on_step is not None:
                        on_step(engine, step, loss)
                    step += 1
                    self.step = step
                    if self.drain.requested and step < num_steps:
                        raise LeaveNow()
                break
            except Exception as err:  # noqa: BLE001 - only communication failures are recovered, see below
                if classify(err) != COMMUNICATION:
                    raise  # train() stops the job with it
                failure = err
            interrupted = self.step if interrupted is None else interrupted
            session.failed(failure, self.step)
            del failure  # (with it the frames that hold the failed world's groups)
        session.finish()
        return session.engine

    def _report_lost_loss(self, engine: CheckFreeEngine, step: int,
                          on_step: Callable[[CheckFreeEngine, int, object], None]) -> None:
        """``step`` was applied by every survivor, but the failure came on this rank after its update and before
        its ``train_batch`` returned (in DeepSpeed's broadcast of the loss from the last stage), so the job goes on
        after it and its loss is lost with the failed world: ``on_step`` gets NaN for it, so that no step goes
        unreported."""
        logger.warning("%s step %d was applied by every survivor before the failure, but its loss went with the "
                       "failed world: it is reported as NaN", identity(rank=self.rank), step)
        self.events.write("loss_lost", rank=self.rank, step=step, generation=self.generation)
        on_step(engine, step, float("nan"))
