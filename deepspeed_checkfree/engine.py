"""The CheckFree pipeline engine: DeepSpeed's ``PipelineEngine`` plus per-stage gradient norms, stage loss, rebuild
from neighbours, optimizer reset and LR boost. The only module that touches DeepSpeed's engine internals; the
decisions live in :mod:`recovery` and :mod:`failures`, the transfers in :mod:`exchange`.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from deepspeed.runtime.pipe import schedule
from deepspeed.runtime.pipe.engine import PipelineEngine
from deepspeed.runtime.pipe.module import PipelineModule, TiedLayerSpec

from .config import CheckFreeConfig
from .errors import UnsupportedSetupError
from .events import EventLog, identity
from .exchange import RebuildResult, gather_signatures, rebuild_stages
from .failures import FailurePlan, recoverable_stages
from .recovery import StageSignature, layer_signature, match_layers, plan_recovery

logger = logging.getLogger(__name__)


def stage_layers(module: PipelineModule) -> List[tuple]:
    """(name prefix, module, tied key) of each local layer that has parameters, in layer order."""
    out, seen = [], set()
    for idx in range(module._local_start, module._local_stop):
        spec = module._layer_specs[idx]
        if isinstance(spec, TiedLayerSpec):
            if spec.key in seen:
                continue
            seen.add(spec.key)
            out.append((f"tied_modules.{spec.key}", module.tied_modules[spec.key], spec.key))
        elif str(idx) in module._modules:
            out.append((str(idx), module._modules[str(idx)], None))
    return [entry for entry in out if any(True for _ in entry[1].parameters())]


def stage_signature(module: PipelineModule) -> StageSignature:
    """The signature (layer types, parameter names and shapes) of this rank's stage."""
    return tuple(layer_signature(name, layer, key) for name, layer, key in stage_layers(module))


