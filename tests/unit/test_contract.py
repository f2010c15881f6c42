"""The supervisor-trainer contract: what the supervisor writes is what the trainer reads, and the store keys keep
their spelling (a running job and a joining machine of another version must agree on them)."""
from __future__ import annotations

import io
import json
import math
import threading
import time

import pytest
import torch.distributed as dist

from deepspeed_checkfree.errors import ConfigError
from deepspeed_checkfree.resilience import contract
from deepspeed_checkfree.core.rejoin import MemberInfo
from deepspeed_checkfree.resilience.joins import JoinRefused, JoinReviewer, request_join
from deepspeed_checkfree.resilience.membership import Fenced, JobStopped, Membership, MembershipTimeout


def test_the_trainer_reads_what_the_supervisor_sets():
    env = contract.trainer_env(rank=2, world_size=4, local_rank=1, master_addr="10.0.0.1", master_port=29500,
                               store_port=29501, incarnation=3)
    assert contract.supervised(env) and not contract.is_spare(env)
    assert contract.incarnation_from_env(env) == 3
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_ADDR"], env["MASTER_PORT"]) == \
        ("2", "4", "1", "10.0.0.1", "29500")
    assert env[contract.STORE_ADDR_ENV] == "10.0.0.1" and env[contract.STORE_PORT_ENV] == "29501"
    spare = contract.trainer_env(rank=2, world_size=4, local_rank=1, master_addr="h", master_port=1, store_port=2,
                                 incarnation=0, spare=True)
    assert contract.is_spare(spare) and contract.supervised(spare)
    assert not contract.supervised({}) and not contract.is_spare({}) and contract.incarnation_from_env({}) == 0


def test_a_spare_is_activated_by_its_line_and_released_by_a_closed_stdin():
    assert contract.read_activation(io.StringIO(contract.activation_line(5))) == 5
    assert contract.read_activation(io.StringIO("")) is None


def test_store_keys_keep_their_spelling():
    assert contract.key_prefix("tok") == "cf/" + contract.token_mac("tok", "checkfree-job")[:32]
    assert len(contract.key_prefix("tok")) == 35 and contract.key_prefix("tok") != contract.key_prefix("other")
    assert contract.rank_generation_key(3) == "rank_gen/3"
    assert contract.member_key(4, 1) == "g/4/member/1"
    assert contract.group_store_prefix(4) == "g/4/pg"
    assert contract.fact_key(contract.death_fact(2, 0)) == "fact/death/2/0"
    assert contract.incarnation_fact(2) == "incarnation/2" and contract.pid_fact(2, 1) == "pid/2/1"
    assert contract.DONE_KEY == "done"
    assert contract.join_request_key(7) == "cf-join/requests/7"
    assert contract.join_verdict_key(7) == "cf-join/requests/7/verdict"
    assert contract.lease_key(2) == "lease/2" and contract.formed_key(4) == "g/4/formed"
    assert contract.arrivals_key(4) == "g/4/arrivals" and contract.abort_key(4) == "g/4/abort"
    assert contract.signal_key(3) == "signal/3" and contract.SIGNALS_KEY == "signals"
    assert contract.lost_fact(2) == "lost/2" and contract.leaving_fact(2, 1) == "leaving/2/1"
    assert contract.parse_lease(contract.lease_value(7, 12.5, "abc").encode()) == contract.Lease(7, 12.5, "abc")
    assert contract.parse_lease(None) == contract.Lease()
    assert (contract.STOPPED_FACT, contract.PROGRESS_FACT, contract.FRESH_START_KEY, contract.STOP_ACKS_KEY) == \
        ("stopped", "progress", "fresh_start", "stop_acks")
    assert contract.pid_file("/p", 2) == "/p/rank2.pid"
    assert contract.spare_pid_file("/p", 2) == "/p/rank2.spare.pid"
    assert contract.supervisor_pid_file("/p", 2) == "/p/supervisor2.pid"
    assert contract.started_file("/p", 2) == "/p/rank2.started"
    assert contract.dump_file("/d", 3, "after", 1) == "/d/g3-after-rank1.pt"


def test_a_pid_file_is_replaced_whole(tmp_path):
    path = contract.spare_pid_file(str(tmp_path / "pids"), 1)
    contract.write_pid_file(path, 123)
    contract.write_pid_file(path, 4567)
    assert open(path).read() == "4567" and sorted(p.name for p in (tmp_path / "pids").iterdir()) == ["rank1.spare.pid"]
    contract.remove_pid_file(path)
    contract.remove_pid_file(path)  # (gone already: fine)
    assert not any((tmp_path / "pids").iterdir())


