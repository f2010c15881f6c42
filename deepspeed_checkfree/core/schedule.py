"""The CheckFree+ schedule as a DeepSpeed ``PipeSchedule`` (pure: no process group). Odd micro-batches swap the
first two and the last two stages (route ``1,0,2,..,P-3,P-1,P-2``; arXiv 2506.15461, CheckFree+). It is a
route-aware 1F1B: each stage holds the activations of at most :func:`max_in_flight` micro-batches, and every rank
issues its sends and receives in one global order, so blocking (gloo) sends cannot deadlock and pair up in order on
every link, the extra hops 0->2 and P-3->P-1 included."""
from __future__ import annotations

import functools
from collections import defaultdict
from dataclasses import dataclass
from types import MappingProxyType
from typing import Dict, Iterator, List, Mapping, Optional, Tuple

from deepspeed.runtime.pipe.schedule import (BackwardPass, ForwardPass, LoadMicroBatch, OptimizerStep,
                                             PipeInstruction, PipeSchedule, RecvActivation, RecvGrad, ReduceGrads,
                                             ReduceTiedGrads, SendActivation, SendGrad)

FORWARD, BACKWARD = "forward", "backward"
Pass = Tuple[str, int, int]  # (FORWARD or BACKWARD, micro_batch_id, position on the micro-batch's route)


def route(micro_batch_id: int, num_stages: int) -> Tuple[int, ...]:
    """The order in which the stages process ``micro_batch_id``: swapped edges on odd micro-batches."""
    if num_stages < 4:
        raise ValueError(f"CheckFree+ swaps the first two and the last two stages, so it needs num_stages >= 4; "
                         f"got num_stages={num_stages}")
    return _route(micro_batch_id % 2, num_stages)


@functools.lru_cache(maxsize=None)
def _route(parity: int, num_stages: int) -> Tuple[int, ...]:
    order = list(range(num_stages))
    if parity == 1:
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
    return _role(stage_id, micro_batch_id % 2, num_stages)


@functools.lru_cache(maxsize=None)
def _role(stage_id: int, parity: int, num_stages: int) -> Role:
    r = route(parity, num_stages)
    pos = r.index(stage_id)
    return Role(r[pos - 1] if pos > 0 else None, r[pos + 1] if pos < num_stages - 1 else None)


def data_stages(num_stages: int) -> Tuple[int, ...]:
    """Stages that are first or last on some route, and so read inputs or labels: the two edge pairs."""
    return tuple(sorted({0, 1, num_stages - 2, num_stages - 1}))


# ----------------------------------------------------------------------------------------------------------------
# When each pass runs: a plan on clocks, a forward taking one and a backward two (backward ~ 2x forward)
# ----------------------------------------------------------------------------------------------------------------

DURATION = {FORWARD: 1, BACKWARD: 2}
PERIOD = 6  # clocks per pair of micro-batches: each stage runs two forwards and two backwards in it


def _period_offsets(num_stages: int) -> Tuple[Tuple[List[int], List[int]], Tuple[List[int], List[int]]]:
    """Start offsets of every pass of one pair of micro-batches (2j normal, 2j+1 swapped): pair j starts the
    forward at route position p of its parity-q micro-batch at clock ``6j + fwd[q][p]``, the backward at
    ``6j + bwd[q][p]``.

    In the steady state a stage is busy all six clocks of a period, so the four passes that land on one stage must
    tile them modulo 6. DeepSpeed's 1F1B (forward of micro-batch m at position p at ``3m + p``, backward at
    ``3m + C - 2p`` with C = 3P - 2) tiles them everywhere but on the edge pairs, where a stage holds a different
    position on even and odd micro-batches. The offsets below (found by an exhaustive search over shifts of the
    edge pairs, ``tests/unit/test_schedule_deadlock.py`` checks every depth) keep 1F1B in the middle with
    C = 3P + 4 and the odd micro-batch's backward three clocks before the even one's; the two micro-batches of a
    pair cross each edge pair side by side (stage P-2 runs one while P-1 runs the other), and every message has a
    clock between its production and its consumption where both ends are between passes, so a blocking send never
    waits for a pass to end. P = 4, where the odd route moves every stage, runs both micro-batches of a pair at once;
    P = 5 has its own table (see :func:`max_in_flight`).
    """
    P = num_stages
    if P == 4:
        return ([0, 1, 2, 3], [0, 1, 2, 3]), ([10, 8, 6, 4], [10, 8, 6, 4])
    if P == 5:
        # One middle stage: it takes the two micro-batches of a pair on adjacent clocks, so neither edge pair
        # needs the three-clock shift (found by the same search; W = 6 on the first pair instead of P + 2 = 7).
        return ([0, 1, 2, 4, 5], [0, 1, 3, 4, 5]), ([16, 14, 10, 8, 6], [16, 14, 12, 8, 6])
    C = 3 * P + 4
    fwd0 = list(range(P - 2)) + [P + 1, P + 2]
    fwd1 = [0, 1] + [p + 3 for p in range(2, P - 2)] + [P + 1, P + 2]
    bwd0 = [C, C - 2] + [C - 2 * p for p in range(2, P - 2)] + [P + 5, P + 3]
    bwd1 = [C, C - 2] + [C - 2 * p - 3 for p in range(2, P - 2)] + [P + 5, P + 3]
    if P % 2 == 1:
        # C is odd here, which shifts the middle's tiling by three against the first pair: stage 1 waits three
        # clocks for the even gradient and the odd micro-batch's first pair runs three clocks earlier.
        bwd0[0], bwd0[1] = C + 3, C + 1
        bwd1[0], bwd1[1] = C - 3, C - 5
    return (fwd0, fwd1), (bwd0, bwd1)


