"""The supervisor's loop watch (resilience/stall_watch.py): the rule, and a real loop thread that stalls."""
from __future__ import annotations

import threading
import time

from deepspeed_checkfree.resilience.stall_watch import StallWatch, stalled_for


def test_a_loop_is_stalled_only_once_it_has_been_still_for_longer_than_the_limit():
    assert stalled_for(None, 100.0, 2.0) is None  # not watched
    assert stalled_for(99.0, 100.0, 2.0) is None
    assert stalled_for(97.5, 100.0, 2.0) == 2.5


def test_a_stalled_loop_is_reported_once_with_where_it_is_and_again_when_it_turns():
    stalls, resumes = [], []
    watch = StallWatch(0.2, lambda still, stack: stalls.append((still, stack)), resumes.append)

    def blocked_in_a_call():
        time.sleep(1.2)

    def loop():
        with watch.watching():
            for i in range(20):
                watch.turn()
                if i == 5:
                    blocked_in_a_call()
                time.sleep(0.01)

    thread = threading.Thread(target=loop)
    thread.start()
    thread.join(10)
    time.sleep(0.5)  # (outside watching(): a loop that has ended is not reported)
    watch.close()
    assert len(stalls) == 1, stalls
    still, stack = stalls[0]
    assert 0.2 < still < 1.2 and "blocked_in_a_call" in stack
    assert len(resumes) == 1 and 1.0 < resumes[0] < 5.0, resumes
