"""The fault policy's decisions, with no process: which exceptions are a lost peer, what a supervisor does when its
trainer or its spare exits, when a trainer is hung, and whether a join is admitted."""
from __future__ import annotations

import pytest
import torch.distributed as dist

from deepspeed_checkfree.core import fault_policy as policy
from deepspeed_checkfree.errors import CheckFreeError, ConfigError, RecoveryError

GLOO_ERRORS = [
    "[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:10147: Connection reset by "
    "peer. This is typically caused by a remote worker crashing",
    "[../gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:2400",
    "[../gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 4000ms for recv operation to complete",
    "Gloo connectFullMesh failed with [..] Connection refused",
    "NCCL error in: ProcessGroupNCCL.cpp:1, remote process exited or there was a network error",
    "[Rank 1] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=5, OpType=ALLREDUCE)",
]


@pytest.mark.parametrize("message", GLOO_ERRORS)
def test_transport_failures_of_gloo_and_nccl_are_communication_failures(message):
    assert policy.classify(RuntimeError(message)) == policy.COMMUNICATION


@pytest.mark.parametrize("err", [dist.DistNetworkError("x"), dist.DistStoreError("wait timeout"),
                                 dist.DistBackendError("x"), ConnectionResetError("x"), TimeoutError("x")])
def test_torch_distributed_errors_and_connection_errors_are_communication_failures(err):
    assert policy.classify(err) == policy.COMMUNICATION


@pytest.mark.parametrize("err", [
    RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x64 and 32x64)"),
    RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    AssertionError("injected"), ValueError("bad"), KeyError("k"), NotImplementedError("connection closed by peer"),
    MemoryError()])
def test_a_shape_bug_an_out_of_memory_error_or_an_assertion_is_a_program_error(err):
    assert policy.classify(err) == policy.PROGRAM


def test_config_errors_and_checkfree_stops_are_their_own_kinds_and_a_cause_counts():
    assert policy.classify(ConfigError("lr_bost")) == policy.CONFIG
    assert policy.classify(RecoveryError("nothing to rebuild from")) == policy.STOP
    assert policy.classify(CheckFreeError("x")) == policy.STOP
    try:
        try:
            raise RuntimeError("Connection closed by peer")
        except RuntimeError as comm:
            raise ValueError("while receiving") from comm
    except ValueError as err:
        assert policy.classify(err) == policy.COMMUNICATION


def decide(rc, **kw):
    args = dict(stopped_code=78, job_stopped=False, job_has_progress=True, group_formed=True, restarts=0,
                max_restarts=100)
    args.update(kw)
    return policy.on_trainer_exit(rc, **args).action


def test_a_supervisor_replaces_a_dead_trainer_and_never_respawns_a_stopped_one():
    assert decide(0) == policy.FINISH
    assert decide(-9) == policy.REPLACE and decide(1) == policy.REPLACE
    assert decide(78) == policy.STOP_JOB, "exit code 78: the trainer stopped the job on purpose"
    assert decide(-9, job_stopped=True) == policy.STOP_JOB
    assert decide(-9, restarts=100, max_restarts=100) == policy.STOP_JOB
    assert decide(-11, trainer_finished=True) == policy.FINISH, "a crash while exiting after the job is no loss"
    assert "--max-restarts=3" in policy.on_trainer_exit(
        1, stopped_code=78, job_stopped=False, job_has_progress=True, group_formed=True, restarts=3,
        max_restarts=3).reason


def test_a_death_before_the_first_step_is_a_fresh_start_once_a_group_had_formed():
    assert decide(-9, job_has_progress=False, group_formed=True) == policy.FRESH_START
    # Died before its generation formed: the others wait in Python for its replacement, nothing to start over.
    assert decide(-9, job_has_progress=False, group_formed=False) == policy.REPLACE


def test_a_dying_spare_is_restarted_a_few_times_and_a_stopped_one_never():
    assert policy.on_spare_exit(-9, stopped_code=78, consecutive_deaths=1).action == policy.SPARE_RESTART
    assert policy.on_spare_exit(-9, stopped_code=78, consecutive_deaths=3).action == policy.SPARE_DROP
    assert policy.on_spare_exit(78, stopped_code=78, consecutive_deaths=1).action == policy.SPARE_DROP


def test_a_trainer_is_hung_after_its_timeout_of_silence_and_not_before_its_first_beat():
    assert policy.heartbeat_overdue(10.0, last_beat=None, timeout_s=None) is None
    assert policy.heartbeat_overdue(10.0, last_beat=7.0, timeout_s=4.0) is None
    assert policy.heartbeat_overdue(12.0, last_beat=7.0, timeout_s=4.0) == 5.0
    assert policy.heartbeat_overdue(1e9, last_beat=7.0, timeout_s=float("inf")) is None, "a finished trainer"


def verdict(**kw):
    args = dict(token_ok=True, rank=2, world_size=4, now=10.0, requested_at=9.0, lease_renewed_at=9.5,
                lease_timeout_s=5.0, token_env="CHECKFREE_JOB_TOKEN")
    args.update(kw)
    return policy.join_verdict(**args)


def test_a_join_is_admitted_only_with_the_token_for_a_rank_whose_supervisor_is_silent():
    assert verdict(token_ok=False)[0] == policy.REFUSE and "CHECKFREE_JOB_TOKEN" in verdict(token_ok=False)[1]
    assert verdict(rank=4)[0] == policy.REFUSE and "not in 0..3" in verdict(rank=4)[1]
    refused, reason = verdict()
    assert refused == policy.REFUSE and "rank 2 is alive" in reason
    assert verdict(lease_renewed_at=8.0)[0] == policy.PENDING, "not silent for the lease timeout yet"
    assert verdict(lease_renewed_at=4.0)[0] == policy.ADMIT
    assert verdict(lease_renewed_at=None, now=10.0, requested_at=9.0)[0] == policy.PENDING
    assert verdict(lease_renewed_at=None, now=15.0, requested_at=9.0)[0] == policy.ADMIT, "never seen alive"


def test_a_standby_join_waits_while_the_rank_lives_and_is_admitted_when_it_is_lost_or_leaves():
    pending, reason = verdict(standby=True)  # (the lease renewed after the request: a plain join is refused)
    assert pending == policy.PENDING and "standing by for rank 2" in reason
    assert verdict(standby=True, now=1000.0, lease_renewed_at=999.0)[0] == policy.PENDING, "however long it waits"
    assert verdict(standby=True, now=20.0, lease_renewed_at=14.0)[0] == policy.ADMIT, "its supervisor went silent"
    admitted, reason = verdict(standby=True, recorded_lost="preemption notice")
    assert admitted == policy.ADMIT and "preemption notice" in reason
    assert verdict(standby=True, draining=True)[0] == policy.PENDING
    assert verdict(standby=True, token_ok=False)[0] == policy.REFUSE
    assert "join with --standby" in verdict()[1], "a refused join names the way to wait"


@pytest.mark.parametrize("detection_s, connect_s", [(2.0, 10.0), (4.0, 10.0), (10.0, 10.0), (30.0, 30.0)])
def test_a_gloo_connect_waits_for_a_dead_peer_at_most_max_of_t_and_the_floor(detection_s, connect_s):
    # gloo's passive side waits 5x the pair timeout (tcp/pair.h): the pair timeout is that bound over 5
    pair = policy.gloo_pair_timeout_s(detection_s)
    assert pair * policy.GLOO_CONNECT_WAIT_FACTOR == pytest.approx(connect_s)
    assert pair * policy.GLOO_CONNECT_WAIT_FACTOR < policy.startup_timeout_s(detection_s)
