"""A job with one machine per rank, as users run it: rank r's DeepSpeed node launcher runs on host r of a
network-namespace bed (:mod:`.netns`), rank 0's host is the master address, and a replacement machine runs the
README's ``--join`` command on a spare host.

    def test_x(host_jobs):
        job = host_jobs(hosts=5, steps=12, train_args=SMALL)    # 4 ranks on hosts 0-3, host 4 spare
        job.wait_for_step(4)
        job.hosts[1].kill_machine()
        job.join(1, job.hosts[4])
        assert job.wait() == [0, 0, 0, 0]                       # the fixture then fails the test on any leftover

Every launcher and joiner runs under ``timeout -s KILL`` (a hung job cannot outlive its test) with one thread per
process, the CPU accelerator, the job token and, unless the test says otherwise, ``GLOO_SOCKET_IFNAME`` naming the
host's interface (the hostname resolves to loopback here, as on many real machines).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import pytest

from .etcd import EtcdCluster, require_etcd
from .job import Job, world_info
from .netns import Host, Hosts
from .processes import LEFTOVER, close_all
from .ranks import REPO

TIME_LIMIT_S = 300  # the hard limit on every launcher and joiner (timeout -s KILL)


class HostJob(Job):
    """A training job spread over the machines of ``hosts``: rank r starts on ``hosts[r]``.

    Args:
        tmp: the job's directory.
        hosts: the bed; it needs at least ``world`` hosts (more for joins).
        gloo_ifname: set ``GLOO_SOCKET_IFNAME`` to each host's interface (False: leave it unset, as a user who
            never heard of it would).
        hostname_address: make the hostname resolve to this on every host (e.g. Debian's ``127.0.1.1``); None:
            as on the machine running the test.
        time_limit_s: the hard limit of every launcher and joiner.
        kwargs: those of :class:`.job.Job` (steps, checkfree, train_args, store, ...).
    """

    def __init__(self, tmp: Path, hosts: Hosts, config: str = "checkfree_no_failure.json", *, gloo_ifname: bool = True,
                 time_limit_s: float = TIME_LIMIT_S, hostname_address: Optional[str] = None, **kwargs) -> None:
        super().__init__(tmp, config, processes=hosts.processes, dumps=kwargs.pop("dumps", False), **kwargs)
        assert len(hosts) >= self.world, f"{self.world} ranks need {self.world} hosts, the bed has {len(hosts)}"
        self.hosts, self.gloo_ifname, self.time_limit_s = hosts, gloo_ifname, time_limit_s
        self.master_addr = hosts[0].address
        self.host_of: Dict[int, Host] = {}  # where each rank's supervisor runs now
        self.etcd: Optional[EtcdCluster] = None  # the job's etcd cluster, when the fixture started one
        if hostname_address is not None:
            for host in hosts:
                host.resolve_hostname(hostname_address)
        info = world_info(self.world)
        for rank in range(self.world):
            self.procs.append(self.run_on(hosts[rank], rank, [
                sys.executable, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={info}",
                f"--node_rank={rank}", f"--master_addr={self.master_addr}", f"--master_port={self.port}",
                "--module", *self.supervisor_module]))

    def host_env(self, host: Host) -> Dict[str, str]:
        env = dict(self.env)
        if self.gloo_ifname:
            env["GLOO_SOCKET_IFNAME"] = host.ifname
        else:
            env.pop("GLOO_SOCKET_IFNAME", None)
        return env

    def run_on(self, host: Host, rank: int, cmd: List[str], **kwargs) -> subprocess.Popen:
        """Start ``cmd`` for ``rank`` on ``host`` under the hard time limit (output to the job's log)."""
        self.host_of[rank] = host
        kwargs.setdefault("stdout", self.log)
        kwargs.setdefault("stderr", subprocess.STDOUT)
        return host.popen(["timeout", "-s", "KILL", str(self.time_limit_s), *cmd], env=self.host_env(host),
                          cwd=REPO, stdin=subprocess.DEVNULL, **kwargs)

    def join(self, rank: int, host: Host, *extra: str) -> subprocess.Popen:
        """A new machine, ``host``, takes over ``rank`` with the README's ``--join`` command; it is that rank's
        launcher in :attr:`procs` from now on (so :meth:`wait` waits for it)."""
        proc = self.run_on(host, rank, self.join_command(rank, "--pid-dir", str(self.pid_dir), *extra,
                                                         master_addr=self.master_addr))
        self.procs[rank] = proc
        return proc

    def host(self, rank: int) -> Host:
        """The machine ``rank``'s supervisor runs on now."""
        return self.host_of[rank]

    def kill_trainer(self, rank: int) -> int:
        """SIGKILL ``rank``'s active trainer (on its machine); return its pid."""
        pid = self.trainer_pid(rank)
        self.host(rank).kill(pid)
        return pid


def check_machines_empty(job: HostJob) -> None:
    """No process runs on any of the job's machines any more."""
    left = {host.name: host.pids() for host in job.hosts if host.pids()}
    assert not left, f"processes still run on the job's machines: {left}"


def outage_of(job: HostJob, ranks) -> dict:
    """The one outage record of the failure that lost ``ranks``."""
    records = [e for e in job.events() if e["event"] == "outage" and e["lost_ranks"] == ranks]
    assert len(records) == 1, [e for e in job.events() if e["event"] == "outage"]
    return records[0]


@pytest.fixture
def host_jobs(tmp_path, new_hosts) -> Iterator:
    """A factory of jobs, each on a bed of its own: ``host_jobs(hosts=5, etcd=0, **HostJob kwargs)``; with ``etcd=k``
    the job's store is an etcd cluster of k members on the bed's last k hosts (``job.etcd``), started first. After
    the test it ends every process of the jobs by pid and fails the test if one outlived a job that had finished."""
    jobs: List[HostJob] = []
    clusters: List[EtcdCluster] = []

    def make(hosts: Optional[int] = None, etcd: int = 0, **kwargs) -> HostJob:
        home = tmp_path / f"job{len(jobs)}"
        home.mkdir()
        bed = new_hosts(hosts or kwargs.get("world", 4) + etcd)
        cluster = None
        if etcd:
            require_etcd()
            (home / "etcd").mkdir()
            cluster = EtcdCluster(home / "etcd", etcd, hosts=bed.hosts[-etcd:])
            clusters.append(cluster)
            kwargs["store"] = cluster.start().url
        jobs.append(HostJob(home, bed, **kwargs))
        jobs[-1].etcd = cluster
        return jobs[-1]

    yield make
    try:
        left = close_all([job.processes for job in jobs])
    finally:
        for job in jobs:
            job.close()
        for cluster in clusters:
            cluster.close()
    assert not left, LEFTOVER + "\n".join(left)
