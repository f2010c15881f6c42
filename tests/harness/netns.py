"""Machines for the tests: Linux network namespaces on one bridge, each with its own address, so a job runs with one
rank per "machine" as users run it, and the faults that only machines have (a silent vanish, a partition) are real.

    with Hosts(5) as hosts:                     # a bridge and 5 namespaces, 172.29.K.10 ... .14 (K: the bed's slot)
        proc = hosts[0].popen(["sleep", "30"], env=dict(os.environ))
        hosts[1].vanish()                       # its link down, then SIGKILL of everything in it: no packet leaves

A bed takes a slot (bridge and namespace names, and a /24 of 172.29.0.0/16) under a file lock, like
:mod:`.ports`, so parallel test processes never collide; the kernel drops the lock when the test process exits, and
the next bed in that slot first removes what a crashed one left. Teardown SIGKILLs every process in each namespace
(by pid, found through the namespace itself), deletes the namespaces and the bridge, also after a failed test.

It needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN, for ``ip netns``). Tests take beds from the ``new_hosts`` fixture,
which skips with the reason where namespaces cannot be made (and fails under CI, where they must work).
"""
from __future__ import annotations

import fcntl
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import pytest

from .processes import ProcessTracker

LOCK_DIR = Path(tempfile.gettempdir()) / "checkfree-test-netns"
NETNS_DIR = Path("/run/netns")  # where `ip netns add` mounts each namespace
ETC_DIR = Path("/etc/netns")    # `ip netns exec NAME` bind-mounts the files of ETC_DIR/NAME over /etc's
SLOTS = 200                     # beds that can exist at once on this machine (a /24 each)
# Slot K owns 172.29.K.0/24: the bridge is .1, host i is .(10 + i). Above 127 on purpose: of two gloo peers, the one
# with the greater address connects to the other, so a rank that advertises loopback (127.x) is connected to, and
# breaks the job, only when the others' addresses sort above 127; under 10.x such a bug would hide (measured).
NETWORK = "172.29"
FIRST_HOST = 10
KILL_ROUNDS_S = 10.0            # SIGKILL everything in a namespace until it is empty, for at most this long


