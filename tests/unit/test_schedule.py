"""The CheckFree+ schedule: routes, roles, completeness, and send/receive pairing with blocking sends."""
from __future__ import annotations

from collections import defaultdict

import pytest
from deepspeed.runtime.pipe.schedule import (BackwardPass, ForwardPass, LoadMicroBatch, OptimizerStep, RecvActivation,
                                             RecvGrad, SendActivation, SendGrad)

from deepspeed_checkfree.core.schedule import CheckFreePlusTrainSchedule, data_stages, role, route, route_hops


def test_routes_swap_the_edge_pairs_on_odd_micro_batches():
    assert route(0, 4) == (0, 1, 2, 3)
    assert route(1, 4) == (1, 0, 3, 2)
    assert route(3, 6) == (1, 0, 2, 3, 5, 4)
    assert route(2, 6) == (0, 1, 2, 3, 4, 5)


def test_roles():
    assert role(1, 1, 4).is_first and role(2, 1, 4).is_last
    assert role(0, 1, 4).prev_stage == 1 and role(0, 1, 4).next_stage == 3
    assert role(0, 1, 6).next_stage == 2 and role(3, 1, 6).next_stage == 5


def test_hops_include_non_adjacent_pairs_for_more_than_four_stages():
    assert (0, 2) in route_hops(6) and (3, 5) in route_hops(6) and (2, 0) in route_hops(6)
    assert (0, 3) not in route_hops(6)
    assert route_hops(4) == {(0, 1), (1, 0), (1, 2), (2, 1), (2, 3), (3, 2), (0, 3), (3, 0)}


def test_too_few_stages_or_micro_batches_are_rejected():
    with pytest.raises(ValueError, match="num_stages >= 4"):
        route(0, 3)
    with pytest.raises(ValueError, match="gradient_accumulation_steps >= 2"):
        CheckFreePlusTrainSchedule(1, 4, 0)


def _programs(stages, mbs):
    return {s: [c for step in CheckFreePlusTrainSchedule(mbs, stages, s).steps() for c in step] for s in range(stages)}


@pytest.mark.parametrize("stages", [4, 5, 6, 8])
@pytest.mark.parametrize("mbs", [2, 3, 4, 8])
def test_every_micro_batch_visits_every_stage_once_forward_and_backward(stages, mbs):
    progs = _programs(stages, mbs)
    for s, prog in progs.items():
        fwd = [c.buffer_id for c in prog if isinstance(c, ForwardPass)]
        bwd = [c.buffer_id for c in prog if isinstance(c, BackwardPass)]
        assert sorted(fwd) == list(range(mbs)) and sorted(bwd) == list(range(mbs))
        last_fwd = max(i for i, c in enumerate(prog) if isinstance(c, ForwardPass))
        assert all(not isinstance(c, BackwardPass) for c in prog[:last_fwd]), "forwards precede backwards"
        assert isinstance(prog[-1], OptimizerStep)
        loads = [c.buffer_id for c in prog if isinstance(c, LoadMicroBatch)]
        assert loads == (list(range(mbs)) if s in data_stages(stages) else [])


def simulate(progs, stages):
    """Execute all ranks' programs with rendezvous semantics (a send completes only together with the matching
    receive, as gloo's does). Returns the messages per (sender, receiver); raises AssertionError on a deadlock or a
    mismatched pair."""
    pc = {s: 0 for s in progs}
    channel_log = defaultdict(list)

    def comm(s):
        c = progs[s][pc[s]]
        r = role(s, c.buffer_id, stages) if hasattr(c, "buffer_id") else None
        if isinstance(c, SendActivation):
            return ("send", r.next_stage, "act", c.buffer_id)
        if isinstance(c, RecvActivation):
            return ("recv", r.prev_stage, "act", c.buffer_id)
        if isinstance(c, SendGrad):
            return ("send", r.prev_stage, "grad", c.buffer_id)
        if isinstance(c, RecvGrad):
            return ("recv", r.next_stage, "grad", c.buffer_id)
        return None

    while any(pc[s] < len(progs[s]) for s in progs):
        progressed = False
        for s in progs:
            while pc[s] < len(progs[s]) and comm(s) is None:  # local work
                pc[s] += 1
                progressed = True
        for s in progs:
            if pc[s] >= len(progs[s]):
                continue
            op = comm(s)
            if op is None or op[0] != "send":
                continue
            peer = op[1]
            if pc[peer] < len(progs[peer]):
                peer_op = comm(peer)
                if peer_op and peer_op[0] == "recv" and peer_op[1] == s:
                    assert peer_op[2:] == op[2:], f"stage {s} sends {op} while {peer} expects {peer_op}"
                    channel_log[(s, peer)].append(op[2:])
                    pc[s] += 1
                    pc[peer] += 1
                    progressed = True
        assert progressed, f"deadlock: {[(s, comm(s)) for s in progs if pc[s] < len(progs[s])]}"
    return channel_log


@pytest.mark.parametrize("stages", [4, 5, 6, 8])
@pytest.mark.parametrize("mbs", [2, 3, 4, 8])
def test_sends_and_receives_pair_up_and_cannot_deadlock_with_blocking_sends(stages, mbs):
    channel_log = simulate(_programs(stages, mbs), stages)
    for mb in range(mbs):
        r = route(mb, stages)
        for a, b in zip(r, r[1:]):
            assert ("act", mb) in channel_log[(a, b)] and ("grad", mb) in channel_log[(b, a)]


def test_the_simulator_detects_a_rank_that_walks_micro_batches_in_another_order():
    progs = _programs(4, 4)
    fwd_end = max(i for i, c in enumerate(progs[2]) if isinstance(c, SendActivation) or isinstance(c, ForwardPass))
    head, tail = progs[2][:fwd_end + 1], progs[2][fwd_end + 1:]
    progs[2] = list(reversed(head)) + tail  # stage 2 posts its micro-batches backwards
    with pytest.raises(AssertionError, match="deadlock|expects"):
        simulate(progs, 4)


@pytest.mark.parametrize("stages", [4, 5, 6, 8])
@pytest.mark.parametrize("mbs", [2, 3, 4, 8])
def test_a_received_gradient_is_used_before_the_next_one_arrives(stages, mbs):
    """The engine receives gradients into one reused buffer, so each must be consumed first."""
    for prog in _programs(stages, mbs).values():
        pending = None
        for c in prog:
            if isinstance(c, RecvGrad):
                assert pending is None, f"gradient of micro-batch {pending} overwritten before its backward"
                pending = c.buffer_id
            elif isinstance(c, BackwardPass) and c.buffer_id == pending:
                pending = None
        assert pending is None


def test_the_swapped_pair_computes_concurrently_on_the_first_two_stages():
    """Stage 0 embeds micro-batch 0 while stage 1 embeds micro-batch 1: each rank's first pass needs no receive."""
    progs = _programs(4, 4)
    for s in (0, 1):
        first_pass = next(c for c in progs[s] if isinstance(c, ForwardPass))
        before = progs[s][:progs[s].index(first_pass)]
        assert not any(isinstance(c, RecvActivation) for c in before)
        assert first_pass.buffer_id == s
