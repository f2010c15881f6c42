"""The fault policy end to end: every fault ends in bounded time, recovered or stopped with its cause named, with no
restart loop and no process left behind. Real jobs (launch/train.py under `-m deepspeed_checkfree.supervisor`, the
smallest model), real signals (SIGKILL, SIGSTOP), both launchers. Each test asserts the job's exit code and final
step count, the time bound, and that no process the job started (recorded by pid) survives it.

(`FaultJob` is this file's own small runner; it moves onto the shared e2e harness once that lands on main.)
"""
from __future__ import annotations

import base64
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import pytest

from deepspeed_checkfree.events import read_events
from deepspeed_checkfree.resilience.contract import pid_file, started_file, supervisor_pid_file

from ..distributed.spawn import REPO, cpu_env, free_port

pytestmark = pytest.mark.e2e

BIN = Path(sys.executable).parent
DETECTION_TIMEOUT_S = 4.0
TOKEN = "fault-policy-token"
SMALL = ["--d-model", "32", "--layers", "4", "--heads", "2", "--seq-len", "32"]
LEFTOVER_S = 5.0  # a process the job started may outlive it by this much


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


class FaultJob:
    """One job: its launcher(s), what it wrote, and every pid it started."""

    def __init__(self, tmp: Path, *, launcher: str = "deepspeed", steps: int = 12, checkfree: Optional[dict] = None,
                 train_args: List[str] = (), yaml_section: bool = False, section: Optional[object] = None) -> None:
        cfg = json.loads((REPO / "configs" / "checkfree_no_failure.json").read_text())
        cfg.update(train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=4)
        cfg["checkfree"].update(detection_timeout_s=DETECTION_TIMEOUT_S, join_timeout_s=120.0, **(checkfree or {}))
        if yaml_section:
            (tmp / "checkfree.yaml").write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in cfg["checkfree"].items()))
            cfg["checkfree"] = str(tmp / "checkfree.yaml")
        if section is not None:
            cfg["checkfree"] = section
        self.tmp, self.steps, self.out = tmp, steps, tmp / "out"
        self.config = tmp / "ds_config.json"
        self.config.write_text(json.dumps(cfg))
        self.port = free_port()
        self.env = cpu_env({"CHECKFREE_JOB_TOKEN": TOKEN,
                            "CHECKFREE_SUPERVISOR_EVENTS": str(self.out / "supervisor_events.jsonl")})
        self.pids_dir = self.out / "pids"
        self.train_args = ["launch/train.py", "--deepspeed_config", str(self.config), "--steps", str(steps),
                           "--out", str(self.out), *SMALL, *train_args]
        self.log = open(tmp / "job.log", "w+")
        self.procs: List[subprocess.Popen] = []
        self.extra_pids: List[int] = []
        sup = ["deepspeed_checkfree.supervisor", "--pid-dir", str(self.pids_dir)]
        if launcher == "deepspeed":
            self._popen([str(BIN / "deepspeed"), "--num_gpus", "4", "--master_port", str(self.port), "--module", *sup,
                         *self.train_args])
        elif launcher == "torchrun":
            self._popen([str(BIN / "torchrun"), "--nproc_per_node", "4", "--master_port", str(self.port), "-m", *sup,
                         *self.train_args])
        elif launcher == "nodes":  # one DeepSpeed node launcher per rank, as on 4 machines
            world = base64.urlsafe_b64encode(json.dumps({f"node{i}": [0] for i in range(4)}).encode()).decode()
            for node in range(4):
                self._popen([sys.executable, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={world}",
                             f"--node_rank={node}", "--master_addr=127.0.0.1", f"--master_port={self.port}",
                             "--module", *sup, *self.train_args])
        self.started_at = time.monotonic()

    def _popen(self, cmd: List[str]) -> subprocess.Popen:
        proc = subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs.append(proc)
        return proc

    def supervisor(self, *args: str, rank: int, token: str = TOKEN) -> subprocess.Popen:
        """A machine running the supervisor by hand (a join)."""
        proc = subprocess.Popen(
            [sys.executable, "-m", "deepspeed_checkfree.supervisor", "--rank", str(rank), "--world-size", "4",
             "--master-addr", "127.0.0.1", "--master-port", str(self.port), "--pid-dir", str(self.pids_dir), *args,
             *self.train_args], cwd=REPO, env=dict(self.env, CHECKFREE_JOB_TOKEN=token),
            stdout=open(self.tmp / f"joiner{len(self.extra_pids)}.log", "w"), stderr=subprocess.STDOUT,
            start_new_session=True)
        proc.log = self.tmp / f"joiner{len(self.extra_pids)}.log"
        self.extra_pids.append(proc.pid)
        return proc

    def finish(self, proc: subprocess.Popen, timeout_s: float) -> str:
        """Wait for a process started by :meth:`supervisor`; return its output."""
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{proc.args} did not end within {timeout_s} s\n{proc.log.read_text()[-6000:]}")
        return proc.log.read_text()

    # what the job started and wrote -------------------------------------------------------------------------------

    def started(self, rank: Optional[int] = None) -> List[tuple]:
        """(role, pid) of every process the supervisors started (of ``rank``), themselves included."""
        rows = []
        for r in range(4) if rank is None else [rank]:
            path = Path(started_file(str(self.pids_dir), r))
            if path.exists():
                rows += [(line.split()[0], int(line.split()[1])) for line in path.read_text().splitlines()]
        return rows

    def all_pids(self) -> List[int]:
        return [p.pid for p in self.procs] + self.extra_pids + [pid for _, pid in self.started()]

    def trainer_pid(self, rank: int) -> int:
        return int(Path(pid_file(str(self.pids_dir), rank)).read_text())

    def supervisor_pid(self, rank: int) -> int:
        return int(Path(supervisor_pid_file(str(self.pids_dir), rank)).read_text())

    def steps_done(self) -> int:
        path = self.out / "metrics.csv"
        return max(0, len(path.read_text().splitlines()) - 1) if path.exists() else 0

    def step_list(self) -> List[int]:
        path = self.out / "metrics.csv"
        return [int(r["step"]) for r in csv.DictReader(open(path))] if path.exists() else []

    def events(self, name: str = "events.jsonl") -> List[dict]:
        path = self.out / name
        return read_events(str(path)) if path.exists() else []

    def tail(self, n: int = 8000) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-n:]

    # waiting -----------------------------------------------------------------------------------------------------

    def wait_for_step(self, step: int, timeout_s: float = 240) -> None:
        deadline = time.monotonic() + timeout_s
        while self.steps_done() < step:
            assert all(p.poll() is None for p in self.procs), self.tail()
            assert time.monotonic() < deadline, f"no step {step} after {timeout_s} s\n{self.tail()}"
            time.sleep(0.05)

    def wait_until(self, what, timeout_s: float, message: str) -> float:
        deadline = time.monotonic() + timeout_s
        while not what():
            assert time.monotonic() < deadline, f"{message} (after {timeout_s} s)\n{self.tail()}"
            time.sleep(0.05)
        return time.monotonic()

    def wait(self, timeout_s: float) -> List[int]:
        """Wait for every launcher; return their exit codes."""
        deadline = time.monotonic() + timeout_s
        for p in self.procs:
            try:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise AssertionError(f"the job did not end within {timeout_s} s\n{self.tail()}")
        self.ended_at, self.ended_wall = time.monotonic(), time.time()
        return [p.returncode for p in self.procs]

    def assert_nothing_left(self) -> None:
        """No process the job started outlives it by more than LEFTOVER_S."""
        pids = self.all_pids()
        assert len(pids) > 4
        deadline = time.monotonic() + LEFTOVER_S
        while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = {pid: open(f"/proc/{pid}/cmdline").read().replace("\0", " ")[:200] for pid in pids if alive(pid)}
        assert not left, f"processes left {LEFTOVER_S} s after the job ended: {left}"

    def cleanup(self) -> None:
        for pid in self.all_pids():
            if alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


