"""Step time of the CheckFree+ schedule against DeepSpeed's 1F1B on a simulated pipeline: every rank on its own
core, a backward taking twice a forward, blocking sends (a send and its receive complete together), each rank
running its instructions in order. The bubble must be no worse than 1F1B's (odd depths: a few percent)."""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import pytest
from deepspeed.runtime.pipe.schedule import (BackwardPass, ForwardPass, RecvActivation, RecvGrad, SendActivation,
                                             SendGrad, TrainSchedule)

from deepspeed_checkfree.core.schedule import CheckFreePlusTrainSchedule, role

Program = List[Tuple[object, Optional[int]]]  # (instruction, peer stage of a message)


def stock_programs(stages: int, mbs: int) -> Dict[int, Program]:
    out = {}
    for s in range(stages):
        cmds = [c for step in TrainSchedule(mbs, stages, s).steps() for c in step]
        out[s] = [(c, s - 1 if isinstance(c, (RecvActivation, SendGrad)) else s + 1) for c in cmds]
    return out


def plus_programs(stages: int, mbs: int) -> Dict[int, Program]:
    out = {}
    for s in range(stages):
        prog = []
        for c in [c for step in CheckFreePlusTrainSchedule(mbs, stages, s).steps() for c in step]:
            mb = getattr(c, "micro_batch_id", None)
            r = role(s, mb, stages) if mb is not None else None
            peer = r.prev_stage if isinstance(c, (RecvActivation, SendGrad)) else \
                r.next_stage if isinstance(c, (SendActivation, RecvGrad)) else None
            prog.append((c, peer))
        out[s] = prog
    return out


def step_time(progs: Dict[int, Program], duration: Callable[[int, object], float]) -> float:
    """When the last rank finishes, each rank starting at 0 and a message happening when both ends reach it."""
    pc = {s: 0 for s in progs}
    now = {s: 0.0 for s in progs}
    messages = (SendActivation, RecvActivation, SendGrad, RecvGrad)
    while any(pc[s] < len(progs[s]) for s in progs):
        progressed = False
        for s in progs:
            while pc[s] < len(progs[s]) and not isinstance(progs[s][pc[s]][0], messages):
                now[s] += duration(s, progs[s][pc[s]][0])
                pc[s] += 1
                progressed = True
        for s in progs:
            if pc[s] >= len(progs[s]) or not isinstance(progs[s][pc[s]][0], (SendActivation, SendGrad)):
                continue
            peer = progs[s][pc[s]][1]
            if pc[peer] < len(progs[peer]) and isinstance(progs[peer][pc[peer]][0], (RecvActivation, RecvGrad)) \
                    and progs[peer][pc[peer]][1] == s:
                now[s] = now[peer] = max(now[s], now[peer])
                pc[s] += 1
                pc[peer] += 1
                progressed = True
        assert progressed, "deadlock"
    return max(now.values())


def passes(forward: float = 1.0, backward: float = 2.0, head: float = 0.0, plus: bool = False, stages: int = 0):
    """Pass durations: ``head`` extra where the stage computes the loss (the LM head and the loss)."""
    def duration(s: int, cmd) -> float:
        if not isinstance(cmd, (ForwardPass, BackwardPass)):
            return 0.0
        last = role(s, cmd.micro_batch_id, stages).is_last if plus else s == stages - 1
        base = forward if isinstance(cmd, ForwardPass) else backward
        return base * (1 + (head if last else 0.0))
    return duration


@pytest.mark.parametrize("stages", [4, 5, 6, 7, 8, 12])
@pytest.mark.parametrize("mbs", [8, 32])
def test_step_time_is_that_of_1f1b_on_an_ideal_pipeline(stages, mbs):
    stock = step_time(stock_programs(stages, mbs), passes(stages=stages))
    plus = step_time(plus_programs(stages, mbs), passes(plus=True, stages=stages))
    # Even depths and 5 tie 1F1B exactly (4 stages beat it); at an odd depth >= 7 the first pair waits three clocks
    # per pair for a gradient, which the drain does not fully hide.
    assert plus / stock <= (1.0 + 1e-9 if stages % 2 == 0 or stages == 5 else 1.06), plus / stock


@pytest.mark.parametrize("stages", [4, 5, 6, 8])
def test_splitting_the_loss_over_two_ranks_beats_1f1b_when_the_head_costs(stages):
    """Under CheckFree+ the head runs on P-2 and P-1 in turn, so its cost no longer all lands on one stage."""
    stock = step_time(stock_programs(stages, 32), passes(head=0.15, stages=stages))
    plus = step_time(plus_programs(stages, 32), passes(head=0.15, plus=True, stages=stages))
    assert plus < stock


def recomputing(stages: int, mbs: int, policy) -> Callable[[int, object], float]:
    """Forward 1, backward 2, plus a forward in the backward of every micro-batch a stage recomputes."""
    from deepspeed_checkfree.core.recompute import recomputed_micro_batches
    planned = {s: recomputed_micro_batches(s, stages, mbs, policy) for s in range(stages)}

    def duration(s: int, cmd) -> float:
        if isinstance(cmd, ForwardPass):
            return 1.0
        if isinstance(cmd, BackwardPass):
            return 3.0 if cmd.micro_batch_id in planned[s] else 2.0
        return 0.0
    return duration


@pytest.mark.parametrize("stages,mbs,bound", [(5, 32, 1.05), (6, 8, 1.06), (6, 32, 1.08), (8, 32, 1.05),
                                              (12, 32, 1.03)])
def test_recomputing_just_enough_costs_a_few_percent_on_an_ideal_pipeline(stages, mbs, bound):
    # plus_recompute_edges=true: the first pair's extra forwards (8 of 32 micro-batches at 6 stages) lengthen the
    # step by what they add to the busiest stages. (Measured here: 6 stages 1.072, 8 stages 1.043.)
    stock = step_time(stock_programs(stages, mbs), passes(stages=stages))
    plus = step_time(plus_programs(stages, mbs), recomputing(stages, mbs, True))
    assert plus / stock <= bound, plus / stock


@pytest.mark.parametrize("stages", [6, 8])
def test_recomputing_every_micro_batch_of_the_first_pair_costs_a_quarter_on_an_ideal_pipeline(stages):
    # 'all': stages 0 and 1 run 4 clocks per micro-batch where the others run 3, and they set the pace.
    stock = step_time(stock_programs(stages, 32), passes(stages=stages))
    plus = step_time(plus_programs(stages, 32), recomputing(stages, 32, "all"))
    assert 1.2 <= plus / stock <= 1.3, plus / stock
