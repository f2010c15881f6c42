"""The CheckFree+ 1F1B schedule run on a simulated pipeline with blocking sends, for every depth 4..16 and every
micro-batch count 2..64: no deadlock, messages paired in order on every link, the activations each stage holds
exactly the stated bound, and the buffers never more than one above it."""
from __future__ import annotations

from collections import defaultdict
from typing import Dict, List

import pytest
from deepspeed.runtime.pipe.schedule import (BackwardPass, ForwardPass, LoadMicroBatch, OptimizerStep, RecvActivation,
                                             RecvGrad, ReduceGrads, ReduceTiedGrads, SendActivation, SendGrad)

from deepspeed_checkfree.core.schedule import CheckFreePlusTrainSchedule, data_stages, max_in_flight, role, route

P2P = (SendActivation, RecvActivation, SendGrad, RecvGrad)


def programs(stages: int, mbs: int) -> Dict[int, list]:
    return {s: [c for step in CheckFreePlusTrainSchedule(mbs, stages, s).steps() for c in step]
            for s in range(stages)}


class StageState:
    """What one simulated rank holds: buffer slots, activations, the one gradient receive buffer, loads."""

    def __init__(self, stage: int, stages: int, mbs: int) -> None:
        self.stage, self.stages = stage, stages
        self.buffers = CheckFreePlusTrainSchedule(mbs, stages, stage).num_pipe_buffers()
        self.slot_owner: Dict[int, int] = {}
        self.done = defaultdict(set)  # instruction class name -> micro-batches
        self.in_flight = self.peak_in_flight = self.peak_slots = 0
        self.pending_grad = None
        self.loads: List[int] = []

    def use_slot(self, cmd) -> None:
        slot, mb = cmd.buffer_id, cmd.micro_batch_id
        assert 0 <= slot < self.buffers, f"stage {self.stage}: slot {slot} outside {self.buffers} buffers"
        owner = self.slot_owner.setdefault(slot, mb)
        assert owner == mb, f"stage {self.stage}: {cmd} uses slot {slot} still held by micro-batch {owner}"
        self.peak_slots = max(self.peak_slots, len(self.slot_owner))

    def execute(self, cmd) -> None:
        """Apply one instruction, checking that its inputs are there."""
        name = type(cmd).__name__
        if isinstance(cmd, (ReduceTiedGrads, ReduceGrads, OptimizerStep)):
            return
        mb = cmd.micro_batch_id
        r = role(self.stage, mb, self.stages)
        if isinstance(cmd, LoadMicroBatch):
            assert self.stage in data_stages(self.stages)
            self.loads.append(mb)
            if cmd.buffer_id is None:
                assert not (r.is_first or r.is_last), f"stage {self.stage} drops data it needs for {mb}"
            else:
                self.use_slot(cmd)
        else:
            self.use_slot(cmd)
        if isinstance(cmd, ForwardPass):
            needs = "LoadMicroBatch" if r.is_first else "RecvActivation"
            assert mb in self.done[needs], f"stage {self.stage} runs forward {mb} before its input"
            assert not r.is_last or mb in self.done["LoadMicroBatch"], f"stage {self.stage}: no labels for {mb}"
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        elif isinstance(cmd, BackwardPass):
            assert mb in self.done["ForwardPass"]
            if not r.is_last:
                assert self.pending_grad == mb, f"stage {self.stage}: backward {mb} without its gradient"
                self.pending_grad = None
            self.in_flight -= 1
            if r.is_first:
                del self.slot_owner[cmd.buffer_id]
        elif isinstance(cmd, SendActivation):
            assert mb in self.done["ForwardPass"]
        elif isinstance(cmd, SendGrad):
            assert mb in self.done["BackwardPass"]
            del self.slot_owner[cmd.buffer_id]
        elif isinstance(cmd, RecvGrad):
            # DeepSpeed receives every gradient into one buffer: it must be used before the next arrives.
            assert self.pending_grad is None, f"stage {self.stage}: gradient {self.pending_grad} overwritten"
            self.pending_grad = mb
        self.done[name].add(mb)


def message(stage: int, cmd, stages: int):
    """(send|recv, peer, kind, micro-batch) of a point-to-point instruction, with the peer from its route."""
    r = role(stage, cmd.micro_batch_id, stages)
    return {SendActivation: ("send", r.next_stage, "activation"), RecvActivation: ("recv", r.prev_stage, "activation"),
            SendGrad: ("send", r.prev_stage, "grad"), RecvGrad: ("recv", r.next_stage, "grad")}[type(cmd)] + \
        (cmd.micro_batch_id,)


