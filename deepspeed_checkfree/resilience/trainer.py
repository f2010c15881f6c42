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

import gc
import logging
import os
import sys
import time
from dataclasses import asdict
from datetime import timedelta
from typing import Callable, Dict, List, Optional

import deepspeed
import torch
import torch.distributed as dist

from ..core.config import CheckFreeConfig
from ..core.fault_policy import COMMUNICATION, classify
from ..core.rejoin import MemberInfo, RankTimes, RejoinPlan, joining_generation, measure_outage, plan_rejoin
from ..errors import CheckFreeError
from ..events import EventLog, identity
from ..pipe import ds_internals
from ..pipe.engine import CheckFreeEngine
from ..pipe.progress import StageProgress
# (SPARE_ENV, SUPERVISED_ENV, STOPPED_EXIT_CODE and supervised are also this module's names since version 0.1.)
from .contract import (DUMP_ENV, INCARNATION_ENV, SPARE_ENV, STOPPED_EXIT_CODE, STORE_ADDR_ENV,  # noqa: F401
                       STORE_PORT_ENV, SUPERVISED_ENV, activated, dump_file, group_store_prefix, incarnation_from_env,
                       is_spare, read_activation, supervised)
from .connection_cut import CUT_BACKENDS, GenerationConnections
from .coordination import (check_trainer_store, death_watch_interval, prepare_client, rendezvous_polling,
                           store_ports, trainer_store)
from .death_watch import DeathWatch, deaths_since_arrival
from .generation_store import GenerationStore
from .heartbeat import Heartbeat
from .membership import Membership, job_token
from .stopping import stop_job

logger = logging.getLogger(__name__)


def _is_comm_failure(err: BaseException) -> bool:
    return classify(err) == COMMUNICATION


