"""The CheckFree pipeline engine: DeepSpeed's ``PipelineEngine`` that can lose a stage and rebuild it from its
neighbours. It keeps the dispatch (which instruction runs what) and the rebuild; its parts live beside it:
per-stage gradient norms (:mod:`.grad_norm`), the LR boost (:mod:`.lr_boost`), CheckFree+ routing (:mod:`.plus_routing`),
the stage's progress record (:mod:`.progress`), transfers (:mod:`.exchange`) and DeepSpeed internals
(:mod:`.ds_internals`). The decisions are pure, in :mod:`deepspeed_checkfree.core`.
"""
from __future__ import annotations

import logging
import math
import os
import signal
import time
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from deepspeed.runtime.pipe import schedule
from deepspeed.runtime.pipe.engine import PipelineEngine
from deepspeed.runtime.pipe.module import PipelineModule

from ..core.config import CheckFreeConfig
from ..core.failures import FailurePlan, recoverable_stages, replacement_death_phase
from ..core.recovery import match_layers, plan_recovery, random_rebuild_seed, tied_authorities
from ..errors import RecoveryError
from ..events import EventLog, identity
from ..repair.ds_pipeline import checkpoint_client_state
from . import ds_internals
from .exchange import RebuildResult, broadcast_state, broadcast_tensors, gather_signatures, rebuild_stages
from .handover import StageState
from .grad_norm import measure_stage_grad_norm, stage_gradients
from .lr_boost import LRBoost
from .plus_routing import PlusRouting, allow_route_hops, check_plus_setup
from .progress import StageProgress
from .stage import stage_layers, stage_signature

__all__ = ["CheckFreeEngine", "stage_layers", "stage_signature"]

logger = logging.getLogger(__name__)


def _no_update(*args, **kwargs) -> None:
    """The torch optimizer's step while a rank replays a step it already applied."""
    return None


