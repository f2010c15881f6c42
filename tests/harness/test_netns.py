"""The multi-host bed's own guarantees: machines reach each other only through their links, each fault does what it
says, and nothing of a bed (process, namespace, link, /etc/netns file) outlives it, a crashed one's included. Fast
(each under a few seconds; small Python servers and `sleep`s as the machines' processes); skipped without root."""
from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

from tests.harness.etcd import EtcdCluster, require_etcd
from tests.harness.netns import ETC_DIR, NETNS_DIR, Hosts, namespace_pids, new_hosts  # noqa: F401 (fixture)
from tests.harness.ranks import REPO

SERVER = ("import socket\ns = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
          "s.bind(('0.0.0.0', 5000)); s.listen(16)\nwhile True: s.accept()[0].close()")


def reaches(host, address: str, timeout_s: float = 0.5) -> bool:
    """Whether a TCP connection from ``host`` (None: this test's own namespace) to ``address``:5000 succeeds."""
    code = f"import socket; socket.create_connection(('{address}', 5000), timeout={timeout_s})"
    cmd = [sys.executable, "-c", code]
    return subprocess.run(host.command(cmd) if host else cmd, capture_output=True, timeout=30).returncode == 0


def serve(host) -> subprocess.Popen:
    proc = host.popen([sys.executable, "-c", SERVER], env=dict(os.environ))
    deadline = time.monotonic() + 10
    while not reaches(host, host.address):
        assert time.monotonic() < deadline and proc.poll() is None, "the test server did not start"
        time.sleep(0.05)
    return proc


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE  # (an orphan's zombie waits for init)
    except psutil.NoSuchProcess:
        return False


def bed_names(bed: Hosts) -> list:
    return [h.name for h in bed]


def gone(bed_slot: int, names: list) -> None:
    """Nothing of the bed in ``bed_slot`` is left: namespaces, links, /etc/netns files."""
    assert not [n for n in names if (NETNS_DIR / n).exists() or (ETC_DIR / n).exists()]
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    assert f"cfn{bed_slot}br" not in links and f"cfn{bed_slot}p" not in links and f"cfn{bed_slot}v" not in links


def test_machines_reach_each_other_through_their_links_only(new_hosts):
    bed = new_hosts(3)
    assert len({h.address for h in bed}) == 3 and all(ipaddress.ip_address(h.address) in bed.subnet for h in bed)
    serve(bed[2])
    assert reaches(bed[0], bed[2].address) and reaches(None, bed[2].address), "through the bridge"
    bed[2].link_down()
    assert not reaches(bed[0], bed[2].address)
    bed[2].link_up()
    assert reaches(bed[0], bed[2].address)
    heal = bed[2].partition(1.0)
    assert not reaches(bed[0], bed[2].address), "cut off during the partition"
    heal.join()
    assert reaches(bed[0], bed[2].address, timeout_s=3), "back after it, its processes still running"


def test_each_machine_fault_ends_exactly_that_machines_processes(new_hosts):
    bed = new_hosts(3)
    env = dict(os.environ)
    # (a grandchild too: the fault finds processes by their namespace, not by their parent)
    for host in bed:
        host.popen(["sh", "-c", "sleep 60 & exec sleep 61"], env=env)
    stubborn = bed[2].popen(["sh", "-c", "trap '' TERM; sleep 62 & wait"], env=env)
    deadline = time.monotonic() + 10
    while [len(h.pids()) for h in bed] != [2, 2, 4]:
        assert time.monotonic() < deadline, [h.pids() for h in bed]
        time.sleep(0.05)

    bed[0].vanish()
    assert bed[0].pids() == [] and bed[1].pids() and bed[2].pids()
    assert not reaches(bed[1], bed[0].address), "a vanished machine's link is down"

    terminated = bed[1].kill_all(signal.SIGTERM)
    assert len(terminated) == 2
    started = time.monotonic()
    bed[2].preempt(grace_s=1.0)  # SIGTERM, SIGKILL of what ignored it after the grace, link down
    assert 1.0 <= time.monotonic() - started < 5 and bed[2].pids() == []
    assert stubborn.wait(timeout=5) == -signal.SIGKILL
    pid = bed[1].popen(["sleep", "60"], env=env).pid
    with pytest.raises(AssertionError, match="does not run on"):
        bed[2].kill(pid)  # a pid of another machine
    bed[1].kill(pid)


def test_the_hostname_resolves_where_each_machine_says(new_hosts):
    bed = new_hosts(2)
    bed[0].resolve_hostname("127.0.1.1")
    code = "import socket; print(socket.gethostbyname(socket.gethostname()))"
    got = [subprocess.run(h.command([sys.executable, "-c", code]), capture_output=True, text=True).stdout.strip()
           for h in bed]
    assert got[0] == "127.0.1.1"
    assert got[1] == subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip()


CRASH = """
import json, os, subprocess, sys, time
from tests.harness.netns import Hosts
bed = Hosts(2).__enter__()
bed[1].resolve_hostname("127.0.1.1")
proc = bed[1].popen(["sh", "-c", "sleep 60 & exec sleep 61"], env=dict(os.environ), stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
while len(bed[1].pids()) < 2:
    time.sleep(0.02)
print(json.dumps({"slot": bed.slot, "names": [h.name for h in bed]}), flush=True)
os._exit(1)  # a crash: no teardown; the kernel drops the slot's lock
"""


def test_teardown_leaves_nothing_and_a_crashed_beds_leftovers_are_removed_before_reuse(new_hosts):
    crashed = json.loads(subprocess.run([sys.executable, "-c", CRASH], cwd=REPO, capture_output=True, text=True,
                                        timeout=60).stdout)
    slot, names = crashed["slot"], crashed["names"]
    orphans = [p for n in names for p in namespace_pids(n)]
    assert len(orphans) == 2 and (ETC_DIR / names[1] / "hosts").exists()
    # Serial runs (CI) reuse the lowest free slot, the crashed one; with other test processes about, another one
    # may have taken (and cleaned) it first.
    with Hosts(3) as bed:
        if bed.slot != slot:
            pytest.skip(f"another test process took the crashed bed's slot {slot} first")
        assert not any(running(pid) for pid in orphans), "the crashed bed's processes ended"
        assert bed_names(bed)[:2] == names and all(h.pids() == [] for h in bed)
        assert not (ETC_DIR / names[1]).exists(), "a machine starts with the shared /etc/hosts"
        bed[2].popen(["sleep", "60"], env=dict(os.environ))
    gone(slot, names + [f"cfn{slot}h2"])


@pytest.mark.e2e
def test_an_etcd_cluster_runs_one_member_per_machine_and_survives_one_vanishing(new_hosts, tmp_path):
    require_etcd()
    bed = new_hosts(3)
    cluster = EtcdCluster(tmp_path, 3, hosts=bed.hosts)
    try:
        cluster.start()
        assert cluster.url == "etcd://" + ",".join(f"{h.address}:{p}" for h, p in zip(bed, cluster.client_ports))
        assert all(cluster.procs[i].pid in bed[i].pids() for i in range(3))
        leader = cluster.leader()
        bed[leader].vanish()
        cluster.procs[leader].wait(timeout=10)
        cluster.wait_healthy(timeout_s=30)  # (the two members left elect a leader among themselves)
        assert cluster.leader() != leader
    finally:
        cluster.close()
