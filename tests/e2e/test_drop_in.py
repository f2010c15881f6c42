"""A training script written like a user's (tests/e2e/user_script.py: its own model, a plain ``train_batch`` loop,
``import deepspeed_checkfree`` and the config section being its only CheckFree lines) under the supervisor, with
real launchers and real SIGKILLs: it survives the loss of any stage, and the shapes it cannot support are refused
at start-up with the rule and the fix, never a hang."""
from __future__ import annotations

import json
import math
import time

import pytest

from deepspeed_checkfree.resilience.contract import STOPPED_EXIT_CODE

from .test_process_loss import check_rebuilt, job_factory, outage  # noqa: F401 (fixture)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

USER = "tests/e2e/user_script.py"
MICRO = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4}
STEPS = 40


def ranks_report(job) -> dict:
    return {r: json.loads((job.out / f"rank{r}.json").read_text()) for r in range(job.world)}


def wait_for_printed_step(job, step: int) -> None:
    job.wait_until(lambda: f"step {step} loss" in job.tail(10**6), 240, f"the script did not print step {step}")


def check_recovered(job, lost_rank: int) -> dict:
    reports = ranks_report(job)
    assert all(r["global_steps"] == STEPS for r in reports.values()), reports
    rec = outage(job, [lost_rank])
    caught_up = rec["replayed_step"]
    survivors = [reports[r]["losses"] for r in range(job.world) if r != lost_rank]
    assert all(len(x) == STEPS and all(v is not None and math.isfinite(v) for v in x) for x in survivors), survivors
    assert all(x == survivors[0] for x in survivors), "every stage returns the job's loss"
    replacement = reports[lost_rank]["losses"]
    assert replacement[:caught_up] == [None] * caught_up, "the replacement's catch-up calls return NaN"
    assert replacement[caught_up:] == survivors[0][caught_up:], "then it trains the job's steps"
    assert f"joined the job at step {caught_up}" in job.tail(10**7)
    return rec


def test_a_plain_range_loop_survives_a_middle_stage_killed_and_every_rank_ends_at_step_n(job_factory):
    job = job_factory("checkfree_no_failure.json", script=USER, steps=STEPS, deepspeed=MICRO,
                      train_args=["--loop", "range"])
    wait_for_printed_step(job, 5)
    job.kill_trainer(2)
    job.wait(timeout_s=300)
    rec = check_recovered(job, 2)
    check_rebuilt(job, rec["generation"], {2: [1, 3]})  # the documented rebuild: the gradnorm blend


def test_a_global_steps_loop_over_a_dataloader_survives_the_first_stage_killed_under_checkfree_plus(job_factory):
    job = job_factory("checkfree_plus_no_failure.json", script=USER, steps=STEPS, deepspeed=MICRO,
                      train_args=["--loop", "global_steps", "--data", "dataloader"])
    wait_for_printed_step(job, 5)
    job.kill_trainer(0)
    job.wait(timeout_s=300)
    rec = check_recovered(job, 0)
    check_rebuilt(job, rec["generation"], {0: [1]})  # copied from stage 1's replica and blocks


@pytest.mark.parametrize("shape, words", [
    ("fixed_port", "asks deepspeed.init_distributed for a rendezvous of its own"),
    ("no_pipeline", "a DeepSpeedEngine (the model is not a PipelineModule)"),
    ("no_section", "the DeepSpeed config has no \"checkfree\": {\"enabled\": true}"),
])
def test_a_script_shape_the_supervisor_cannot_keep_alive_is_refused_at_start_up_naming_the_rule(job_factory, shape,
                                                                                              words):
    args = ["--stages", "2", "--blocks", "2"]
    cfg = dict(MICRO)
    if shape == "no_section":
        cfg["checkfree"] = {"enabled": False}
    else:
        args += ["--shape", shape]
    started = time.monotonic()
    job = job_factory("checkfree_no_failure.json", script=USER, steps=STEPS, world=2, deepspeed=cfg, train_args=args,
                      dumps=False)
    job.wait(timeout_s=180, succeed=False)
    took = time.monotonic() - started
    assert job.procs[0].returncode != 0 and f"exits with return code = {STOPPED_EXIT_CODE}" in job.tail(10**6)
    assert took < 150, took
    stops = [e for e in job.events() if e["event"] == "stopped"]
    assert stops and words in stops[0]["reason"], stops
