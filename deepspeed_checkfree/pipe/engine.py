"""The CheckFree pipeline engine: DeepSpeed's ``PipelineEngine`` plus per-stage gradient norms, stage loss, rebuild
from neighbours, optimizer reset and LR boost. The only module that touches DeepSpeed's engine internals; the
decisions live in :mod:`recovery` and :mod:`failures`, the transfers in :mod:`exchange`.
"""
from __future__ import annotations

import functools
import logging
import math
import os
import signal
import time
from types import MethodType
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from deepspeed.runtime.pipe import p2p, schedule
from deepspeed.runtime.pipe.engine import PipelineEngine
from deepspeed.runtime.pipe.module import PipelineModule, TiedLayerSpec
from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

from ..core import schedule as cf_schedule
from ..core.config import CheckFreeConfig
from ..errors import ConfigError, RecoveryError, UnsupportedSetupError
from ..events import EventLog, identity
from .exchange import RebuildResult, broadcast_tensors, gather_signatures, rebuild_stages
from ..core.failures import FailurePlan, recoverable_stages
from .plus_module import CheckFreePlusPipelineModule
from ..core.recovery import StageSignature, layer_signature, match_layers, plan_recovery
from ..repair.deepspeed_format import checkpoint_client_state
from ..resilience.contract import INCARNATION_ENV

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


def _check_plus_setup(model, config_class) -> None:
    """CheckFree+ needs its module layout, swapped micro-batches in every step, and fp32 or bf16."""
    if not isinstance(model, CheckFreePlusPipelineModule):
        raise UnsupportedSetupError(
            f"checkfree.mode='checkfree_plus' needs the (de)embedding replicas and role-gated edge layers, but the "
            f"model is a plain {type(model).__name__}. Build it with deepspeed_checkfree.checkfree_plus_module("
            f"embedding, blocks, head, num_stages, loss_fn=...) or use mode='checkfree'.")
    gas = config_class.gradient_accumulation_steps
    if gas < 2:
        raise ConfigError(
            f"CheckFree+ runs every other micro-batch out of order, so it needs gradient_accumulation_steps >= 2; "
            f"the config has {gas}. Raise gradient_accumulation_steps (and lower the micro-batch size).")
    if config_class.float16_config.enabled:
        raise UnsupportedSetupError(
            "checkfree.mode='checkfree_plus' runs in fp32 or bf16 (with or without ZeRO-1), not fp16: its dynamic "
            "loss scaling has not been made to work with the swapped micro-batches. Use bf16 or fp32.")


@functools.lru_cache(maxsize=None)
def _route_hops(num_stages: int) -> frozenset:
    return cf_schedule.route_hops(num_stages)


def _allow_route_hops() -> None:
    """DeepSpeed's p2p helpers assert that only adjacent stages talk; CheckFree+ routes also link stages 0->2 and
    P-3->P-1. Extend the check with exactly the route hops (the transport is a plain send on the world group)."""
    original = p2p._is_valid_send_recv
    if getattr(original, "checkfree_route_hops", False):
        return

    def is_valid_send_recv(src_stage, dest_stage):
        stages = p2p._grid.pipe_parallel_size
        if stages >= 4 and (src_stage, dest_stage) in _route_hops(stages):
            return
        original(src_stage, dest_stage)

    is_valid_send_recv.checkfree_route_hops = True
    p2p._is_valid_send_recv = is_valid_send_recv