@pytest.mark.parametrize("args", [["--deepspeed_config", "X"], ["--deepspeed-config", "X"], ["--deepspeed_config=X"],
                                  ["--deepspeed", "--deepspeed_config", "old", "--steps", "3", "--deepspeed-config=X"]])
def test_the_deepspeed_config_is_found_in_every_spelling(args):
    assert contract.deepspeed_config_path(args) == "X"


def test_a_script_without_the_flag_has_no_deepspeed_config():
    assert contract.deepspeed_config_path(["--steps", "3", "--deepspeed_config"]) is None
    assert contract.read_deepspeed_config(["--steps", "3"]) is None


def test_the_deepspeed_config_is_read_from_the_command_line(tmp_path, monkeypatch):
    cfg = {"optimizer": {"type": "AdamW"}, "checkfree": {"enabled": True}}
    (tmp_path / "ds.json").write_text(json.dumps(cfg))
    assert contract.read_deepspeed_config(["--deepspeed_config", str(tmp_path / "ds.json")]) == cfg
    monkeypatch.setattr("sys.argv", ["train.py", f"--deepspeed_config={tmp_path / 'ds.json'}"])
    assert contract.read_deepspeed_config() == cfg  # (this process's own arguments)


@pytest.mark.parametrize("content, says", [(None, "cannot read the DeepSpeed config"), ("{not json", "is not JSON"),
                                            ("[1, 2]", "must hold a JSON object")])
def test_an_unreadable_deepspeed_config_is_a_config_error_naming_the_file(tmp_path, content, says):
    path = tmp_path / "ds.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=says) as err:
        contract.read_deepspeed_config(["--deepspeed_config", str(path)])
    assert str(path) in str(err.value)


def test_supervisor_facts_round_trip_through_the_store():
    store = dist.HashStore()
    supervisor = Membership(store, "tok", rank=2, world_size=4, join_timeout_s=1.0)
    trainer = Membership(store, "tok", rank=0, world_size=4, join_timeout_s=1.0)
    assert trainer.incarnation(2) is None and trainer.death(2, 0) is None
    supervisor.record_trainer(2, 1, pid=4242)
    supervisor.record_loss(2, 0, contract.TrainerDeath(time=12.5, returncode=-9), generation=3)
    assert trainer.incarnation(2) == 1 and trainer.fact(contract.pid_fact(2, 1)) == 4242
    assert trainer.death(2, 0) == contract.TrainerDeath(time=12.5, returncode=-9, cause="trainer death")
    assert "rank 2's trainer (incarnation 0) was lost" in trainer.abort_reason(3)["reason"]
    assert trainer.incarnations() == {0: None, 1: None, 2: 1, 3: None}
    assert store.check([f"{contract.key_prefix('tok')}/fact/death/2/0"])
    trainer.finish()
    supervisor.finish()
    assert supervisor.finished() == 2
    assert Membership(store, "other", 0, 4, 1.0).finished() == 0, "another token sees other keys"


def test_the_heartbeat_carries_its_timeout_and_the_environment_names_the_pipe_and_the_supervisor():
    assert contract.last_heartbeat_timeout(contract.heartbeat_line(4.0) * 3) == 4.0
    assert contract.last_heartbeat_timeout(contract.heartbeat_line(2.5) + b"4.0") == 2.5, "a partial beat is ignored"
    assert contract.last_heartbeat_timeout(b"") is None
    assert contract.last_heartbeat_timeout(contract.heartbeat_line(4.0) + contract.heartbeat_line(math.inf)) == math.inf
    env = contract.trainer_env(rank=0, world_size=1, local_rank=0, master_addr="h", master_port=1, store_port=2,
                               incarnation=0, heartbeat_fd=7, supervisor_pid=99)
    assert env[contract.HEARTBEAT_FD_ENV] == "7" and env[contract.SUPERVISOR_PID_ENV] == "99"
    spare = contract.trainer_env(rank=0, world_size=1, local_rank=0, master_addr="h", master_port=1, store_port=2,
                                 incarnation=0, spare=True)
    contract.activated(spare, 3)
    assert not contract.is_spare(spare) and contract.incarnation_from_env(spare) == 3


def _review_until_done(store, reviewer, token, rank, clock):
    outcome = {}

    def join():
        try:
            request_join(store, token, rank, timeout_s=10)
            outcome["admitted"] = True
        except JoinRefused as err:
            outcome["refused"] = str(err)

    joiner = threading.Thread(target=join)
    joiner.start()
    decided = []
    while joiner.is_alive():
        clock["now"] += 0.5
        decided += reviewer.review(clock["now"], store.add(contract.JOIN_REQUESTS, 0))
        joiner.join(0.01)
    return outcome, decided


