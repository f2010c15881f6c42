"""The CheckFree+ out-of-order micro-batch schedule, as a DeepSpeed ``PipeSchedule`` (pure: no process group).

Every odd micro-batch runs the first two and the last two stages in swapped order (route ``1,0,2,..,P-3,P-1,P-2``;
4 stages: ``1,0,3,2``), so autograd trains S_0/S_1 and S_{P-2}/S_{P-1} to be interchangeable (arXiv 2506.15461,
CheckFree+). Forwards run before backwards (GPipe-style), micro-batches in pairs; every rank issues its sends and
receives in one global order, so each send is posted in the same order as its matching receive. That keeps
blocking (gloo) sends deadlock-free, also between stages that are not adjacent in the default order.
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


def _pair_program(stage_id: int, pair: Tuple[int, ...], num_stages: int, backward: bool) -> List[PipeInstruction]:
    """One rank's instructions for a pair of micro-batches (one normal, one swapped), forward or backward.

    Communication is issued in one global order (by hop position along the route, then micro-batch), so blocking
    sends pair up on both sides. Computation is placed greedily: a send whose data is ready goes first; otherwise a
    pass whose input is available runs now. The swapped pair then works concurrently (stage 0 embeds micro-batch
    2k while stage 1 embeds 2k+1, then they exchange) instead of waiting for each other.
    """
    Compute, Recv, Send = (BackwardPass, RecvGrad, SendGrad) if backward else (ForwardPass, RecvActivation,
                                                                               SendActivation)
    comms = []  # (key, kind, micro-batch)
    ready = []  # micro-batches whose input is already here (first on the route; last, going backward)
    for mb in pair:
        r = route(mb, num_stages)
        pos = r.index(stage_id)
        # Going backward the route is walked from its end: position counts from the last stage.
        hop_pos = num_stages - 1 - pos if backward else pos
        has_upstream = pos < num_stages - 1 if backward else pos > 0
        has_downstream = pos > 0 if backward else pos < num_stages - 1
        if has_upstream:
            comms.append(((hop_pos - 1, mb), "recv", mb))
        else:
            ready.append(mb)
        if has_downstream:
            comms.append(((hop_pos, mb), "send", mb))
    comms.sort()
    done: set = set()
    cmds: List[PipeInstruction] = []

    def run(mb: int) -> None:
        cmds.append(Compute(buffer_id=mb))
        done.add(mb)

    for _, kind, mb in comms:
        if kind == "send" and mb not in done:
            for other in [m for m in ready if m not in done and m != mb]:
                run(other)
            run(mb)
        elif kind == "recv":
            for other in [m for m in ready if m not in done]:
                run(other)
        cmds.append((Send if kind == "send" else Recv)(buffer_id=mb))
        if kind == "recv":
            ready.append(mb)
    for mb in ready:
        if mb not in done:
            run(mb)
    return cmds


class CheckFreePlusTrainSchedule(PipeSchedule):
    """Training schedule with CheckFree+ routes. ``buffer_id`` equals the micro-batch id, so the engine can look up
    each instruction's route with :func:`role`.

    All forwards run before all backwards, micro-batches in pairs (2k normal, 2k+1 swapped). Every stage that is
    first or last on some route loads every micro-batch (and discards the ones it does not use), so its data
    iterator stays aligned with the micro-batch ids.
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
        pairs = [tuple(range(k, min(k + 2, self.micro_batches))) for k in range(0, self.micro_batches, 2)]
        for pair in pairs:
            cmds: List[PipeInstruction] = [LoadMicroBatch(buffer_id=mb) for mb in pair] if loads else []
            yield cmds + _pair_program(self.stage_id, pair, self.stages, backward=False)
        for i, pair in enumerate(pairs):
            cmds = _pair_program(self.stage_id, pair, self.stages, backward=True)
            if i == len(pairs) - 1:
                cmds += [ReduceTiedGrads(), ReduceGrads(), OptimizerStep()]
            yield cmds
