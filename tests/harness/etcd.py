"""A real etcd cluster for the tests: N members (3 by default), each with its own data directory and ports from
:mod:`.ports`, on loopback or one member per machine of a network-namespace bed (``hosts``), started, waited for until
healthy, killed member by member or all at once, and ended by pid with none left.

The ``etcd_cluster`` fixture (module-scoped, shared by a module's tests) and ``new_etcd_cluster`` (a factory for
tests that break their cluster) skip when the ``etcd`` binary is missing, except under CI (``CI=true``), where
.ci/run installs it and a missing binary must fail rather than hide the tests.
"""
from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Iterator, List, Optional, Sequence

import pytest

from .ports import reserve_ports
from .processes import ProcessTracker
from .ranks import require_multi_process_marker

# Fast elections so a killed leader is replaced within about a second; cheap bcrypt for the auth tests.
TEST_FLAGS = ("--heartbeat-interval", "50", "--election-timeout", "500", "--bcrypt-cost", "4",
              "--logger", "zap", "--log-level", "warn", "--snapshot-count", "10000")
INSTALL_HINT = "apt-get install etcd-server (Debian/Ubuntu; .ci/run installs it)"


def etcd_binary() -> Optional[str]:
    return os.environ.get("CHECKFREE_ETCD_BIN") or shutil.which("etcd")


class EtcdCluster:
    """``members`` etcd processes forming one cluster under ``root``.

    Args:
        hosts: run member i on ``hosts[i]`` (a :class:`.netns.Host`), listening on its address; default: every
            member on 127.0.0.1.

    Attributes:
        addresses: each member's address, in member order.
        client_ports: each member's client port, in member order.
    """

    def __init__(self, root: Path, members: int = 3, extra_args: Sequence[str] = (),
                 tls: Optional["TLSFiles"] = None, hosts: Optional[Sequence] = None) -> None:
        binary = etcd_binary()
        if binary is None:
            raise RuntimeError(f"no etcd binary on PATH: {INSTALL_HINT}")
        require_multi_process_marker()
        self.binary, self.root, self.extra_args = binary, root, tuple(extra_args)
        assert hosts is None or (len(hosts) >= members and tls is None), "one host per member, and no TLS on hosts"
        self.hosts = hosts
        self.addresses = [h.address for h in hosts[:members]] if hosts else ["127.0.0.1"] * members
        self.ports = reserve_ports(2 * members)
        self.client_ports = [self.ports.port + 2 * i for i in range(members)]
        self.peer_ports = [self.ports.port + 2 * i + 1 for i in range(members)]
        self.tracker = ProcessTracker()
        self.procs: List[Optional[subprocess.Popen]] = [None] * members
        self.logs = [root / f"m{i}.log" for i in range(members)]
        self.cluster_token = f"checkfree-test-{self.ports.port}"
        self.tls = tls  # clients must then use https and present a certificate the test CA signed
        self.scheme = "https" if tls else "http"

    @property
    def endpoints(self) -> List[str]:
        return [f"{a}:{p}" for a, p in zip(self.addresses, self.client_ports)]

    @property
    def url(self) -> str:
        return ("etcds://" if self.tls else "etcd://") + ",".join(self.endpoints)

    def _command(self, i: int) -> List[str]:
        peers = ",".join(f"m{j}=http://{a}:{p}" for j, (a, p) in enumerate(zip(self.addresses, self.peer_ports)))
        client = f"{self.scheme}://{self.addresses[i]}:{self.client_ports[i]}"
        peer = f"http://{self.addresses[i]}:{self.peer_ports[i]}"
        tls = ["--cert-file", str(self.tls.server_cert), "--key-file", str(self.tls.server_key), "--client-cert-auth",
               "--trusted-ca-file", str(self.tls.ca_cert)] if self.tls else []
        return [self.binary, "--name", f"m{i}", "--data-dir", str(self.root / f"m{i}.etcd"),
                "--listen-client-urls", client, "--advertise-client-urls", client,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", peers, "--initial-cluster-token", self.cluster_token,
                "--initial-cluster-state", "new", *TEST_FLAGS, *tls, *self.extra_args]

    def start_member(self, i: int) -> None:
        """Start (or restart, on its existing data directory) member ``i``."""
        assert self.procs[i] is None or self.procs[i].poll() is not None, f"member {i} already runs"
        log = open(self.logs[i], "a")
        start = self.hosts[i].popen if self.hosts else self.tracker.popen
        kwargs = {"tracker": self.tracker} if self.hosts else {}
        self.procs[i] = start(self._command(i), env=dict(os.environ), stdout=log, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, **kwargs)
        log.close()

    def start(self, timeout_s: float = 30.0) -> "EtcdCluster":
        for i in range(len(self.procs)):
            self.start_member(i)
        self.wait_healthy(timeout_s)
        return self

    def _open(self, request, timeout: float):
        context = None
        if self.tls:
            context = ssl.create_default_context(cafile=str(self.tls.ca_cert))
            context.load_cert_chain(str(self.tls.client_cert), str(self.tls.client_key))
        return urllib.request.urlopen(request, timeout=timeout, context=context)

    def healthy(self, i: int) -> bool:
        try:
            with self._open(f"{self.scheme}://{self.endpoints[i]}/health", timeout=1) as r:
                return json.loads(r.read()).get("health") == "true"
        except (OSError, ValueError):
            return False

    def status(self, i: int) -> dict:
        """Member ``i``'s status (its ``leader`` and own ``header.member_id``) from the v3 gateway."""
        req = urllib.request.Request(f"{self.scheme}://{self.endpoints[i]}/v3/maintenance/status",
                                     data=b"{}", headers={"Content-Type": "application/json"})
        with self._open(req, timeout=2) as r:
            return json.loads(r.read())

    def leader(self) -> int:
        """The index of the member that is the raft leader now."""
        for i, p in enumerate(self.procs):
            if p is not None and p.poll() is None:
                status = self.status(i)
                break
        else:
            raise RuntimeError("no member runs")
        for i, p in enumerate(self.procs):
            if p is not None and p.poll() is None and self.status(i)["header"]["member_id"] == status["leader"]:
                return i
        raise RuntimeError(f"the leader {status['leader']} is not a running member")

    def wait_healthy(self, timeout_s: float = 30.0) -> None:
        """Until every running member reports health (which needs an elected leader)."""
        deadline = time.monotonic() + timeout_s
        running = [i for i, p in enumerate(self.procs) if p is not None and p.poll() is None]
        while not all(self.healthy(i) for i in running):
            dead = [i for i, p in enumerate(self.procs) if p is not None and p.poll() is not None and i in running]
            if dead or time.monotonic() > deadline:
                tails = "\n".join(f"--- member {i} ---\n{self.logs[i].read_text()[-2000:]}" for i in running)
                raise RuntimeError(f"etcd members {dead or running} not healthy within {timeout_s} s:\n{tails}")
            time.sleep(0.1)

    def kill(self, i: int) -> None:
        """SIGKILL member ``i`` (as if its machine were lost) and reap it."""
        proc = self.procs[i]
        assert proc is not None and proc.poll() is None, f"member {i} is not running"
        proc.kill()
        proc.wait(timeout=10)

    def stop_all(self) -> None:
        """Kill every member (the cluster is gone; ``close`` still cleans up)."""
        for proc in self.procs:
            if proc is not None and proc.poll() is None:
                proc.kill()
        for proc in self.procs:
            if proc is not None:
                proc.wait(timeout=10)

    def close(self) -> None:
        """End every member by pid, check that none outlived it, release the ports."""
        self.stop_all()
        self.tracker.end_all()
        left = self.tracker.alive()
        self.ports.release()
        assert not left, f"etcd processes left running: {[p.pid for p in left]}"


