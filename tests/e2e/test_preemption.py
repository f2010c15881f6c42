"""Preemption notices, across network hosts: every process of a machine gets SIGTERM at once (as systemd and
Kubernetes send it), SIGKILL after the grace, then the machine is taken away (its link goes down). The leaving
rank finishes its step and hands its stage over exactly: to a replacement that waits, or parked on a neighbour
until one comes. The job ends bit-identical to the same job run without a fault: every step's loss and every
rank's final weights (launch/train.py --save-weights).

Needs root (network namespaces); skipped with the reason elsewhere.
"""
from __future__ import annotations

import re
import threading
import time
from pathlib import Path
from typing import Dict, List

import pytest
import torch

from deepspeed_checkfree.resilience.contract import ready_spare

from ..harness.cluster import HostJob, check_machines_empty, host_jobs, outage_of  # noqa: F401 (fixture)
from ..harness.job import Job
from ..harness.netns import new_hosts  # noqa: F401 (fixture)
from ..harness.processes import LEFTOVER, close_all

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

STEPS = 14
GRACE_S = 30.0  # Kubernetes' default terminationGracePeriodSeconds
SMALL = ["--d-model", "32", "--layers", "4", "--heads", "2", "--seq-len", "32", "--min-step-s", "0.25"]
CHECKFREE = {"detection_timeout_s": 30.0, "join_timeout_s": 240.0}


def run_reference(tmp: Path, world: int, train_args: List[str]) -> Dict[str, object]:
    """The same job without a fault, on one machine: its losses and every rank's final weights."""
    weights = tmp / "weights"
    job = Job(tmp, "checkfree_no_failure.json", steps=STEPS, world=world, dumps=False, checkfree=CHECKFREE,
              train_args=[*SMALL, *train_args, "--save-weights", str(weights)], supervisor_args=["--no-spare"])
    try:
        job.procs.append(job.start([str(Path(__import__("sys").executable).parent / "deepspeed"), "--num_gpus",
                                    str(world), "--master_port", str(job.port), "--module",
                                    *job.supervisor_module]))
        job.wait(timeout_s=240)
        return {"losses": [r["loss"] for r in job.metrics()],
                "weights": {r: torch.load(weights / f"rank{r}.pt") for r in range(world)}}
    finally:
        left = close_all([job.processes])
        job.close()
        assert not left, LEFTOVER + "\n".join(left)


@pytest.fixture(scope="module")
def reference_4(tmp_path_factory):
    return run_reference(tmp_path_factory.mktemp("reference4"), 4, [])


@pytest.fixture(scope="module")
def reference_3x2(tmp_path_factory):
    return run_reference(tmp_path_factory.mktemp("reference3x2"), 6, ["--stages", "3", "--layers", "3"])


def check_bit_identical(job: HostJob, reference: Dict[str, object], weights: Path) -> None:
    assert [r["loss"] for r in job.metrics()] == reference["losses"], "every step's loss, as without the fault"
    for rank, want in reference["weights"].items():
        got = torch.load(weights / f"rank{rank}.pt")
        assert want.keys() == got.keys() and all(torch.equal(want[n], got[n]) for n in want), f"rank {rank}"


def preempt_in_background(job: HostJob, rank: int) -> threading.Thread:
    """SIGTERM to every process of ``rank``'s machine, SIGKILL after the grace, then the link down."""
    thread = threading.Thread(target=job.host(rank).preempt, kwargs={"grace_s": GRACE_S}, daemon=True)
    thread.start()
    return thread


def start_job(host_jobs, tmp_path: Path, hosts: int, **kwargs) -> tuple:
    weights = tmp_path / "weights"
    train_args = [*SMALL, *kwargs.pop("train_args", []), "--save-weights", str(weights)]
    job = host_jobs(hosts=hosts, steps=STEPS, checkfree=CHECKFREE, train_args=train_args, **kwargs)
    return job, weights


def test_a_preempted_middle_stage_is_handed_over_to_a_replacement_that_starts_at_the_signal(host_jobs, tmp_path,
                                                                                            reference_4):
    job, weights = start_job(host_jobs, tmp_path, hosts=5)
    job.wait_for_step(5)
    signalled = time.time()
    preempted = preempt_in_background(job, 2)
    job.join(2, job.hosts[4])
    assert job.wait(timeout_s=240) == [0, 0, 0, 0], job.tail()
    preempted.join()
    check_bit_identical(job, reference_4, weights)
    record = outage_of(job, [2])
    assert (record["start"], record["method"]) == ("preemption notice", "exact hand-over"), record
    assert record["drain_s"] is not None and record["drain_s"] < GRACE_S
    preempted_events = [e for e in job.events() if e["event"] == "preempted"]
    assert [e["outcome"] for e in preempted_events] == ["exact hand-over"], preempted_events
    log = job.tail(10**7)
    assert "The job goes on without this machine: start a replacement" in log
    print(f"preemption with a joiner at the signal: next step {job.step_after(signalled) - signalled:.2f} s after "
          f"the signal; outage record {record['outage_s']:.2f} s (drain {record['drain_s']:.2f} s)")
    check_machines_empty(job)


