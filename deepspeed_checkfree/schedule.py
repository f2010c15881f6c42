"""The CheckFree+ out-of-order micro-batch schedule, as a DeepSpeed ``PipeSchedule`` (pure: no process group).

Every odd micro-batch runs the first two and the last two stages in swapped order (route ``1,0,2,..,P-3,P-1,P-2``;
4 stages: ``1,0,3,2``), so autograd trains S_0/S_1 and S_{P-2}/S_{P-1} to be interchangeable (arXiv 2506.15461,
CheckFree+). Every rank walks the micro-batches in one global order, forwards first, then backwards (GPipe-style):
each send is posted in the same order as its matching receive, which keeps blocking (gloo) sends deadlock-free
even between stages that are not adjacent in the default order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple

from deepspeed.runtime.pipe.schedule import (BackwardPass, ForwardPass, LoadMicroBatch, OptimizerStep,
                                             PipeInstruction, PipeSchedule, RecvActivation, RecvGrad, ReduceGrads,
                                             ReduceTiedGrads, SendActivation, SendGrad)


def route(micro_batch_id: int, num_stages: int) -> Tuple[int, ...]:
    """The order in which the stages process ``micro_batch_id``: swapped edges on odd micro-batches."""
    if num_stages < 4:
        raise ValueError(f"CheckFree+ swaps the first two and the last two stages, so it needs num_stages >= 4; "
                         f"got num_stages={num_stages}")
    order = list(range(num_stages))
    if micro_batch_id % 2 == 1:
        order[0], order[1] = order[1], order[0]
        order[-1], order[-2] = order[-2], order[-1]
    return tuple(order)


def route_hops(num_stages: int) -> frozenset:
    """Every (sender, receiver) stage pair either route uses, in either direction (activations and gradients)."""
    hops = set()
    for mb in (0, 1):
        r = route(mb, num_stages)
        for a, b in zip(r, r[1:]):
            hops.update({(a, b), (b, a)})
    return frozenset(hops)


@dataclass(frozen=True)
class Role:
    """What a stage does for one micro-batch: its neighbours on that micro-batch's route, and whether it is first
    (embeds the tokens) or last (applies the head and computes the loss)."""

    prev_stage: Optional[int]
    next_stage: Optional[int]

    @property
    def is_first(self) -> bool:
        return self.prev_stage is None

    @property
    def is_last(self) -> bool:
        return self.next_stage is None


def role(stage_id: int, micro_batch_id: int, num_stages: int) -> Role:
    """The role of ``stage_id`` on ``micro_batch_id``'s route."""
    r = route(micro_batch_id, num_stages)
    pos = r.index(stage_id)
    return Role(r[pos - 1] if pos > 0 else None, r[pos + 1] if pos < num_stages - 1 else None)


def data_stages(num_stages: int) -> Tuple[int, ...]:
    """Stages that are first or last on some route, and so read inputs or labels: the two edge pairs."""
    return tuple(sorted({0, 1, num_stages - 2, num_stages - 1}))


class CheckFreePlusTrainSchedule(PipeSchedule):
    """Training schedule with CheckFree+ routes. ``buffer_id`` equals the micro-batch id, so the engine can look up
    each instruction's route with :func:`role`.

    Every stage that is first or last on some route loads every micro-batch (and discards the ones it does not
    use), so its data iterator stays aligned with the micro-batch ids.
    """

    def __init__(self, micro_batches: int, stages: int, stage_id: int) -> None:
        if micro_batches < 2:
            raise ValueError(f"CheckFree+ swaps every other micro-batch, so it needs gradient_accumulation_steps >= 2 "
                             f"(got {micro_batches}); with one micro-batch the replicas would get no gradient")
        route(0, stages)  # validates the depth
        super().__init__(micro_batches, stages, stage_id)

    def num_pipe_buffers(self) -> int:
        # Forwards of all micro-batches precede their backwards, so every micro-batch keeps its buffers.
        return self.micro_batches

    def steps(self) -> Iterator[List[PipeInstruction]]:
        loads = self.stage_id in data_stages(self.stages)
        for mb in range(self.micro_batches):
            r = role(self.stage_id, mb, self.stages)
            cmds: List[PipeInstruction] = []
            if loads:
                cmds.append(LoadMicroBatch(buffer_id=mb))
            if not r.is_first:
                cmds.append(RecvActivation(buffer_id=mb))
            cmds.append(ForwardPass(buffer_id=mb))
            if not r.is_last:
                cmds.append(SendActivation(buffer_id=mb))
            yield cmds
        for mb in range(self.micro_batches):
            r = role(self.stage_id, mb, self.stages)
            cmds = []
            if not r.is_last:
                cmds.append(RecvGrad(buffer_id=mb))
            cmds.append(BackwardPass(buffer_id=mb))
            if not r.is_first:
                cmds.append(SendGrad(buffer_id=mb))
            if mb == self.micro_batches - 1:
                cmds.extend([ReduceTiedGrads(), ReduceGrads(), OptimizerStep()])
            yield cmds