@pytest.fixture
def job_factory(tmp_path):
    jobs = []

    def make(**kwargs) -> FaultJob:
        tmp = tmp_path / f"job{len(jobs)}"
        tmp.mkdir()
        job = FaultJob(tmp, **kwargs)
        jobs.append(job)
        return job

    yield make
    for job in jobs:
        job.cleanup()


def stopped_records(job: FaultJob) -> List[dict]:
    return [e for e in job.events() if e["event"] == "stopped"]


# ---------------------------------------------------------------------------------------------------------------
# Errors that are not a lost peer stop the job at once: exit code 78, no respawn
# ---------------------------------------------------------------------------------------------------------------

def test_a_config_error_stops_every_rank_at_once_with_exit_code_78_under_both_launchers(job_factory):
    typo = job_factory(checkfree={"lr_bost": 1.2})
    missing = job_factory(launcher="torchrun", section="/nonexistent/checkfree.yaml")
    for job in (typo, missing):
        codes = job.wait(timeout_s=120)
        took = job.ended_at - job.started_at
        assert took < 90, f"a config error must stop the job at once, it took {took:.0f} s"
        assert job.steps_done() == 0
        trainers = [role for role, _ in job.started() if role == "trainer"]
        assert len(trainers) == 4, f"one trainer per rank, none respawned: {job.started()}"
        stops = stopped_records(job)
        assert stops and all(e["cause"] == "config" for e in stops), stops
        job.assert_nothing_left()
    assert codes and typo.procs[0].returncode == 78, typo.tail()
    assert "Did you mean 'lr_boost'" in stopped_records(typo)[0]["reason"]
    assert missing.procs[0].returncode != 0 and "exitcode  : 78" in missing.tail(10**6), missing.tail()
    assert "cannot read the CheckFree config file '/nonexistent/checkfree.yaml'" in stopped_records(missing)[0]["reason"]


