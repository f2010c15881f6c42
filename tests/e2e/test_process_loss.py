"""Surviving real process and node loss: the stock launchers, real SIGKILLs, the supervisor, no checkpoint files.

Each test launches a real 4-rank job (launch/train.py under `-m deepspeed_checkfree.supervisor`), kills processes
with SIGKILL while it trains, and checks that the job reaches its step count with every step run exactly once,
that the rebuilt stage equals the blend (or copy) of its neighbours' pre-failure weights computed here, that the
survivors' state is bit-identical across the failure, and that the loss stays finite. Every process a job starts
is tracked by pid; at the end the test ends those (and only those) and fails if any outlived the finished job.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import pytest
import torch

from deepspeed_checkfree.resilience.contract import STORE_LOST_EXIT_CODE

from ..harness import job as harness_job
from ..harness.job import BIN, DETECTION_TIMEOUT_S, world_info
from ..harness.oracle import (check_loss_falls, check_masters_refreshed, check_rebuild, check_same_state,
                              check_survivors_untouched, gradnorm_weights)
from ..harness.processes import LEFTOVER, close_all

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

LR_BOOST = 1.1  # the configs' (default) boost of a rebuilt stage's learning rate


class Job(harness_job.Job):
    """A job under one of the stock launchers on this machine, and its state dumps around each rebuild."""

    def __init__(self, tmp: Path, config: str, checkfree: Optional[dict] = None, launcher: str = "deepspeed",
                 **kwargs) -> None:
        super().__init__(tmp, config, checkfree, **kwargs)
        assert self.cfg["checkfree"].get("lr_boost", LR_BOOST) == LR_BOOST
        world, supervisor = self.world, self.supervisor_module
        if launcher == "deepspeed":
            self.procs.append(self.start([str(BIN / "deepspeed"), "--num_gpus", str(world), "--master_port",
                                          str(self.port), "--module", *supervisor]))
        elif launcher == "torchrun":
            self.procs.append(self.start([str(BIN / "torchrun"), "--nproc_per_node", str(world), "--master_port",
                                          str(self.port), "-m", *supervisor]))
        elif launcher == "nodes":
            # One DeepSpeed node launcher per rank, as the multi-node runner starts on each machine.
            info = world_info(4)
            for node in range(4):
                self.procs.append(self.start(
                    [sys.executable, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={info}",
                     f"--node_rank={node}", "--master_addr=127.0.0.1", f"--master_port={self.port}", "--module",
                     *supervisor], new_session=True))
        else:
            raise ValueError(launcher)

    def dump(self, generation: int, when: str, rank: int) -> dict:
        return torch.load(self.out / "dumps" / f"g{generation}-{when}-rank{rank}.pt", weights_only=False)

    def snapshots(self, generation: int) -> Tuple[Dict[int, dict], Dict[int, dict]]:
        """Every rank's state just before and just after the rebuild of ``generation``."""
        return ({r: self.dump(generation, "before", r) for r in range(self.world)},
                {r: self.dump(generation, "after", r) for r in range(self.world)})


@pytest.fixture
def job_factory(tmp_path):
    jobs: List[Job] = []

    def make(*args, **kwargs) -> Job:
        home = tmp_path / f"job{len(jobs)}"  # each job its own output, pid and config files
        home.mkdir()
        job = Job(home, *args, **kwargs)
        jobs.append(job)
        return job

    yield make
    try:
        left = close_all([job.processes for job in jobs])
    finally:
        for job in jobs:
            job.close()
    assert not left, LEFTOVER + "\n".join(left)


def check_completed(job: Job) -> List[float]:
    rows = job.metrics()
    assert [int(r["step"]) for r in rows] == list(range(job.steps)), "every step ran exactly once, none lost"
    # (a failure that came after every survivor's update of a step, in DeepSpeed's broadcast of its loss, leaves
    # that step's loss unknown on a rank: it reports it as NaN and records it, trainer.py; rank 0 writes the rows)
    lost = {int(e["step"]) for e in job.events() if e["event"] == "loss_lost" and e["rank"] == 0}
    assert len(lost) <= 1 and all(math.isnan(float(rows[s]["loss"])) for s in lost), lost
    losses = [float(r["loss"]) for r in rows if int(r["step"]) not in lost]
    check_loss_falls(losses, since=0, window=3)
    assert not list(job.out.rglob("*model_states*")) and not list(job.out.rglob("*.ckpt")), "no checkpoint file"
    return losses