class ResilientTrainer:
    """Runs ``train_step`` for every step, surviving the loss of any rank's process.

    Args:
        build_engine: builds the model and returns ``deepspeed.initialize(...)[0]`` (a ``CheckFreeEngine``); called
            once per generation, after the process group is formed.
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
        self.build_engine = build_engine
        self.config = CheckFreeConfig.from_ds_config(ds_config)
        check_trainer_store(self.config.store)
        if backend is None:
            from deepspeed.accelerator import get_accelerator
            backend = get_accelerator().communication_backend_name()
        self.backend = backend
        self.rank = int(os.environ["RANK"])
        self.world_size = int(os.environ["WORLD_SIZE"])
        self.engine: Optional[CheckFreeEngine] = None
        if is_spare():
            # A warm spare: everything is imported and prepared (what building the engine imports and the compiled
            # ops it loads, too; with spare_builds_engine, the engine itself, in the solo world); wait until the
            # supervisor activates it in place of a trainer that died, which saves the replacement the seconds of
            # start-up.
            if self.config.spare_builds_engine:
                self.engine = self._build(solo=True)
            else:
                ds_internals.prewarm_engine_imports()
                ds_internals.prewarm_engine_ops(ds_config)  # e.g. FusedAdam: never loaded in the outage
            prepare_client()
            incarnation = read_activation(sys.stdin)
            if incarnation is None:
                sys.exit(0)  # the supervisor ended without needing this spare
            activated(os.environ, incarnation)  # for the training script, as for a respawned trainer
        self.incarnation = incarnation_from_env()
        # From now on the supervisor may kill this trainer if it stops beating (hung), and it ends itself if the
        # supervisor goes away.
        self.heartbeat = Heartbeat.from_env(self.config.heartbeat_s, self.config.detection_timeout_s)
        self.token = job_token()
        if self.engine is not None:
            self.engine.incarnation = self.incarnation
        self.generation = -1
        self.events = EventLog(self.config.events_file)
        self.failures = 0
        self.membership: Optional[Membership] = None
        self.step: Optional[int] = None

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
        except Exception as err:  # noqa: BLE001 - every exception that reaches here stops the job, with its cause
            kind = classify(err)
            if kind == COMMUNICATION:
                raise  # outside a generation (the job's store is gone): the supervisor decides
            stage = self.engine.stage_id if self.engine is not None else None
            if self.heartbeat is not None:
                self.heartbeat.finish()
            stop_job(err, kind, rank=self.rank, stage=stage, step=self.step, events=self.events,
                     membership=self.membership, generation=self.generation)

    def _train(self, num_steps: int, train_step: Callable[[CheckFreeEngine, int], object],
               on_step: Optional[Callable[[CheckFreeEngine, int, object], None]]) -> CheckFreeEngine:
        store = trainer_store(self.token, self.config.join_timeout_s)  # the supervisor's: embedded or etcd
        membership = Membership(store, self.token, self.rank, self.world_size, self.config.join_timeout_s)
        self.membership = membership
        # Push detection: a thread that aborts the generation when a member's supervisor records its death. It has
        # its own store connection: the main thread's may be blocked.
        self.watch_membership = Membership(trainer_store(self.token, self.config.join_timeout_s), self.token,
                                           self.rank, self.world_size, self.config.join_timeout_s)
        self.death_watch = DeathWatch(interval_s=death_watch_interval())
        self.connections: Optional[GenerationConnections] = None
        latest = membership.latest_generation()
        generation = joining_generation(latest, latest >= 0 and membership.formed(latest))
        holds_state = False     # this rank's engine holds its stage's state (a survivor keeps it in place)
        detected_at: Optional[float] = None     # first detection since the last completed step
        last_success_at: Optional[float] = None  # when this rank last completed a step
        while True:
            engine = self.engine
            info = MemberInfo(self.rank, fresh=not holds_state,
                              completed_steps=engine.global_steps if holds_state else 0,
                              incarnation=self.incarnation, pid=os.getpid())
            members = membership.arrive(generation, info)
            t_arrived = time.time()
            step = engine.global_steps if holds_state else 0
            self.step = step
            try:
                engine = self._engine_for(membership, generation, members)
                self._arm_detection()
                t_rejoined = time.time()
                plan = plan_rejoin(generation, members, self._stage_of(engine), membership.has_progress())
                if plan.cold_start and generation > 0 and self.rank == 0:
                    logger.warning("%s no step had completed: the job starts over from initialisation in "
                                   "generation %d", identity(rank=self.rank), generation)
                    self.events.write("fresh_start", rank=self.rank, generation=generation)
                step = self._resume(engine, plan, survivor=holds_state)
                self.step = step
                holds_state = True
                t_rebuilt = time.time()
                first = True
                while step < num_steps:
                    loss = train_step(engine, step)
                    if first:
                        membership.record_progress()  # once per generation: cheap
                    if first and not plan.cold_start:
                        self._report_outage(membership, plan, members, RankTimes(
                            detected=detected_at, last_success=last_success_at, arrived=t_arrived,
                            rejoined=t_rejoined, rebuilt=t_rebuilt, resumed=time.time()))
                    first = False
                    detected_at, last_success_at = None, time.time()
                    if on_step is not None:
                        on_step(engine, step, loss)
                    step += 1
                    self.step = step
                break
            except Exception as err:  # noqa: BLE001 - only communication failures are recovered, see below
                if not _is_comm_failure(err):
                    raise  # train() stops the job with it
                detected_at = detected_at or time.time()
                why = (str(err).splitlines() or [type(err).__name__])[0][:300]
                # (err goes with this block, and with it the frames that hold the failed world's groups)
            self._on_failure(why, generation, step)
            generation += 1
        # The supervisor hears first: once every trainer counts as finished, rank 0's supervisor closes the store.
        self.death_watch.close()
        if self.heartbeat is not None:
            self.heartbeat.finish()
        membership.finish()
        return self.engine

    def _stage_of(self, engine: CheckFreeEngine) -> Dict[int, int]:
        """Global rank -> pipeline stage, for every rank."""
        return {r: ds_internals.stage_of_rank(engine.grid, r) for r in range(self.world_size)}

    def _engine_for(self, membership: Membership, generation: int, members: Dict[int, MemberInfo]) -> CheckFreeEngine:
        """Form this generation's process group and return the engine bound to it.

        A survivor keeps its engine and re-binds it. A replacement joining survivors builds its engine first in a
        solo world (no peer is needed: the survivors are not building one) and re-binds it like them. When no rank
        holds any state (generation 0, or a fresh start) every rank builds its engine in the new group together.
        """
        survivors = any(not m.fresh for m in members.values())
        if not survivors and self.engine is not None:
            self._drop_engine()  # everyone starts from initialisation together
        if survivors and self.engine is None:
            self.engine = self._build(solo=True)
        arrived = {r: m.incarnation for r, m in members.items()}  # a member replaced since has died
        # (the connections the new groups open are the generation's, cut when it fails)
        connections = GenerationConnections(keep_ports=store_ports()) if self.backend in CUT_BACKENDS else None
        self.connections = connections
        self._form_group(membership, generation, arrived)
        self.generation = generation
        watcher = self.watch_membership
        abort = connections.cut if connections is not None else ds_internals.abort_world

        def abort_generation() -> None:  # (on the death watch's thread)
            self.events.write("death_seen", rank=self.rank, generation=generation, dead_ranks=self.death_watch.fired)
            abort()

        self.death_watch.arm(deaths_since_arrival(arrived, watcher.incarnation_moves, watcher.incarnation),
                             abort_generation)
        if self.engine is None:
            self.engine = self._build(solo=False)
        else:
            self.engine.rebind()
        return self.engine

    def _build(self, solo: bool) -> CheckFreeEngine:
        if solo:
            ds_internals.form_solo_world(self.rank, self.world_size)
            deepspeed.init_distributed(dist_backend=self.backend)
        try:
            engine = self.build_engine()
        finally:
            if solo:
                dist.destroy_process_group()
        if not isinstance(engine, CheckFreeEngine) or not engine.checkfree.enabled:
            raise CheckFreeError("build_engine must return the CheckFree engine: add \"checkfree\": "
                                 "{\"enabled\": true} to the DeepSpeed config and import deepspeed_checkfree")
        engine.incarnation = getattr(self, "incarnation", None)
        return engine

    def _drop_engine(self) -> None:
        self.engine = None
        gc.collect()

    def _on_failure(self, why: str, generation: int, step: int) -> None:
        """Record a detected failure, then let the failed world go: its connections first (a peer still waiting on
        this rank fails at once, and cuts its own in turn), then its groups."""
        self.failures += 1
        stage = self.engine.stage_id if self.engine is not None else None
        logger.warning("%s failure detected in generation %d: %s", identity(stage, self.rank, step), generation, why)
        self.events.write("failure_detected", step=step, stage=stage, rank=self.rank, generation=generation,
                          error=why)
        self.death_watch.disarm()
        if self.connections is not None:
            self.connections.cut()
        if self.engine is not None and self.engine.grid is not None:
            self.engine.release_process_groups()
        gc.collect()
        if dist.is_initialized():
            dist.destroy_process_group()
        if self.failures > self.config.max_failures:
            raise CheckFreeError(f"{self.failures} failures exceed checkfree.max_failures={self.config.max_failures}")

    def _resume(self, engine: CheckFreeEngine, plan: RejoinPlan, survivor: bool) -> int:
        """Carry out ``plan``: take the replayed step's schedule state, restore ranks from their data-parallel
        replicas and rebuild the lost stages; return the step to run next. A survivor's engine holds its state."""
        if plan.cold_start:
            return engine.global_steps
        step, source = plan.step, plan.schedule_source
        # A replacement takes the replayed step's schedule (LR scheduler, un-boosted LRs, sample count) from a
        # survivor that has not applied it yet.
        payload: List[Optional[StageProgress]] = [None]
        if self.rank == source:
            payload = [engine.progress().schedule_for_replacement(step)]
        dist.broadcast_object_list(payload, src=source)
        if not survivor:
            engine.load_progress(payload[0])
        cause = f"process lost (ranks {list(plan.fresh_ranks)}, generation {plan.generation})"
        dump = os.environ.get(DUMP_ENV)
        if dump:
            self._dump(dump, plan.generation, "before", engine)
        engine.replay_from(step)
        restore = plan.replica_restore(engine.stage_id, engine.grid.get_data_parallel_group_ranks())
        if restore is not None:
            engine.restore_from_replica(restore.source_rank, list(restore.restored_ranks), cause)
        if plan.lost_stages:
            engine.lose_and_rebuild(list(plan.lost_stages), cause=cause)
        if dump:
            self._dump(dump, plan.generation, "after", engine)
        return step

    def _report_outage(self, membership: Membership, plan: RejoinPlan, members: Dict[int, MemberInfo],
                       mine: RankTimes) -> None:
        """After the first step of a new generation: gather every rank's phase times; rank 0 writes the outage
        (:func:`~deepspeed_checkfree.core.rejoin.measure_outage` says how it is measured)."""
        times: List[Optional[RankTimes]] = [None] * self.world_size
        dist.all_gather_object(times, mine)
        if self.rank != 0:
            return
        deaths = [d.time for r in plan.fresh_ranks for i in range(members[r].incarnation)
                  if (d := membership.death(r, i)) is not None]
        outage = measure_outage(plan, times, deaths)
        logger.warning("%s outage of generation %d: %.2f s (detected %.2f, re-joined %.2f, rebuilt %.2f, resumed "
                       "%.2f), replayed step %d, lost steps 0", identity(step=plan.step, rank=self.rank),
                       plan.generation, outage.outage_s, outage.detected_s or 0.0, outage.rejoined_s,
                       outage.rebuilt_s, outage.resumed_s, plan.step)
        self.events.write("outage", **asdict(outage))

    # ------------------------------------------------------------------------------------------------------
    # The process group of a generation
    # ------------------------------------------------------------------------------------------------------

    def _form_group(self, membership: Membership, generation: int, arrived: Dict[int, int]) -> None:
        # Building the engine runs collectives while a fresh process may still pay first-use costs that the
        # survivors paid long ago: form every group with a generous start-up timeout, and shorten it once the
        # engine exists (see _arm_detection). DeepSpeed creates its pipeline, data-parallel and tied-weight groups
        # with torch's default timeout, so that default is set too.
        startup = timedelta(seconds=max(120.0, 10 * self.config.detection_timeout_s))
        ds_internals.set_default_group_timeout(startup)
        # A member that dies while the group forms (``arrived``: rank -> the incarnation it arrived as) ends the
        # wait at once, not after the start-up timeout.
        store = GenerationStore(membership.store,
                                deaths_since_arrival(arrived, membership.incarnation_moves, membership.incarnation),
                                generation, startup, prefix=membership.key(group_store_prefix(generation)),
                                **rendezvous_polling())
        # (c10d keeps only the C++ side of a Python store: the Python object must stay referenced here)
        self._group_store = store
        dist.init_process_group(self.backend, store=store, rank=self.rank, world_size=self.world_size,
                                timeout=startup)
        # DeepSpeed's communication layer wraps the process group that now exists (it delegates every call to
        # torch.distributed, so it follows the group of each new generation).
        deepspeed.init_distributed(dist_backend=self.backend)

    def _arm_detection(self) -> None:
        """From now on every wait on a peer gives up after ``detection_timeout_s``: collectives through the groups'
        timeout, pipeline sends and receives through timed waits (gloo fixes a pair's own timeout when the group is
        created, so shortening the group's timeout alone would not reach them)."""
        timeout = timedelta(seconds=self.config.detection_timeout_s)
        ds_internals.set_every_group_timeout(timeout)
        ds_internals.install_timed_p2p(timeout)
        if self.engine is not None:
            self.engine.p2p_timeout = timeout

    # ------------------------------------------------------------------------------------------------------
    # Verification aid
    # ------------------------------------------------------------------------------------------------------

    def _dump(self, directory: str, generation: int, when: str, engine: CheckFreeEngine) -> None:
        os.makedirs(directory, exist_ok=True)
        torch.save({"stage": engine.stage_id, "step": engine.global_steps, "norm": engine.stage_grad_norm,
                    "params": {n: p.detach().clone() for n, p in engine.module.named_parameters()},
                    "opt_state": engine.basic_optimizer.state_dict()["state"],
                    "fp32_masters": [t.detach().clone() for t in engine.fp32_master_partitions()],
                    "lrs": [g["lr"] for g in engine.basic_optimizer.param_groups]},
                   dump_file(directory, generation, when, self.rank))