class CheckFreeEngine(PipelineEngine):
    """A ``PipelineEngine`` that can lose a stage and rebuild it from its neighbours.

    Created by ``deepspeed.initialize`` (after ``import deepspeed_checkfree``) when the config has
    ``"checkfree": {"enabled": true}``. Constructor arguments are those of ``PipelineEngine``.
    """

    def __init__(self, *args, **kwargs) -> None:
        model = kwargs.get("model")
        config_class = kwargs.get("config_class")
        ds_config = config_class._param_dict if config_class is not None else {}
        cf = CheckFreeConfig.from_ds_config(ds_config)
        if isinstance(model, PipelineModule):
            # Fail on bad input before any engine state, optimizer or process group exists.
            cf.validate_for(model.num_stages)
        if cf.enabled and cf.mode == "checkfree_plus":
            raise UnsupportedSetupError(
                "checkfree.mode='checkfree_plus' needs the out-of-order CheckFree+ engine, which this version "
                "does not include yet. Use mode='checkfree' (middle stages only).")
        super().__init__(*args, **kwargs)
        self.checkfree = cf
        self.failure_plan = FailurePlan.from_config(cf, self.num_stages)
        self.events = EventLog(cf.events_file)
        self._stage_grad_norm: Optional[torch.Tensor] = None
        self._lr_scale = 1.0
        self._scheduled_lrs: Optional[List[float]] = None
        self.recoveries: List[dict] = []
        self.stage_signatures = gather_signatures(stage_signature(self.module), self.stage_id, self.num_stages,
                                                  group=self.grid.get_pipe_parallel_group())
        self._check_recoverable()

    # ------------------------------------------------------------------------------------------------------
    # Start-up checks
    # ------------------------------------------------------------------------------------------------------

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
    # Per-stage gradient norm
    # ------------------------------------------------------------------------------------------------------

    def _stage_grads(self) -> List[torch.Tensor]:
        """The tensors that hold this stage's accumulated, data-parallel-averaged gradient at OptimizerStep."""
        if self.using_bf16_optimizer:
            # BF16_Optimizer accumulates in fp32 ``_hp_grad``; ``p.grad`` is not the step's gradient.
            return [g for p in self.module.parameters() if (g := getattr(p, "_hp_grad", None)) is not None]
        if self.zero_optimization():
            # ZeRO-1 moved the reduced gradients into this data-parallel rank's partitions.
            return [g for grads in self.optimizer.averaged_gradients.values() for g in grads if g is not None]
        return [p.grad for p in self.module.parameters() if p.grad is not None]

    def _record_stage_grad_norm(self) -> None:
        grads = self._stage_grads()
        if not grads:
            self._stage_grad_norm = torch.zeros((), device=self.device)
            return
        norm = torch.nn.utils.get_total_norm(grads, 2.0)
        if self.zero_optimization() and self.dp_world_size > 1:
            sq = norm.float() ** 2
            dist.all_reduce(sq, group=self.grid.get_data_parallel_group())
            norm = sq.sqrt()
        if self.checkfree.per_stage_clip is not None:
            # The reference code clips every stage to norm 1.0 before the optimizer step and measures after.
            coef = torch.clamp(self.checkfree.per_stage_clip / (norm + 1e-6), max=1.0)
            torch._foreach_mul_(grads, coef.to(grads[0].dtype))
            norm = norm * coef
        # Kept as a tensor: reading it would synchronise the device at every step.
        self._stage_grad_norm = norm.detach()

    @property
    def stage_grad_norm(self) -> Optional[float]:
        """L2 norm of this stage's gradient at the last optimizer step (None before the first step)."""
        return None if self._stage_grad_norm is None else float(self._stage_grad_norm)

    def _exec_optimizer_step(self, lr_kwargs=None):
        if self.checkfree.enabled:
            self._record_stage_grad_norm()
        PipelineEngine._exec_optimizer_step(self, lr_kwargs)

    # The base class dispatches through a map of *its own* functions; subclass overrides count only if mapped.
    _INSTRUCTION_MAP = {**PipelineEngine._INSTRUCTION_MAP, schedule.OptimizerStep: _exec_optimizer_step}

    # ------------------------------------------------------------------------------------------------------
    # LR boost that survives the LR scheduler
    # ------------------------------------------------------------------------------------------------------

    def _take_model_step(self, lr_kwargs):
        scheduler = self.lr_scheduler
        if self._scheduled_lrs is None or scheduler is None:
            return super()._take_model_step(lr_kwargs)
        # DeepSpeed steps the scheduler right after the optimizer; let the scheduler see (and update) the
        # un-boosted LRs, then re-apply the boost, so chainable and absolute schedulers both keep it exact.
        real_step = scheduler.step

        def boosted_step(*args, **kwargs):
            groups = self.basic_optimizer.param_groups
            for g, lr in zip(groups, self._scheduled_lrs):
                g["lr"] = lr
            real_step(*args, **kwargs)
            self._scheduled_lrs = [g["lr"] for g in groups]
            for g, lr in zip(groups, self._scheduled_lrs):
                g["lr"] = lr * self._lr_scale

        scheduler.step = boosted_step
        try:
            return super()._take_model_step(lr_kwargs)
        finally:
            del scheduler.step

    def _apply_lr_boost(self) -> None:
        groups = self.basic_optimizer.param_groups
        if self._scheduled_lrs is None:
            self._scheduled_lrs = [g["lr"] for g in groups]
        # A second rebuild of the same stage sets boost x scheduled LR again; it does not compound.
        self._lr_scale = self.checkfree.lr_boost
        for g, lr in zip(groups, self._scheduled_lrs):
            g["lr"] = lr * self._lr_scale

    # ------------------------------------------------------------------------------------------------------
    # Losing and rebuilding a stage
    # ------------------------------------------------------------------------------------------------------

    def train_batch(self, data_iter=None):
        if self.checkfree.enabled:
            lost = self.failure_plan.failures_at(self.global_steps)
            if lost:
                self.lose_and_rebuild(lost, cause="injected")
        return super().train_batch(data_iter)

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
        if self.using_bf16_optimizer or self.zero_optimization():
            # Otherwise the fp32 master weights would overwrite the new weights at the next step.
            self.optimizer.refresh_fp32_params()

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
            random_seed=cf.seed + 7919 * step + self.stage_id)
        if me:
            self._reset_optimizer_state()
            self._apply_lr_boost()
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