class TLSFiles:
    """A throw-away CA, a server certificate for 127.0.0.1 and a client certificate, made with openssl."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.ca_cert, ca_key = root / "ca.pem", root / "ca.key"
        self.server_cert, self.server_key = root / "server.pem", root / "server.key"
        self.client_cert, self.client_key = root / "client.pem", root / "client.key"
        key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        self._run(["req", "-x509", *key, "-keyout", ca_key, "-out", self.ca_cert, "-days", "1", "-subj", "/CN=test-ca"])
        for cert, cert_key, name, usage in ((self.server_cert, self.server_key, "127.0.0.1", "serverAuth,clientAuth"),
                                           (self.client_cert, self.client_key, "checkfree-test-client", "clientAuth")):
            csr, ext = root / f"{name}.csr", root / f"{name}.ext"
            ext.write_text(f"subjectAltName=IP:127.0.0.1\nextendedKeyUsage={usage}\n")
            self._run(["req", *key, "-keyout", cert_key, "-out", csr, "-subj", f"/CN={name}"])
            self._run(["x509", "-req", "-in", csr, "-CA", self.ca_cert, "-CAkey", ca_key, "-CAcreateserial",
                       "-out", cert, "-days", "1", "-extfile", ext])

    @staticmethod
    def _run(args: list) -> None:
        subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=30)


def require_etcd() -> None:
    if etcd_binary() is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the etcd tests, but no etcd binary is on PATH: {INSTALL_HINT}")
        pytest.skip(f"no etcd binary on PATH (needed for a real etcd cluster): {INSTALL_HINT}")


@pytest.fixture(scope="module")
def etcd_cluster(tmp_path_factory) -> Iterator[EtcdCluster]:
    """A healthy 3-member cluster shared by the tests of a module (a test must leave it healthy)."""
    require_etcd()
    cluster = EtcdCluster(tmp_path_factory.mktemp("etcd"))
    try:
        yield cluster.start()
    finally:
        cluster.close()


@pytest.fixture
def new_etcd_cluster(tmp_path) -> Iterator:
    """A factory of clusters owned by one test (to kill members of): ``new_etcd_cluster(members=3, tls=None,
    hosts=None)`` (``hosts``: one member per machine of a :mod:`.netns` bed)."""
    require_etcd()
    made: List[EtcdCluster] = []

    def make(members: int = 3, extra_args: Sequence[str] = (), tls: Optional[TLSFiles] = None,
             hosts: Optional[Sequence] = None) -> EtcdCluster:
        root = tmp_path / f"etcd{len(made)}"
        root.mkdir()
        made.append(EtcdCluster(root, members, extra_args, tls, hosts))
        return made[-1].start()

    try:
        yield make
    finally:
        for cluster in made:
            cluster.close()
