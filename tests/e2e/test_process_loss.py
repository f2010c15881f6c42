"""Surviving real process and node loss: the stock launchers, real SIGKILLs, the supervisor, no checkpoint files.

Each test launches a real 4-rank job (launch/train.py under `-m deepspeed_checkfree.supervisor`), kills processes
with SIGKILL while it trains, and checks that the job reaches its step count with every step run exactly once,
that the rebuilt stage equals the blend (or copy) of its neighbours' pre-failure weights computed here, that the
survivors' state is bit-identical across the failure, and that the loss stays finite.
"""
from __future__ import annotations

import base64
import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import pytest
import torch

from deepspeed_checkfree.events import read_events

from ..distributed.spawn import REPO, cpu_env, free_port

pytestmark = pytest.mark.e2e

STEPS = 22
DETECTION_TIMEOUT_S = 4.0
EPS = 1e-4
BIN = Path(sys.executable).parent


class Job:
    """A running training job and what it wrote."""

    def __init__(self, tmp: Path, config: str, checkfree: Optional[dict] = None, launcher: str = "deepspeed",
                 token: str = "e2e-token-1234", steps: int = STEPS, deepspeed: Optional[dict] = None,
                 world: int = 4, train_args: List[str] = ()) -> None:
        self.steps, self.world = steps, world
        cfg = {**json.loads((REPO / "configs" / config).read_text()), **(deepspeed or {})}
        # Several ranks share 2 cores here: a timeout well above a step's longest wait keeps false alarms away.
        cfg["checkfree"]["detection_timeout_s"] = DETECTION_TIMEOUT_S
        cfg["checkfree"].update(checkfree or {})
        self.out = tmp / "out"
        self.config = tmp / config
        self.config.write_text(json.dumps(cfg))
        self.port = free_port()
        self.token = token
        self.env = cpu_env({"CHECKFREE_JOB_TOKEN": token, "CHECKFREE_DUMP_DIR": str(self.out / "dumps")})
        self.train_args = ["launch/train.py", "--deepspeed_config", str(self.config), "--steps", str(steps),
                           "--out", str(self.out), *train_args]
        self.log = open(tmp / "job.log", "w+")
        self.procs: List[subprocess.Popen] = []
        if launcher == "deepspeed":
            cmd = [str(BIN / "deepspeed"), "--num_gpus", str(world), "--master_port", str(self.port), "--module",
                   "deepspeed_checkfree.supervisor", "--pid-dir", str(self.out / "pids"), *self.train_args]
            self.procs.append(self._popen(cmd))
        elif launcher == "torchrun":
            cmd = [str(BIN / "torchrun"), "--nproc_per_node", str(world), "--master_port", str(self.port), "-m",
                   "deepspeed_checkfree.supervisor", "--pid-dir", str(self.out / "pids"), *self.train_args]
            self.procs.append(self._popen(cmd))
        elif launcher == "nodes":
            # One DeepSpeed node launcher per rank, as the multi-node runner starts on each machine.
            world = base64.urlsafe_b64encode(json.dumps({f"node{i}": [0] for i in range(4)}).encode()).decode()
            for node in range(4):
                cmd = [sys.executable, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={world}",
                       f"--node_rank={node}", "--master_addr=127.0.0.1", f"--master_port={self.port}", "--module",
                       "deepspeed_checkfree.supervisor", "--pid-dir", str(self.out / "pids"), *self.train_args]
                self.procs.append(self._popen(cmd, new_session=True))
        else:
            raise ValueError(launcher)

    def _popen(self, cmd, new_session: bool = False) -> subprocess.Popen:
        return subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                start_new_session=new_session)

    def steps_done(self) -> int:
        path = self.out / "metrics.csv"
        return max(0, len(path.read_text().splitlines()) - 1) if path.exists() else 0

    def wait_for_step(self, step: int, timeout_s: float = 240) -> None:
        deadline = time.monotonic() + timeout_s
        while self.steps_done() < step:
            assert all(p.poll() is None for p in self.procs), self.tail()
            assert time.monotonic() < deadline, f"no step {step} after {timeout_s} s\n{self.tail()}"
            time.sleep(0.05)

    def kill_trainer(self, rank: int) -> None:
        os.kill(int((self.out / "pids" / f"rank{rank}.pid").read_text()), signal.SIGKILL)

    def wait(self, timeout_s: float = 300) -> None:
        deadline = time.monotonic() + timeout_s
        for p in self.procs:
            try:
                p.wait(timeout=max(1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.terminate()
                raise AssertionError(f"job did not finish in {timeout_s} s\n{self.tail()}")
        assert all(p.returncode == 0 for p in self.procs), self.tail()

    def terminate(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL) if p.pid == os.getpgid(p.pid) else p.kill()
                except ProcessLookupError:
                    pass
        subprocess.run(["pkill", "-9", "-f", str(self.config)], check=False)

    def tail(self, n: int = 6000) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-n:]

    # what the job wrote -------------------------------------------------------------------------------------

    def metrics(self) -> List[dict]:
        return list(csv.DictReader(open(self.out / "metrics.csv")))

    def events(self) -> List[dict]:
        return read_events(str(self.out / "events.jsonl"))

    def dump(self, generation: int, when: str, rank: int) -> dict:
        return torch.load(self.out / "dumps" / f"g{generation}-{when}-rank{rank}.pt", weights_only=False)


@pytest.fixture
def job_factory(tmp_path):
    jobs = []

    def make(*args, **kwargs):
        job = Job(tmp_path, *args, **kwargs)
        jobs.append(job)
        return job

    yield make
    for job in jobs:
        job.terminate()


def _blocks(params: Dict[str, torch.Tensor]) -> List[int]:
    return sorted({int(n.split(".")[0]) for n in params if n.endswith(".qkv.weight")})


def check_completed(job: Job) -> List[float]:
    rows = job.metrics()
    assert [int(r["step"]) for r in rows] == list(range(job.steps)), "every step ran exactly once, none lost"
    losses = [float(r["loss"]) for r in rows]
    assert all(math.isfinite(l) for l in losses), losses
    assert sum(losses[-3:]) < sum(losses[:3]), losses
    assert not list(job.out.rglob("*model_states*")) and not list(job.out.rglob("*.ckpt")), "no checkpoint file"
    return losses


def check_survivors(job: Job, generation: int, lost_ranks: List[int]) -> None:
    for rank in range(job.world):
        if rank in lost_ranks:
            continue
        before, after = job.dump(generation, "before", rank), job.dump(generation, "after", rank)
        for name, p in before["params"].items():
            assert torch.equal(p, after["params"][name]), f"survivor rank {rank}: {name} changed"
        for key, st in before["opt_state"].items():
            for field, v in st.items():
                assert torch.equal(torch.as_tensor(v), torch.as_tensor(after["opt_state"][key][field]))
        assert before["opt_state"], f"survivor rank {rank} kept its Adam moments"
        # Under bf16/ZeRO the fp32 master weights come through as they were, not re-derived from the bf16 ones.
        assert len(before["fp32_masters"]) == len(after["fp32_masters"])
        for b, a in zip(before["fp32_masters"], after["fp32_masters"]):
            assert torch.equal(b, a), f"survivor rank {rank}: fp32 master weights changed"


def check_blend(job: Job, generation: int, target: int, sources: List[int], weights: List[float]) -> None:
    """The rebuilt stage equals the rule applied here to the sources' pre-failure weights."""
    after = job.dump(generation, "after", target)["params"]
    src = [job.dump(generation, "before", s)["params"] for s in sources]
    tb, sb = _blocks(after), [_blocks(p) for p in src]
    checked = 0
    for k, layer in enumerate(tb):
        for name in after:
            if not name.startswith(f"{layer}."):
                continue
            suffix = name[len(str(layer)):]
            vals = [p[f"{b[k]}{suffix}"].float() for p, b in zip(src, sb)]  # bf16 blends in fp32, as documented
            if len(vals) == 2:
                want = (weights[0] * vals[0] + weights[1] * vals[1]) / (weights[0] + weights[1])
            else:
                want = vals[0]
            assert torch.equal(after[name], want.to(after[name].dtype)), \
                f"rank {target} {name} is not the blend of {sources}"
            checked += 1
    assert checked > 0
    if len(sources) == 1:
        # A CheckFree+ copy also takes the neighbour's (de)embedding replica: tied modules have the same names.
        for name in (n for n in after if n.startswith("tied_modules.")):
            assert torch.equal(after[name], src[0][name]), f"rank {target} {name} is not rank {sources[0]}'s copy"
    assert job.dump(generation, "after", target)["opt_state"] == {}, "rebuilt stage starts with a fresh optimizer"


def check_masters_refreshed(job: Job, generation: int, target: int) -> None:
    """The rebuilt stage's fp32 masters are its new weights (not the dead process's, nor fresh initialisation),
    so the next optimizer step cannot undo the rebuild."""
    after = job.dump(generation, "after", target)
    # (Compared as sorted values: the flat masters order parameters by optimizer group and may end in padding.)
    flat = torch.cat([p.detach().float().flatten() for p in after["params"].values()])
    masters = torch.cat([m.flatten() for m in after["fp32_masters"]])
    flat = torch.cat([flat, flat.new_zeros(masters.numel() - flat.numel())])
    assert torch.equal(torch.sort(masters).values, torch.sort(flat).values)


def gradnorm_weights(job: Job, generation: int, sources: List[int], distances=(1, 1)) -> List[float]:
    norms = [job.dump(generation, "before", s)["norm"] for s in sources]
    return [(n + EPS) * d for n, d in zip(norms, reversed(distances))]


def outage(job: Job, lost_stages: List[int]) -> dict:
    """The one outage record of the failure that lost ``lost_stages`` (its generation numbers the dumps)."""
    records = [e for e in job.events() if e["event"] == "outage" and e["lost_stages"] == lost_stages]
    assert len(records) == 1, job.events()
    rec = records[0]
    assert rec["lost_steps"] == 0
    assert 0 < rec["detected_s"] <= rec["rejoined_s"] <= rec["rebuilt_s"] <= rec["resumed_s"] == rec["outage_s"]
    return rec


def test_sigkill_of_a_middle_stage_under_the_deepspeed_launcher_and_a_refused_join(job_factory):
    job = job_factory("checkfree_no_failure.json", steps=40)
    job.wait_for_step(2)
    # A machine that tries to join without the job's token is refused, and the job does not notice.
    bad_env = dict(job.env, CHECKFREE_JOB_TOKEN="not-the-token")
    intruder = subprocess.Popen(
        [sys.executable, "-m", "deepspeed_checkfree.supervisor", "--join", "--rank", "2", "--world-size", "4",
         "--master-addr", "127.0.0.1", "--master-port", str(job.port), *job.train_args],
        cwd=REPO, env=bad_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    job.wait_for_step(8)
    job.kill_trainer(2)
    intruder_out, _ = intruder.communicate(timeout=120)
    job.wait()
    assert intruder.returncode == 3, intruder_out
    assert "join refused for rank 2" in intruder_out and "token does not match" in intruder_out
    check_completed(job)
    events = job.events()
    assert any(e["event"] == "failure_detected" for e in events)
    rec = outage(job, [2])
    assert rec["start"] == "trainer death"
    g = rec["generation"]
    check_survivors(job, g, [2])
    check_blend(job, g, 2, [1, 3], gradnorm_weights(job, g, [1, 3]))
    log = job.tail(10**6)
    assert "refused a join for rank 2" in log and "Traceback" not in log
    assert all(e["lost_stages"] in ([2], []) for e in events if e["event"] == "outage"), \
        "the refused join did not disturb the job"


@pytest.mark.parametrize("precision", ["bf16", "zero1"])
def test_sigkill_of_a_middle_stage_under_bf16_and_zero1_keeps_the_fp32_masters(job_factory, precision):
    ds = {"bf16": {"bf16": {"enabled": True}}, "zero1": {"zero_optimization": {"stage": 1}}}[precision]
    job = job_factory("checkfree_no_failure.json", deepspeed=ds)
    job.wait_for_step(6)
    job.kill_trainer(1)
    job.wait()
    check_completed(job)
    g = outage(job, [1])["generation"]
    before = job.dump(g, "before", 0)
    assert before["fp32_masters"], "the wrapping optimizer's fp32 masters are dumped"
    want_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    assert next(iter(before["params"].values())).dtype == want_dtype
    check_survivors(job, g, [1])
    check_blend(job, g, 1, [0, 2], gradnorm_weights(job, g, [0, 2]))
    check_masters_refreshed(job, g, 1)


def test_data_parallel_replica_restores_a_lost_rank_exactly_and_a_stage_without_replicas_is_rebuilt(job_factory):
    # 3 stages x 2 data-parallel replicas: rank = 2 * stage + replica.
    job = job_factory("checkfree_no_failure.json", world=6, train_args=["--stages", "3", "--layers", "9"],
                      steps=18)
    job.wait_for_step(4)
    job.kill_trainer(3)  # stage 1, replica 1; its replica on rank 2 survives
    job.wait_for_step(11)
    job.kill_trainer(2)  # now both replicas of stage 1
    job.kill_trainer(3)
    job.wait()
    check_completed(job)
    first, second = sorted((e for e in job.events() if e["event"] == "outage"), key=lambda e: e["generation"])
    assert first["lost_ranks"] == [3] and second["lost_ranks"] == [2, 3]
    assert first["lost_steps"] == second["lost_steps"] == 0

    g = first["generation"]
    check_survivors(job, g, [3])
    replica, restored = job.dump(g, "before", 2), job.dump(g, "after", 3)
    for name, p in replica["params"].items():
        assert torch.equal(restored["params"][name], p), f"restored rank 3: {name} is not its replica's"
    assert restored["opt_state"].keys() == replica["opt_state"].keys() and restored["opt_state"]
    for key, st in replica["opt_state"].items():
        for field, v in st.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(restored["opt_state"][key][field]))
    assert restored["lrs"] == replica["lrs"], "no LR boost: nothing was approximated"
    rec = next(e for e in job.events() if e["event"] == "recovery" and e["rank"] == 3)
    assert rec["strategy"] == "data_parallel_replica" and rec["source_rank"] == 2 and rec["optimizer"] == "copied"

    g = second["generation"]
    check_survivors(job, g, [2, 3])
    check_blend(job, g, 2, [0, 4], gradnorm_weights(job, g, [0, 4]))
    check_blend(job, g, 3, [1, 5], gradnorm_weights(job, g, [1, 5]))
    a, b = job.dump(g, "after", 2)["params"], job.dump(g, "after", 3)["params"]
    assert all(torch.equal(a[n], b[n]) for n in a), "both replicas are rebuilt alike"


def test_first_then_last_stage_killed_under_checkfree_plus(job_factory):
    job = job_factory("checkfree_plus_no_failure.json")
    job.wait_for_step(5)
    job.kill_trainer(0)
    job.wait_for_step(13)
    job.kill_trainer(3)
    job.wait()
    check_completed(job)
    g0, g3 = outage(job, [0])["generation"], outage(job, [3])["generation"]
    assert g0 < g3
    check_survivors(job, g0, [0])
    check_blend(job, g0, 0, [1], [1.0])
    check_survivors(job, g3, [3])
    check_blend(job, g3, 3, [2], [1.0])


def test_first_stage_killed_under_checkfree_plus_and_bf16_copies_weights_and_refreshes_fp32_masters(job_factory):
    job = job_factory("checkfree_plus_no_failure.json", deepspeed={"bf16": {"enabled": True}}, steps=14)
    job.wait_for_step(5)
    job.kill_trainer(0)
    job.wait()
    check_completed(job)
    g = outage(job, [0])["generation"]
    assert next(iter(job.dump(g, "before", 1)["params"].values())).dtype == torch.bfloat16
    check_survivors(job, g, [0])
    check_blend(job, g, 0, [1], [1.0])  # blocks and the embedding copied from stage 1
    assert any(n.startswith("tied_modules.") for n in job.dump(g, "after", 0)["params"]), "stage 0 has its embedding"
    check_masters_refreshed(job, g, 0)


def test_node_loss_and_join_of_a_replacement_machine(job_factory):
    job = job_factory("checkfree_no_failure.json", launcher="nodes")
    job.wait_for_step(6)
    node = job.procs[1]
    os.killpg(node.pid, signal.SIGKILL)  # the whole node: its launcher, supervisor, trainer and spare
    node.wait()
    killed = time.time()
    joiner = subprocess.Popen(
        [sys.executable, "-m", "deepspeed_checkfree.supervisor", "--join", "--rank", "1", "--world-size", "4",
         "--master-addr", "127.0.0.1", "--master-port", str(job.port), "--pid-dir", str(job.out / "pids"),
         *job.train_args], cwd=REPO, env=job.env, stdout=job.log, stderr=subprocess.STDOUT)
    job.procs[1] = joiner
    job.wait()
    check_completed(job)
    rec = outage(job, [1])
    assert rec["start"].startswith("first detection")
    assert "admitted a new machine" in job.tail(10**6)
    g = rec["generation"]
    check_survivors(job, g, [1])
    check_blend(job, g, 1, [0, 2], gradnorm_weights(job, g, [0, 2]))
    assert time.time() - killed < 200


def test_replacement_dying_during_its_rebuild_under_torchrun(job_factory):
    job = job_factory("checkfree_no_failure.json", {"failure_injection": {"kill_during_rebuild": 2}},
                      launcher="torchrun")
    job.wait_for_step(6)
    job.kill_trainer(2)
    job.wait()
    check_completed(job)
    assert "kill_during_rebuild" in job.tail(10**6)
    rec = outage(job, [2])  # the generation of the first replacement died in its rebuild; the next completed it
    g = rec["generation"]
    died = [e for e in job.events() if e["event"] == "stage_lost" and e["stage"] == 2]
    assert len(died) >= 2, "two replacements started rebuilding stage 2"
    check_survivors(job, g, [2])
    check_blend(job, g, 2, [1, 3], gradnorm_weights(job, g, [1, 3]))


def test_two_adjacent_stages_lost_at_once_are_interpolated(job_factory):
    job = job_factory("checkfree_no_failure.json")
    job.wait_for_step(6)
    job.kill_trainer(1)
    job.kill_trainer(2)
    job.wait()
    check_completed(job)
    g = outage(job, [1, 2])["generation"]
    check_survivors(job, g, [1, 2])
    # stage 1 lies at distance 1 from stage 0 and 2 from stage 3 (and the other way round for stage 2)
    check_blend(job, g, 1, [0, 3], gradnorm_weights(job, g, [0, 3], distances=(1, 2)))
    check_blend(job, g, 2, [0, 3], gradnorm_weights(job, g, [0, 3], distances=(2, 1)))


def test_two_adjacent_stages_lost_stop_the_job_cleanly_when_the_config_says_stop(job_factory):
    job = job_factory("checkfree_no_failure.json", {"on_adjacent_failure": "stop"})
    job.wait_for_step(4)
    job.kill_trainer(1)
    job.kill_trainer(2)
    job.procs[0].wait(timeout=240)
    assert job.procs[0].returncode != 0, "the job stops instead of training on"
    log = job.tail(10**6)
    assert "on_adjacent_failure='stop'" in log and "not restarting it" in log
    stopped = [e for e in job.events() if e["event"] == "stopped"]
    assert stopped and "adjacent stages [1, 2]" in stopped[0]["reason"]
