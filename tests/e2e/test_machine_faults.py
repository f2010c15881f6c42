"""Machines that fail the way real ones do, across network hosts (tests/harness/netns.py): vanishing without a
packet, cut off and back, losing the embedded store's host. Every fault ends in bounded time, recovered or stopped
with its cause named; each test asserts the exit codes, every step exactly once, the time bound, and that no
process it started survives (the ``host_jobs`` fixture, by pid, and each machine's own process list).

Needs root (network namespaces); skipped with the reason elsewhere.
"""
from __future__ import annotations

import time

import pytest

from deepspeed_checkfree.resilience.contract import FENCED_EXIT_CODE, STORE_LOST_EXIT_CODE

from ..harness.cluster import HostJob, check_machines_empty, host_jobs, outage_of  # noqa: F401 (fixture)
from ..harness.netns import new_hosts  # noqa: F401 (fixture)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SMALL = ["--d-model", "32", "--layers", "4", "--heads", "2", "--seq-len", "32", "--min-step-s", "0.25"]
LEASE_TIMEOUT_S = 4.0  # (--lease-timeout: a supervisor silent this long is recorded lost by the leader)
LEASE = ["--lease-timeout", str(LEASE_TIMEOUT_S)]
# A long detection timeout: a silent machine must be found by its lease, not by a peer's timeout.
LONG_T = {"detection_timeout_s": 60.0, "join_timeout_s": 120.0}


def check_every_step_once(job: HostJob) -> None:
    assert [int(row["step"]) for row in job.metrics()] == list(range(job.steps)), "every step ran exactly once"


def detections_after(job: HostJob, when: float) -> dict:
    """rank -> seconds from ``when`` to its first failure detection."""
    seen = {}
    for e in job.events():
        if e["event"] == "failure_detected" and e["time"] >= when:
            seen.setdefault(e["rank"], e["time"] - when)
    return seen


def test_a_machine_that_vanishes_silently_is_found_by_its_lease_and_replaced_whether_or_not_a_joiner_waits(
        host_jobs):
    # The link goes down, then every process is killed: no packet tells anyone. The detection timeout is 60 s, so
    # only the lease (4 s) can find it. No joiner waits at first: the survivors must still notice within the lease
    # timeout, and say what they wait for; the replacement joins after that.
    job = host_jobs(hosts=5, steps=16, train_args=SMALL, checkfree=LONG_T, supervisor_args=LEASE)
    job.wait_for_step(4)
    job.hosts[2].vanish()
    vanished = time.time()
    job.wait_until(lambda: len(detections_after(job, vanished)) == 3, 30, "the survivors did not notice")
    detected = detections_after(job, vanished)
    assert max(detected.values()) < LEASE_TIMEOUT_S + 4, detected  # (renewal interval, leader's look, load)
    job.wait_until(lambda: "its machine was recorded lost" in job.tail(10**6), 30, "the survivors did not say what "
                   "they wait for")
    joined_at = time.time()
    job.join(2, job.hosts[4])
    assert job.wait(timeout_s=180) == [0, 0, 0, 0], job.tail()
    check_every_step_once(job)
    record = outage_of(job, [2])
    assert record["start"] == "machine silent" and record["silent_s"] > 1.0, record
    log = job.tail(10**7)
    assert "rank 2's machine is silent: its supervisor has not renewed its lease" in log
    assert "--join --rank 2" in log, "the survivors' and the leader's lines give the join command"
    next_step = job.step_after(joined_at) - joined_at
    print(f"silent vanish: detected by every rank {max(detected.values()):.2f} s after the loss; next step "
          f"{next_step:.2f} s after the join started; outage record {record['outage_s']:.2f} s")
    check_machines_empty(job)


