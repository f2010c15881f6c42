"""What one re-formation and a quiet job cost the job's store as the world grows (issue 30).

    flock /tmp/cf-heavy.lock timeout 900 python benchmarks/coordination_scale.py --quick
    python benchmarks/coordination_scale.py --sizes 8,32,128,512,1024
    git worktree add --detach /tmp/before 6ec7492 && python benchmarks/coordination_scale.py --code before \
        --repo /tmp/before --sizes 8,32,128

N members are threads of one process (a fresh process per store and size), each with its own store clients, running
the project's own classes (those of --repo) against a real TCPStore (libuv, hosted in that process) and a real
1-member etcd 3.4. Requests are counted the same way for both codes: every call into a TCPStore client, and every HTTP
request to etcd (a counting wrapper around the client's session; "keys read" counts the key-value records etcd sent
back).

One re-formation: generation 0 forms (not counted), then rank N-1's trainer dies: its supervisor records the loss,
every survivor's death watch sees it, a replacement trainer starts, and all N arrive for the next generation, form it,
run gloo's rendezvous through the generation's store (each rank publishes its 154 + 8N-byte address and waits for and
reads every rank's, as torch 2.13's ProcessGroupGloo does) and arm their death watch. Counted: everything from the
loss record until every member watches the new generation. Steady state: every supervisor ticks every 0.25 s
(lease, the leader's duties, the job-wide signals) while every trainer's death watch waits; measured with the real
intervals up to --steady-max members, and computed for every size from the requests of one synchronous round of
ticks and of one watch wait (a process of threads cannot keep real intervals for a thousand ranks on two cores).
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "coordination_scale.json"
TICK_S = 0.25  # the supervisor's store tick (both codes' STORE_TICK_S)


class Tally:
    """Requests (and etcd's key-value records) counted for one role of every member."""

    def __init__(self) -> None:
        self.requests = self.keys_read = 0
        self._lock = threading.Lock()

    def count(self, keys: int = 0) -> None:
        with self._lock:
            self.requests += 1
            self.keys_read += keys


class CountingTCPStore(dist.Store):
    """A TCPStore client that counts every call that goes to the server (one request each)."""

    def __init__(self, inner: dist.Store, tally: Tally) -> None:
        super().__init__()
        self.inner, self.tally = inner, tally

    def _call(self, method: str, *args):
        self.tally.count()
        return getattr(self.inner, method)(*args)

    def set(self, key, value): return self._call("set", key, value)
    def get(self, key): return self._call("get", key)
    def add(self, key, amount): return self._call("add", key, amount)
    def compare_set(self, key, expected, desired): return self._call("compare_set", key, expected, desired)
    def check(self, keys): return self._call("check", list(keys))
    def wait(self, keys, *timeout): return self._call("wait", list(keys), *timeout)
    def multi_get(self, keys): return self._call("multi_get", list(keys))
    def multi_set(self, keys, values): return self._call("multi_set", list(keys), list(values))
    def append(self, key, value): return self._call("append", key, value)
    def delete_key(self, key): return self._call("delete_key", key)
    def num_keys(self): return self._call("num_keys")
    def has_extended_api(self): return True
    def set_timeout(self, timeout): self.inner.set_timeout(timeout)  # (client-side only)
    def clone(self): return CountingTCPStore(self.inner.clone(), self.tally)

    @property
    def timeout(self): return self.inner.timeout


def count_etcd(store, tally: Tally):
    """Count every HTTP request the etcd store sends, and the key-value records etcd answers with."""
    post = store.etcd.session.post

    def counted(*args, **kwargs):
        response = post(*args, **kwargs)
        tally.count(0 if kwargs.get("stream") else response.content.count(b'"key":'))
        return response

    store.etcd.session.post = counted
    return store


class Etcd:
    """A 1-member etcd on loopback, in a temporary data directory, killed by pid at the end."""

    def __init__(self) -> None:
        self.root = tempfile.mkdtemp(prefix="cf-scale-etcd-")
        client, peer = free_port(), free_port()
        self.url = f"etcd://127.0.0.1:{client}"
        args = ["etcd", "--name", "m0", "--data-dir", f"{self.root}/m0", "--log-level", "error", "--logger", "zap",
                "--listen-client-urls", f"http://127.0.0.1:{client}",
                "--advertise-client-urls", f"http://127.0.0.1:{client}", "--listen-peer-urls",
                f"http://127.0.0.1:{peer}", "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
                "--initial-cluster", f"m0=http://127.0.0.1:{peer}"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=open(f"{self.root}/log", "w"))
        deadline = time.monotonic() + 30
        while not self._healthy(client):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"etcd did not start; see {self.root}/log")
            time.sleep(0.1)

    @staticmethod
    def _healthy(port: int) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                return b'"true"' in r.read()
        except OSError:
            return False

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        shutil.rmtree(self.root, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_all(threads) -> None:
    for t in threads:
        t.start()
    for t in threads:
        t.join()


# ---------------------------------------------------------------------------------------------------------------
# One configuration (code, store, N), in a process of its own
# ---------------------------------------------------------------------------------------------------------------

class Job:
    """N members of the job on one store, driving --repo's classes the way its trainer and supervisor do."""

    ROLES = ("trainer", "watch", "supervisor", "signals")

    def __init__(self, args) -> None:
        from deepspeed_checkfree.resilience import contract, coordination, death_watch, generation_store, membership
        self.api = dict(contract=contract, coordination=coordination, death_watch=death_watch,
                        generation_store=generation_store, membership=membership)
        self.after = hasattr(membership.Membership, "record_loss")  # the counter arrival came with it
        self.n, self.store, self.args = args.n, args.store, args
        self.token = f"bench-{os.getpid()}"
        self.tallies = {role: Tally() for role in self.ROLES}
        env = {contract.STORE_URL_ENV: args.etcd_url} if args.store == "etcd" else {}
        self.polling = coordination.rendezvous_polling(env)
        self.watch_interval_s = getattr(coordination, "death_watch_interval", lambda e: None)(env)
        if args.store == "tcp":
            self.server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, use_libuv=True,
                                        timeout=timedelta(seconds=300))
        roles = self.ROLES if self.after else self.ROLES[:3]  # (main's supervisor read the signals in its tick)
        self.memberships = {role: [self.membership(role, r) for r in range(self.n)] for role in roles}

    def client(self, role: str) -> dist.Store:
        tally = self.tallies[role]
        if self.store == "etcd":
            from deepspeed_checkfree.resilience.etcd_store import EtcdStore
            return count_etcd(EtcdStore(self.args.etcd_url, self.token, timeout=timedelta(seconds=300)), tally)
        inner = CountingTCPStore(dist.TCPStore("127.0.0.1", self.server.port, is_master=False,
                                               timeout=timedelta(seconds=300)), tally)
        if not self.after:
            return inner  # main's processes used the TCPStore client itself
        from deepspeed_checkfree.resilience.store_access import DeadlineStore
        return DeadlineStore(inner, timedelta(seconds=300))

    def membership(self, role: str, rank: int):
        return self.api["membership"].Membership(self.client(role), self.token, rank, self.n, 300.0)

    def counts(self) -> dict:
        return {role: (t.requests, t.keys_read) for role, t in self.tallies.items()}

    # one member's re-formation -------------------------------------------------------------------------------

    def reform(self, rank: int, generation: int, incarnation: int, fresh: bool, watch, phases=None) -> None:
        """Arrive for ``generation``, form it, run gloo's rendezvous in its store, arm the death watch
        (``phases``: a barrier every member passes after the arrival and after the rendezvous)."""
        from deepspeed_checkfree.core.rejoin import MemberInfo
        m = self.memberships["trainer"][rank]
        if fresh and generation > 0:  # a new trainer process first looks where the job is
            latest = m.latest_generation()
            m.formed(latest)
        info = MemberInfo(rank, fresh, 0 if fresh else 100, incarnation, os.getpid())
        gen_store = self.api["generation_store"]
        prefix = m.key(self.api["contract"].group_store_prefix(generation))
        if self.after:
            generation, _ = m.arrive(generation, info)
            aborted = self.api["death_watch"].aborted_reader(m, generation)
            store = gen_store.GenerationStore(m.store, aborted, generation, timedelta(seconds=300), prefix=prefix,
                                              **self.polling)
        else:
            members = m.arrive(generation, info)
            arrived = {r: i.incarnation for r, i in members.items()}
            dead = self.api["death_watch"].deaths_since_arrival(arrived, m.incarnation_moves, m.incarnation)
            store = gen_store.GenerationStore(m.store, dead, generation, timedelta(seconds=300), prefix=prefix,
                                              **self.polling)
        if phases is not None:
            phases.wait()
        store.set(f"0/{rank}", b"\1" * (154 + 8 * self.n))  # gloo's full-mesh connect, as in torch 2.13
        for peer in range(self.n):
            store.wait([f"0/{peer}"])
            store.get(f"0/{peer}")
        if phases is not None:
            phases.wait()
        self.arm(watch, rank, generation, None if self.after else arrived)

    def new_watch(self, rank: int):
        dw = self.api["death_watch"]
        if self.after:
            return dw.DeathWatch(self.memberships["watch"][rank])
        return dw.DeathWatch(interval_s=self.watch_interval_s)

    def arm(self, watch, rank: int, generation: int, arrived) -> None:
        watch.first_look = threading.Event()
        if self.after:
            watch.arm(generation, lambda: None)
            return
        wm = self.memberships["watch"][rank]
        dead = self.api["death_watch"].deaths_since_arrival(arrived, wm.incarnation_moves, wm.incarnation)

        def looked():  # main's watch polls: the re-formation ends with every member's first poll
            try:
                return dead()
            finally:
                watch.first_look.set()
        watch.arm(looked, lambda: None)

    def watching(self, watches, since: int, timeout_s: float = 60.0) -> None:
        """Until every death watch waits on (after) or has looked at (before) the new generation (``since``: the
        watches' request count before they were armed)."""
        deadline = time.monotonic() + timeout_s
        if not self.after:
            for w in watches:
                w.first_look.wait(max(0.0, deadline - time.monotonic()))
            return
        # each armed watch sends its one blocking request (and one more after a false wake, see DeadlineStore)
        expected = since + (2 if self.store == "etcd" else 1) * len(watches)
        seen = -1
        while (self.tallies["watch"].requests < expected or self.tallies["watch"].requests != seen) and \
                time.monotonic() < deadline:
            seen = self.tallies["watch"].requests
            time.sleep(0.2)

    # the benchmark -------------------------------------------------------------------------------------------

    def run(self) -> dict:
        n, victim = self.n, self.n - 1
        sup = self.memberships["supervisor"]
        for r in range(n):
            sup[r].record_trainer(r, 0, 1000 + r)
        watches = [self.new_watch(r) for r in range(n)]
        since = self.tallies["watch"].requests
        run_all([threading.Thread(target=self.reform, args=(r, 0, 0, True, watches[r])) for r in range(n)])
        self.watching(watches, since)
        marks = []  # (counts, etcd CPU s, time) at the loss, after the arrival, the rendezvous, the watches

        def mark() -> None:
            marks.append((self.counts(), cpu_s(self.args.etcd_pid) if self.store == "etcd" else 0.0,
                          time.monotonic()))
        mark()
        # rank N-1's trainer dies: its supervisor records the loss, and starts a replacement
        from deepspeed_checkfree.resilience.contract import TrainerDeath
        watches[victim].disarm()
        death = TrainerDeath(time=time.time(), returncode=-9)
        if self.after:
            sup[victim].record_loss(victim, 0, death, generation=0)
        else:
            sup[victim].record_replacement(victim, 0, death)
        sup[victim].record_trainer(victim, 1, 2000)
        watches[victim] = self.new_watch(victim)
        for w in watches[:victim]:  # every survivor learns of it through its death watch
            while not w.fired:
                time.sleep(0.001)
        phases, since = threading.Barrier(n, action=mark, timeout=600), self.tallies["watch"].requests
        run_all([threading.Thread(target=self.reform, args=(r, 1, int(r == victim), r == victim, watches[r], phases))
                 for r in range(n)])
        self.watching(watches, since)
        mark()
        row, names = {}, ("arrival", "rendezvous", "watch")
        for name, (c0, cpu0, t0), (c1, cpu1, t1) in zip(names, marks, marks[1:]):
            row[name] = dict(requests=sum(c1[r][0] - c0[r][0] for r in c0), wall_s=round(t1 - t0, 3))
            if self.store == "etcd":
                row[name].update(keys_read=sum(c1[r][1] - c0[r][1] for r in c0), etcd_cpu_s=round(cpu1 - cpu0, 3))
        for key in row["arrival"]:
            row[key] = round(sum(row[name][key] for name in names), 3)
        row["steady"] = self.steady(watches)
        return row

    def coordinators(self):
        coord = self.api["coordination"] if hasattr(self.api["coordination"], "Coordinator") else None
        if coord is None:
            from deepspeed_checkfree.resilience import coordinator as coord
        from deepspeed_checkfree.events import EventLog
        extra = inspect.signature(coord.Coordinator).parameters
        made = []
        for r, m in enumerate(self.memberships["supervisor"]):
            kwargs = dict(owner=f"bench-{r}") if "owner" in extra else {}
            made.append(coord.Coordinator(m, self.token, hosted=r == 0 and self.store == "tcp",
                                          external=self.store == "etcd", lease_timeout_s=5.0,
                                          events=EventLog(None), prefix=f"[rank {r}]", **kwargs))
        return made

    def supervisor_tick(self, c, now: float) -> None:
        c.tick(now)
        if not self.after:
            c.membership.job_signals()  # main's supervisor read the stop and the fresh start every tick

    def steady(self, watches) -> dict:
        """Requests/s per rank of a quiet job: measured with real intervals (up to --steady-max ranks), and
        computed from one synchronous round of ticks plus the watches' waits."""
        coordinators, out = self.coordinators(), {}
        self.signal_watches = []  # (their threads wait for the next signal)
        if self.after:
            from deepspeed_checkfree.resilience.signal_watch import SignalWatch
            self.signal_watches = [SignalWatch(m, 0) for m in self.memberships["signals"]]
        warm_s, window_s = self.args.warm_s, self.args.window_s
        if self.n <= self.args.steady_max:
            stop = threading.Event()

            def loop(c):
                while not stop.is_set():
                    self.supervisor_tick(c, time.monotonic())
                    stop.wait(TICK_S)
            threads = [threading.Thread(target=loop, args=(c,), daemon=True) for c in coordinators]
            for t in threads:
                t.start()
            time.sleep(warm_s)
            first, t0 = self.counts(), time.monotonic()
            time.sleep(window_s)
            last, elapsed = self.counts(), time.monotonic() - t0
            stop.set()
            for t in threads:
                t.join()
            out["measured_per_rank"] = round(sum(last[r][0] - first[r][0] for r in self.ROLES) / elapsed / self.n, 3)
        now = time.monotonic() + 1.0  # (after every real tick's next one)
        for _ in range(int(warm_s / TICK_S)):  # computed: a quiet round of ticks, then the watches' waits
            now += TICK_S
            for c in coordinators:
                self.supervisor_tick(c, now)
        first = self.tallies["supervisor"].requests
        for _ in range(int(window_s / TICK_S)):
            now += TICK_S
            for c in coordinators:
                self.supervisor_tick(c, now)
        ticks = (self.tallies["supervisor"].requests - first) / window_s / self.n
        out["computed_per_rank"] = round(ticks + self.watch_rate(), 3)
        out["computed_supervisor_per_rank"] = round(ticks, 3)
        return out

    def watch_rate(self) -> float:
        """Requests/s one rank's watches make while nothing happens."""
        probe = self.membership("watch", 0)
        tally, start = self.tallies["watch"], self.tallies["watch"].requests
        if not self.after:
            probe.incarnation_moves()  # one poll (the counter did not move)
            return (tally.requests - start) / self.watch_interval_s
        from deepspeed_checkfree.resilience import signal_watch, store_access
        store_access.wait_for(probe.store, probe.key("bench/never"), 0.01)  # one death-watch wait
        rate = (tally.requests - start) / self.api["death_watch"].WAIT_S
        start = tally.requests
        probe.next_signal(10 ** 6, 0.01)  # one wait for the next signal
        return rate + (tally.requests - start) / signal_watch.SIGNAL_WAIT_S


