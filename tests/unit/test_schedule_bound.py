"""Why the CheckFree+ schedule's first pair holds what it holds: an exhaustive search over every period-6 plan at
1F1B's throughput (each pair of micro-batches, 2j on the normal route and 2j+1 on the swapped one, runs its passes
at the same offsets; every stage busy all six clocks of a period, a forward taking one clock and a backward two)
finds no plan in which stages 0 and 1 both hold fewer than P + 2 micro-batches for P >= 6, and one with P + 1 for
P = 5. The plans of core/schedule.py reach these values (test_schedule_deadlock.py checks them exactly)."""
from __future__ import annotations

from typing import Dict, Tuple

import pytest

from deepspeed_checkfree.core.schedule import max_in_flight, route

PERIOD = 6
# A plan whose stages 0 and 1 each hold at most W micro-batches on average has, on each of them, a summed lifetime
# of at most 6W over the two micro-batches of a period; the lifetimes without any wait sum to 6P - 3 (stage 0:
# 3P as the first of the even route, 3P - 3 as the second of the odd one; stage 1 alike), so each may see at most
# 6W - 6P + 3 clocks of waiting. A peak of at most W needs an average of at most W: the search may prune there.
Key = Tuple[str, int, int]  # (F or B, parity, route position)


def _peak(f_even: int, b_even: int, f_odd: int, b_odd: int) -> int:
    """Most micro-batches alive (forward started, backward not finished) on a stage in the steady state."""
    def alive(t: int, f: int, b: int) -> int:
        return sum(1 for i in range(t // PERIOD + 2) if PERIOD * i + f <= t < PERIOD * i + b + 2)
    starts = [f_even, f_odd]
    return max(alive(t, f_even, b_even) + alive(t, f_odd, b_odd)
               for f in starts for t in range(100 * PERIOD + f, 101 * PERIOD + f, PERIOD))


def first_pair_peaks(num_stages: int, max_wait_seen: int):
    """(W_0, W_1) of every period-6 plan in which stages 0 and 1 each see at most ``max_wait_seen`` clocks of
    waiting per period. Forward of position p starts at least one clock after position p-1's; the backward at the
    last position after its forward, every other backward two clocks after the next position's."""
    P = num_stages
    routes = (route(0, P), route(1, P))
    order = [("F", q, p) for p in range(1, P) for q in (0, 1)] + [("B", q, p) for p in range(P - 1, -1, -1)
                                                                  for q in (0, 1)]
    # Which of stages 0 and 1 see a wait at (kind, parity, position): all of a route's waits lengthen its lifetime
    # on the stage where it starts; the stage at position 1 misses the wait before its own forward and the wait
    # before the position-0 backward.
    def seen(q: int, kind: str, p: int) -> Tuple[int, int]:
        first, second = routes[q][0], routes[q][1]
        out = {first: 1, second: 0 if (kind, p) in (("F", 1), ("B", 0)) else 1}
        return out[0], out[1]

    found = []

    def dfs(k: int, t: Dict[Key, int], occupied: Dict[int, set], seen0: int, seen1: int) -> None:
        if k == len(order):
            pos = [{s: r.index(s) for s in range(P)} for r in routes]
            found.append(tuple(_peak(t[("F", 0, pos[0][s])], t[("B", 0, pos[0][s])], t[("F", 1, pos[1][s])],
                                     t[("B", 1, pos[1][s])]) for s in (0, 1)))
            return
        kind, q, p = order[k]
        stage = routes[q][p]
        if kind == "F":
            earliest = t[("F", q, p - 1)] + 1
        else:
            earliest = t[("F", q, P - 1)] + 1 if p == P - 1 else t[("B", q, p + 1)] + 2
        s0, s1 = seen(q, kind, p)
        for wait in range(PERIOD):  # a wait of a whole period more only lengthens lifetimes
            if seen0 + s0 * wait > max_wait_seen or seen1 + s1 * wait > max_wait_seen:
                break
            start = earliest + wait
            clocks = {start % PERIOD} if kind == "F" else {start % PERIOD, (start + 1) % PERIOD}
            if clocks & occupied[stage]:
                continue
            occupied[stage] |= clocks
            t[(kind, q, p)] = start
            dfs(k + 1, t, occupied, seen0 + s0 * wait, seen1 + s1 * wait)
            occupied[stage] -= clocks
            del t[(kind, q, p)]

    for phase in range(PERIOD):  # the odd micro-batch's first forward, relative to the even one's
        if routes[1][0] == routes[0][0] and phase == 0:
            continue
        occupied = {s: set() for s in range(P)}
        occupied[routes[0][0]].add(0)
        occupied[routes[1][0]].add(phase)
        dfs(0, {("F", 0, 0): 0, ("F", 1, 0): phase}, occupied, 0, 0)
    return found


def _budget(stages: int, held: int) -> int:
    """The most waiting each of stages 0 and 1 may see per period for both to hold at most ``held`` on average."""
    return 6 * held - (6 * stages - 3)


def test_no_period_six_plan_holds_fewer_than_p_plus_2_on_both_first_stages():
    # P = 6 (the benchmark's depth). Run offline: P = 7 and 8 give the same answer (~40 s); with the budget of
    # P + 2 (15 clocks seen) P = 6 has plans holding (7, 8), (8, 7) and (8, 8) (~4 min), the search is not vacuous.
    stages = 6
    plans = first_pair_peaks(stages, max_wait_seen=_budget(stages, stages + 1))
    # Both holding P + 1 on average needs each to see at most 9 clocks of waiting per period: no plan does.
    assert not plans, min(plans, key=max)
    assert max_in_flight(0, stages, 64) == max_in_flight(1, stages, 64) == stages + 2


def test_the_search_finds_a_plan_where_one_exists():
    """Five stages (one middle stage): P + 1 on both first stages, which the schedule uses; nothing below it."""
    plans = first_pair_peaks(5, max_wait_seen=_budget(5, 6))
    assert min(max(w) for w in plans) == 6
    assert all(max(w) >= 6 for w in first_pair_peaks(5, max_wait_seen=_budget(5, 5)))
    assert max_in_flight(0, 5, 64) == max_in_flight(1, 5, 64) == 6
