"""Real jobs on a real 3-member etcd cluster (``--store etcd://...``): rank 0's whole machine lost and replaced by a
join, one etcd member killed mid-run together with a refused join, and etcd gone for longer than the store timeout.

Each rank runs under its own DeepSpeed node launcher (as on 4 machines). Every process a job starts is tracked by
pid; the fixtures end those (and only those) and fail the test if any outlived the finished job.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from datetime import timedelta

import pytest

from deepspeed_checkfree.resilience.contract import formed_key, key_prefix
from deepspeed_checkfree.resilience.etcd_store import EtcdStore

from ..harness.etcd import new_etcd_cluster  # noqa: F401 (fixture)
from .test_process_loss import check_completed, check_rebuilt, job_factory, outage  # noqa: F401 (fixture)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_rank_0s_whole_machine_is_lost_and_replaced_by_a_join_under_checkfree_plus(job_factory, new_etcd_cluster):
    cluster = new_etcd_cluster()
    job = job_factory("checkfree_plus_no_failure.json", launcher="nodes", store=cluster.url, steps=24,
                      train_args=["--min-step-s", "0.2"])
    job.wait_for_step(6)
    node = job.procs[0]
    os.killpg(node.pid, signal.SIGKILL)  # rank 0's machine: its launcher, supervisor, trainer and spare
    node.wait()
    killed = time.monotonic()
    # The replacement machine runs the documented join command.
    job.procs[0] = job.start(job.join_command(0, "--store", cluster.url, "--pid-dir", str(job.out / "pids")))
    job.wait(timeout_s=300)
    took = time.monotonic() - killed
    assert [p.returncode for p in job.procs] == [0, 0, 0, 0], job.tail()
    check_completed(job)  # every step once (rank 0's metrics continue in the replacement), none lost
    rec = outage(job, [0])
    check_rebuilt(job, rec["generation"], {0: [1]})  # stage 0 copied from stage 1 (CheckFree+)
    log = job.tail(10**6)
    assert "took over the job's coordination from rank 0" in log, log[-6000:]
    assert "admitted a new machine for rank 0" in log and "joined the job as a replacement" in log
    assert "lost the" not in log, "no rank lost the store"
    assert took < 200, f"{took:.0f} s from the loss to the end of the job"
    store = EtcdStore(cluster.url, job.token, timeout=timedelta(seconds=10))
    formed = lambda g: store.check([f"{key_prefix(job.token)}/{formed_key(g)}"])  # noqa: E731
    assert not formed(0) and formed(rec["generation"]), "the keys of the generation every rank left are deleted"
    print(f"rank 0's machine lost: outage {rec['outage_s']:.2f} s, job ended {took:.1f} s after the loss")


def test_one_etcd_member_killed_mid_run_and_a_join_with_a_wrong_token_leave_the_job_untouched(job_factory,
                                                                                              new_etcd_cluster):
    cluster = new_etcd_cluster()
    # The store named by the config's checkfree.store key, not by --store: every supervisor (the intruder's too)
    # reads it from the training script's --deepspeed_config.
    job = job_factory("checkfree_no_failure.json", launcher="nodes", checkfree={"store": cluster.url}, steps=20,
                      train_args=["--min-step-s", "0.2"])
    job.wait_for_step(3)
    cluster.kill(cluster.leader())  # the harder member to lose: a new leader is elected
    intruder = job.start(job.join_command(2),
                         env=dict(job.env, CHECKFREE_JOB_TOKEN="not-the-token"), stdout=subprocess.PIPE, text=True)
    out, _ = intruder.communicate(timeout=60)
    assert intruder.returncode == 3, out
    assert "join refused for rank 2: no job with this token runs in the etcd store" in out
    job.wait(timeout_s=240)
    check_completed(job)
    events = job.events() if (job.out / "events.jsonl").exists() else []  # (no event at all: the file is absent)
    assert not [e for e in events if e["event"] in ("failure_detected", "outage", "stopped")], \
        "training did not notice the lost member nor the refused join"


def test_etcd_unreachable_for_longer_than_the_store_timeout_stops_every_rank_naming_the_endpoints(
        job_factory, new_etcd_cluster):
    cluster = new_etcd_cluster()
    store_timeout_s = 6.0
    job = job_factory("checkfree_no_failure.json", launcher="nodes", store=cluster.url, steps=400,
                      train_args=["--min-step-s", "0.2"], supervisor_args=["--store-timeout", str(store_timeout_s)])
    job.wait_for_step(3)
    cluster.stop_all()
    stopped = time.monotonic()
    job.wait(timeout_s=120, succeed=False)
    took = time.monotonic() - stopped
    codes = [p.returncode for p in job.procs]
    assert all(c != 0 for c in codes), codes
    assert took < store_timeout_s + 30, f"every rank stopped {took:.1f} s after etcd went away"
    assert job.steps_done() < 400
    log = job.tail(10**6)
    for rank in range(4):
        assert f"rank={rank}] lost the etcd store {cluster.url}" in log, log[-6000:]
    assert "etcd unreachable at" in log and "did not answer for --store-timeout=6 s" in log
    assert all(f"{e}: connection refused" in log for e in cluster.endpoints)
    print(f"etcd gone: every rank stopped {took:.1f} s later (store timeout {store_timeout_s} s), codes {codes}")