# ---------------------------------------------------------------------------------------------------------------
# The driver: one process per (store, N), the fit, the table
# ---------------------------------------------------------------------------------------------------------------

def fitted_exponent(sizes, values) -> float:
    """Slope of log(values) against log(sizes), least squares."""
    xs, ys = [math.log(s) for s in sizes], [math.log(v) for v in values]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def table(results: dict) -> str:
    """The markdown table of every code in ``results`` (before/after side by side where both were run)."""
    codes = [c for c in ("before", "after") if c in results]
    head = "| store | N | " + " | ".join(f"{c}: requests (per member) | {c}: keys read | {c}: wall s | "
                                         f"{c}: steady req/s per rank" for c in codes) + " |"
    lines = [head, "|" + "---|" * (2 + 4 * len(codes))]
    for store in ("tcp", "etcd"):
        sizes = sorted({int(n) for c in codes for n in results[c].get(store, {}).get("rows", {})})
        for n in sizes:
            cells = []
            for c in codes:
                row = results[c].get(store, {}).get("rows", {}).get(str(n))
                if row is None:
                    cells += ["not run"] * 4
                    continue
                steady = row["steady"]
                rate = (f"{steady['measured_per_rank']} measured, " if "measured_per_rank" in steady else "") + \
                    f"{steady['computed_per_rank']} computed"
                cpu = f" (etcd CPU {row['etcd_cpu_s']} s)" if "etcd_cpu_s" in row else ""
                cells += [f"{row['requests']:,} ({row['requests'] / n:.1f})",
                          f"{row['keys_read']:,}" if store == "etcd" else "-", f"{row['wall_s']}{cpu}", rate]
            lines.append(f"| {store} | {n} | " + " | ".join(cells) + " |")
        fits = [f"{c}: {results[c][store]['exponent']:.2f}" for c in codes if "exponent" in results[c].get(store, {})]
        if fits:
            lines.append(f"| {store} | fitted exponent | " + ", ".join(fits) + " |" + " |" * (4 * len(codes) - 1))
    return "\n".join(lines)


