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