def test_a_deterministic_exception_in_a_step_stops_the_job_with_its_traceback_and_no_replay(job_factory):
    job = job_factory(train_args=["--inject-error", "2:3"])
    codes = job.wait(timeout_s=240)
    assert codes == [78], job.tail()
    assert job.step_list() == [0, 1, 2], "steps 0-2 completed, step 3 raised and was not replayed"
    stop = next(e for e in stopped_records(job) if e["rank"] == 2)
    assert stop["cause"] == "program" and stop["step"] == 3
    assert "AssertionError: injected deterministic error in step 3 on rank 2" in stop["reason"]
    assert "not a communication failure" in stop["reason"]
    log = job.tail(10**6)
    assert "Traceback" in log and 'in train_step\n    raise AssertionError(f"injected' in log
    # The other ranks see rank 2's exit as a lost peer, then the stop: nobody replays, rebuilds or respawns.
    assert not [e for e in job.events() if e["event"] == "outage" or (e["event"] == "failure_detected"
                                                                       and e["rank"] == 2)]
    assert {e["rank"] for e in stopped_records(job)} >= {2} and not [
        e for e in job.events("supervisor_events.jsonl") if e["event"] == "trainer_died"]
    took = job.ended_wall - stop["time"]
    assert took < DETECTION_TIMEOUT_S + 15, f"the job ended {took:.1f} s after the raise"
    assert [role for role, _ in job.started()].count("trainer") == 4, "no trainer was respawned"
    job.assert_nothing_left()


# ---------------------------------------------------------------------------------------------------------------
# Deaths before the first step: a fresh start
# ---------------------------------------------------------------------------------------------------------------

def test_trainer_deaths_at_start_up_and_in_the_first_engine_build_start_the_job_over(job_factory):
    job = job_factory(steps=8, train_args=["--die-at", "startup:1", "--die-at", "build:2"])
    codes = job.wait(timeout_s=300)
    assert codes == [0], job.tail()
    assert job.step_list() == list(range(8)), "every step ran exactly once"
    took = job.ended_at - job.started_at
    assert took < 200, f"{took:.0f} s"
    log = job.tail(10**6)
    assert "--die-at startup:1" in log and "--die-at build:2" in log
    sup = job.events("supervisor_events.jsonl")
    assert any(e["event"] == "fresh_start" for e in sup), sup
    assert [e for e in job.events() if e["event"] == "fresh_start"], "rank 0 records the fresh start"
    assert not [e for e in job.events() if e["event"] in ("outage", "stopped")]
    job.assert_nothing_left()


# ---------------------------------------------------------------------------------------------------------------
# One job, several rows: a transient communication error, a dead spare, joins for a live rank, a hung trainer
# ---------------------------------------------------------------------------------------------------------------