def check_rebuilt(job: Job, generation: int, rebuilt: Dict[int, Sequence[int]],
                  distances: Optional[Dict[int, Sequence[int]]] = None) -> None:
    """Every rank lost in ``generation`` (``rebuilt``: rank -> its source ranks) is the gradnorm blend (two
    sources) or the copy (one source, CheckFree+: blocks and (de)embedding replica) of its sources' pre-failure
    weights, computed here, with a fresh optimizer and boosted LR; every other rank is bit-identical across it."""
    before, after = job.snapshots(generation)
    resumed = {r: job.dump(generation, "resumed", r) for r in range(job.world)}
    for target, sources in rebuilt.items():
        weights = None
        if len(sources) == 2:
            weights = gradnorm_weights([before[s]["norm"] for s in sources],
                                       distances=(distances or {}).get(target, (1, 1)))
        check_rebuild(before, after, target, sources, weights, lr_boost=LR_BOOST, expect_replica=weights is None,
                      lrs_at=resumed)
    check_survivors_untouched(before, after, [r for r in range(job.world) if r not in rebuilt])


def outage(job: Job, lost_stages: List[int]) -> dict:
    """The one outage record of the failure that lost ``lost_stages`` (its generation numbers the dumps)."""
    records = [e for e in job.events() if e["event"] == "outage" and e["lost_stages"] == lost_stages]
    assert len(records) == 1, job.events()
    rec = records[0]
    assert rec["lost_steps"] == 0
    # The first detection can be the outage start itself (a neighbour notices before the supervisor sees the exit).
    assert 0 <= rec["detected_s"] <= rec["rejoined_s"] <= rec["rebuilt_s"] <= rec["resumed_s"] == rec["outage_s"]
    return rec


def test_sigkill_of_a_middle_stage_under_the_deepspeed_launcher_and_a_refused_join(job_factory):
    job = job_factory("checkfree_no_failure.json", steps=40)
    job.wait_for_step(2)
    # A machine that tries to join without the job's token is refused, and the job does not notice.
    intruder = job.start(job.join_command(2), env=dict(job.env, CHECKFREE_JOB_TOKEN="not-the-token"),
                         stdout=subprocess.PIPE, text=True)
    job.wait_for_step(8)
    killed = time.time()
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
    # Push detection: the neighbours notice at once (the dead process's connections close), and so does the
    # non-neighbour rank 0, long before detection_timeout_s (the neighbours cut their connections of the failed
    # generation, and every trainer's death watch reads the supervisor's death record).
    detected = {}
    for e in events:
        if e["event"] == "failure_detected" and killed <= e["time"] < killed + 60:
            detected.setdefault(e["rank"], e["time"] - killed)
    assert set(detected) >= {0, 1, 3}, detected
    assert max(detected.values()) < DETECTION_TIMEOUT_S / 4, detected
    check_rebuilt(job, rec["generation"], {2: [1, 3]})
    log = job.tail(10**6)
    assert "refused a join for rank 2" in log and "Traceback" not in log
    assert all(e["lost_stages"] in ([2], []) for e in events if e["event"] == "outage"), \
        "the refused join did not disturb the job"


# glibc serves large allocations by mmap and frees them back to the system, but raises that threshold each time
# one is freed, after which blocks of up to 32 MiB stay in the heap: the peak RSS of a steady training loop then
# keeps growing for several steps. A fixed threshold makes the resident set follow what is allocated (as
# torch.cuda.max_memory_allocated does on a GPU).
FOLLOW_ALLOCATIONS = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}


def peak_rss_bytes(pid: int) -> int:
    """The process's peak resident set (VmHWM) so far."""
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for pid {pid}")