def simulate(progs: Dict[int, list], stages: int, mbs: int):
    """Run every rank's instructions with rendezvous sends (a send completes only together with its receive, as a
    blocking gloo send of a large tensor does). Returns the messages carried per (sender, receiver) link and each
    stage's state; raises AssertionError on a deadlock, a mismatched pair or a violated input."""
    pc = {s: 0 for s in progs}
    states = {s: StageState(s, stages, mbs) for s in progs}
    links = defaultdict(list)

    def current(s):
        return progs[s][pc[s]] if pc[s] < len(progs[s]) else None

    while any(current(s) is not None for s in progs):
        progressed = False
        for s in progs:
            while current(s) is not None and not isinstance(current(s), P2P):
                states[s].execute(current(s))
                pc[s] += 1
                progressed = True
        for s in progs:
            cmd = current(s)
            if cmd is None or not isinstance(cmd, (SendActivation, SendGrad)):
                continue
            op = message(s, cmd, stages)
            peer_cmd = current(op[1])
            if peer_cmd is None or not isinstance(peer_cmd, P2P):
                continue
            peer_op = message(op[1], peer_cmd, stages)
            if peer_op[0] == "recv" and peer_op[1] == s:
                assert peer_op[2:] == op[2:], f"stage {s} sends {op[2:]} while stage {op[1]} expects {peer_op[2:]}"
                states[s].execute(cmd)
                states[op[1]].execute(peer_cmd)
                links[(s, op[1])].append(op[2:])
                pc[s] += 1
                pc[op[1]] += 1
                progressed = True
        waiting = {s: current(s) for s in progs if current(s) is not None}
        assert progressed, f"deadlock with blocking sends: {waiting}"
    return links, states


CASES = [(stages, mbs) for stages in range(4, 17) for mbs in range(2, 65)]


@pytest.mark.parametrize("stages,mbs", CASES, ids=[f"P{p}-M{m}" for p, m in CASES])
def test_blocking_sends_pair_up_in_order_and_buffers_stay_within_the_bound(stages, mbs):
    progs = programs(stages, mbs)
    links, states = simulate(progs, stages, mbs)
    # Every hop of every route carries the activation forward and the gradient back, once each.
    expected = defaultdict(list)
    for mb in range(mbs):
        r = route(mb, stages)
        for a, b in zip(r, r[1:]):
            expected[(a, b)].append(("activation", mb))
            expected[(b, a)].append(("grad", mb))
    assert {k: sorted(v) for k, v in links.items()} == {k: sorted(v) for k, v in expected.items()}
    for s, st in states.items():
        bound = max_in_flight(s, stages, mbs)
        # The stated bound is exact: reached, never exceeded.
        assert st.peak_in_flight == bound, f"stage {s} held {st.peak_in_flight} micro-batches, bound {bound}"
        assert st.peak_slots <= st.buffers <= bound + 1
        assert not st.slot_owner and st.in_flight == 0 and st.pending_grad is None
        assert st.loads == (list(range(mbs)) if s in data_stages(stages) else [])
        # The reductions and the optimizer step close the step on every rank, after its last message.
        assert [type(c) for c in progs[s][-3:]] == [ReduceTiedGrads, ReduceGrads, OptimizerStep]


@pytest.mark.parametrize("stages", [4, 5, 6, 7])
def test_the_bound_is_reached_with_many_micro_batches(stages):
    _, states = simulate(programs(stages, 40), stages, 40)
    assert [st.peak_in_flight for st in states.values()] == [max_in_flight(s, stages, 40) for s in range(stages)]


def test_the_simulator_detects_a_deadlock():
    progs = programs(6, 8)
    # Stage 2 holds back its activations for stage 3 until it has a gradient from stage 3, which stage 3 can send
    # only after those activations: each end waits for the other.
    recv = next(k for k, c in enumerate(progs[2]) if isinstance(c, RecvGrad))
    held = [c for c in progs[2][:recv] if isinstance(c, SendActivation)]
    rest = [c for c in progs[2][:recv] if not isinstance(c, SendActivation)]
    progs[2][:recv + 1] = rest + [progs[2][recv]] + held
    with pytest.raises(AssertionError, match="deadlock"):
        simulate(progs, 6, 8)


def test_the_simulator_detects_a_reused_slot():
    progs = programs(4, 8)
    k0, k1 = [k for k, c in enumerate(progs[0]) if isinstance(c, ForwardPass)][:2]
    # Two micro-batches in flight in one buffer.
    progs[0][k1] = ForwardPass(progs[0][k0].buffer_id, micro_batch_id=progs[0][k1].micro_batch_id)
    with pytest.raises(AssertionError, match="still held"):
        simulate(progs, 4, 8)