def test_transient_error_dead_spare_refused_joins_and_a_hung_trainer_in_one_job(job_factory):
    steps = 400  # at least 0.2 s each: long enough for the joins and the hang below, however fast the machine
    job = job_factory(steps=steps, yaml_section=True, train_args=["--inject-comm-error", "1:3", "--min-step-s", "0.2"])
    job.wait_for_step(5)
    # A transient communication error on rank 1 (step 3): the group re-forms and the step is replayed, no rebuild.
    transient = [e for e in job.events() if e["event"] == "outage"]
    assert len(transient) == 1 and transient[0]["lost_ranks"] == [] and transient[0]["lost_steps"] == 0, transient
    assert transient[0]["outage_s"] < DETECTION_TIMEOUT_S + 20

    # A warm spare's death is a log line and an event, and another spare is started.
    spare = [pid for role, pid in job.started(3) if role == "spare"][-1]
    os.kill(spare, signal.SIGKILL)
    job.wait_until(lambda: any(e["event"] == "spare_died" and e["pid"] == spare
                               for e in job.events("supervisor_events.jsonl")), 10, "no spare_died event")
    assert f"warm spare pid {spare} died" in job.tail(10**6)

    # Joins for a live rank (with the token) and without the token are refused; the job is untouched.
    rank1 = job.trainer_pid(1)
    cases = ((TOKEN, "rank 1 is alive"), ("not-the-token", "token does not match"))
    joiners = [(job.supervisor("--join", rank=1, token=token), words) for token, words in cases]
    for joiner, words in joiners:
        out = job.finish(joiner, timeout_s=60)
        assert joiner.returncode == 3 and words in out, out
    assert job.trainer_pid(1) == rank1 and alive(rank1)
    assert job.steps_done() < steps - 100, "the job must still be training for the hang below"

    # A hung trainer (SIGSTOP, for good) is killed within detection_timeout_s and replaced like a dead one.
    hung = job.trainer_pid(2)
    os.kill(hung, signal.SIGSTOP)
    stopped_at = time.monotonic()
    job.wait_until(lambda: not alive(hung), DETECTION_TIMEOUT_S + 6, f"hung trainer {hung} was not killed")
    assert time.monotonic() - stopped_at < DETECTION_TIMEOUT_S + 6
    codes = job.wait(timeout_s=240)
    assert codes == [0], job.tail()
    assert job.step_list() == list(range(steps)), "every step ran exactly once"
    sup = job.events("supervisor_events.jsonl")
    assert [e for e in sup if e["event"] == "trainer_hung" and e["pid"] == hung]
    lost = [e for e in job.events() if e["event"] == "outage" and e["lost_ranks"] == [2]]
    assert len(lost) == 1 and 0 <= lost[0]["detected_s"] <= lost[0]["outage_s"] < DETECTION_TIMEOUT_S + 30, lost
    assert [e["event"] for e in sup if e["event"].startswith("join_")] == ["join_refused", "join_refused"]
    job.assert_nothing_left()


# ---------------------------------------------------------------------------------------------------------------
# A supervisor's death: its trainer and spare end, and the rank is taken over by a joining machine
# ---------------------------------------------------------------------------------------------------------------

def test_a_killed_supervisor_takes_its_trainer_and_spare_along_and_a_join_takes_over_its_rank(job_factory):
    # Paced (0.3 s a step), so that the kill lands mid-run however fast the machine: the orphaned trainer may train
    # on for up to a heartbeat interval (1 s) before it notices, and a death in the job's last step is another case
    # (the ranks that finished have left: see the README's limitations).
    job = job_factory(launcher="nodes", steps=14, train_args=["--min-step-s", "0.3"])
    job.wait_for_step(4)
    children = [pid for role, pid in job.started(1) if role != "supervisor"]
    os.kill(job.supervisor_pid(1), signal.SIGKILL)
    killed_at = time.monotonic()
    job.wait_until(lambda: not any(alive(p) for p in children), 5, f"rank 1's trainer/spare {children} orphaned")
    assert "ends itself: its supervisor" in job.tail(10**6)
    assert job.procs[1].wait(timeout=30) != 0, "rank 1's node launcher ends with its supervisor"
    joiner = job.supervisor("--join", rank=1)
    out = job.finish(joiner, timeout_s=150)
    assert joiner.returncode == 0, out
    assert "joined the job as a replacement" in out
    codes = [p.wait(timeout=120) for i, p in enumerate(job.procs) if i != 1]
    job.ended_at = time.monotonic()
    assert codes == [0, 0, 0], job.tail()
    assert job.step_list() == list(range(14))
    assert job.ended_at - killed_at < 200
    assert [e for e in job.events() if e["event"] == "outage" and e["lost_ranks"] == [1]]
    job.assert_nothing_left()
