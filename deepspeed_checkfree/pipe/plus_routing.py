"""CheckFree+ inside the engine (:class:`PlusRouting`, mixed into ``CheckFreeEngine``): runs the route-aware 1F1B
schedule of :mod:`deepspeed_checkfree.core.schedule` with each micro-batch's route (odd ones swap the edge pairs),
marks the micro-batches the first pair recomputes (:mod:`deepspeed_checkfree.core.recompute`), aggregates the loss
and additional losses of the two loss ranks, gives every tied weight a gradient, and keeps a rebuilt (de)embedding
copy in step with the copy it was rebuilt from.
"""
from __future__ import annotations

import functools
from collections import OrderedDict
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from deepspeed.runtime.pipe import schedule
from deepspeed.runtime.pipe.engine import PipelineEngine
from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

from ..core import recompute as cf_recompute
from ..core import schedule as cf_schedule
from ..errors import ConfigError, UnsupportedSetupError
from . import ds_internals
from .plus_module import CheckFreePlusPipelineModule


def check_plus_setup(model, config_class) -> None:
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
        # Two ranks compute the loss (P-1 and P-2) and both must scale it by the same dynamic loss scale and skip
        # the same overflowed steps; DeepSpeed's CPU accelerator, where this plugin is verified, has no fp16, so
        # that agreement is untested and fp16 stays refused rather than silently trusted.
        raise UnsupportedSetupError(
            "checkfree.mode='checkfree_plus' runs in fp32 or bf16 (with or without ZeRO-1), not fp16: under "
            "CheckFree+ two ranks (stages P-2 and P-1) compute the loss, and fp16's dynamic loss scaling has not "
            "been verified to agree on both (DeepSpeed's CPU accelerator has no fp16 to test it). Use bf16 or fp32.")


@functools.lru_cache(maxsize=None)
def _route_hops(num_stages: int) -> frozenset:
    # CheckFree+ routes also link stages 0->2 and P-3->P-1 (and back, for gradients).
    return cf_schedule.route_hops(num_stages) if num_stages >= 4 else frozenset()


def allow_route_hops() -> None:
    """Let DeepSpeed's point-to-point helpers send along both CheckFree+ routes."""
    ds_internals.allow_extra_hops(_route_hops)


