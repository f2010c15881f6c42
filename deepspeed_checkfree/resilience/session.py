"""A trainer's part in the job across generations: arrive, form the generation's process group, keep or build the
engine, restore and rebuild what was lost, and, when a failure comes, let the failed world go.

Both ways of training under the supervisor run on it: :class:`~.trainer.ResilientTrainer` (the explicit loop) and a
plain script's ``engine.train_batch`` (:mod:`.drop_in`). The decisions are pure (:mod:`deepspeed_checkfree.core`);
this module carries them out.
"""
from __future__ import annotations

import gc
import logging
import os
import signal
import time
from datetime import timedelta
from typing import Callable, Dict, List, Optional

import deepspeed
import torch
import torch.distributed as dist

from ..core.config import CheckFreeConfig
from ..core.failures import replacement_death_phase
from ..core.fault_policy import detection_trigger, gloo_pair_timeout_s, startup_timeout_s
from ..core.rejoin import (MemberInfo, RankTimes, RejoinPlan, joining_generation,
                           plan_rejoin)
from ..errors import CheckFreeError
from ..events import EventLog, identity
from ..pipe import ds_internals, op_build_lock
from ..pipe.engine import CheckFreeEngine
from ..pipe.progress import StageProgress
from .connection_cut import CUT_BACKENDS, GenerationConnections
from .contract import DUMP_ENV, dump_file, group_store_prefix
from .coordination import rendezvous_polling, store_ports, trainer_store
from .death_watch import DeathWatch, aborted_reader
from .drain import DrainRequest, Parking, leave, take_over
from .generation_store import GenerationStore
from .heartbeat import Heartbeat
from .membership import Membership, job_token
from .outage import report_outage

logger = logging.getLogger(__name__)


class LeaveNow(Exception):
    """Raised out of a wait for a generation when this trainer was told to leave (the trainer then leaves)."""


