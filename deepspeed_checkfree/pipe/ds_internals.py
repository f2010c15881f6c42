"""Every private DeepSpeed and torch.distributed (c10d) name this package relies on, in one place.

DeepSpeed 0.19.8 offers no hooks for what CheckFree changes (per-stage gradient norms, routed micro-batches, rebuilt
stages, re-formed process groups), so the engine reaches into internals. Nothing else in the package touches a
private DeepSpeed or c10d name: it calls the functions here. ``tests/unit/test_deepspeed_contract.py`` names each
entry and fails loudly if DeepSpeed or torch changes it; re-check that test before moving the DeepSpeed pin.
"""
from __future__ import annotations

from datetime import timedelta
from types import MethodType
from typing import Any, Callable, Dict, Iterable, List, Optional

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
from deepspeed.runtime.pipe import p2p
from deepspeed.runtime.pipe.engine import PipelineEngine
from deepspeed.runtime.pipe.module import PipelineModule

# --------------------------------------------------------------------------------------------------------------
# PipelineEngine: the private methods CheckFreeEngine overrides or calls, with the parameters it relies on.
# --------------------------------------------------------------------------------------------------------------

ENGINE_METHODS: Dict[str, tuple] = {
    "_exec_schedule": ("self", "pipe_schedule"),          # overridden: runs the CheckFree+ schedule with routes
    "_train_schedule": ("self",),                          # overridden: picks the CheckFree+ schedule
    "_exec_optimizer_step": ("self", "lr_kwargs"),         # overridden: records the stage's gradient norm
    "_exec_reduce_tied_grads": ("self",),                  # overridden: zero-fills unused tied gradients (CheckFree+)
    "_take_model_step": ("self", "lr_kwargs"),             # overridden: the LR boost around the scheduler step
    "_aggregate_total_loss": ("self",),                    # overridden: the loss lives on two ranks (CheckFree+)
    "_reserve_pipe_buffers": ("self", "num_buffers"),      # called
    "_scale_loss_by_gas": ("self", "prescaled_loss", "eval_micro_batches"),  # called
}
# PipelineEngine attributes the CheckFree+ routing reads and writes between instructions (the activation metadata and
# receive buffer per peer, the buffer slots, the losses of the two loss ranks) and the dispatch table.
ENGINE_ATTRIBUTES = ("first_output_send", "pipe_recv_buf", "_INSTRUCTION_MAP", "pipe_buffers", "fwd_outputs", "loss",
                     "total_loss", "dp_group_loss", "total_additional_losses", "agg_additional_losses")
# PipelineModule: CheckFreePlusPipelineModule overrides/calls these; stage_layers reads the layout attributes.
MODULE_METHODS: Dict[str, tuple] = {"_partition_layers": ("self", "method"), "_set_bounds": ("self", "start", "stop")}
MODULE_ATTRIBUTES = ("_local_start", "_local_stop", "_layer_specs", "_modules", "_topo")


def instruction_map(overrides: Dict[type, Callable]) -> Dict[type, Callable]:
    """DeepSpeed's instruction -> handler map with ``overrides``. ``_exec_schedule`` dispatches through this class
    attribute, which holds the *base class's* functions: a subclass's ``_exec_*`` override is called only if mapped."""
    return {**PipelineEngine._INSTRUCTION_MAP, **overrides}


def run_instruction(engine: PipelineEngine, cmd: Any) -> None:
    """Execute one schedule instruction on ``engine`` exactly as ``PipelineEngine._exec_schedule`` does."""
    MethodType(type(engine)._INSTRUCTION_MAP[type(cmd)], engine)(**cmd.kwargs)


def reserve_pipe_buffers(engine: PipelineEngine, num_buffers: int) -> None:
    engine._reserve_pipe_buffers(num_buffers)


def drop_outputs(engine: PipelineEngine, buffer_id: int) -> None:
    """Free the forward outputs (and with them the autograd graph) held in slot ``buffer_id``."""
    engine.pipe_buffers["outputs"][buffer_id] = None


def scale_loss_by_gas(engine: PipelineEngine, loss: torch.Tensor) -> torch.Tensor:
    return engine._scale_loss_by_gas(loss)


def set_meta_pending(engine: PipelineEngine, pending: bool) -> None:
    """Whether the next ``SendActivation`` also sends the tensor metadata (DeepSpeed sends it once per engine; with
    two routes a rank has two receivers, each needing it once)."""
    engine.first_output_send = pending


def recv_buffer(engine: PipelineEngine) -> Any:
    """The activation receive buffer DeepSpeed allocated from the sender's metadata."""
    return engine.pipe_recv_buf


def set_recv_buffer(engine: PipelineEngine, buffer: Any) -> None:
    engine.pipe_recv_buf = buffer


# --------------------------------------------------------------------------------------------------------------
# PipelineModule layout and the topology
# --------------------------------------------------------------------------------------------------------------