class PlusRouting:
    """The CheckFree+ part of the engine (a mixin over ``PipelineEngine``; inert when ``_plus`` is False).

    Its state: the route of the micro-batch being executed (``_role``), per-peer activation metadata and receive
    buffers (a rank has two peers per side), the losses kept between a micro-batch's forward and backward, and
    ``_tied_authority`` (tied key -> the stage whose copy a rebuilt copy follows), and ``_recompute_policy`` (the
    config's ``plus_recompute_edges``).
    """

    def _init_plus_routing(self, plus: bool, recompute_policy=False) -> None:
        self._plus = plus
        self._recompute_policy = recompute_policy
        self._role: Optional[cf_schedule.Role] = None
        self._mb_losses: Dict[int, torch.Tensor] = {}
        self._meta_sent_to: set = set()
        self._recv_bufs: Dict[int, object] = {}
        self._tied_authority: Dict[str, int] = {}

    def _reset_route_state(self) -> None:
        """Forget the per-peer transfer state (metadata sent, receive buffers) and a step's losses: after the
        process groups re-form, every peer may be a new process that needs the metadata again."""
        self._role = None
        self._mb_losses = {}
        self._meta_sent_to = set()
        self._recv_bufs = {}

    def is_first_stage(self):
        role = getattr(self, "_role", None)
        return self.stage_id == 0 if role is None else role.is_first

    def is_last_stage(self):
        role = getattr(self, "_role", None)
        return self.stage_id == self.num_stages - 1 if role is None else role.is_last

    def _train_schedule(self):
        if self._plus:
            return cf_schedule.CheckFreePlusTrainSchedule(self.micro_batches, self.num_stages, self.stage_id)
        return PipelineEngine._train_schedule(self)

    def _reads_data(self) -> bool:
        # Under CheckFree+ stages 1 and P-2 also read inputs or labels (on the swapped micro-batches).
        return self._plus and self.stage_id in cf_schedule.data_stages(self.num_stages)

    def set_dataloader(self, loader):
        if self._reads_data():
            self.training_dataloader = loader
            self.data_iterator = iter(self.training_dataloader)
        else:
            PipelineEngine.set_dataloader(self, loader)

    def set_dataiterator(self, iterator):
        if self._reads_data():
            self.training_dataloader = None
            self.data_iterator = iterator
        else:
            PipelineEngine.set_dataiterator(self, iterator)

    def _enter_role(self, role: Optional[cf_schedule.Role], recompute: bool = False) -> None:
        """Make the base handlers see this micro-batch's route: neighbours, first/last, and the edge layers' gate;
        and tell the module whether this micro-batch's forward is recomputed in its backward."""
        self._role = role
        self.prev_stage = self.stage_id - 1 if role is None or role.prev_stage is None else role.prev_stage
        self.next_stage = self.stage_id + 1 if role is None or role.next_stage is None else role.next_stage
        gate = self.module.checkfree_role
        gate.first, gate.last = self.is_first_stage(), self.is_last_stage()
        gate.recompute = recompute

    def recomputed_micro_batches(self) -> frozenset:
        """The micro-batches whose forward this stage runs again in their backward, in a training step."""
        if not self._plus:
            return frozenset()
        return cf_recompute.recomputed_micro_batches(self.stage_id, self.num_stages, self.micro_batches,
                                                     self._recompute_policy)

    def _exec_schedule(self, pipe_schedule):
        if not isinstance(pipe_schedule, cf_schedule.CheckFreePlusTrainSchedule):
            return PipelineEngine._exec_schedule(self, pipe_schedule)
        ds_internals.reserve_pipe_buffers(self, pipe_schedule.num_pipe_buffers())
        self.fwd_outputs = []
        self._mb_losses = {}
        recomputed = self.recomputed_micro_batches()
        try:
            for step_cmds in pipe_schedule:
                for cmd in step_cmds:
                    mb = getattr(cmd, "micro_batch_id", None)
                    if mb is not None:
                        self._enter_role(cf_schedule.role(self.stage_id, mb, self.num_stages), mb in recomputed)
                    self._exec_routed(cmd, mb)
        finally:
            self._enter_role(None)

    def _exec_routed(self, cmd, mb: Optional[int]) -> None:
        kind = type(cmd)
        # Tensor metadata goes once per (sender, receiver) pair; with two routes a rank has two peers per side.
        if kind is schedule.SendActivation:
            ds_internals.set_meta_pending(self, self.next_stage not in self._meta_sent_to)
        elif kind is schedule.RecvActivation:
            ds_internals.set_recv_buffer(self, self._recv_bufs.get(self.prev_stage))
        elif kind is schedule.BackwardPass and self._role.is_last:
            # A micro-batch's loss is kept from its forward to its backward (other passes run in between).
            self.loss = self._mb_losses.pop(mb)
        # DeepSpeed's handlers take only ``buffer_id`` (a reused slot); the route came from ``micro_batch_id``.
        ds_internals.run_instruction(self, cmd if mb is None else kind(cmd.buffer_id))
        if kind is schedule.SendActivation:
            self._meta_sent_to.add(self.next_stage)
        elif kind is schedule.RecvActivation:
            self._recv_bufs[self.prev_stage] = ds_internals.recv_buffer(self)
        elif kind is schedule.ForwardPass and self._role.is_last:
            self._mb_losses[mb] = self.loss
        elif kind is schedule.BackwardPass and self._role.is_last:
            # DeepSpeed frees a pass's outputs after its backward except where the loss is computed; here that
            # slot is reused by another micro-batch, so drop the head's outputs now instead of at the overwrite.
            ds_internals.drop_outputs(self, cmd.buffer_id)

    def _additional_loss_names(self) -> List[str]:
        # The loss ranks accumulated them during the forwards; the others ask their module, exactly as the stock
        # engine's non-last stages do to size the broadcast.
        source = self.total_additional_losses or self.module.get_additional_losses() or {}
        return list(source.keys())

    def _aggregate_total_loss(self):
        if not self._plus:
            return PipelineEngine._aggregate_total_loss(self)
        # The loss is computed on two ranks (P-1 on even micro-batches, P-2 on odd): sum their partial totals over
        # the pipeline, then scale by the accumulation steps and average over data parallelism, as the stock engine
        # does with its one loss rank. The count of additional losses (and its square: all ranks agree exactly when
        # sum(n^2) * ranks == sum(n)^2) travels along, so a mismatch fails on every rank instead of hanging.
        pipe_group = self.grid.get_pipe_parallel_group()
        names = self._additional_loss_names()
        partial = self.total_additional_losses or {}
        not_scalar = [name for name, value in partial.items() if value.numel() != 1]
        # [loss total, n, n^2, non-scalar additional losses]: every rank decides on the same reduced numbers.
        summary = torch.zeros(4, dtype=torch.float32, device=self.device)
        if self.total_loss is not None:
            summary[0] = self.total_loss.detach().float()
        summary[1], summary[2], summary[3] = len(names), len(names) ** 2, len(not_scalar)
        dist.all_reduce(summary, group=pipe_group)
        ranks = dist.get_world_size(group=pipe_group)
        total_n, total_n2, total_bad = (int(v) for v in summary[1:].tolist())
        if total_n2 * ranks != total_n ** 2:
            raise UnsupportedSetupError(
                f"get_additional_losses() of the model must return the same loss names on every pipeline stage "
                f"(the stock engine relies on it too): stage {self.stage_id} has {names}, but the stages disagree "
                f"on how many there are (sum {total_n} over {ranks} stages). Return the same keys everywhere "
                f"(with zeros where a stage computes none).")
        if total_bad:
            raise UnsupportedSetupError(
                f"get_additional_losses() must return scalar tensors (the stock engine reduces them as scalars "
                f"too); {total_bad} are not" + (f", here {not_scalar}" if not_scalar else " on another stage"))
        extra = torch.zeros(len(names), dtype=torch.float32, device=self.device)
        if names:
            for i, name in enumerate(names):
                if name in partial:
                    extra[i] = partial[name].detach().float().reshape(())
            dist.all_reduce(extra, group=pipe_group)
        scaled = ds_internals.scale_loss_by_gas(self, torch.cat([summary[:1], extra]))
        self.dp_group_loss = scaled[0].clone()
        if self.is_data_parallel:
            dist.all_reduce(scaled, group=self.grid.get_data_parallel_group())
            scaled /= self.dp_world_size
        self.agg_additional_losses = (OrderedDict((name, scaled[1 + i].clone()) for i, name in enumerate(names))
                                      if names else None)
        return scaled[0].clone()

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

    def follow_tied_copy(self, tied_key: str, stage: int) -> None:
        """From now on, the copies of ``tied_key`` follow the copy on ``stage`` after every step."""
        self._tied_authority[tied_key] = stage

    def _sync_tied_copies(self) -> None:
        """After an edge stage was rebuilt, its (de)embedding copy has a fresh optimizer and a boosted LR while
        the surviving copy has neither; broadcasting the survivor's values after every step keeps the copies
        bit-identical (one broadcast per replicated tensor, like DeepSpeed's own tied-gradient all-reduce).
        Under bf16 or ZeRO the optimizer's fp32 master copy of the weight is broadcast too, or the next step
        would start from the copy's own masters again."""
        wrapped = self.optimizer_is_wrapped()
        with torch.no_grad():
            for key, comm in self.module.tied_comms.items():
                stage = self._tied_authority.get(key)
                if stage is None:
                    continue
                src = self.grid.stage_to_global(stage)
                for attr in comm["weight_attr"]:
                    weight = ds_internals.tied_weight(self.module, comm["module"], attr)
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