def _ip(*args: str, namespace: Optional[str] = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = ["ip", *(["netns", "exec", namespace, "ip"] if namespace else []), *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed ({result.returncode}): {result.stderr.strip()}")
    return result


def _namespace_inode(name: str) -> Optional[tuple]:
    try:
        st = os.stat(NETNS_DIR / name)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def namespace_pids(name: str) -> List[int]:
    """The processes whose network namespace is ``name`` (what ``ip netns pids`` reads: /proc/PID/ns/net)."""
    inode = _namespace_inode(name)
    if inode is None:
        return []
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                st = os.stat(f"/proc/{entry}/ns/net")
            except OSError:  # gone, or a zombie (its namespaces are released)
                continue
            if (st.st_dev, st.st_ino) == inode:
                pids.append(int(entry))
    return pids


def _signal_all(name: str, sig: int) -> List[int]:
    pids = namespace_pids(name)
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    return pids


def _kill_until_empty(name: str, timeout_s: float = KILL_ROUNDS_S) -> List[int]:
    """SIGKILL every process in namespace ``name`` until none is left (a dying parent may still start a child)."""
    killed: List[int] = []
    deadline = time.monotonic() + timeout_s
    while True:
        pids = _signal_all(name, signal.SIGKILL)
        killed += pids
        if not pids:
            return killed
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes {pids} of namespace {name} survive SIGKILL after {timeout_s} s")
        time.sleep(0.05)


class Host:
    """One machine of a bed: a network namespace with ``address`` on interface ``ifname``.

    Attributes:
        index: its position in the bed.
        name: the namespace's name (``ip netns exec NAME ...``).
        address: its IPv4 address, in the bed's /24.
        ifname: its network interface (inside the namespace): what ``GLOO_SOCKET_IFNAME`` names.
    """

    def __init__(self, bed: "Hosts", index: int, name: str, address: str, ifname: str, bridge_port: str) -> None:
        self.bed, self.index, self.name, self.address, self.ifname = bed, index, name, address, ifname
        self.bridge_port = bridge_port  # the veth's other end, in the bridge

    def __repr__(self) -> str:
        return f"Host({self.index}: {self.name} {self.address} on {self.ifname})"

    def command(self, cmd: Sequence[str]) -> List[str]:
        """``cmd`` run inside this machine."""
        return ["ip", "netns", "exec", self.name, *map(str, cmd)]

    def popen(self, cmd: Sequence[str], env: Dict[str, str], tracker: Optional[ProcessTracker] = None,
              **kwargs) -> subprocess.Popen:
        """Start ``cmd`` on this machine, tracked by pid (by ``tracker``, or the bed's). ``ip netns exec`` execs the
        command, so the pid is the command's own."""
        return (tracker or self.bed.processes).popen(self.command(cmd), env=env, **kwargs)

    def pids(self) -> List[int]:
        """Every process running on this machine now."""
        return namespace_pids(self.name)

    def kill_all(self, sig: int = signal.SIGKILL) -> List[int]:
        """Send ``sig`` to every process on this machine; SIGKILL repeats until none is left. Returns the pids."""
        if sig == signal.SIGKILL:
            return _kill_until_empty(self.name)
        return _signal_all(self.name, sig)

    def kill(self, pid: int, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to one process of this machine (``pid`` must run here; a process started a moment ago may
        not be listed in the namespace yet, so it is looked for during a second)."""
        deadline = time.monotonic() + 1.0
        while pid not in self.pids() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pid in self.pids(), f"pid {pid} does not run on {self}: {self.pids()}"
        os.kill(pid, sig)

    def resolve_hostname(self, address: str) -> None:
        """Make the hostname (which every namespace shares) resolve to ``address`` for the processes started here
        from now on, e.g. Debian's default ``127.0.1.1``: this machine gets an /etc/hosts of its own."""
        (ETC_DIR / self.name).mkdir(parents=True, exist_ok=True)
        (ETC_DIR / self.name / "hosts").write_text(f"127.0.0.1 localhost\n{address} {socket.gethostname()}\n")

    def link_down(self) -> None:
        """Take the machine's interface down from inside: from now on no packet leaves or reaches it."""
        _ip("link", "set", self.ifname, "down", namespace=self.name)

    def link_up(self) -> None:
        _ip("link", "set", self.ifname, "up", namespace=self.name)

    # faults ----------------------------------------------------------------------------------------------------

    def kill_machine(self) -> List[int]:
        """The machine is killed: SIGKILL everything on it. The kernel closes its sockets, so peers see FIN/RST."""
        return self.kill_all(signal.SIGKILL)

    def vanish(self) -> List[int]:
        """The machine vanishes silently (power loss, kernel panic): its link goes down first, then everything on it
        is SIGKILLed, so not even the closing of its connections reaches a peer."""
        self.link_down()
        return self.kill_all(signal.SIGKILL)

    def partition(self, duration_s: float) -> threading.Timer:
        """Cut the machine off for ``duration_s``, then bring its link back; its processes keep running. Returns
        the timer that heals it (``.join()`` to wait for the heal)."""
        self.link_down()
        timer = threading.Timer(duration_s, self.link_up)
        timer.daemon = True
        self.bed.timers.append(timer)
        timer.start()
        return timer

    def preempt(self, grace_s: Optional[float] = None) -> List[int]:
        """Preemption as systemd or Kubernetes do it: SIGTERM to every process of the machine at once; with
        ``grace_s``, SIGKILL to whatever is left after it, then the link down (the machine is taken away)."""
        pids = self.kill_all(signal.SIGTERM)
        if grace_s is not None:
            deadline = time.monotonic() + grace_s
            while self.pids() and time.monotonic() < deadline:
                time.sleep(0.05)
            self.kill_all(signal.SIGKILL)
            self.link_down()
        return pids


class Hosts:
    """``count`` machines on one bridge (a context manager: the namespaces exist inside the ``with``).

    Attributes:
        hosts: the machines, in order (also ``bed[i]``, ``iter(bed)``, ``len(bed)``).
        subnet: the bed's /24.
        bridge_address: the bridge's address in it (the test process reaches the hosts through it).
        processes: the tracker of every process started through :meth:`Host.popen` without a tracker of its own.
    """

    def __init__(self, count: int, processes: Optional[ProcessTracker] = None) -> None:
        assert 1 <= count <= 200, count
        self.count = count
        self.processes = processes or ProcessTracker()
        self.timers: List[threading.Timer] = []
        self.hosts: List[Host] = []
        self._lock_fd: Optional[int] = None
        self.slot = -1

    # naming (all names stay within the kernel's 15 characters) ------------------------------------------------

    @property
    def bridge(self) -> str:
        return f"cfn{self.slot}br"

    @property
    def subnet(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(f"{NETWORK}.{self.slot}.0/24")

    @property
    def bridge_address(self) -> str:
        return f"{NETWORK}.{self.slot}.1"

    def _names(self, i: int) -> tuple:
        """(namespace, interface inside it, its peer in the bridge) of host ``i``."""
        return f"cfn{self.slot}h{i}", f"cfn{self.slot}v{i}", f"cfn{self.slot}p{i}"

    # set-up and teardown -------------------------------------------------------------------------------------

    def __enter__(self) -> "Hosts":
        self._take_slot()
        try:
            self._remove_leftovers()
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _take_slot(self) -> None:
        LOCK_DIR.mkdir(parents=True, exist_ok=True)
        used = _routed_networks()
        for slot in range(SLOTS):
            fd = os.open(LOCK_DIR / f"slot{slot}.lock", os.O_CREAT | os.O_RDWR, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue
            self.slot = slot
            # A slot whose /24 this machine already routes (not through our own leftover bridge) is not ours to use.
            if any(self.subnet.overlaps(net) for dev, net in used if dev != self.bridge):
                os.close(fd)
                continue
            self._lock_fd = fd
            return
        raise RuntimeError(f"no free network-namespace slot among {SLOTS} (lock files in {LOCK_DIR})")

    def _remove_leftovers(self) -> None:
        """What a crashed bed in this slot left: its namespaces (and their processes), its bridge."""
        prefix = f"cfn{self.slot}h"
        if NETNS_DIR.is_dir():
            for name in os.listdir(NETNS_DIR):
                if name.startswith(prefix) and name[len(prefix):].isdigit():
                    _kill_until_empty(name)
                    _ip("netns", "del", name, check=False)
        if ETC_DIR.is_dir():
            for name in os.listdir(ETC_DIR):
                if name.startswith(prefix) and name[len(prefix):].isdigit():
                    shutil.rmtree(ETC_DIR / name, ignore_errors=True)
        for link in _links():  # (a veth whose namespace went has gone with it)
            if link == self.bridge or link.startswith(f"cfn{self.slot}p") or link.startswith(f"cfn{self.slot}v"):
                _ip("link", "del", link, check=False)

    def _build(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.bridge_address}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i in range(self.count):
            name, inner, port = self._names(i)
            address = f"{NETWORK}.{self.slot}.{FIRST_HOST + i}"
            _ip("netns", "add", name)
            self.hosts.append(Host(self, i, name, address, inner, port))
            _ip("link", "add", inner, "type", "veth", "peer", "name", port)
            _ip("link", "set", inner, "netns", name)
            _ip("link", "set", port, "master", self.bridge)
            _ip("link", "set", port, "up")
            _ip("addr", "add", f"{address}/24", "dev", inner, namespace=name)
            _ip("link", "set", inner, "up", namespace=name)
            _ip("link", "set", "lo", "up", namespace=name)

    def close(self) -> None:
        """End every process on every host (SIGKILL, by pid), delete the namespaces and the bridge, free the slot."""
        if self.slot < 0:
            return
        for timer in self.timers:
            timer.cancel()
        errors = []
        for name in [self._names(i)[0] for i in range(self.count)]:
            try:
                _kill_until_empty(name)
            except RuntimeError as err:
                errors.append(str(err))
            _ip("netns", "del", name, check=False)
            shutil.rmtree(ETC_DIR / name, ignore_errors=True)
        for i in range(self.count):
            _ip("link", "del", self._names(i)[2], check=False)
        _ip("link", "del", self.bridge, check=False)
        self.processes.end_all()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor drops the lock
            self._lock_fd = None
        self.slot = -1
        if errors:
            raise RuntimeError("; ".join(errors))

    # access ---------------------------------------------------------------------------------------------------

    def __getitem__(self, i: int) -> Host:
        return self.hosts[i]

    def __iter__(self) -> Iterator[Host]:
        return iter(self.hosts)

    def __len__(self) -> int:
        return len(self.hosts)


ROUTE_TYPES = ("unicast", "local", "broadcast", "multicast", "anycast", "unreachable", "blackhole", "prohibit",
               "throw", "nat")


def _routed_networks() -> List[tuple]:
    """(device, network) of every IPv4 route of this (the root) namespace, local ones included."""
    nets = []
    for line in _ip("-4", "route", "show", "table", "all", check=False).stdout.splitlines():
        words = line.split()
        if words and words[0] in ROUTE_TYPES:
            words = words[1:]
        if not words or words[0] == "default":
            continue
        try:
            net = ipaddress.IPv4Network(words[0], strict=False)
        except ValueError:
            continue
        nets.append((words[words.index("dev") + 1] if "dev" in words else "", net))
    return nets


def _links() -> List[str]:
    """The names of the root namespace's network interfaces."""
    return [line.split(":")[1].strip().split("@")[0] for line in _ip("-o", "link", "show").stdout.splitlines()]


def netns_unavailable() -> Optional[str]:
    """Why this process cannot build machines from namespaces (None when it can): found by trying it."""
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    if os.geteuid() != 0:
        return f"network namespaces need root (CAP_NET_ADMIN, CAP_SYS_ADMIN); this process runs as uid {os.geteuid()}"
    probe = f"cfnprobe{os.getpid()}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()} (needs CAP_NET_ADMIN and CAP_SYS_ADMIN)"
    try:
        veth = _ip("link", "add", f"{probe}a", "type", "veth", "peer", "name", f"{probe}b", check=False)
        if veth.returncode != 0:
            return f"`ip link add ... type veth` failed: {veth.stderr.strip()} (needs CAP_NET_ADMIN)"
        _ip("link", "del", f"{probe}a", check=False)
    finally:
        _ip("netns", "del", probe, check=False)
    return None


def require_netns() -> None:
    """Skip the calling test where namespaces cannot be made (fail under CI, which must run these tests)."""
    why = netns_unavailable()
    if why is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI must run the multi-host tests, but this machine cannot make network namespaces: {why}")
    pytest.skip(f"needs network namespaces: {why}")


@pytest.fixture
def new_hosts() -> Iterator:
    """A factory of beds owned by one test, closed after it however it ends: ``new_hosts(count)``."""
    require_netns()
    beds: List[Hosts] = []

    def make(count: int, processes: Optional[ProcessTracker] = None) -> Hosts:
        bed = Hosts(count, processes)
        beds.append(bed.__enter__())
        return bed

    try:
        yield make
    finally:
        errors = []
        for bed in beds:
            try:
                bed.close()
            except RuntimeError as err:
                errors.append(str(err))
        assert not errors, errors
