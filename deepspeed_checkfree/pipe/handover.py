"""Handing one stage's exact state from one process to another: a rank that leaves on a preemption notice gives it
to the machine that replaces it, or parks it on a neighbour until one comes.

The state is everything the stage needs to go on as if nothing happened: its weights (CheckFree+ replicas
included: they are layers of the module), the optimizer's moments and step counts, the bf16/ZeRO wrapper's fp32
master weights, the LR schedule and boost, the step and sample counters and the CheckFree bookkeeping
(:class:`~.progress.StageProgress`). It moves over a world of two processes (the holder and the taker) with the
zero-copy transfers the data-parallel replica restore uses: the holder sends its own tensors, and a taker that has
an engine receives the weights straight into it. A parker, which has no engine of that stage, receives into host
memory (:class:`StageState` with tensors of its own) and sends from there later.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.distributed as dist

from .exchange import broadcast_state, broadcast_tensors
from .progress import StageProgress


@dataclass
class StageState:
    """A stage's exact state: its own tensors on the engine that has them, copies on a parker."""

    stage_id: int
    params: List[torch.Tensor]
    optimizer: dict           # the wrapping optimizer's state dict under bf16/ZeRO (fp32 masters included), else the
                              # torch optimizer's
    wrapped: bool
    progress: StageProgress

    @property
    def nbytes(self) -> int:
        """What holding it costs, in bytes (the weights and every tensor of the optimizer state)."""
        total = sum(t.numel() * t.element_size() for t in self.params)
        stack = [self.optimizer]
        while stack:
            value = stack.pop()
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
            elif isinstance(value, dict):
                stack.extend(value.values())
            elif isinstance(value, (list, tuple)):
                stack.extend(value)
        return total


def transfer(state: Optional[StageState], src: int, into: Optional[List[torch.Tensor]], device: torch.device
             ) -> Optional[StageState]:
    """Move a stage's state from rank ``src`` of the current two-process world to the other rank.

    Args:
        state: the state, on ``src`` (None on the other rank).
        src: the sending rank (0 or 1).
        into: on the receiving rank, the tensors to receive the weights into (its engine's parameters, in module
            order); None to allocate them on ``device`` (a parker).
        device: where received tensors are allocated (host memory on a parker over gloo).

    Returns:
        On the receiving rank, the state (its optimizer state and progress received, its weights in ``into`` or in
        new tensors); None on ``src``.
    """
    sending = dist.get_rank() == src
    header = [(state.stage_id, [(tuple(t.shape), t.dtype) for t in state.params], state.wrapped, state.progress)
              if sending else None]
    dist.broadcast_object_list(header, src=src)
    stage_id, specs, wrapped, progress = header[0]
    if sending:
        params = state.params
    elif into is not None:
        params = list(into)
        got = [(tuple(t.shape), t.dtype) for t in params]
        if got != specs:
            raise ValueError(f"the taker's stage {stage_id} has parameters {got[:3]}... but the holder sent "
                             f"{specs[:3]}...: both must build the same model from the same config")
    else:
        params = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in specs]
    broadcast_tensors(params, src, None, receive=not sending, device=device)
    optimizer, _ = broadcast_state(state.optimizer if sending else None, src, None, receive=not sending,
                                   device=device)
    if sending:
        return None
    return StageState(stage_id=stage_id, params=params, optimizer=optimizer, wrapped=wrapped, progress=progress)
