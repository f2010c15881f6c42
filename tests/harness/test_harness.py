"""The harness's own guarantees, in the fast tier (no ranks; the tracker test starts two `sleep`s for a second)."""
from __future__ import annotations

import os
import socket
import subprocess
import time

import psutil
import pytest

from tests.harness import ports
from tests.harness.processes import ProcessTracker
from tests.harness.ranks import REPO, run_ranks


def test_reserved_ports_lie_below_the_ephemeral_range_and_are_never_handed_out_twice():
    low, _ = ports.ephemeral_range()
    blocks = [ports.reserve_ports(2) for _ in range(20)]
    try:
        taken = [p for b in blocks for p in (b.port, b.port + 1)]
        assert len(set(taken)) == len(taken), "two reservations overlap"
        assert all(ports.LOWEST <= p < low for p in taken)
        for p in taken:
            with socket.socket() as s:
                s.bind(("127.0.0.1", p))  # free to bind for the job it is meant for
            assert ports._lock(p) is None, "a reserved port can be reserved again"
    finally:
        for b in blocks:
            b.release()
    fd = ports._lock(blocks[0].port)
    assert fd is not None, "a released port stays locked"
    os.close(fd)


def test_a_test_without_a_multi_process_marker_cannot_start_ranks(tmp_path):
    with pytest.raises(AssertionError, match="mark it distributed or e2e"):
        run_ranks(REPO / "tests" / "harness" / "scenario_worker.py", 2, log_dir=tmp_path)


def test_tracker_finds_an_orphan_of_its_job_and_ends_only_its_own_processes():
    unrelated = subprocess.Popen(["sleep", "30"])
    tracker = ProcessTracker()
    try:
        # The job's process starts a grandchild and exits at once: the grandchild is re-parented before any walk
        # of the tree can see it, so only the job's tag in its environment finds it.
        root = tracker.popen(["sh", "-c", "(sleep 30 &) ; exit 0"], env=dict(os.environ))
        root.wait()
        tracker.finished = True
        left = tracker.leftovers(grace_s=0.5)
        assert len(left) == 1 and "sleep 30" in left[0], left
        assert unrelated.pid not in tracker.seen
        orphan = next(p for p in tracker.alive())
        tracker.end_all()
        assert not orphan.is_running() or orphan.status() == psutil.STATUS_ZOMBIE
        time.sleep(0.1)
        assert unrelated.poll() is None, "a process the job did not start was hit"
    finally:
        tracker.end_all()
        unrelated.kill()
        unrelated.wait()
