"""Jobs across machines: one rank per network namespace on a bridge (tests/harness/netns.py), one DeepSpeed node
launcher per machine, the README's ``--join`` command on a spare machine, real SIGKILLs. Each test asserts the exit
codes, every step exactly once (metrics.csv), a time bound on the recovery, and that no process it started survives
(the ``host_jobs`` fixture, by pid, and each machine's own process list).

Needs root (network namespaces); skipped with the reason elsewhere.
"""
from __future__ import annotations

import time

import pytest

from ..harness.cluster import HostJob, host_jobs  # noqa: F401 (fixture)
from ..harness.netns import new_hosts  # noqa: F401 (fixture)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

STEPS = 16
SMALL = ["--d-model", "32", "--layers", "4", "--heads", "2", "--seq-len", "32", "--min-step-s", "0.2"]
RECOVERY_BOUND_S = 60.0  # from the fault to the next completed step; measured on 2 idle cores: see each test


def check_every_step_once(job: HostJob) -> None:
    assert [int(row["step"]) for row in job.metrics()] == list(range(job.steps)), "every step ran exactly once"


def check_machines_empty(job: HostJob) -> None:
    left = {host.name: host.pids() for host in job.hosts if host.pids()}
    assert not left, f"processes still run on the job's machines: {left}"


def the_outage(job: HostJob, lost_stages) -> dict:
    records = [e for e in job.events() if e["event"] == "outage" and e["lost_stages"] == lost_stages]
    assert len(records) == 1, job.events()
    return records[0]


def test_a_trainer_killed_on_one_machine_recovers_and_each_machine_finds_its_interface_without_gloo_socket_ifname(
        host_jobs):
    # The hostname resolves to loopback on every machine (Debian's 127.0.1.1) and nobody set GLOO_SOCKET_IFNAME:
    # each supervisor gives its trainers the interface that routes to the master address.
    job = host_jobs(hosts=4, steps=STEPS, train_args=SMALL, gloo_ifname=False, hostname_address="127.0.1.1")
    job.wait_for_step(4)
    killed = time.time()
    job.kill_trainer(2)
    assert job.wait(timeout_s=120) == [0, 0, 0, 0]
    check_every_step_once(job)
    record = the_outage(job, [2])
    assert record["start"] == "trainer death"
    recovered_s = job.step_after(killed) - killed
    assert recovered_s < RECOVERY_BOUND_S, recovered_s
    print(f"trainer kill across machines: next step {recovered_s:.2f} s after it (outage record "
          f"{record['outage_s']:.2f} s)")
    log = job.tail(10**6)
    for rank, host in enumerate(job.hosts):
        assert (f"[checkfree rank={rank}] GLOO_SOCKET_IFNAME={host.ifname} for the trainer: this machine's hostname"
                in log), log[-3000:]
    check_machines_empty(job)


def test_a_whole_machine_killed_is_replaced_by_a_join_on_a_spare_machine(host_jobs):
    job = host_jobs(hosts=5, steps=STEPS, train_args=SMALL)  # GLOO_SOCKET_IFNAME set per machine: left alone
    job.wait_for_step(4)
    lost = job.hosts[1].kill_machine()  # launcher, supervisor, trainer and spare at once
    killed = time.time()
    job.join(1, job.hosts[4])
    assert job.wait(timeout_s=150) == [0, 0, 0, 0]
    check_every_step_once(job)
    record = the_outage(job, [1])
    recovered_s = job.step_after(killed) - killed
    assert recovered_s < RECOVERY_BOUND_S, recovered_s
    print(f"machine killed, join on a spare: next step {recovered_s:.2f} s after the kill (outage record "
          f"{record['outage_s']:.2f} s)")
    log = job.tail(10**6)
    assert "admitted a new machine" in log and "for the trainer: this machine's hostname" not in log
    assert job.host(1) is job.hosts[4] and job.trainer_pid(1) not in lost
    check_machines_empty(job)