@pytest.mark.parametrize("token, rank, admitted", [("tok", 1, True), ("wrong", 1, False), ("tok", 9, False)])
def test_a_join_request_is_admitted_only_with_the_token_and_a_rank_in_range(token, rank, admitted):
    store = dist.HashStore()
    reviewer = JoinReviewer(Membership(store, "tok", 0, 4, 1.0), "tok", lease_timeout_s=2.0, renewed_at={})
    outcome, decided = _review_until_done(store, reviewer, token, rank, {"now": 0.0})
    assert [d[1] for d in decided] == [admitted] and reviewer.reviewed == 1
    if admitted:
        assert outcome == {"admitted": True}
    else:
        assert outcome["refused"].startswith(f"join refused for rank {rank}: ")


def test_a_join_for_a_rank_whose_supervisor_renews_its_lease_is_refused_and_admitted_once_it_is_silent():
    store = dist.HashStore()
    renewed_at = {}
    reviewer = JoinReviewer(Membership(store, "tok", 0, 4, 1.0), "tok", lease_timeout_s=2.0, renewed_at=renewed_at)
    clock = {"now": 0.0}
    renewing = threading.Event()

    def keep_renewing():  # (what the leader's lease watch reports while rank 2's supervisor renews)
        while not renewing.wait(0.005):
            renewed_at[2] = clock["now"] + 0.25

    beat = threading.Thread(target=keep_renewing)
    beat.start()
    try:
        outcome, decided = _review_until_done(store, reviewer, "tok", 2, clock)
    finally:
        renewing.set()
        beat.join()
    assert not decided[0][1] and "rank 2 is alive" in outcome["refused"]
    # The supervisor is silent now (its machine is gone): a join is admitted after the lease timeout.
    outcome, decided = _review_until_done(store, reviewer, "tok", 2, clock)
    assert outcome == {"admitted": True} and "silent" in decided[0][2]


def test_a_join_for_a_rank_recorded_lost_is_admitted_at_once():
    store = dist.HashStore()
    leader = Membership(store, "tok", 0, 4, 1.0)
    leader.record_trainer(3, 0)
    leader.record_machine_loss(3, 0, "machine silent", owner="abc", when=100.0, generation=2)
    assert leader.lost_machines() == {3: {"incarnation": 0, "cause": "machine silent", "owner": "abc",
                                          "time": 100.0}}
    assert leader.incarnation(3) == 1 and leader.abort_reason(2) is not None
    reviewer = JoinReviewer(leader, "tok", lease_timeout_s=30.0, renewed_at={3: 0.0})
    outcome, decided = _review_until_done(store, reviewer, "tok", 3, {"now": 0.0})
    assert outcome == {"admitted": True} and "recorded lost (machine silent)" in decided[0][2]
    leader.record_trainer(3, 2)  # the joiner's trainer: the rank is taken again
    assert leader.lost_machines() == {}


def info(rank, incarnation, fresh=True):
    return MemberInfo(rank=rank, fresh=fresh, completed_steps=0, incarnation=incarnation, pid=rank)


def test_a_member_counts_as_arrived_only_while_it_is_its_ranks_active_trainer_and_a_stop_ends_the_wait():
    store = dist.HashStore()
    ranks = [Membership(store, "tok", r, 2, join_timeout_s=0.3) for r in range(2)]
    ranks[0].record_trainer(0, 0)  # (every supervisor records its trainer before starting it)
    # Rank 1's trainer of incarnation 0 arrived, then died: its supervisor moved the rank on. A ghost is not waited
    # for: the generation does not form without its replacement.
    ranks[1].record_trainer(1, 0)
    done = {}

    def ghost_arrives():
        try:
            done["ghost"] = ranks[1].arrive(0, info(1, 0))
        except MembershipTimeout as err:  # it waits for the generation like everyone, and never counts
            done["ghost"] = err

    ghost = threading.Thread(target=ghost_arrives)
    ghost.start()
    time.sleep(0.1)
    ranks[1].record_trainer(1, 1)
    with pytest.raises(MembershipTimeout, match=r"ranks \[1\] did not arrive"):
        ranks[0].arrive(0, info(0, 0))
    ghost.join(5)
    assert not ranks[0].formed(0) and ranks[0].latest_generation() == 0
    # The replacement arrives: the generation forms with it.
    replacement = threading.Thread(target=lambda: done.setdefault("new", ranks[1].arrive(0, info(1, 1))))
    replacement.start()
    generation, members = ranks[0].arrive(0, info(0, 0))
    replacement.join(5)
    assert generation == 0 and members[1].incarnation == 1 and done["new"][0] == 0 and ranks[0].formed(0)
    assert ranks[0].stop(1, "program", "AssertionError: x")["reason"] == "AssertionError: x"
    assert ranks[1].stop(0, "supervisor", "later")["rank"] == 1, "the first stop's reason is kept"
    with pytest.raises(JobStopped, match="rank 1 stopped the job \\(program\\): AssertionError: x"):
        ranks[0].arrive(1, info(0, 0))


