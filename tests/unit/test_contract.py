"""The supervisor-trainer contract: what the supervisor writes is what the trainer reads, and the store keys keep
their spelling (a running job and a joining machine of another version must agree on them)."""
from __future__ import annotations

import io
import threading

import pytest
import torch.distributed as dist

from deepspeed_checkfree.resilience import contract
from deepspeed_checkfree.resilience.membership import (JoinRefused, Membership, request_join,
                                                       review_join_requests)


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
    assert contract.pid_file("/p", 2) == "/p/rank2.pid"
    assert contract.dump_file("/d", 3, "after", 1) == "/d/g3-after-rank1.pt"


def test_supervisor_facts_round_trip_through_the_store():
    store = dist.HashStore()
    supervisor = Membership(store, "tok", rank=2, world_size=4, join_timeout_s=1.0)
    trainer = Membership(store, "tok", rank=0, world_size=4, join_timeout_s=1.0)
    assert trainer.incarnation(2) is None and trainer.death(2, 0) is None
    supervisor.record_trainer(2, 1, pid=4242)
    supervisor.record_death(2, 0, contract.TrainerDeath(time=12.5, returncode=-9))
    assert trainer.incarnation(2) == 1 and trainer.fact(contract.pid_fact(2, 1)) == 4242
    assert trainer.death(2, 0) == contract.TrainerDeath(time=12.5, returncode=-9)
    assert store.check([f"{contract.key_prefix('tok')}/fact/death/2/0"])
    trainer.finish()
    supervisor.finish()
    assert supervisor.finished() == 2
    assert Membership(store, "other", 0, 4, 1.0).finished() == 0, "another token sees other keys"


@pytest.mark.parametrize("token, rank, admitted", [("tok", 1, True), ("wrong", 1, False), ("tok", 9, False)])
def test_a_join_request_is_admitted_only_with_the_token_and_a_rank_in_range(token, rank, admitted):
    store = dist.HashStore()
    outcome = {}

    def join():
        try:
            request_join(store, token, rank, timeout_s=10)
            outcome["admitted"] = True
        except JoinRefused as err:
            outcome["refused"] = str(err)

    joiner = threading.Thread(target=join)
    joiner.start()
    reviewed, decided = 0, []
    while joiner.is_alive():
        reviewed, new = review_join_requests(store, "tok", world_size=4, reviewed=reviewed)
        decided += new
        joiner.join(0.01)
    assert [d[1] for d in decided] == [admitted] and reviewed == 1
    if admitted:
        assert outcome == {"admitted": True}
    else:
        assert outcome["refused"].startswith(f"join refused for rank {rank}: ")
