"""A planned removal on one machine: ``checkfree drain --rank 2`` (run with the job's token, as an operator would)
makes rank 2's supervisor drain as on a preemption notice, under the stock ``deepspeed`` launcher: its trainer
finishes its step and hands its stage over exactly to the README's ``--join`` for the rank, and rank 2's
supervisor ends with exit code 0, so the launcher keeps the other ranks. The CPU run is the CI's; the same test on
four GPUs (NCCL: the hand-over goes through the accelerator's backend) is ``gpu``-marked. Across machines and under
SIGTERM: tests/e2e/test_preemption.py."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from .test_process_loss import check_completed, job_factory, outage  # noqa: F401 (fixture)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.mark.parametrize("accelerator", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_checkfree_drain_hands_a_middle_stage_over_exactly_to_a_join(job_factory, accelerator):
    if accelerator == "cuda" and torch.cuda.device_count() < 4:
        pytest.skip(f"needs 4 GPUs, this machine has {torch.cuda.device_count()}")
    job = job_factory("checkfree_no_failure.json", steps=24, accelerator=accelerator,
                      checkfree={"join_timeout_s": 240.0}, train_args=["--min-step-s", "0.2"])
    job.wait_for_step(5)
    old_supervisor = job.supervisor_pid(2)
    drain = job.start([sys.executable, "-m", "deepspeed_checkfree.cli", "drain", "--rank", "2", "--master-addr",
                       "127.0.0.1", "--master-port", str(job.port), "--wait", "120"],
                      stdout=subprocess.PIPE, text=True)
    job.procs.append(job.start(job.join_command(2, "--pid-dir", str(job.pid_dir))))
    said, _ = drain.communicate(timeout=180)
    assert drain.returncode == 0, said
    assert "asked rank 2's supervisor to drain" in said and "rank 2 left" in said, said
    job.wait(timeout_s=300)
    assert [p.returncode for p in job.procs] == [0, 0], job.tail()  # the launcher (rank 2's drained supervisor
    check_completed(job)                                               # ended with 0) and the joined machine
    record = outage(job, [2])
    assert (record["start"], record["method"]) == ("preemption notice", "exact hand-over"), record
    assert [e["outcome"] for e in job.events() if e["event"] == "preempted"] == ["exact hand-over"]
    assert job.supervisor_pid(2) != old_supervisor, "the joined machine's supervisor holds rank 2 now"
    log = job.tail(10**7)
    assert "The job goes on without this machine: start a replacement" in log
    print(f"checkfree drain on {accelerator}: outage record {record['outage_s']:.2f} s "
          f"(drain {record['drain_s']:.2f} s)")
