"""The death watch aborts the generation's communicators once, as soon as a member is replaced."""
from __future__ import annotations

import threading
import time

from deepspeed_checkfree.resilience.death_watch import DeathWatch


def test_it_aborts_once_when_a_member_dies_and_never_while_disarmed():
    aborted = threading.Event()
    calls = []
    watch = DeathWatch(lambda: (calls.append(time.monotonic()), aborted.set()), interval_s=0.01)
    try:
        dead = []
        watch.arm(lambda: list(dead))
        time.sleep(0.1)
        assert not calls
        dead.append(2)
        t0 = time.monotonic()
        assert aborted.wait(2.0) and calls[0] - t0 < 0.5
        time.sleep(0.1)
        assert len(calls) == 1 and watch.fired == [2], "one abort per arming"
        aborted.clear()
        watch.arm(lambda: [1])  # the next generation: armed again, a new death
        assert aborted.wait(2.0) and len(calls) == 2 and watch.fired == [1]
        watch.disarm()
        time.sleep(0.1)
        assert len(calls) == 2
    finally:
        watch.close()


def test_a_store_error_while_looking_is_not_a_death():
    calls = []
    watch = DeathWatch(lambda: calls.append(1), interval_s=0.01)
    try:
        def broken():
            raise RuntimeError("store unreachable")
        watch.arm(broken)
        time.sleep(0.1)
        assert not calls
    finally:
        watch.close()


def test_each_arming_aborts_its_own_generation():
    calls = []
    watch = DeathWatch(interval_s=0.01)
    try:
        fired = threading.Event()
        watch.arm(lambda: [3], lambda: (calls.append("generation 1"), fired.set()))
        assert fired.wait(2.0)
        fired.clear()
        watch.arm(lambda: [0], lambda: (calls.append("generation 2"), fired.set()))
        assert fired.wait(2.0)
        assert calls == ["generation 1", "generation 2"]
    finally:
        watch.close()


def test_a_poll_reads_one_counter_and_the_incarnations_only_when_it_moved():
    from deepspeed_checkfree.resilience.death_watch import deaths_since_arrival
    incarnations, moves, reads = {0: 0, 1: 0, 2: 3, 3: 0}, [7], []

    def incarnation(rank):
        reads.append(rank)
        return incarnations[rank]

    dead = deaths_since_arrival({0: 0, 1: 0, 2: 3, 3: 0}, lambda: moves[0], incarnation)
    assert dead() == [] and len(reads) == 4, "the first poll looks at every member (a move before arming counts)"
    assert dead() == [] and dead() == [] and len(reads) == 4, "no move, no per-rank reads"
    incarnations[2], moves[0] = 4, 8  # rank 2's supervisor replaced its trainer
    assert dead() == [2]
    incarnations[2] = 4
    dead_from_the_start = deaths_since_arrival({2: 3}, lambda: 8, lambda r: 4)
    assert dead_from_the_start() == [2], "a member replaced before the watch was armed is found at the first poll"