def test_rank_0s_machine_vanishing_under_the_embedded_store_stops_every_rank_within_the_store_timeout(host_jobs):
    # The embedded store lives in rank 0's supervisor. Its machine vanishes without closing a connection: every
    # other rank's store requests go unanswered, and each stops (exit code 80, naming the store) within
    # --store-timeout, whatever TCP would do (its retries last ~15 min).
    store_timeout_s = 15.0
    job = host_jobs(hosts=4, steps=400, train_args=SMALL, checkfree=LONG_T,
                    supervisor_args=["--store-timeout", str(store_timeout_s)])
    job.wait_for_step(3)
    job.hosts[0].vanish()
    vanished = time.monotonic()
    codes = [p.wait(timeout=store_timeout_s + 60) for p in job.procs[1:]]
    took = time.monotonic() - vanished
    job.processes.finished = True
    assert codes == [STORE_LOST_EXIT_CODE] * 3, job.tail()
    assert took < store_timeout_s + 30, took
    log = job.tail(10**7)
    for rank in (1, 2, 3):
        assert f"[checkfree rank={rank}] lost the embedded store at {job.master_addr}:{job.port + 1}" in log
    assert "rank 0's supervisor or machine is gone, which ends the job (--store etcd://... survives it)" in log
    assert job.steps_done() < 400
    print(f"rank 0's machine vanished (embedded store): every rank stopped {took:.1f} s after it")
    check_machines_empty(job)


def test_rank_0s_machine_vanishing_under_etcd_is_survived_and_replaced(host_jobs):
    # (CheckFree+: stage 0 is copied from stage 1, which holds its replica; plain CheckFree cannot rebuild it)
    job = host_jobs(hosts=8, etcd=3, config="checkfree_plus_no_failure.json", steps=16, train_args=SMALL,
                    checkfree=LONG_T, supervisor_args=LEASE)
    job.wait_for_step(4)
    job.hosts[0].vanish()
    vanished = time.time()
    job.join(0, job.hosts[4])
    assert job.wait(timeout_s=240) == [0, 0, 0, 0], job.tail()
    check_every_step_once(job)
    record = outage_of(job, [0])
    assert record["start"] == "machine silent", record
    assert "took over the job's coordination from rank 0" in job.tail(10**7)
    print(f"rank 0's machine vanished (etcd): next step {job.step_after(vanished) - vanished:.2f} s after it, "
          f"outage record {record['outage_s']:.2f} s")
    for host in job.hosts[:5]:
        assert not host.pids(), host


def test_a_machine_cut_off_longer_than_its_lease_is_replaced_and_fenced_when_the_partition_heals(host_jobs):
    # Rank 1's machine is cut off for longer than the lease timeout: the leader records it lost, the job goes on
    # with a replacement. When the partition heals, the old machine's supervisor and trainer learn that their rank
    # was taken over and end (exit code 81) instead of coming back as a second copy of rank 1.
    job = host_jobs(hosts=5, steps=20, train_args=SMALL, checkfree=LONG_T, supervisor_args=LEASE)
    job.wait_for_step(4)
    old_host, old_launcher = job.hosts[1], job.procs[1]
    old_trainer = job.trainer_pid(1)
    healed = old_host.partition(LEASE_TIMEOUT_S + 6)
    cut = time.time()
    job.wait_until(lambda: any(e["event"] == "outage" for e in job.events()) or
                   "rank 1's machine is silent" in job.tail(10**6), 60, "rank 1 was not recorded lost")
    job.join(1, job.hosts[4])
    healed.join()
    assert old_launcher.wait(timeout=60) == FENCED_EXIT_CODE, job.tail()
    job.wait_until(lambda: not old_host.pids(), 30, "the fenced machine's processes did not end")
    assert job.wait(timeout_s=180) == [0, 0, 0, 0], job.tail()
    check_every_step_once(job)
    log = job.tail(10**7)
    assert "this machine was recorded lost by the job while it was cut off" in log
    fenced = [e for e in job.events() if e["event"] == "fenced"]
    assert fenced, "the old machine recorded its fencing"
    assert old_trainer not in old_host.pids()
    outage_of(job, [1])
    print(f"partition: fenced machine empty, job done {time.time() - cut:.1f} s after the cut")
    check_machines_empty(job)