@functools.lru_cache(maxsize=32)
def pass_clocks(micro_batches: int, num_stages: int) -> Mapping[Pass, int]:
    """The start clock of every pass of one step: ``(FORWARD|BACKWARD, micro_batch_id, route position) -> clock``.

    Pair j's passes start at the periodic offsets of :func:`_period_offsets`. In the drain, where no later pair
    competes for a stage, a backward moves to the earliest clocks that are free once its gradient is there (the
    steady state has none free, so only the drain changes). Forwards keep their clocks: moving one earlier would
    hold its activations longer.
    """
    P = num_stages
    fwd, bwd = _period_offsets(P)
    periodic: Dict[Pass, int] = {}
    for mb in range(micro_batches):
        j, q = divmod(mb, 2)
        for p in range(P):
            periodic[(FORWARD, mb, p)] = PERIOD * j + fwd[q][p]
            periodic[(BACKWARD, mb, p)] = PERIOD * j + bwd[q][p]
    clocks: Dict[Pass, int] = {}
    busy: Dict[int, set] = defaultdict(set)  # stage -> occupied clocks
    # In start order, so a pass's input is placed before it; a pass only moves earlier, onto clocks free then,
    # and its own clocks are still free (any pass placed before it started no later).
    for key in sorted(periodic, key=lambda k: (periodic[k], k)):
        kind, mb, p = key
        stage = route(mb, P)[p]
        span = range(DURATION[kind])
        t = periodic[key]
        if kind == BACKWARD:
            t = (clocks[(FORWARD, mb, p)] + DURATION[FORWARD] if p == P - 1
                 else clocks[(BACKWARD, mb, p + 1)] + DURATION[BACKWARD])
            while any(t + i in busy[stage] for i in span) and t < periodic[key]:
                t += 1
        assert not any(t + i in busy[stage] for i in span), (P, micro_batches, key, t)
        busy[stage].update(t + i for i in span)
        clocks[key] = t
    return MappingProxyType(clocks)