def _to_cpu(obj):
    """A copy of a (nested) state dict with every tensor on the CPU, to send as an object."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


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
        self._plus = cf.enabled and cf.mode == "checkfree_plus"
        if self._plus:
            _check_plus_setup(model, config_class)
            _allow_route_hops()
        self._role: Optional[cf_schedule.Role] = None
        super().__init__(*args, **kwargs)
        self.checkfree = cf
        # Tied key -> global rank whose copy is authoritative after an edge stage was rebuilt (see _step_tied).
        self._tied_authority: Dict[str, int] = {}
        self._replayed_steps = 0
        # Set by the resilient trainer: give up on a peer in a rebuild after this long.
        self.p2p_timeout = None
        self._mb_losses: Dict[int, torch.Tensor] = {}
        self._meta_sent_to: set = set()
        self._recv_bufs: Dict[int, object] = {}
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
        if self._replayed_steps > 0:
            # This rank already applied this step before a failure interrupted the others: its update is not
            # applied twice; the replay only carried activations and gradients for the stages that had not.
            self._replayed_steps -= 1
            if self.using_bf16_optimizer or self.zero_optimization():
                self.optimizer.zero_grad()
            else:
                self.zero_grad()
            return
        PipelineEngine._exec_optimizer_step(self, lr_kwargs)

    # The base class dispatches through a map of *its own* functions; subclass overrides count only if mapped.
    _INSTRUCTION_MAP = {**PipelineEngine._INSTRUCTION_MAP, schedule.OptimizerStep: _exec_optimizer_step}

    # ------------------------------------------------------------------------------------------------------
    # LR boost that survives the LR scheduler
    # ------------------------------------------------------------------------------------------------------

    def _take_model_step(self, lr_kwargs):
        self._take_boosted_model_step(lr_kwargs)
        if self._tied_authority:
            self._sync_tied_copies()

    def _take_boosted_model_step(self, lr_kwargs):
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
    # CheckFree+: out-of-order micro-batches
    # ------------------------------------------------------------------------------------------------------

    def is_first_stage(self):
        role = getattr(self, "_role", None)
        return self.stage_id == 0 if role is None else role.is_first

    def is_last_stage(self):
        role = getattr(self, "_role", None)
        return self.stage_id == self.num_stages - 1 if role is None else role.is_last

    def _train_schedule(self):
        if self._plus:
            return cf_schedule.CheckFreePlusTrainSchedule(self.micro_batches, self.num_stages, self.stage_id)
        return super()._train_schedule()

    def set_dataloader(self, loader):
        if self._plus and self.stage_id in cf_schedule.data_stages(self.num_stages):
            self.training_dataloader = loader
            self.data_iterator = iter(self.training_dataloader)
        else:
            super().set_dataloader(loader)

    def set_dataiterator(self, iterator):
        # Under CheckFree+ stages 1 and P-2 also read inputs or labels (on the swapped micro-batches).
        if self._plus and self.stage_id in cf_schedule.data_stages(self.num_stages):
            self.training_dataloader = None
            self.data_iterator = iterator
        else:
            super().set_dataiterator(iterator)

    def _enter_role(self, role: Optional[cf_schedule.Role]) -> None:
        """Make the base handlers see this micro-batch's route: neighbours, first/last, and the edge layers' gate."""
        self._role = role
        self.prev_stage = self.stage_id - 1 if role is None or role.prev_stage is None else role.prev_stage
        self.next_stage = self.stage_id + 1 if role is None or role.next_stage is None else role.next_stage
        gate = self.module.checkfree_role
        gate.first, gate.last = self.is_first_stage(), self.is_last_stage()

    def _exec_schedule(self, pipe_schedule):
        if not isinstance(pipe_schedule, cf_schedule.CheckFreePlusTrainSchedule):
            return super()._exec_schedule(pipe_schedule)
        self._reserve_pipe_buffers(pipe_schedule.num_pipe_buffers())
        self.fwd_outputs = []
        self._mb_losses = {}
        try:
            for step_cmds in pipe_schedule:
                for cmd in step_cmds:
                    mb = cmd.kwargs.get("buffer_id")
                    if mb is not None:
                        self._enter_role(cf_schedule.role(self.stage_id, mb, self.num_stages))
                    self._exec_routed(cmd, mb)
        finally:
            self._enter_role(None)

    def _exec_routed(self, cmd, mb: Optional[int]) -> None:
        kind = type(cmd)
        # Tensor metadata goes once per (sender, receiver) pair; with two routes a rank has two peers per side.
        if kind is schedule.SendActivation:
            self.first_output_send = self.next_stage not in self._meta_sent_to
        elif kind is schedule.RecvActivation:
            self.pipe_recv_buf = self._recv_bufs.get(self.prev_stage)
        elif kind is schedule.BackwardPass and self._role.is_last:
            # All forwards run before the backwards, so each micro-batch's loss is kept until its backward.
            self.loss = self._mb_losses.pop(mb)
        MethodType(self._INSTRUCTION_MAP[kind], self)(**cmd.kwargs)
        if kind is schedule.SendActivation:
            self._meta_sent_to.add(self.next_stage)
        elif kind is schedule.RecvActivation:
            self._recv_bufs[self.prev_stage] = self.pipe_recv_buf
        elif kind is schedule.ForwardPass and self._role.is_last:
            self._mb_losses[mb] = self.loss

    def _aggregate_total_loss(self):
        if not self._plus:
            return super()._aggregate_total_loss()
        # The loss is computed on two ranks (P-1 on even micro-batches, P-2 on odd): sum their partial totals
        # over the pipeline, then scale by the accumulation steps exactly as the base engine does.
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        if self.total_loss is not None:
            total += self.total_loss.detach().float()
        dist.all_reduce(total, group=self.grid.get_pipe_parallel_group())
        loss = self._scale_loss_by_gas(total)
        self.dp_group_loss = loss.clone()
        if self.is_data_parallel:
            dist.all_reduce(loss, group=self.grid.get_data_parallel_group())
            loss /= self.dp_world_size
        return loss

    def _exec_reduce_tied_grads(self):
        if self._plus:
            # DeepSpeed all-reduces a tied weight's gradient only where it is not None, and a rank that skips the
            # collective hangs the others. Under CheckFree+ a copy may leave some of its weights unused in a step
            # (tied input/output embeddings: the position embedding only on the embedding stages, the final norm
            # only on the head stages), so give every tied weight a (zero) gradient first.
            for weight, _ in self.module.get_tied_weights_and_groups():
                if weight.grad is None:
                    weight.grad = torch.zeros_like(weight)
        PipelineEngine._exec_reduce_tied_grads(self)

    _INSTRUCTION_MAP = {**_INSTRUCTION_MAP, schedule.ReduceTiedGrads: _exec_reduce_tied_grads}

    def _sync_tied_copies(self) -> None:
        """After an edge stage was rebuilt, its (de)embedding copy has a fresh optimizer and a boosted LR while
        the surviving copy has neither; broadcasting the survivor's values after every step keeps the copies
        bit-identical (one broadcast per replicated tensor, like DeepSpeed's own tied-gradient all-reduce).
        Under bf16 or ZeRO the optimizer's fp32 master copy of the weight is broadcast too, or the next step
        would start from the copy's own masters again."""
        wrapped = self._optimizer_is_wrapped()
        with torch.no_grad():
            for key, comm in self.module.tied_comms.items():
                src = self._tied_authority.get(key)
                if src is None:
                    continue
                for attr in comm["weight_attr"]:
                    weight = self.module._recursive_getattr(comm["module"], attr)
                    dist.broadcast(weight.data, src=src, group=comm["group"])
                    if wrapped:
                        # The full fp32 master (gathered over the data-parallel group when partitioned).
                        master = safe_get_full_fp32_param(weight)
                        dist.broadcast(master, src=src, group=comm["group"])
                        safe_set_full_fp32_param(weight, master)

    @property
    def replica_bytes(self) -> int:
        """Bytes of (de)embedding replicas this rank holds beyond the originals: stage 1's embedding copy and stage
        P-2's head copy (0 on every other stage, and without CheckFree+)."""
        if not self._plus or self.stage_id not in (1, self.num_stages - 2):
            return 0
        return sum(p.numel() * p.element_size() for m in self.module.tied_modules.values() for p in m.parameters())

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

    def export_state(self) -> dict:
        """Everything this rank's stage needs to continue, as in-memory objects (tensors are not copied).

        A survivor of a lost process calls this before its engine and process group are torn down, and
        :meth:`import_state` on the engine it builds next; nothing is written to disk. Under bf16 or ZeRO-1 the
        wrapping optimizer's state is kept whole, fp32 master weights included, so a survivor continues
        bit-identically rather than from masters re-derived from its bf16 weights.
        """
        wrapped = self._optimizer_is_wrapped()
        return {
            "module": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict() if wrapped else self.basic_optimizer.state_dict(),
            "optimizer_wrapped": wrapped,
            "lr_scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None,
            "global_steps": self.global_steps, "global_samples": self.global_samples,
            "skipped_steps": self.skipped_steps, "stage_grad_norm": self._stage_grad_norm,
            "scheduled_lrs": self._scheduled_lrs, "lr_scale": self._lr_scale,
            "tied_authority": dict(self._tied_authority), "stage_id": self.stage_id,
        }

    def import_state(self, state: dict) -> None:
        """Continue from :meth:`export_state` of the previous engine of this rank."""
        if state["stage_id"] != self.stage_id:
            raise RecoveryError(f"state exported by stage {state['stage_id']} cannot be imported by stage "
                                f"{self.stage_id}; the rank-to-stage mapping changed between generations")
        if state["optimizer_wrapped"] != self._optimizer_is_wrapped():
            raise RecoveryError("the optimizer kind changed between generations (bf16/ZeRO wrapper on one side "
                                "only); build every generation's engine from the same DeepSpeed config")
        self.module.load_state_dict(state["module"])
        if state["optimizer_wrapped"]:
            # One data-parallel rank's state (DP = 1 under the supervisor); the fp32 masters are restored as saved.
            self.optimizer.load_state_dict([state["optimizer"]], load_optimizer_states=True,
                                           load_from_fp32_weights=True)
        else:
            self.basic_optimizer.load_state_dict(state["optimizer"])
        if state["lr_scheduler"] is not None and self.lr_scheduler is not None:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.global_steps, self.global_samples = state["global_steps"], state["global_samples"]
        self.skipped_steps = state["skipped_steps"]
        self._stage_grad_norm = state["stage_grad_norm"]
        self._scheduled_lrs, self._lr_scale = state["scheduled_lrs"], state["lr_scale"]
        self._tied_authority = dict(state["tied_authority"])

    def _optimizer_is_wrapped(self) -> bool:
        """bf16 and ZeRO wrap the torch optimizer and keep fp32 master weights of their own."""
        return bool(self.using_bf16_optimizer or self.zero_optimization())

    def fp32_master_partitions(self) -> List[torch.Tensor]:
        """The wrapping optimizer's flat fp32 master weights of this rank (empty without a wrapper)."""
        if self.using_bf16_optimizer:
            return list(self.optimizer.fp32_groups_flat_partition)
        if self.zero_optimization():
            return list(self.optimizer.single_partition_of_fp32_groups)
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
        optimizer's state, the LR schedule and the step counters are copied too, and the restored rank goes on
        exactly as its replica. Under bf16 or ZeRO
        every data-parallel rank holds only its own partition of the optimizer state: a restored rank's partition
        starts fresh, its fp32 masters taken from the copied weights.

        Returns:
            The event record on a restored rank; None elsewhere.
        """
        step = self.global_steps
        me = self.global_rank in restored
        prefix = identity(self.stage_id, self.global_rank, step)
        group = self.grid.get_data_parallel_group()
        wrapped = self._optimizer_is_wrapped()
        t0 = time.perf_counter()
        if me:
            logger.warning("%s state lost (%s); copying it from its data-parallel replica on rank %d", prefix,
                           cause, src)
            self.events.write("stage_lost", step=step, stage=self.stage_id, rank=self.global_rank, cause=cause,
                              lost_stages=[self.stage_id], replica_rank=src)
            self._wipe_stage()
        nbytes = broadcast_tensors(list(self.module.parameters()), src, group, receive=me)
        extra: List[Optional[dict]] = [None]
        if self.global_rank == src:
            topo = self.grid._topo
            # Everything the replica's progress consists of, so the restored rank is its clone: also when the
            # replica had already applied the interrupted step and replays it without applying it again.
            extra = [{"optimizer": None if wrapped else _to_cpu(self.basic_optimizer.state_dict()),
                      "stage_grad_norm": self.stage_grad_norm, "lr_scale": self._lr_scale,
                      "scheduled_lrs": self._scheduled_lrs, "lrs": [g["lr"] for g in self.basic_optimizer.param_groups],
                      "lr_scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None,
                      "global_steps": self.global_steps, "global_samples": self.global_samples,
                      "replayed_steps": self._replayed_steps,
                      # Tied-copy authorities name global ranks of src's column: sent as stages.
                      "tied_authority": {k: topo.get_coord(r).pipe for k, r in self._tied_authority.items()}}]
        dist.broadcast_object_list(extra, src=src, group=group)
        if not me:
            return None
        state = extra[0]
        if wrapped:
            self._reset_optimizer_state()
        else:
            self.basic_optimizer.load_state_dict(state["optimizer"])
        norm = state["stage_grad_norm"]
        self._stage_grad_norm = None if norm is None else torch.tensor(norm, device=self.device)
        self._tied_authority = {k: self.grid.stage_to_global(s) for k, s in state["tied_authority"].items()}
        if state["lr_scheduler"] is not None and self.lr_scheduler is not None:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self._scheduled_lrs, self._lr_scale = state["scheduled_lrs"], state["lr_scale"]
        for g, lr in zip(self.basic_optimizer.param_groups, state["lrs"]):
            g["lr"] = lr
        self.global_steps, self.global_samples = state["global_steps"], state["global_samples"]
        self._replayed_steps = state["replayed_steps"]
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

    def _die_during_rebuild_hook(self):
        """``failure_injection.kill_during_rebuild``: the first replacement of that stage dies mid-rebuild."""
        if (self.checkfree.failure_injection.kill_during_rebuild == self.stage_id
                and os.environ.get(INCARNATION_ENV) == "1"):
            def die(source_stage: int) -> None:
                logger.warning("%s killing this replacement after receiving stage %d (kill_during_rebuild)",
                               identity(self.stage_id, self.global_rank, self.global_steps), source_stage)
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
            random_seed=cf.seed + 7919 * step + self.stage_id, on_received=self._die_during_rebuild_hook(),
            timeout=self.p2p_timeout)
        for plan in plans:
            # A rebuilt holder of a replicated (de)embedding follows the copy it was rebuilt from from now on.
            if plan.strategy == "copy":
                for layer in self.stage_signatures[plan.target]:
                    if layer.tied_key is not None:
                        self._tied_authority[layer.tied_key] = self.grid.stage_to_global(plan.sources[0])
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
