"""Per-stage gradient norms: the paper weighs a rebuild by each neighbour's own gradient norm, which DeepSpeed does
not provide (its fp32 "global" clip norm is stage 0's only). Measured in the ``OptimizerStep`` instruction, after the
data-parallel and tied-gradient reductions and before clipping.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist

from ..core.recovery import clip_stage_grads_
from . import ds_internals


def stage_gradients(engine) -> List[torch.Tensor]:
    """The tensors that hold this stage's accumulated, data-parallel-averaged gradient at ``OptimizerStep``."""
    if engine.using_bf16_optimizer:
        return ds_internals.bf16_hp_grads(engine.module)
    if engine.zero_optimization():
        return ds_internals.zero_reduced_grads(engine.optimizer)
    return [p.grad for p in engine.module.parameters() if p.grad is not None]


def measure_stage_grad_norm(grads: List[torch.Tensor], device: torch.device,
                            partition_group: Optional[dist.ProcessGroup] = None,
                            max_norm: Optional[float] = None) -> torch.Tensor:
    """The L2 norm of a stage's gradient, as a device tensor (reading it would synchronise the device every step).

    Args:
        grads: the stage's gradient tensors (see :func:`stage_gradients`).
        device: where the zero norm of a stage without gradients lives.
        partition_group: when ``grads`` is this rank's partition of the stage (ZeRO), the data-parallel group whose
            partitions make up the whole.
        max_norm: ``per_stage_clip``: clip ``grads`` in place to this norm first and return the clipped norm.
    """
    if not grads:
        return torch.zeros((), device=device)
    if all(g.dtype in (torch.float32, torch.float64) for g in grads):
        norm = torch.nn.utils.get_total_norm(grads, 2.0)
    else:
        # DeepSpeed 0.19.8 accumulates bf16 gradients in bf16 by default: measure each tensor's norm in fp32 (one
        # tensor converted at a time, never a second copy of the whole gradient), so the norm is not rounded to bf16.
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, 2.0, dtype=torch.float32)
                                                     for g in grads]), 2.0)
    if partition_group is not None:
        sq = norm.float() ** 2
        dist.all_reduce(sq, group=partition_group)
        norm = sq.sqrt()
    if max_norm is not None:
        norm = clip_stage_grads_(grads, norm, max_norm)
    return norm.detach()