def local_layer_range(module: PipelineModule) -> range:
    """Indices of the layers this rank's stage holds."""
    return range(module._local_start, module._local_stop)


def layer_spec(module: PipelineModule, idx: int) -> Any:
    return module._layer_specs[idx]


def local_layer(module: PipelineModule, idx: int) -> Optional[torch.nn.Module]:
    """The built (non-tied) layer ``idx`` of this stage, or None if it is not a module of its own."""
    return module._modules.get(str(idx))


def tied_weight(module: PipelineModule, tied_module: torch.nn.Module, attr: str) -> torch.Tensor:
    """The weight ``attr`` (dotted) of a tied module, as DeepSpeed resolves it for its tied groups."""
    return PipelineModule._recursive_getattr(tied_module, attr)


def stage_of_rank(grid: Any, rank: int) -> int:
    """The pipeline stage of global ``rank`` in the engine's grid."""
    return grid._topo.get_coord(rank).pipe


def module_stage_id(module: PipelineModule) -> int:
    """This rank's stage, as a PipelineModule knows it while it partitions its layers."""
    return module._topo.get_coord(module.global_rank).pipe


def config_dict(config_class: Any) -> dict:
    """The raw DeepSpeed config dict behind a ``DeepSpeedConfig`` (it keeps extra sections such as "checkfree")."""
    return getattr(config_class, "_param_dict", None) or {}


# --------------------------------------------------------------------------------------------------------------
# Pipeline point-to-point (deepspeed.runtime.pipe.p2p)
# --------------------------------------------------------------------------------------------------------------


def allow_extra_hops(extra_hops: Callable[[int], Iterable[tuple]]) -> None:
    """DeepSpeed's p2p helpers assert that only adjacent stages talk. Also allow ``(src, dst)`` stage pairs in
    ``extra_hops(num_stages)`` (idempotent; the transport is a plain send on the world group either way)."""
    original = p2p._is_valid_send_recv
    if getattr(original, "checkfree_extra_hops", False):
        return

    def is_valid_send_recv(src_stage, dest_stage):
        if (src_stage, dest_stage) in extra_hops(p2p._grid.pipe_parallel_size):
            return
        original(src_stage, dest_stage)

    is_valid_send_recv.checkfree_extra_hops = True
    p2p._is_valid_send_recv = is_valid_send_recv


def install_timed_p2p(timeout: timedelta) -> None:
    """Make DeepSpeed's pipeline sends and receives give up after ``timeout`` (they otherwise wait for the group's
    creation-time timeout). The transport is unchanged: a point-to-point op on the world group."""

    def send(tensor, dest_stage, async_op=False):
        p2p._is_valid_send_recv(p2p._grid.get_stage_id(), dest_stage)
        work = dist.isend(tensor, p2p._grid.stage_to_global(stage_id=dest_stage))
        return work if async_op else work.wait(timeout)

    def recv(tensor, src_stage, async_op=False):
        p2p._is_valid_send_recv(src_stage, p2p._grid.get_stage_id())
        work = dist.irecv(tensor, p2p._grid.stage_to_global(stage_id=src_stage))
        return work if async_op else work.wait(timeout)

    p2p.send, p2p.recv = send, recv


# --------------------------------------------------------------------------------------------------------------
# Process-group timeouts (torch.distributed.distributed_c10d)
# --------------------------------------------------------------------------------------------------------------


def set_default_group_timeout(timeout: timedelta) -> None:
    """The timeout of groups created without one: DeepSpeed creates its pipeline, data-parallel and tied groups so."""
    c10d.default_pg_timeout = timeout
    c10d.default_pg_nccl_timeout = timeout


def set_every_group_timeout(timeout: timedelta) -> None:
    """Shorten (or lengthen) the timeout of every existing process group, the world group included."""
    for group in list(c10d._world.pg_map):
        c10d._set_pg_timeout(timeout, group)


# --------------------------------------------------------------------------------------------------------------
# Mixed-precision optimizers: BF16_Optimizer and ZeRO-1 (DeepSpeedZeroOptimizer)
# --------------------------------------------------------------------------------------------------------------


def bf16_hp_grads(module: torch.nn.Module) -> List[torch.Tensor]:
    """BF16_Optimizer accumulates each parameter's gradient in fp32 ``_hp_grad``; ``p.grad`` is not the step's."""
    return [g for p in module.parameters() if (g := getattr(p, "_hp_grad", None)) is not None]


def zero_reduced_grads(optimizer: Any) -> List[torch.Tensor]:
    """ZeRO-1 moves the reduced gradients into this data-parallel rank's partitions."""
    return [g for grads in optimizer.averaged_gradients.values() for g in grads if g is not None]


def bf16_fp32_partitions(optimizer: Any) -> List[torch.Tensor]:
    return list(optimizer.fp32_groups_flat_partition)


def zero_fp32_partitions(optimizer: Any) -> List[torch.Tensor]:
    return list(optimizer.single_partition_of_fp32_groups)