def max_in_flight(stage_id: int, num_stages: int, micro_batches: int) -> int:
    """The most micro-batches whose activations ``stage_id`` holds at once (forward done, backward not yet), exactly.

    ``min(micro_batches, W)`` with W, for P = ``num_stages`` (DeepSpeed's 1F1B holds ``P - s``):

    ====================  =======  =======  ==========
    stage                 P = 4    P = 5    P >= 6
    ====================  =======  =======  ==========
    0 and 1               4        6        P + 2
    2 <= s <= P - 3       -        4        P - s + 1
    P - 2 and P - 1       2        2        2
    ====================  =======  =======  ==========

    One exception: for an odd P >= 7 with exactly P + 2 micro-batches the first pair holds P + 1 (the drain
    starts before the last forward would need the slot). ``tests/unit/test_schedule_deadlock.py`` checks the value
    exactly for every P 4..16 and micro-batch count 2..64.

    Why the first pair holds P + 2 for P >= 6, and why no schedule of this kind holds less (derived by exhaustive
    search, ``tests/unit/test_schedule_bound.py``): in a steady state at 1F1B's throughput every stage is busy all
    six clocks of a pair, so each stage's four passes tile them. A middle stage can do so without waiting only if
    micro-batches reach it every three clocks (its tiling must survive the three-clock shift between neighbours),
    while each edge pair runs both positions; moving between the two costs waits, at least six clocks per pair of
    micro-batches at the last pair alone, and every such wait lengthens the lifetime of that micro-batch on stages
    0 and 1. Over all period-6 plans the fewest total waits is 12 and the smallest ``max(W_0, W_1)`` is P + 2
    (plans with W_0 = P + 1 exist, but then W_1 = P + 2). Only P = 5, whose single middle stage may take a pair on
    adjacent clocks, gets P + 1 (P = 4 has no middle: P).
    """
    P, s = num_stages, stage_id
    if P == 4:
        bound = (4, 4, 2, 2)[s]
    elif P == 5:
        bound = (6, 6, 4, 2, 2)[s]
    elif s in (0, 1):
        bound = P + 1 if (P % 2 == 1 and micro_batches == P + 2) else P + 2
    elif s <= P - 3:
        bound = P - s + 1
    else:
        bound = 2
    return min(micro_batches, bound)


# ----------------------------------------------------------------------------------------------------------------
# One stage's instruction stream
# ----------------------------------------------------------------------------------------------------------------

Message = Tuple[int, int, int, str, int]  # (clock, receiver, sender, "activation"|"grad", micro_batch_id)


@functools.lru_cache(maxsize=32)
def messages(micro_batches: int, num_stages: int) -> Tuple[Message, ...]:
    """Every message of the step, in the one order every rank issues its own: by clock, then receiver, sender,
    kind and micro-batch.

    A message's clock is the latest one between its production and its consumption at which neither end is inside
    a pass (the plan of :func:`_period_offsets` always has one), so neither end waits for the other's pass. Since
    every rank issues its messages in this one global order, the earliest unfinished message always has both ends
    waiting on it: blocking sends cannot deadlock, and each link carries its messages in the same order on both
    ends.
    """
    P = num_stages
    clocks = pass_clocks(micro_batches, P)
    inside: Dict[int, set] = defaultdict(set)  # stage -> clocks strictly inside one of its passes
    for (kind, mb, p), t in clocks.items():
        inside[route(mb, P)[p]].update(t + i for i in range(1, DURATION[kind]))
    out = []
    for (kind, mb, p), consumed in clocks.items():
        r = route(mb, P)
        if kind == FORWARD and p > 0:
            sender, what, produced = r[p - 1], "activation", clocks[(FORWARD, mb, p - 1)] + DURATION[FORWARD]
        elif kind == BACKWARD and p < P - 1:
            sender, what, produced = r[p + 1], "grad", clocks[(BACKWARD, mb, p + 1)] + DURATION[BACKWARD]
        else:
            continue
        receiver = r[p]
        free = [t for t in range(consumed, produced - 1, -1) if t not in inside[sender] and t not in inside[receiver]]
        # Without a common free clock (never in the plan) the consumer's start is still a valid order.
        out.append((free[0] if free else consumed, receiver, sender, what, mb))
    return tuple(sorted(out))


Spec = Tuple[type, Optional[int], int]  # (instruction class, buffer_id, micro_batch_id)