def test_a_generation_aborted_before_it_formed_moves_everyone_to_the_next():
    store = dist.HashStore()
    ranks = [Membership(store, "tok", r, 3, join_timeout_s=5.0) for r in range(3)]
    for r in range(3):
        ranks[r].record_trainer(r, 0)
    got = {}
    waiting = [threading.Thread(target=lambda r=r: got.setdefault(r, ranks[r].arrive(4, info(r, 0))))
               for r in (0, 1)]
    for t in waiting:
        t.start()
    time.sleep(0.2)
    # Rank 2's trainer died before it arrived: its supervisor aborts the generation the others are forming.
    ranks[2].record_trainer(2, 1)
    ranks[2].abort(4, "rank 2's trainer died")
    time.sleep(0.2)
    assert ranks[0].formed(4) and not got, "they wait in generation 5 now"
    generation, members = ranks[2].arrive(4, info(2, 1))  # its replacement starts from the aborted generation
    for t in waiting:
        t.join(5)
    assert generation == 5 and got[0][0] == got[1][0] == 5 and members[2].incarnation == 1


def test_a_rank_recorded_lost_is_fenced_when_it_comes_back():
    store = dist.HashStore()
    ranks = [Membership(store, "tok", r, 2, join_timeout_s=1.0) for r in range(2)]
    ranks[0].record_trainer(1, 0)
    ranks[0].record_machine_loss(1, 0, "machine silent", owner="old", when=5.0, generation=0)
    with pytest.raises(Fenced, match="rank 1's active trainer is incarnation 1, not this one \\(0\\)"):
        ranks[1].arrive(1, info(1, 0))


def test_job_wide_signals_are_read_in_order_with_one_blocking_request_each():
    store = dist.HashStore()
    poster, watcher = Membership(store, "tok", 0, 4, 1.0), Membership(store, "tok", 3, 4, 1.0)
    assert watcher.next_signal(0, 0.05) == (0, None)
    poster.request_fresh_start()
    poster.stop(0, "program", "x")
    assert watcher.next_signal(0, 1.0) == (1, {"kind": "fresh_start", "epoch": 1})
    assert watcher.next_signal(1, 1.0) == (2, {"kind": "stop"})
    poster.stop(1, "program", "a later stop changes nothing")
    assert watcher.next_signal(2, 0.05) == (2, None)
    store.add(poster.key(contract.SIGNALS_KEY), 1)  # a poster that died between counting and writing
    poster.post_signal("lost", rank=2)
    assert watcher.next_signal(2, 0.05) == (3, None), "the gap is skipped once a later signal exists"
    assert watcher.next_signal(3, 1.0) == (4, {"kind": "lost", "rank": 2})


def test_the_trainer_gets_the_external_stores_url_from_its_supervisor():
    env = contract.trainer_env(rank=0, world_size=4, local_rank=0, master_addr="h", master_port=1, store_port=2,
                               incarnation=0, store_url="etcd://e1:2379,e2:2379")
    assert env[contract.STORE_URL_ENV] == "etcd://e1:2379,e2:2379"
    assert contract.STORE_URL_ENV not in contract.trainer_env(rank=0, world_size=4, local_rank=0, master_addr="h",
                                                              master_port=1, store_port=2, incarnation=0)
    assert contract.generation_prefix(1) == "g/1/" and contract.member_key(1, 0).startswith("g/1/")
    assert contract.group_store_prefix(1).startswith(contract.generation_prefix(1))


def test_the_supervisor_rejects_a_bad_store_url_with_the_form_to_use(capsys):
    from deepspeed_checkfree.resilience.supervisor import parse_args
    assert parse_args(["--store", "etcd://a:1,b", "s.py"]).store == "etcd://a:1,b:2379"
    with pytest.raises(SystemExit) as err:
        parse_args(["--store", "http://a:2379", "s.py"])
    assert err.value.code == 2
    err_text = capsys.readouterr().err
    assert "--store: store URL 'http://a:2379': unknown scheme 'http'" in err_text and "etcd://host:port" in err_text


def test_standby_without_join_is_refused_naming_the_rule(capsys):
    from deepspeed_checkfree.resilience.supervisor import parse_args
    assert parse_args(["--join", "--standby", "--rank", "2", "s.py"]).standby
    with pytest.raises(SystemExit) as err:
        parse_args(["--standby", "--rank", "2", "s.py"])
    assert err.value.code == 2 and "--standby stands by to join: it needs --join" in capsys.readouterr().err