class CheckFreeEngine(PlusRouting, PipelineEngine):
    """A ``PipelineEngine`` that can lose a stage and rebuild it from its neighbours.

    Created by ``deepspeed.initialize`` (after ``import deepspeed_checkfree``) when the config has
    ``"checkfree": {"enabled": true}``. Constructor arguments are those of ``PipelineEngine``.
    """

    def __init__(self, *args, **kwargs) -> None:
        model = kwargs.get("model")
        config_class = kwargs.get("config_class")
        cf = CheckFreeConfig.from_ds_config(ds_internals.config_dict(config_class))
        if isinstance(model, PipelineModule):
            # Fail on bad input before any engine state, optimizer or process group exists.
            cf.validate_for(model.num_stages)
        plus = cf.enabled and cf.mode == "checkfree_plus"
        if plus:
            check_plus_setup(model, config_class)
            allow_route_hops()
        self._init_plus_routing(plus, cf.plus_recompute_edges)
        super().__init__(*args, **kwargs)
        self.checkfree = cf
        self.lr_boost = LRBoost()
        self._replayed_steps = 0
        # Set by the resilient trainer: give up on a peer in a rebuild after this long, and which replacement of its
        # rank this process is (0: the first trainer; None: not supervised).
        self.p2p_timeout = None
        self.incarnation: Optional[int] = None
        self.failure_plan = FailurePlan.from_config(cf, self.num_stages)
        self.events = EventLog(cf.events_file)
        self._stage_grad_norm: Optional[torch.Tensor] = None
        self.recoveries: List[dict] = []
        self.stage_signatures: Optional[list] = None
        if not ds_internals.world_is_solo():  # else (a replacement built before its peers exist): in rebind()
            self._gather_signatures()

    def _gather_signatures(self) -> None:
        self.stage_signatures = gather_signatures(stage_signature(self.module), self.stage_id, self.num_stages,
                                                  group=self.grid.get_pipe_parallel_group())
        self._check_recoverable()

    def release_process_groups(self) -> None:
        """Let go of the process groups of a failed world (see :func:`~.ds_internals.release_process_groups`);
        :meth:`rebind` binds the engine to the next one."""
        ds_internals.release_process_groups(self)

    def rebind(self) -> None:
        """Continue in a re-formed world: called on every rank after ``init_process_group`` of a new generation.

        The engine keeps its module, optimizer (fp32 masters and moments), LR scheduler and counters; only the process
        groups are created anew (pipeline, data-parallel, tied-weight and p2p) and the engine, module and optimizer
        re-bound to them. What an interrupted step left behind (activations, partial gradients, the peers' tensor
        metadata) is dropped. No stage tensor is copied, so a survivor's memory does not grow. A replacement built
        its engine in the solo world (:func:`~.ds_internals.form_solo_world`) and re-binds the same way.
        """
        ds_internals.rebind_process_groups(self)
        ds_internals.reset_step_state(self)
        self._reset_route_state()
        self._gather_signatures()

    def _check_recoverable(self) -> None:
        """Plan and match the rebuild of every stage the mode protects, so a mismatch stops training now."""
        if not self.checkfree.enabled:
            return
        cf = self.checkfree
        for stage in recoverable_stages(self.num_stages, cf.mode):
            for plan in plan_recovery([stage], self.num_stages, cf.mode, cf.strategy, cf.on_adjacent_failure):
                for src in plan.sources:
                    match_layers(self.stage_signatures[plan.target], self.stage_signatures[src], plan.target, src)

    # ------------------------------------------------------------------------------------------------------
    # Dispatch: the optimizer step records the stage's gradient norm, applies the boost, skips a replayed update
    # ------------------------------------------------------------------------------------------------------

    @property
    def stage_grad_norm(self) -> Optional[float]:
        """L2 norm of this stage's gradient at the last optimizer step (None before the first step)."""
        return None if self._stage_grad_norm is None else float(self._stage_grad_norm)

    def _exec_optimizer_step(self, lr_kwargs=None):
        if self.checkfree.enabled:
            partitioned = self.zero_optimization() and self.dp_world_size > 1
            self._stage_grad_norm = measure_stage_grad_norm(
                stage_gradients(self), self.device,
                partition_group=self.grid.get_data_parallel_group() if partitioned else None,
                max_norm=self.checkfree.per_stage_clip)
        if self._replayed_steps > 0:
            # This rank already applied this step before a failure interrupted the others: its update is not
            # applied twice; the replay only carried activations and gradients for the stages that had not.
            self._replayed_steps -= 1
            self._step_without_update(lr_kwargs)
            return
        PipelineEngine._exec_optimizer_step(self, lr_kwargs)

    def _step_without_update(self, lr_kwargs) -> None:
        """DeepSpeed's optimizer step with the update left out, for a rank that already applied it.

        The step's collectives still run, so the ranks that do apply it are not left waiting: the global gradient
        norm of ``gradient_clipping`` (all stages), and the bf16/ZeRO wrappers' norm and all-gathers. The torch
        optimizer's ``step`` is a no-op meanwhile (weights, moments and step counts stay), the wrappers copy back the
        unchanged fp32 masters, and the progress record (counters, LR schedule and boost) is put back as it was.
        """
        progress = self.progress()
        optimizer = self.basic_optimizer
        optimizer.step = _no_update  # an instance attribute hides the class's step (and its hooks)
        try:
            PipelineEngine._exec_optimizer_step(self, lr_kwargs)
        finally:
            del optimizer.step
        norm = self._stage_grad_norm
        self.load_progress(progress)
        self._stage_grad_norm = norm

    _INSTRUCTION_MAP = ds_internals.instruction_map({
        schedule.OptimizerStep: _exec_optimizer_step,
        schedule.ReduceTiedGrads: PlusRouting._exec_reduce_tied_grads,
    })

    def _take_model_step(self, lr_kwargs):
        with self.lr_boost.around_scheduler_step(self.lr_scheduler, self.basic_optimizer.param_groups):
            super()._take_model_step(lr_kwargs)
        if self._tied_authority:
            self._sync_tied_copies()

    def train_batch(self, data_iter=None):
        drop_in = getattr(self, "_checkfree_drop_in", None)
        if drop_in is not None:  # a plain script under the supervisor (resilience/drop_in.py)
            return drop_in.train_batch(self, self._train_one_step, data_iter)
        return self._train_one_step(data_iter)

    def _train_one_step(self, data_iter=None):
        if self.checkfree.enabled:
            lost = self.failure_plan.failures_at(self.global_steps)
            if lost:
                self.lose_and_rebuild(lost, cause="injected")
        return super().train_batch(data_iter)

    @property
    def checkfree_catching_up(self) -> bool:
        """Under the supervisor, a replacement's first train_batch calls only take the data of the steps the job
        ran before it joined (they return NaN): True during them."""
        drop_in = getattr(self, "_checkfree_drop_in", None)
        return drop_in is not None and drop_in.catching_up(self)

    def save_checkpoint(self, save_dir, tag=None, client_state=None, **kwargs):
        """DeepSpeed's checkpoint, plus this stage's gradient norm and layer range in the client state, so that
        ``checkfree repair`` can rebuild a lost stage of the checkpoint with the paper's weights."""
        state = dict(client_state or {})
        if self.checkfree.enabled:
            state.update(checkpoint_client_state(self))
        return super().save_checkpoint(save_dir, tag=tag, client_state=state, **kwargs)

    # ------------------------------------------------------------------------------------------------------
    # Keeping a survivor's state across a re-formed process group (no file involved)
    # ------------------------------------------------------------------------------------------------------

    def progress(self) -> StageProgress:
        """This stage's progress record (counters, LR schedule and boost, last norm, tied authorities)."""
        return StageProgress(
            global_steps=self.global_steps, global_samples=self.global_samples, skipped_steps=self.skipped_steps,
            lr_scheduler=self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None,
            lrs=[g["lr"] for g in self.basic_optimizer.param_groups],
            scheduled_lrs=self.lr_boost.scheduled_lrs, lr_scale=self.lr_boost.lr_scale,
            stage_grad_norm=self.stage_grad_norm, tied_authority=dict(self._tied_authority),
            replayed_steps=self._replayed_steps)

    def load_progress(self, progress: StageProgress) -> None:
        """Continue from ``progress`` (of this rank's previous engine, its replica, or a survivor's schedule)."""
        if progress.lr_scheduler is not None and self.lr_scheduler is not None:
            self.lr_scheduler.load_state_dict(progress.lr_scheduler)
        for g, lr in zip(self.basic_optimizer.param_groups, progress.lrs):
            g["lr"] = lr
        self.global_steps, self.global_samples = progress.global_steps, progress.global_samples
        self.skipped_steps = progress.skipped_steps
        self.lr_boost.scheduled_lrs = None if progress.scheduled_lrs is None else list(progress.scheduled_lrs)
        self.lr_boost.lr_scale = progress.lr_scale
        norm = progress.stage_grad_norm
        self._stage_grad_norm = None if norm is None else torch.tensor(norm, device=self.device)
        self._tied_authority = dict(progress.tied_authority)
        self._replayed_steps = progress.replayed_steps

    # ------------------------------------------------------------------------------------------------------
    # Keeping a survivor's state across a re-formed process group (no file involved)
    # ------------------------------------------------------------------------------------------------------

    def stage_state(self) -> StageState:
        """This stage's exact state, as its own tensors (nothing is copied): what a leaving rank hands over
        (:mod:`.handover`). Under bf16 or ZeRO-1 the wrapping optimizer's state is taken whole, fp32 master weights
        included, so the taker continues bit-identically rather than from masters re-derived from bf16 weights."""
        wrapped = self.optimizer_is_wrapped()
        return StageState(stage_id=self.stage_id, params=list(self.module.parameters()),
                          optimizer=self.optimizer.state_dict() if wrapped else self.basic_optimizer.state_dict(),
                          wrapped=wrapped, progress=self.progress())

    def load_stage_state(self, state: StageState) -> None:
        """Continue from ``state`` (:meth:`stage_state` of this stage's previous engine, handed over or parked); its
        weights must already be in this engine's parameters or are copied in here."""
        if state.stage_id != self.stage_id:
            raise RecoveryError(f"state of stage {state.stage_id} cannot be taken over by stage {self.stage_id}; the "
                                f"rank-to-stage mapping changed between generations")
        if state.wrapped != self.optimizer_is_wrapped():
            raise RecoveryError("the optimizer kind changed between generations (bf16/ZeRO wrapper on one side "
                                "only); build every generation's engine from the same DeepSpeed config")
        with torch.no_grad():
            for mine, theirs in zip(self.module.parameters(), state.params):
                if mine is not theirs and mine.data_ptr() != theirs.data_ptr():
                    mine.copy_(theirs)
        if state.wrapped:
            # One data-parallel rank's state (this rank's partition); the fp32 masters are restored as saved.
            self.optimizer.load_state_dict([state.optimizer], load_optimizer_states=True, load_from_fp32_weights=True)
        else:
            self.basic_optimizer.load_state_dict(state.optimizer)
        progress = state.progress
        # A replayed step is decided anew by replay_from in the next generation.
        progress.replayed_steps = self._replayed_steps
        self.load_progress(progress)

    def optimizer_is_wrapped(self) -> bool:
        """bf16 and ZeRO wrap the torch optimizer and keep fp32 master weights of their own."""
        return bool(self.using_bf16_optimizer or self.zero_optimization())

    def fp32_master_partitions(self) -> List[torch.Tensor]:
        """The wrapping optimizer's flat fp32 master weights of this rank (empty without a wrapper)."""
        if self.using_bf16_optimizer:
            return ds_internals.bf16_fp32_partitions(self.optimizer)
        if self.zero_optimization():
            return ds_internals.zero_fp32_partitions(self.optimizer)
        return []

    def replay_from(self, step: int) -> None:
        """Prepare to re-run ``step`` (the one a failure interrupted): a rank that already applied it skips its
        optimizer update while replaying, a rank that had not applies it, and both end at ``step + 1``."""
        if self.global_steps > step + 1 or self.global_steps < step:
            raise RecoveryError(f"stage {self.stage_id} completed {self.global_steps} steps but the job replays "
                                f"step {step}: a rank can be at most one step ahead")
        self._replayed_steps = self.global_steps - step

    # ------------------------------------------------------------------------------------------------------
    # Losing and rebuilding a stage
    # ------------------------------------------------------------------------------------------------------

    def restore_from_replica(self, src: int, restored: Sequence[int], cause: str) -> Optional[dict]:
        """Give the ranks ``restored`` of this stage the state of its surviving data-parallel replica ``src``
        (global ranks); a collective over this stage's data-parallel group.

        The weights arrive exactly, so there is no LR boost (an earlier rebuild's boost is carried over). A torch
        optimizer's state and the whole progress record (LR schedule, step counters, replayed step) are copied
        too, and the restored rank goes on exactly as its replica. Under bf16 or ZeRO every data-parallel rank holds
        only its own partition of the optimizer state: a restored rank's partition starts fresh, its fp32 masters
        taken from the copied weights.

        Returns:
            The event record on a restored rank; None elsewhere.
        """
        step = self.global_steps
        me = self.global_rank in restored
        prefix = identity(self.stage_id, self.global_rank, step)
        wrapped = self.optimizer_is_wrapped()
        t0 = time.perf_counter()
        if me:
            logger.warning("%s state lost (%s); copying it from its data-parallel replica on rank %d", prefix,
                           cause, src)
            self.events.write("stage_lost", step=step, stage=self.stage_id, rank=self.global_rank, cause=cause,
                              lost_stages=[self.stage_id], replica_rank=src)
            self._wipe_stage()
        group = self.grid.get_data_parallel_group()
        params = list(self.module.parameters())
        nbytes = broadcast_tensors(params, src, group, receive=me)
        # Everything the replica's progress consists of, so the restored rank is its clone: also when the replica
        # had already applied the interrupted step and replays it without applying it again.
        progress: List[Optional[StageProgress]] = [self.progress() if self.global_rank == src else None]
        dist.broadcast_object_list(progress, src=src, group=group)
        optimizer_state = None
        if not wrapped:  # the source sends its own moments (no copy); a restored rank receives straight into its own
            source_state = self.basic_optimizer.state_dict() if self.global_rank == src else None
            optimizer_state, moved = broadcast_state(source_state, src, group, receive=me, device=params[0].device)
            nbytes += moved
        if not me:
            return None
        if wrapped:
            self._reset_optimizer_state()
        else:
            self.basic_optimizer.load_state_dict(optimizer_state)
        self.load_progress(progress[0])
        self.module.zero_grad(set_to_none=True)
        record = dict(step=step, stage=self.stage_id, rank=self.global_rank, mode=self.checkfree.mode,
                      strategy="data_parallel_replica", sources=[self.stage_id], source_rank=src,
                      optimizer="fresh partition" if wrapped else "copied",
                      lr_after=[g["lr"] for g in self.basic_optimizer.param_groups], bytes_received=nbytes,
                      duration_s=round(time.perf_counter() - t0, 6), cause=cause)
        self.recoveries.append(record)
        logger.warning("%s restored from its data-parallel replica on rank %d in %.3f s (optimizer state %s)",
                       prefix, src, record["duration_s"], record["optimizer"])
        self.events.write("recovery", **record)
        return record

    def _local_params(self) -> Dict[str, torch.nn.Parameter]:
        return dict(self.module.named_parameters())

    def _wipe_stage(self) -> None:
        """What losing the stage's process loses: weights (set to NaN, so a leak is visible), fp32 master copies,
        optimizer state and the last gradient norm."""
        with torch.no_grad():
            for p in self.module.parameters():
                p.fill_(math.nan)
        self._reset_optimizer_state()
        self._stage_grad_norm = None

    def _reset_optimizer_state(self) -> None:
        # Each pipeline rank's optimizer holds only its own stage, so clearing it resets exactly this stage.
        self.basic_optimizer.state.clear()
        if self.optimizer_is_wrapped():
            # Otherwise the fp32 master weights would overwrite the new weights at the next step.
            self.optimizer.refresh_fp32_params()

    def _die_during_rebuild_hook(self):
        """``failure_injection.kill_during_rebuild``: the first replacement of that stage dies mid-rebuild; and
        ``kill_replacements``'s "rebuild" phase."""
        phase = (replacement_death_phase(self.checkfree, self.global_rank, self.incarnation)
                 if self.incarnation is not None else None)
        if phase == "rebuild" or (self.checkfree.failure_injection.kill_during_rebuild == self.stage_id
                                  and self.incarnation == 1):
            what = (f"replacement incarnation {self.incarnation} kills itself in its re-join's rebuild phase "
                    f"(kill_replacements)" if phase == "rebuild" else "killing this replacement (kill_during_rebuild)")

            def die(source_stage: int) -> None:
                logger.warning("%s %s after receiving stage %d", identity(self.stage_id, self.global_rank,
                                                                       self.global_steps), what, source_stage)
                os.kill(os.getpid(), signal.SIGKILL)
            return die
        return None

    def lose_and_rebuild(self, lost: Sequence[int], cause: str) -> Optional[RebuildResult]:
        """Lose the ``lost`` stages' state and rebuild them from the survivors (a collective on every rank).

        Args:
            lost: the stages to lose.
            cause: why, for the event record ("injected", ...).

        Returns:
            On a rebuilt rank, what was done; None elsewhere.

        Raises:
            RecoveryError: a lost stage cannot be rebuilt (before anything is lost).
        """
        cf = self.checkfree
        step = self.global_steps
        plans = plan_recovery(lost, self.num_stages, cf.mode, cf.strategy, cf.on_adjacent_failure)
        me = self.stage_id in lost
        prefix = identity(self.stage_id, self.global_rank, step)
        report = me and self.grid.data_parallel_id == 0
        t0 = time.perf_counter()
        if me:
            if report:
                logger.warning("%s stage lost (%s); rebuilding it from stage(s) %s", prefix, cause,
                               next(p.sources for p in plans if p.target == self.stage_id))
                self.events.write("stage_lost", step=step, stage=self.stage_id, rank=self.global_rank,
                                  cause=cause, lost_stages=list(lost))
            self._wipe_stage()
        result = rebuild_stages(
            plans, self.stage_id, self._local_params(), self.stage_signatures, self.grid.stage_to_global,
            self.stage_grad_norm, eps=cf.eps, norm=cf.norm,
            layers=[layer for _, layer, _ in stage_layers(self.module)],
            random_seed=random_rebuild_seed(cf.seed, step, self.stage_id), on_received=self._die_during_rebuild_hook(),
            timeout=self.p2p_timeout)
        # A rebuilt holder of a replicated (de)embedding follows the copy it was rebuilt from from now on.
        for key, stage in tied_authorities(plans, self.stage_signatures).items():
            self.follow_tied_copy(key, stage)
        if me:
            self._reset_optimizer_state()
            self.lr_boost.apply(self.basic_optimizer.param_groups, cf.lr_boost)
            self.module.zero_grad(set_to_none=True)
            duration = time.perf_counter() - t0
            assert result is not None
            record = dict(step=step, stage=self.stage_id, rank=self.global_rank, mode=cf.mode,
                          strategy=result.plan.strategy, sources=list(result.plan.sources),
                          source_norms=list(result.source_norms), weights=list(result.normalized_weights),
                          fallback=result.fallback, layer_mapping=result.layer_note,
                          lr_after=[g["lr"] for g in self.basic_optimizer.param_groups],
                          bytes_received=result.bytes_received, duration_s=round(duration, 6),
                          phases_s={k: round(v, 6) for k, v in result.timings_s.items()}, cause=cause)
            self.recoveries.append(record)
            if report:
                weights = ", ".join(f"stage {s}: {w:.4f}" for s, w in zip(result.plan.sources,
                                                                           result.normalized_weights))
                logger.warning("%s rebuilt by %s from %s in %.3f s; lr now %s%s", prefix, result.plan.strategy,
                               weights or "fresh initialisation", duration, record["lr_after"],
                               f" ({result.fallback})" if result.fallback else "")
                self.events.write("recovery", **record)
        return result