class JobSession:
    """One trainer process's membership in the job.

    Args:
        config: the ``checkfree`` section (timeouts, rebuild settings).
        backend: the torch.distributed backend of every generation's world.
        rank, world_size: this trainer's global rank and the job's size.
        incarnation: which trainer of its rank this process is.
        build_engine: builds the model and returns the engine (``deepspeed.initialize(...)[0]``); called in the
            world it is to run in (a replacement's in a solo world, re-bound later).
        events: the event log.
        heartbeat: the heartbeat to the supervisor (its timeout is a start-up allowance until the first completed
            step of a generation, ``detection_timeout_s`` from then on).
        engine: an engine built already (a warm spare that built its own).
    """

    def __init__(self, config: CheckFreeConfig, backend: str, rank: int, world_size: int, incarnation: int,
                 build_engine: Callable[[], CheckFreeEngine], events: EventLog, heartbeat: Optional[Heartbeat],
                 engine: Optional[CheckFreeEngine] = None, drain: Optional[DrainRequest] = None) -> None:
        self.config, self.backend, self.rank, self.world_size = config, backend, rank, world_size
        self.incarnation, self.build_engine, self.events, self.heartbeat = incarnation, build_engine, events, heartbeat
        self.engine = engine
        op_build_lock.bound_build_lock_wait()  # (a compiled op's build killed midway holds no later build up)
        # What exists now (the modules of torch, DeepSpeed and the script) stays for the process's life: set it
        # aside from the collector, so that the collection letting a failed generation's groups go (on every
        # rank, in the outage) scans only what was made since (0.37-0.56 s -> 0.12-0.23 s, 4 ranks across hosts).
        gc.freeze()
        self.token = job_token()
        self.membership = Membership(trainer_store(self.token, config.join_timeout_s), self.token, rank, world_size,
                                     config.join_timeout_s)
        # Push detection: a thread that aborts the generation when its abort record appears. It has its own store
        # connection: it blocks in a wait all through training, and the main thread's may be blocked too.
        self.death_watch = DeathWatch(Membership(trainer_store(self.token, config.join_timeout_s), self.token, rank,
                                                 world_size, config.join_timeout_s))
        self.connections: Optional[GenerationConnections] = None
        latest = self.membership.latest_generation()
        self.generation = joining_generation(latest, latest >= 0 and self.membership.formed(latest))
        self.failures = 0
        self.holds_state = False  # this rank's engine holds its stage's state (a survivor keeps it in place)
        self.members: Dict[int, MemberInfo] = {}       # the current generation's
        self.previous: Dict[int, MemberInfo] = {}      # the last generation this rank trained in
        self.plan: Optional[RejoinPlan] = None
        self.first_step_pending = False
        self.detected_at: Optional[float] = None       # first detection since the last completed step
        self.last_success_at: Optional[float] = None   # when this rank last completed a step
        self.completed_before: Optional[int] = None    # steps applied when the failure came
        self._times: Dict[str, float] = {}
        self._startup = startup_timeout_s(config.detection_timeout_s)
        if heartbeat is not None:
            heartbeat.set_timeout(self._startup)
        self.drain = drain
        self.parking = Parking(self.membership, config.park_memory_fraction, events)
        self.took_over: Optional[str] = None
        self._last_stage_of: Dict[int, int] = {}

    # ------------------------------------------------------------------------------------------------------
    # Joining a generation
    # ------------------------------------------------------------------------------------------------------

    def arrive(self) -> None:
        """Arrive for the next generation and wait until it forms (the store only: its errors are the store's, and
        end this trainer; the supervisor reports the lost store).

        Raises:
            Fenced: this trainer's rank was recorded lost (it must end).
            MembershipTimeout, JobStopped: as :meth:`.Membership.arrive`.
        """
        if not self.holds_state and self.incarnation > 0 and self.took_over is None:
            self._take_over()
        engine = self.engine if self.holds_state else None
        info = MemberInfo(self.rank, fresh=not self.holds_state,
                          completed_steps=engine.global_steps if engine is not None else 0,
                          incarnation=self.incarnation, pid=os.getpid(), took_over=self.took_over)
        self.generation, self.members = self.membership.arrive(self.generation, info, self._report_waiting,
                                                               self._while_waiting, self._hook("arrival"))
        self._times = {"arrived": time.time()}

    def _take_over(self) -> None:
        """A replacement whose predecessor left on a notice: take its exact state first (see :mod:`.drain`)."""
        t0 = time.time()
        how = take_over(self.membership, self._solo_engine, self.backend, identity(rank=self.rank))
        if how is None:
            return
        self.took_over, self.holds_state = how, True
        engine = self.engine
        logger.warning("%s took stage %d over from the trainer that left (%s, %.0f MiB) in %.2f s: exact, nothing "
                       "to rebuild", identity(engine.stage_id, self.rank, engine.global_steps), engine.stage_id, how,
                       engine.stage_state().nbytes / 2**20, time.time() - t0)
        self.events.write("recovery", step=engine.global_steps, stage=engine.stage_id, rank=self.rank,
                          mode=self.config.mode, strategy="exact hand-over", source=how,
                          duration_s=round(time.time() - t0, 6), cause="preemption notice")

    def _hook(self, phase: str) -> Optional[Callable[[], None]]:
        """``failure_injection.kill_replacements``: this replacement SIGKILLs itself in ``phase`` of its re-join."""
        if replacement_death_phase(self.config, self.rank, self.incarnation) != phase:
            return None

        def die() -> None:
            logger.warning("%s replacement incarnation %d kills itself in its re-join's %s phase (kill_replacements)",
                           identity(rank=self.rank), self.incarnation, phase)
            os.kill(os.getpid(), signal.SIGKILL)

        return die

    def _die_in(self, phase: str) -> None:
        hook = self._hook(phase)
        if hook is not None:
            hook()

    def _solo_engine(self) -> CheckFreeEngine:
        if self.engine is None:
            self.engine = self.build(solo=True)
        return self.engine

    def _while_waiting(self) -> None:
        self.parking.serve()
        if self.drain is not None and self.drain.requested and self.holds_state:
            raise LeaveNow()

    def resume(self) -> int:
        """Form the arrived generation's process group, bind the engine to it and carry out the rejoin plan; return
        the step to run next.

        Raises:
            Exception: a communication failure while the group forms (call :meth:`failed`, then arrive again).
        """
        self.form_world()
        self.bind_engine()
        return self.start()

    def start(self) -> int:
        """With the engine bound to the generation's world: carry out the rejoin plan; return the step to run
        next."""
        engine = self.engine
        self._arm_detection()
        self._times["rejoined"] = time.time()
        self._last_stage_of = self._stage_of(engine)
        self.plan = plan_rejoin(self.generation, self.members, self._last_stage_of, self.membership.has_progress())
        if self.plan.cold_start and self.generation > 0 and self.rank == 0:
            logger.warning("%s no step had completed: the job starts over from initialisation in generation %d",
                           identity(rank=self.rank), self.generation)
            self.events.write("fresh_start", rank=self.rank, generation=self.generation)
        step = self._resume(engine, self.plan, survivor=self.holds_state)
        self.holds_state = True
        self._times["rebuilt"] = time.time()
        self.first_step_pending = True
        return step

    def _report_waiting(self, generation: int, missing: List[int], waited_s: float) -> None:
        lost = self.membership.lost_machines(missing)
        words = [f"rank {r}: " + (f"its machine was recorded lost ({lost[r]['cause']}): start a replacement on a "
                                  f"new machine with the join command (README: real process and machine loss)" if r in lost
                                  else "its supervisor (or the machine that joined for it) is starting its trainer") for r in missing]
        logger.warning("%s waiting %.0f s for generation %d to form: %s. The job waits up to join_timeout_s=%g s",
                       identity(rank=self.rank), waited_s, generation, "; ".join(words), self.config.join_timeout_s)
        self.events.write("waiting", rank=self.rank, generation=generation, missing=missing,
                          waited_s=round(waited_s, 3), lost=sorted(lost))

    def _stage_of(self, engine: CheckFreeEngine) -> Dict[int, int]:
        """Global rank -> pipeline stage, for every rank."""
        return {r: ds_internals.stage_of_rank(engine.grid, r) for r in range(self.world_size)}

    def form_world(self) -> None:
        """Form the arrived generation's process group (its death watch armed).

        A survivor keeps its engine, to be re-bound. A replacement joining survivors builds its engine first in a
        solo world (no peer is needed: the survivors are not building one) and re-binds it like them. When no rank
        holds any state (generation 0, or a fresh start) every rank builds its engine in the new group together
        (:meth:`bind_engine`, or the training script after this).
        """
        generation = self.generation
        survivors = any(not m.fresh for m in self.members.values())
        if not survivors and self.engine is not None and self.build_engine is not None:
            self.engine = None  # everyone starts from initialisation together
            gc.collect()
        if survivors and self.engine is None:
            self._die_in("build")
            self.engine = self.build(solo=True)
        # (the connections the new groups open are the generation's, cut when it fails)
        connections = GenerationConnections(keep_ports=store_ports()) if self.backend in CUT_BACKENDS else None
        self.connections = connections
        self._form_group(generation)
        self._die_in("rebind")
        abort = connections.cut if connections is not None else ds_internals.abort_world

        def abort_generation() -> None:  # (on the death watch's thread)
            self.events.write("death_seen", rank=self.rank, generation=generation, record=self.death_watch.fired)
            abort()

        self.death_watch.arm(generation, abort_generation)

    def bind_engine(self, built_in_world: bool = False) -> CheckFreeEngine:
        """The engine, bound to the formed generation's world: built in it (by ``build_engine``) when this rank
        holds none, else re-bound; with ``built_in_world``, the training script built it in this world itself."""
        if self.engine is None:
            self.engine = self.build(solo=False)
        elif not built_in_world:
            self.engine.rebind()
        self.membership.register_written(self.generation, self._group_store.written)  # (every group exists now)
        return self.engine

    def build(self, solo: bool) -> CheckFreeEngine:
        """Build the engine (in a solo world of its own with ``solo``; else in the current world)."""
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
        engine.incarnation = self.incarnation
        return engine

    def _form_group(self, generation: int) -> None:
        # Building the engine runs collectives while a fresh process may still pay first-use costs that the
        # survivors paid long ago: form every group with a generous start-up timeout, and shorten it once the
        # engine exists (see _arm_detection). DeepSpeed creates its pipeline, data-parallel and tied-weight groups
        # with torch's default timeout, so that default is set too.
        startup = timedelta(seconds=self._startup)
        ds_internals.set_default_group_timeout(startup)
        # The generation's abort record (a member died, went silent, or failed) ends a wait at once, not after the
        # start-up timeout.
        store = GenerationStore(self.membership.store, aborted_reader(self.membership, generation), generation,
                                startup, prefix=self.membership.key(group_store_prefix(generation)),
                                on_published=self._hook("rendezvous"), **rendezvous_polling())
        # (c10d keeps only the C++ side of a Python store: the Python object must stay referenced here)
        self._group_store = store
        # A peer that died after publishing its gloo address is waited for by gloo's connect, which neither the
        # abort record nor a connection cut reaches: every gloo group (this one and those the engine's build
        # creates) connects within max(T, 10 s) and then carries the start-up timeout (fault_policy).
        ds_internals.bound_gloo_connect(timedelta(seconds=gloo_pair_timeout_s(self.config.detection_timeout_s)))
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
        self._dump(plan.generation, "before", engine)
        engine.replay_from(step)
        restore = plan.replica_restore(engine.stage_id, engine.grid.get_data_parallel_group_ranks())
        if restore is not None:
            engine.restore_from_replica(restore.source_rank, list(restore.restored_ranks), cause)
        if plan.lost_stages:
            engine.lose_and_rebuild(list(plan.lost_stages), cause=cause)
        self._dump(plan.generation, "after", engine)
        return step

    # ------------------------------------------------------------------------------------------------------
    # Training steps and failures
    # ------------------------------------------------------------------------------------------------------

    def step_done(self) -> None:
        """After each completed step (cheap but on the first of a generation, which records the progress and, after
        a failure, the outage)."""
        now = time.time()
        if self.first_step_pending:
            self.first_step_pending = False
            self.membership.record_progress()  # once per generation
            if self.heartbeat is not None:
                self.heartbeat.set_timeout(self.config.detection_timeout_s)
            if not self.plan.cold_start:
                # (every rank has now applied the replayed step: their LR schedules are in step again)
                self._dump(self.plan.generation, "resumed", self.engine)
                self._report_outage(RankTimes(
                    detected=self.detected_at, last_success=self.last_success_at, arrived=self._times["arrived"],
                    rejoined=self._times["rejoined"], rebuilt=self._times["rebuilt"], resumed=now,
                    completed_before=self.completed_before, completed_after=self.engine.global_steps))
            self.previous = self.members
        self.detected_at, self.last_success_at, self.completed_before = None, now, None

    def failed(self, err: BaseException, step: Optional[int]) -> None:
        """A communication failure in the current generation: record it (naming what made this rank notice), abort
        the generation in the store (every rank's death watch wakes), let the failed world go: its connections
        first (a peer still waiting on this rank fails at once), then its groups.

        Raises:
            CheckFreeError: more failures than ``checkfree.max_failures``.
        """
        self.detected_at = self.detected_at or time.time()
        if self.completed_before is None and self.holds_state and self.engine is not None:
            self.completed_before = self.engine.global_steps
        why = (str(err).splitlines() or [type(err).__name__])[0][:300]
        fired = self.death_watch.fired
        self.death_watch.disarm()
        trigger = detection_trigger(why, fired is not None)
        self.failures += 1
        stage = self.engine.stage_id if self.engine is not None else None
        said = f" ({fired.get('reason')})" if fired else ""
        logger.warning("%s failure detected in generation %d through %s%s: %s", identity(stage, self.rank, step),
                       self.generation, trigger, said, why)
        self.events.write("failure_detected", step=step, stage=stage, rank=self.rank, generation=self.generation,
                          trigger=trigger, record=fired, error=why)
        try:
            self.membership.abort(self.generation, f"rank {self.rank} detected a failure: {why}")
        except Exception as store_err:  # noqa: BLE001 - the store's loss is the supervisor's to report
            logger.debug("could not record the abort: %s", store_err)
        self._release_world()
        if self.heartbeat is not None:
            self.heartbeat.set_timeout(self._startup)
        self.generation += 1
        if self.failures > self.config.max_failures:
            raise CheckFreeError(f"{self.failures} failures exceed checkfree.max_failures={self.config.max_failures}")

    def leave(self) -> str:
        """Leave the job on the notice ``self.drain`` holds, handing this stage's exact state over (see
        :mod:`.drain`); returns what became of it."""
        engine = self.engine if self.holds_state else None
        parkers, replica_kept = [], False
        if engine is not None:
            # The neighbours of this stage in its data-parallel column (the layout of the last generation formed).
            stage_of, stage = self._last_stage_of, engine.stage_id
            column = [r for r, s in stage_of.items() if s == stage].index(self.rank)
            parkers = [[r for r, s in sorted(stage_of.items()) if s == n][column]
                       for n in (stage - 1, stage + 1) if 0 <= n < engine.num_stages]
            replica_kept = engine.dp_world_size > 1
        outcome = leave(self.membership, engine.stage_state() if engine is not None else None,
                        incarnation=self.incarnation, generation=self.generation, parkers=parkers,
                        backend=self.backend, request=self.drain, events=self.events, replica_kept=replica_kept,
                        release_world=lambda: self._release_world(collect=False))  # (it ends: no next world)
        self.events.write("preempted", rank=self.rank, stage=engine.stage_id if engine is not None else None,
                          step=engine.global_steps if engine is not None else None, notice=self.drain.at,
                          left_s=round(time.time() - self.drain.at, 6), outcome=outcome)
        return outcome

    def _release_world(self, collect: bool = True) -> None:
        """Let this generation's world go (a failure's or a leaving rank's): its connections first, then its
        groups (with ``collect``, their objects too, before the next generation makes new ones)."""
        self.death_watch.disarm()
        if self.connections is not None:
            self.connections.cut()
        if self.engine is not None and self.engine.grid is not None:
            self.engine.release_process_groups()
        if collect:
            gc.collect()
        if dist.is_initialized():
            dist.destroy_process_group()
        ds_internals.forget_failed_world()

    def finish(self) -> None:
        """The job is done: the supervisor hears first (once every trainer counts as finished, rank 0's supervisor
        closes the store)."""
        self.death_watch.close()
        close = getattr(self.death_watch.membership.store, "close", None)
        if close is not None:
            close()  # (its thread's blocked wait ends now, not while the interpreter shuts down)
        self.death_watch.thread.join(1.0)
        if self.heartbeat is not None:
            self.heartbeat.finish()
        self.membership.finish()

    def _report_outage(self, mine: RankTimes) -> None:
        report_outage(self, mine)

    # ------------------------------------------------------------------------------------------------------
    # Verification aid
    # ------------------------------------------------------------------------------------------------------

    def _dump(self, generation: int, when: str, engine: CheckFreeEngine) -> None:
        """With ``CHECKFREE_DUMP_DIR`` set: save this rank's state ``when`` (:func:`.contract.dump_file`)."""
        directory = os.environ.get(DUMP_ENV)
        if not directory:
            return
        os.makedirs(directory, exist_ok=True)
        torch.save({"stage": engine.stage_id, "step": engine.global_steps, "norm": engine.stage_grad_norm,
                    "params": {n: p.detach().clone() for n, p in engine.module.named_parameters()},
                    "opt_state": engine.basic_optimizer.state_dict()["state"],
                    "fp32_masters": [t.detach().clone() for t in engine.fp32_master_partitions()],
                    "lrs": [g["lr"] for g in engine.basic_optimizer.param_groups]},
                   dump_file(directory, generation, when, self.rank))