def test_survivors_peak_memory_across_a_recovery_stays_within_a_tenth_of_their_stage(job_factory):
    # Weights dominate (d_model 1024, 16 tokens): a middle stage's weights plus Adam's moments are 302 MB. A
    # survivor that held a second copy of its stage's weights during the recovery (as before in-place recovery: up
    # to 83%; or a packed copy of the weights it sends: 33%) exceeds its own steady-state peak by a third or more.
    # Measured with the allocator following allocations (FOLLOW_ALLOCATIONS; without it the steady peak itself
    # kept growing by up to 12% of the stage for six steps): +3 MB (1%).
    from deepspeed_checkfree.models import gpt
    d_model, layers = 1024, 8
    block = gpt.Block(gpt.GPTConfig(vocab_size=256, seq_len=16, d_model=d_model, n_heads=4, n_layers=layers))
    stage_state = 3 * 4 * sum(p.numel() for p in block.parameters()) * (layers // 4)
    job = job_factory("checkfree_no_failure.json", steps=8, dumps=False, checkfree={"detection_timeout_s": 30.0},
                      train_args=["--d-model", str(d_model), "--seq-len", "16"], extra_env=FOLLOW_ALLOCATIONS)
    job.wait_for_step(3, timeout_s=300)  # (the steady peak is reached in the second step)
    survivors = {r: int((job.out / "pids" / f"rank{r}.pid").read_text()) for r in (1, 3)}
    steady = {r: peak_rss_bytes(pid) for r, pid in survivors.items()}
    job.kill_trainer(2)
    done_before = job.steps_done()
    job.wait_for_step(done_before + 2, timeout_s=300)
    excess = {r: peak_rss_bytes(pid) - steady[r] for r, pid in survivors.items()}
    job.wait(timeout_s=300)
    assert job.steps_done() == 8
    assert all(e <= 0.10 * stage_state for e in excess.values()), (excess, stage_state)
    rec = outage(job, [2])
    # Push detection reaches every rank at once, far inside the 30 s detection timeout.
    assert rec["detected_s"] < 0.5, rec


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
    check_rebuilt(job, g, {1: [0, 2]})  # the survivors' fp32 masters included
    check_masters_refreshed(job.dump(g, "after", 1))


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
    before, after = job.snapshots(g)
    check_survivors_untouched(before, after, [0, 1, 2, 4, 5])
    replica, restored = before[2], after[3]
    check_same_state(replica, restored, "restored rank 3 against its replica on rank 2")
    assert restored["opt_state"], "the replica's Adam moments are copied"
    assert restored["lrs"] == replica["lrs"], "no LR boost: nothing was approximated"
    rec = next(e for e in job.events() if e["event"] == "recovery" and e["rank"] == 3)
    assert rec["strategy"] == "data_parallel_replica" and rec["source_rank"] == 2 and rec["optimizer"] == "copied"

    g = second["generation"]
    check_rebuilt(job, g, {2: [0, 4], 3: [1, 5]})
    a, b = job.dump(g, "after", 2)["params"], job.dump(g, "after", 3)["params"]
    assert all(torch.equal(a[n], b[n]) for n in a), "both replicas are rebuilt alike"


def test_a_killed_replica_ends_bit_identical_to_an_uninterrupted_run(job_factory, tmp_path):
    # 3 stages x 2 data-parallel replicas, fp32: rank 3 (stage 1, replica 1) is SIGKILLed mid-run. Its replacement
    # copies rank 2's weights and Adam state, the interrupted step is replayed with the same data, and no step is
    # lost or applied twice: every rank's final weights equal those of the same job run without a failure.
    layout = dict(world=6, steps=8, dumps=False, supervisor_args=["--no-spare"])  # (12 fewer processes to start)
    weights = {name: tmp_path / f"weights_{name}" for name in ("reference", "killed")}
    reference = job_factory("checkfree_no_failure.json", **layout, train_args=[
        "--stages", "3", "--layers", "9", "--save-weights", str(weights["reference"])])
    reference.wait()
    killed = job_factory("checkfree_no_failure.json", **layout, train_args=[
        "--stages", "3", "--layers", "9", "--save-weights", str(weights["killed"]), "--min-step-s", "0.3"])
    killed.wait_for_step(3)
    killed.kill_trainer(3)
    killed.wait()
    assert [e["lost_ranks"] for e in killed.events() if e["event"] == "outage"] == [[3]]
    assert [r["loss"] for r in killed.metrics()] == [r["loss"] for r in reference.metrics()]
    for rank in range(6):
        want, got = (torch.load(weights[name] / f"rank{rank}.pt") for name in ("reference", "killed"))
        assert want.keys() == got.keys() and all(torch.equal(want[n], got[n]) for n in want), f"rank {rank}"


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
    check_rebuilt(job, g0, {0: [1]})
    check_rebuilt(job, g3, {3: [2]})


def test_first_stage_killed_under_checkfree_plus_and_bf16_copies_weights_and_refreshes_fp32_masters(job_factory):
    job = job_factory("checkfree_plus_no_failure.json", deepspeed={"bf16": {"enabled": True}}, steps=14)
    job.wait_for_step(5)
    job.kill_trainer(0)
    job.wait()
    check_completed(job)
    g = outage(job, [0])["generation"]
    assert next(iter(job.dump(g, "before", 1)["params"].values())).dtype == torch.bfloat16
    check_rebuilt(job, g, {0: [1]})  # blocks and the embedding copied from stage 1
    check_masters_refreshed(job.dump(g, "after", 0))


def test_node_loss_and_join_of_a_replacement_machine(job_factory):
    job = job_factory("checkfree_no_failure.json", launcher="nodes")
    job.wait_for_step(6)
    node = job.procs[1]
    os.killpg(node.pid, signal.SIGKILL)  # the whole node (its own session): launcher, supervisor, trainer, spare
    node.wait()
    killed = time.time()
    job.procs[1] = job.start(job.join_command(1, "--pid-dir", str(job.out / "pids")))
    job.wait()
    check_completed(job)
    rec = outage(job, [1])
    assert rec["start"] == "machine silent" and rec["silent_s"] > 0, rec
    assert "admitted a new machine" in job.tail(10**6)
    check_rebuilt(job, rec["generation"], {1: [0, 2]})
    assert time.time() - killed < 200


def test_rank_0s_machine_lost_under_the_embedded_store_stops_every_other_rank_naming_the_store(job_factory):
    """The embedded store lives in rank 0's supervisor: without it no generation can form, so every other rank stops
    within seconds with exit code 80, naming the store and the fix, and leaves no process behind (the fixture)."""
    job = job_factory("checkfree_no_failure.json", launcher="nodes", steps=400, train_args=["--min-step-s", "0.2"])
    job.wait_for_step(3)
    os.killpg(job.procs[0].pid, signal.SIGKILL)  # rank 0's whole machine: launcher, supervisor (the store), trainer
    job.procs[0].wait()
    killed = time.monotonic()
    job.procs = job.procs[1:]
    job.wait(timeout_s=60, succeed=False)
    took = time.monotonic() - killed
    assert [p.returncode for p in job.procs] == [STORE_LOST_EXIT_CODE] * 3, job.tail()
    assert took < 30, f"the other ranks took {took:.1f} s to stop"
    log = job.tail(10**6)
    for rank in (1, 2, 3):
        assert (f"[checkfree rank={rank}] lost the embedded store at 127.0.0.1:{job.port + 1} (hosted by rank 0's "
                f"supervisor)") in log, log[-4000:]
    assert "rank 0's supervisor or machine is gone, which ends the job (--store etcd://... survives it)" in log
    # (the supervisors' event records go to the events logger, here the job's log)
    lost = [json.loads(line[line.index("{"):]) for line in log.splitlines() if '"event": "store_lost"' in line]
    assert sorted(e["rank"] for e in lost) == [1, 2, 3], lost
    assert job.steps_done() < 400


def test_replacement_dying_during_its_rebuild_under_torchrun(job_factory):
    job = job_factory("checkfree_no_failure.json", {"failure_injection": {"kill_during_rebuild": 2}},
                      launcher="torchrun")
    job.wait_for_step(6)
    job.kill_trainer(2)
    job.wait()
    check_completed(job)
    assert "kill_during_rebuild" in job.tail(10**6)
    rec = outage(job, [2])  # the generation of the first replacement died in its rebuild; the next completed it
    died = [e for e in job.events() if e["event"] == "stage_lost" and e["stage"] == 2]
    assert len(died) >= 2, "two replacements started rebuilding stage 2"
    # The second death costs one more short re-formation (and a cold start: the warm spare went to the first
    # replacement), never the start-up timeout (120 s) of a waiting rank. Measured: 4.1 s.
    assert rec["outage_s"] < 10, rec
    check_rebuilt(job, rec["generation"], {2: [1, 3]})


def test_two_adjacent_stages_lost_at_once_are_interpolated(job_factory):
    job = job_factory("checkfree_no_failure.json")
    job.wait_for_step(6)
    job.kill_trainer(1)
    job.kill_trainer(2)
    job.wait()
    check_completed(job)
    g = outage(job, [1, 2])["generation"]
    # stage 1 lies at distance 1 from stage 0 and 2 from stage 3 (and the other way round for stage 2)
    check_rebuilt(job, g, {1: [0, 3], 2: [0, 3]}, distances={1: (1, 2), 2: (2, 1)})


def test_two_adjacent_stages_lost_stop_the_job_cleanly_when_the_config_says_stop(job_factory):
    job = job_factory("checkfree_no_failure.json", {"on_adjacent_failure": "stop"})
    job.wait_for_step(4)
    job.kill_trainer(1)
    job.kill_trainer(2)
    job.wait(timeout_s=240, succeed=False)
    assert job.procs[0].returncode != 0, "the job stops instead of training on"
    log = job.tail(10**6)
    assert "on_adjacent_failure='stop'" in log and "not restarting it" in log
    stopped = [e for e in job.events() if e["event"] == "stopped"]
    assert stopped and "adjacent stages [1, 2]" in stopped[0]["reason"]


@pytest.mark.gpu
def test_sigkill_of_a_middle_stage_with_nccl_on_four_gpus(job_factory):
    # The CPU tests' scenario on CUDA: the trainers take the accelerator's backend (NCCL), the death watch aborts
    # the failed generation's communicators (NCCL has no closed-connection cascade), and the survivors re-bind in
    # place. Skipped on machines without a GPU (tests/conftest.py).
    if torch.cuda.device_count() < 4:
        pytest.skip(f"needs 4 GPUs, this machine has {torch.cuda.device_count()}")
    job = job_factory("checkfree_no_failure.json", steps=30, accelerator="cuda")
    job.wait_for_step(8)
    killed = time.time()
    job.kill_trainer(2)
    job.wait()
    check_completed(job)
    rec = outage(job, [2])
    check_rebuilt(job, rec["generation"], {2: [1, 3]})
    detected = [e["time"] - killed for e in job.events() if e["event"] == "failure_detected" and e["time"] >= killed]
    assert detected and max(detected) < DETECTION_TIMEOUT_S / 2, detected
    assert "NCCL" in job.tail(10**6) or "nccl" in job.tail(10**6)


def test_a_replacement_dying_in_each_phase_of_its_rejoin_costs_one_more_short_reformation_each(job_factory):
    # Stage 2's trainer is killed; its replacements then die one after another, each in the next phase of its
    # re-join, through hooks (failure_injection.kill_replacements), not timing: counted in for a generation, its
    # address published in the rendezvous, its engine being built, the group formed, the rebuild half done. Each
    # death aborts the generation and costs one more short re-formation, never a wait for a timeout; the sixth
    # replacement completes the job.
    phases = ["arrival", "rendezvous", "build", "rebind", "rebuild"]
    job = job_factory("checkfree_no_failure.json",
                      {"failure_injection": {"kill_replacements": {"rank": 2, "phases": phases}}}, steps=14)
    job.wait_for_step(4)
    killed = time.monotonic()
    job.kill_trainer(2)
    job.wait(timeout_s=400)
    check_completed(job)
    log = job.tail(10**7)
    for incarnation, phase in enumerate(phases, start=1):
        assert f"replacement incarnation {incarnation} kills itself in its re-join's {phase} phase" in log, phase
    rec = outage(job, [2])
    assert rec["outage_s"] < 150 and time.monotonic() - killed < 300, rec  # (five cold starts on 2 shared cores)
    check_rebuilt(job, rec["generation"], {2: [1, 3]})
    deaths = [e for e in job.events() if e["event"] == "failure_detected" and e["rank"] == 0]
    assert len(deaths) >= 2, "the survivors re-formed more than once"