def drive(args) -> None:
    """Each store and size in a process of its own; the rows join those of earlier runs of the same code."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # (so that etcd and the running size are ended)
    sizes = [8, 32, 128] if args.quick else [int(s) for s in args.sizes.split(",")]
    etcd = Etcd() if "etcd" in args.stores.split(",") else None
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    code = results.setdefault(args.code, {})
    code.update(repo=str(Path(args.repo).resolve()), machine=f"{os.cpu_count()} cores")
    try:
        for store in args.stores.split(","):
            rows = code.setdefault(store, {}).setdefault("rows", {})
            for n in sizes:
                cmd = [sys.executable, __file__, "--one", "--store", store, "--n", str(n), "--repo", args.repo,
                       "--warm-s", str(args.warm_s), "--window-s", str(args.window_s),
                       "--steady-max", str(args.steady_max)]
                if etcd is not None:
                    cmd += ["--etcd-url", etcd.url, "--etcd-pid", str(etcd.proc.pid)]
                try:
                    out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout_s, check=True,
                                         env=dict(os.environ, PYTHONPATH=args.repo))
                    rows[str(n)] = dict(json.loads(out.stdout.strip().splitlines()[-1]),
                                        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
                except subprocess.TimeoutExpired:
                    print(f"{args.code} {store} N={n}: not done within --timeout-s={args.timeout_s}", flush=True)
                    break  # (a larger size takes longer still)
                except subprocess.CalledProcessError as err:
                    raise RuntimeError(f"{store} N={n} failed ({err.returncode}):\n{err.stderr[-3000:]}") from None
                print(f"{args.code} {store} N={n}: {rows[str(n)]}", flush=True)
            done = sorted(rows, key=int)
            if len(done) > 1:
                code[store]["exponent"] = round(fitted_exponent([int(n) for n in done],
                                                                [rows[n]["requests"] for n in done]), 3)
                if store == "etcd":
                    code[store]["keys_exponent"] = round(fitted_exponent(
                        [int(n) for n in done], [rows[n]["keys_read"] for n in done]), 3)
            RESULTS.parent.mkdir(parents=True, exist_ok=True)
            RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    finally:
        if etcd is not None:
            etcd.close()
    print(table(results))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--code", choices=["after", "before"], default="after",
                   help="label of the code measured (before: main's, through --repo)")
    p.add_argument("--repo", default=str(REPO), help="the checkout whose deepspeed_checkfree is measured")
    p.add_argument("--sizes", default="8,32,128,512,1024")
    p.add_argument("--quick", action="store_true", help="N = 8, 32, 128")
    p.add_argument("--stores", default="tcp,etcd")
    p.add_argument("--steady-max", type=int, default=128, help="measure the steady state with real intervals up "
                                                               "to this many ranks (computed for all)")
    p.add_argument("--warm-s", type=float, default=3.0)
    p.add_argument("--window-s", type=float, default=4.0)
    p.add_argument("--timeout-s", type=float, default=840.0, help="for one store and size")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--store", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--etcd-url", help=argparse.SUPPRESS)
    p.add_argument("--etcd-pid", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if not args.one:
        drive(args)
        return
    sys.path.insert(0, args.repo)
    print(json.dumps(Job(args).run()), flush=True)
    os._exit(0)  # (threads still block in store waits: end without unwinding them)


if __name__ == "__main__":
    main()