def test_a_standby_takes_a_preempted_stage_over_at_the_notice_and_one_never_needed_ends_with_the_job(
        host_jobs, tmp_path, reference_4):
    # Two machines stand by (``--join --standby``) from the job's start: one for rank 2, one for rank 1. Steps of
    # at least 1 s, so the job still trains when the standbys' trainers are warm (the losses do not depend on it).
    job, weights = start_job(host_jobs, tmp_path, hosts=6, train_args=["--min-step-s", "1.0"])
    leaving = job.host(2)
    standby_dirs = {rank: tmp_path / f"standby{rank}" for rank in (1, 2)}  # (their own pid files: rank R's run)
    standbys = {rank: job.run_on(host, rank, job.join_command(rank, "--standby", "--pid-dir", str(standby_dirs[rank]),
                                                              master_addr=job.master_addr))
                for rank, host in ((2, job.hosts[4]), (1, job.hosts[5]))}
    job.host_of.update({1: job.hosts[1], 2: leaving})
    deadline = time.monotonic() + 180
    while ready_spare(str(standby_dirs[2]), 2) is None:
        assert time.monotonic() < deadline and standbys[2].poll() is None, job.tail()
        time.sleep(0.05)
    job.wait_for_step(3)
    assert job.steps_done() < STEPS - 4, "the notice comes while the job trains"
    signalled = time.time()
    preempted = threading.Thread(target=leaving.preempt, kwargs={"grace_s": GRACE_S}, daemon=True)
    preempted.start()
    job.procs[2] = standbys[2]  # (rank 2's launcher from now on)
    assert job.wait(timeout_s=240) == [0, 0, 0, 0], job.tail()
    preempted.join()
    check_bit_identical(job, reference_4, weights)
    record = outage_of(job, [2])
    assert (record["start"], record["method"]) == ("preemption notice", "exact hand-over"), record
    log = job.tail(10**7)
    assert "stands by for rank 2" in log and "stands by for rank 1" in log
    # The standby that was never needed ends with the job, saying so, and leaves nothing behind.
    assert standbys[1].wait(timeout=60) == 0, job.tail()
    assert re.search(r"stood by for rank 1\b.*nothing to take over", job.tail(10**7)), job.tail()
    print(f"preemption with a standby: next step {job.step_after(signalled) - signalled:.2f} s after the signal; "
          f"outage record {record['outage_s']:.2f} s (drain {record['drain_s']:.2f} s)")
    check_machines_empty(job)


def test_a_preempted_stage_is_parked_on_a_neighbour_and_taken_over_by_a_replacement_a_minute_later(host_jobs,
                                                                                                 tmp_path,
                                                                                                 reference_4):
    job, weights = start_job(host_jobs, tmp_path, hosts=5)
    job.wait_for_step(5)
    preempt_in_background(job, 2).join()  # the machine is gone: SIGKILL after the grace, link down
    gone = time.time()
    assert not job.hosts[2].pids()
    parked = [e for e in job.events() if e["event"] == "parked"]
    assert len(parked) == 1 and parked[0]["for_rank"] == 2 and parked[0]["rank"] in (1, 3), parked
    time.sleep(max(0.0, 60.0 - (time.time() - gone)))
    job.join(2, job.hosts[4])
    assert job.wait(timeout_s=240) == [0, 0, 0, 0], job.tail()
    check_bit_identical(job, reference_4, weights)
    record = outage_of(job, [2])
    assert (record["start"], record["method"]) == ("preemption notice", "exact hand-over"), record
    assert [e["outcome"] for e in job.events() if e["event"] == "preempted"] == [f"parked on rank {parked[0]['rank']}"]
    print(f"parked: {parked[0]['bytes'] / 2**20:.2f} MiB of host memory on rank {parked[0]['rank']} for "
          f"{time.time() - gone:.0f} s")
    check_machines_empty(job)


def test_the_first_stage_under_plain_checkfree_is_handed_over_exactly(host_jobs, tmp_path, reference_4):
    # Stage 0 is rank 0: its machine hosts nothing special under etcd (the embedded store would go with it).
    job, weights = start_job(host_jobs, tmp_path, hosts=8, etcd=3)
    job.wait_for_step(5)
    preempted = preempt_in_background(job, 0)
    job.join(0, job.hosts[4])
    assert job.wait(timeout_s=240) == [0, 0, 0, 0], job.tail()
    preempted.join()
    check_bit_identical(job, reference_4, weights)
    record = outage_of(job, [0])
    assert (record["start"], record["method"]) == ("preemption notice", "exact hand-over"), record
    for host in job.hosts[:5]:
        assert not host.pids(), host


def test_a_preempted_data_parallel_replica_is_restored_from_its_twin_exactly(host_jobs, tmp_path, reference_3x2):
    # 3 stages x 2 replicas: rank 3 is stage 1's second replica; its twin (rank 2) keeps the stage, nothing is
    # parked or handed over.
    job, weights = start_job(host_jobs, tmp_path, hosts=7, world=6, train_args=["--stages", "3", "--layers", "3"])
    job.wait_for_step(5)
    preempted = preempt_in_background(job, 3)
    job.join(3, job.hosts[6])
    assert job.wait(timeout_s=240) == [0] * 6, job.tail()
    preempted.join()
    check_bit_identical(job, reference_3x2, weights)
    record = outage_of(job, [3])
    assert (record["start"], record["method"]) == ("preemption notice", "data_parallel_replica"), record
    assert [e["outcome"] for e in job.events() if e["event"] == "preempted"] == ["kept by a data-parallel replica"]
    check_machines_empty(job)