@functools.lru_cache(maxsize=64)
def stage_program(stage_id: int, micro_batches: int, num_stages: int) -> Tuple[Tuple[Tuple[Spec, ...], ...], int]:
    """``stage_id``'s instructions as ``(class, buffer_id, micro_batch_id)``, one tuple per pass (with the messages
    before it; the reductions and the optimizer step follow the last tuple), and the number of buffers they use.

    Buffers (``buffer_id``) are slots, reused: a micro-batch takes the lowest free one at its first instruction on
    this stage and gives it back after its last (its ``SendGrad``, or its backward on the stage where it is first).
    Data stages read every micro-batch in order (``LoadMicroBatch``, ``buffer_id=None`` where the stage neither
    embeds it nor computes its loss), so their data iterators stay aligned with the micro-batch ids.
    """
    P, M = num_stages, micro_batches
    events = [((t, 0, receiver, sender, what, mb), (what, mb, stage_id == receiver))
              for t, receiver, sender, what, mb in messages(M, P) if stage_id in (receiver, sender)]
    events += [((t, 1), (kind, mb, None)) for (kind, mb, p), t in pass_clocks(M, P).items()
               if route(mb, P)[p] == stage_id]
    reads_data = stage_id in data_stages(P)
    slot_of: Dict[int, int] = {}
    free: List[int] = []
    used = 0
    next_load = 0
    program: List[Tuple[Spec, ...]] = []
    cmds: List[Spec] = []

    def take(mb: int) -> int:
        nonlocal used
        if mb not in slot_of:
            free.sort()
            slot_of[mb] = free.pop(0) if free else used
            used = max(used, slot_of[mb] + 1)
        return slot_of[mb]

    def loads_through(mb: int) -> None:
        nonlocal next_load
        while next_load <= mb:
            r = role(stage_id, next_load, P)
            cmds.append((LoadMicroBatch, take(next_load) if (r.is_first or r.is_last) else None, next_load))
            next_load += 1

    for _, (what, mb, receiving) in sorted(events, key=lambda e: e[0]):
        if what == "activation":
            cmds.append((RecvActivation, take(mb), mb) if receiving else (SendActivation, slot_of[mb], mb))
        elif what == "grad":
            cmds.append((RecvGrad, slot_of[mb], mb) if receiving else (SendGrad, slot_of[mb], mb))
            if not receiving:
                free.append(slot_of.pop(mb))
        else:
            r = role(stage_id, mb, P)
            if what == FORWARD:
                if reads_data and (r.is_first or r.is_last):
                    loads_through(mb)
                cmds.append((ForwardPass, take(mb), mb))
            else:
                cmds.append((BackwardPass, slot_of[mb], mb))
                if r.is_first:
                    free.append(slot_of.pop(mb))
            program.append(tuple(cmds))
            cmds = []
    if reads_data:
        loads_through(M - 1)
    program.append(tuple(cmds))
    assert not slot_of, f"stage {stage_id} still holds buffers of micro-batches {sorted(slot_of)}"
    return tuple(program), max(used, 1)


class CheckFreePlusTrainSchedule(PipeSchedule):
    """Training schedule with CheckFree+ routes, in DeepSpeed's 1F1B memory class.

    Stage s holds the activations of at most :func:`max_in_flight` micro-batches whatever the micro-batch count
    (exactly ``min(M, W)``: W = P + 2 on stages 0 and 1, P - s + 1 in the middle, 2 on the last pair for P >= 6;
    P = 4: 4, 4, 2, 2; P = 5: 6, 6, 4, 2, 2; DeepSpeed's 1F1B: P - s; the first pair's P + 2 is the least any
    period-6 plan at 1F1B's throughput achieves) and uses :meth:`num_pipe_buffers` buffers, at most one more (where
    a gradient waits to be sent). On the plan's clocks a step takes at most four clocks more than DeepSpeed's
    ``3 (M + P - 1)`` (none for P = 4 and 5); run with blocking sends on an ideal pipeline it takes as long as 1F1B
    for P = 5 and every even P, a few percent more for an odd P >= 7 (``tests/unit/test_schedule_timing.py``). ``buffer_id`` is a slot; ``micro_batch_id`` names the
    micro-batch, whose route the engine looks up with :func:`role`.
    """

    def __init__(self, micro_batches: int, stages: int, stage_id: int) -> None:
        if micro_batches < 2:
            raise ValueError(f"CheckFree+ swaps every other micro-batch, so it needs gradient_accumulation_steps >= 2 "
                             f"(got {micro_batches}); with one micro-batch the replicas would get no gradient")
        route(0, stages)  # validates the depth
        super().__init__(micro_batches, stages, stage_id)

    def num_pipe_buffers(self) -> int:
        return stage_program(self.stage_id, self.micro_batches, self.stages)[1]

    def steps(self) -> Iterator[List[PipeInstruction]]:
        program = stage_program(self.stage_id, self.micro_batches, self.stages)[0]
        for i, specs in enumerate(program):
            # Fresh instructions every step: the program is cached, DeepSpeed's instructions are mutable.
            cmds = [cls(buffer_id, micro_batch_id=mb) for cls, buffer_id, mb in specs]
            if i == len(program) - 1:
                cmds += [ReduceTiedGrads(), ReduceGrads(), OptimizerStep()]
            yield cmds
