"""Who does the job-level duties under an external store: the pure leader rule, then supervisors' coordinators
sharing one in-memory store (HashStore stands in for etcd; a fake clock stands in for time)."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from datetime import timedelta
from typing import List

import pytest
import torch.distributed as dist

from deepspeed_checkfree.core import leadership as lead
from deepspeed_checkfree.core.rejoin import PREEMPTION
from deepspeed_checkfree.events import EventLog
from deepspeed_checkfree.resilience import contract
from deepspeed_checkfree.resilience.coordination import check_job_exists
from deepspeed_checkfree.resilience.coordinator import Coordinator
from deepspeed_checkfree.resilience.joins import JoinRefused, StandbyEnded, join_job, request_join
from deepspeed_checkfree.resilience.membership import Membership


def action(rank, holder, waited_s=0.0, silent_s=None):
    return lead.leader_action(rank=rank, holder=holder, waited_s=waited_s, holder_silent_s=silent_s,
                              lease_timeout_s=5.0, stagger_s=1.0)


def test_the_holder_leads_and_an_unset_key_is_claimed_in_rank_order():
    assert action(2, lead.Holder(2, 7)) == lead.LEAD
    assert action(0, None) == lead.CLAIM
    assert action(3, None, waited_s=14.9) == lead.FOLLOW and action(3, None, waited_s=15.0) == lead.CLAIM


def test_a_holder_is_taken_over_only_after_its_lease_is_silent_for_the_timeout_lowest_rank_first():
    holder = lead.Holder(0, 1)
    assert action(1, holder, silent_s=None) == lead.FOLLOW
    assert action(1, holder, silent_s=5.9) == lead.FOLLOW and action(1, holder, silent_s=6.1) == lead.CLAIM
    assert action(3, holder, silent_s=6.1) == lead.FOLLOW, "rank 3 waits for rank 1 and 2 to have their turn"
    assert lead.successor(holder, 1) == lead.Holder(1, 2) and lead.successor(None, 3) == lead.Holder(3, 1)


def test_the_leader_key_round_trips_and_a_foreign_value_is_an_error():
    assert lead.parse_holder(lead.Holder(12, 3).value()) == lead.Holder(12, 3)
    assert lead.parse_holder(None) is None and lead.parse_holder("") is None
    with pytest.raises(ValueError, match="not '<rank>:<epoch>'"):
        lead.parse_holder("someone")


def test_only_generations_every_rank_has_left_are_deleted():
    assert list(lead.generations_to_delete([3, 4, 3, 5], deleted_below=0)) == [0, 1, 2]
    assert list(lead.generations_to_delete([3, 4, 3, 5], deleted_below=3)) == []
    assert list(lead.generations_to_delete([-1, 0, 0, 0], deleted_below=0)) == []
    assert lead.generations_to_delete([6, 6], deleted_below=2).stop == 6


class Machine:
    """One supervisor's coordinator on the shared store, ticked by the test's clock."""

    def __init__(self, store, rank: int, world: int = 4, token: str = "tok", hosted: bool = False,
                 external: bool = True, owner: str = None) -> None:
        self.membership = Membership(store, token, rank, world, join_timeout_s=1.0)
        self.membership.record_trainer(rank, 0)
        self.coordinator = Coordinator(self.membership, token, owner=owner or f"owner-{rank}", hosted=hosted,
                                       external=external, lease_timeout_s=5.0, events=EventLog(None),
                                       prefix=f"[rank {rank}]")
        self.alive = True

    def tick(self, now: float) -> None:
        if self.alive:
            self.coordinator.tick(now)


def run(machines: List[Machine], start: float, end: float, step: float = 0.25) -> float:
    now = start
    while now < end:
        for m in machines:
            m.tick(now)
        now += step
    return now


def leaders(machines: List[Machine]) -> List[int]:
    return [m.membership.rank for m in machines if m.alive and m.coordinator.leading]


def test_one_leader_at_a_time_and_a_lost_leaders_duties_move_to_the_lowest_live_rank():
    store = dist.HashStore()
    machines = [Machine(store, r) for r in range(4)]
    now = run(machines, 0.0, 4.0)
    assert leaders(machines) == [0]
    machines[0].alive = False  # rank 0's machine is lost: its supervisor renews nothing any more
    lost_at = now
    while leaders(machines) in ([], [0]):
        now = run(machines, now, now + 0.25)
        assert now - lost_at < 10, "a new leader within lease timeout + rank 1's turn"
    assert leaders(machines) == [1] and now - lost_at > 5.0
    assert lead.parse_holder(store.get(machines[1].membership.key(contract.LEADER_KEY)).decode()) == \
        lead.Holder(1, 2)
    run(machines, now, now + 10)
    assert leaders(machines) == [1], "the others follow the new holder, whose lease moves"


def test_a_join_for_the_lost_leaders_rank_is_admitted_by_the_new_leader():
    store = dist.HashStore()
    machines = [Machine(store, r) for r in range(4)]
    now = run(machines, 0.0, 3.0)
    machines[0].alive = False
    # The joiner's request (what request_join writes), in the job's store.
    nonce = "n1"
    index = store.add(contract.JOIN_REQUESTS, 1)
    store.set(contract.join_request_key(index), json.dumps(
        {"rank": 0, "nonce": nonce, "mac": contract.token_mac("tok", nonce), "host": "new", "pid": 1}))
    verdict = contract.join_verdict_key(index)
    start = now
    while not store.check([verdict]):
        now = run(machines, now, now + 0.25)
        assert now - start < 12
    assert json.loads(store.get(verdict))["admitted"] is True
    # A second request, wrong token: refused, and the verdict, once written, is never overwritten.
    index = store.add(contract.JOIN_REQUESTS, 1)
    store.set(contract.join_request_key(index), json.dumps({"rank": 2, "nonce": "x", "mac": "bad"}))
    run(machines, now, now + 1)
    first = json.loads(store.get(contract.join_verdict_key(index)))
    assert first["admitted"] is False and "token does not match" in first["reason"]
    store.set(contract.join_verdict_key(index), json.dumps({"admitted": False, "reason": "kept"}))
    run(machines, now + 1, now + 2)
    assert json.loads(store.get(contract.join_verdict_key(index)))["reason"] == "kept"


def request(store, rank: int, standby: bool) -> str:
    """A joiner's request (what request_join writes); returns its verdict key."""
    index = store.add(contract.JOIN_REQUESTS, 1)
    store.set(contract.join_request_key(index), json.dumps(
        {"rank": rank, "nonce": "n", "mac": contract.token_mac("tok", "n"), "standby": standby}))
    return contract.join_verdict_key(index)


def test_a_standby_for_a_living_rank_waits_and_is_admitted_once_its_machine_is_lost():
    store = dist.HashStore()
    machines = [Machine(store, r) for r in range(4)]
    now = run(machines, 0.0, 3.0)
    plain, standby = request(store, 2, standby=False), request(store, 2, standby=True)
    now = run(machines, now, now + 30)
    assert json.loads(store.get(plain))["admitted"] is False, "a plain join for a living rank is refused"
    assert not store.check([standby]), "the standby still waits, 30 s on"
    machines[2].alive = False
    lost_at = now
    while not store.check([standby]):
        now = run(machines, now, now + 0.25)
        assert now - lost_at < 12
    assert json.loads(store.get(standby))["admitted"] is True


def test_a_standby_for_a_draining_rank_is_admitted_within_a_tick_of_its_leaving():
    store = dist.HashStore()
    machines = [Machine(store, r) for r in range(4)]
    now = run(machines, 0.0, 3.0)
    standby = request(store, 2, standby=True)
    now = run(machines, now, now + 2)
    leader = machines[0].coordinator
    assert leader.leading and not leader.reviewer.awaits_drain, "a standby alone: the leader looks once a second"
    machines[2].membership.record_draining(2, notice=now, deadline=now + 25, owner="owner-2")
    now = run(machines, now, now + 1.25)
    assert leader.reviewer.awaits_drain and not store.check([standby])
    # The leaving trainer's record (drain.leave): the leader, looking every tick now, admits at its next one.
    machines[2].membership.record_machine_loss(2, 0, PREEMPTION, "owner-2", now, 0)
    run(machines, now, now + 0.25)
    assert store.check([standby]) and json.loads(store.get(standby))["admitted"] is True
    assert not leader.reviewer.awaits_drain


def test_a_loss_another_process_recorded_makes_the_leader_look_at_once():
    store = dist.HashStore()
    machines = [Machine(store, r) for r in range(4)]
    now = run(machines, 0.0, 3.0)
    standby = request(store, 2, standby=True)
    leader = machines[0].coordinator
    leader.tick(now)  # a look: the next is a second away
    assert not store.check([standby])
    machines[2].membership.record_machine_loss(2, 0, PREEMPTION, "owner-2", now, 0)  # (a leaving trainer's)
    leader.note_lost([{"rank": 2, "owner": "owner-2"}])  # (what the supervisor passes on from its signal watch)
    leader.tick(now + 0.05)
    assert store.check([standby]) and json.loads(store.get(standby))["admitted"] is True


def test_a_standby_ends_when_the_job_is_over_and_names_why():
    store = dist.HashStore()
    membership = Membership(store, "tok", 2, 4, join_timeout_s=1.0)
    over = iter([None, "finished"])
    with pytest.raises(StandbyEnded, match="the job finished while this machine stood by for rank 2"):
        request_join(store, "tok", 2, timeout_s=0.1, job_over=lambda: next(over))  # (no answer: pending)
    for rank in range(4):
        Membership(store, "tok", rank, 4, join_timeout_s=1.0).finish()
    with pytest.raises(StandbyEnded, match="the job finished"):
        join_job(membership, "tok", standby=True)


def test_a_standby_ends_when_the_embedded_store_closes_under_it():
    """The embedded store closes with the job (or with rank 0's machine): a real TCPStore server process is killed
    while a standby waits on it."""
    server = subprocess.Popen([sys.executable, "-c", "import time, torch.distributed as d\n"
                               "s = d.TCPStore('127.0.0.1', 0, is_master=True, wait_for_workers=False)\n"
                               "print(s.port, flush=True)\ntime.sleep(120)"], stdout=subprocess.PIPE, text=True)
    try:
        store = dist.TCPStore("127.0.0.1", int(server.stdout.readline()), is_master=False,
                              timeout=timedelta(seconds=30))
        threading.Timer(1.0, server.kill).start()
        started = time.monotonic()
        with pytest.raises(StandbyEnded, match="the job's store closed while this machine stood by for rank 2"):
            join_job(Membership(store, "tok", 2, 4, join_timeout_s=1.0), "tok", standby=True)
        assert time.monotonic() - started < 20
    finally:
        server.kill()
        server.wait(timeout=30)


def test_two_claims_of_a_vacant_leadership_leave_one_holder():
    store = dist.HashStore()
    a, b = Machine(store, 0), Machine(store, 1)
    a.tick(0.0)
    b.coordinator.started_at = -100.0  # rank 1 has waited its turn too
    b.tick(0.0)
    assert leaders([a, b]) == [0]


def test_a_join_with_a_token_of_no_running_job_is_refused_at_once():
    store = dist.HashStore()
    Machine(store, 1).tick(0.0)  # the job runs (a lease exists)
    check_job_exists(Membership(store, "tok", 0, 4, 1.0), "etcd://h:2379")
    with pytest.raises(JoinRefused, match="no job with this token runs in the etcd store etcd://h:2379"):
        check_job_exists(Membership(store, "wrong", 0, 4, 1.0), "etcd://h:2379")


def test_etcds_tls_and_auth_options_come_from_the_environment_a_trainer_inherits(monkeypatch):
    from deepspeed_checkfree.resilience.coordination import etcd_options, open_store
    from deepspeed_checkfree.resilience.store_address import etcd_job_user
    env = {"CHECKFREE_ETCD_CA_CERT": "/ca.pem", "CHECKFREE_ETCD_CLIENT_CERT": "/c.pem",
           "CHECKFREE_ETCD_CLIENT_KEY": "/c.key", "CHECKFREE_ETCD_TOKEN_AUTH": "1", "CHECKFREE_ETCD_USER": ""}
    assert etcd_options(env) == {"ca_cert": "/ca.pem", "client_cert": "/c.pem", "client_key": "/c.key",
                                 "token_auth": True}
    assert etcd_options({}) == {}
    monkeypatch.setenv("CHECKFREE_ETCD_TOKEN_AUTH", "1")
    store, server = open_store(store_url="etcds://h:2379", token="tok", master_addr="x", store_port=1, timeout_s=1.0)
    assert server is None and store.etcd.username == etcd_job_user("tok") and store.url.protocol == "https"


def test_a_launch_on_a_tokens_keys_of_a_finished_or_stopped_run_is_refused_with_the_way_out():
    from deepspeed_checkfree.resilience.coordination import check_not_a_previous_run
    store = dist.HashStore()
    members = [Membership(store, "tok", r, 2, 1.0) for r in range(2)]
    check_not_a_previous_run(members[0], "etcd://h:2379")  # nothing there: a new job
    members[1].finish()
    check_not_a_previous_run(members[0], "etcd://h:2379")  # a rank of this run finished early: fine
    members[0].finish()
    with pytest.raises(JoinRefused, match=r"holds a job that finished \(2 trainers done\).*delete_prefix"):
        check_not_a_previous_run(members[0], "etcd://h:2379")
    stopped = Membership(dist.HashStore(), "tok", 0, 2, 1.0)
    stopped.stop(1, "config", "unknown key")
    with pytest.raises(JoinRefused, match=r"a job that stopped \(rank 1: unknown key\).*new CHECKFREE_JOB_TOKEN"):
        check_not_a_previous_run(stopped, "etcd://h:2379")


# ---------------------------------------------------------------------------------------------------------------
# The leader watches every lease: a machine that goes silent is recorded lost within the lease timeout
# ---------------------------------------------------------------------------------------------------------------

def embedded(store, world: int = 4) -> List[Machine]:
    """The embedded store's supervisors: rank 0's hosts the store and leads."""
    return [Machine(store, r, world, hosted=r == 0, external=False) for r in range(world)]


def test_a_silent_machine_is_recorded_lost_its_generation_aborted_and_a_join_for_it_admitted_at_once():
    store = dist.HashStore()
    machines = embedded(store)
    m = machines[0].membership
    store.set(m.key(contract.rank_generation_key(2)), "7")  # rank 2's trainer is in generation 7
    now = run(machines, 0.0, 3.0)
    assert m.abort_reason(7) is None
    machines[2].alive = False  # its machine vanishes: no renewal, no packet
    silent_at = now
    while m.abort_reason(7) is None:
        now = run(machines, now, now + 0.25)
        assert now - silent_at < 7.5, "recorded within the lease timeout (5 s) and a renewal interval"
    assert now - silent_at > 4.0
    assert "rank 2's trainer (incarnation 0) was lost: machine silent" in m.abort_reason(7)["reason"]
    assert m.incarnation(2) == 1 and m.death(2, 0).cause == "machine silent"
    assert m.lost_machines()[2]["owner"] == "owner-2"
    signals = [m.next_signal(0, 0.01)[1]]
    assert signals == [{"kind": "lost", "rank": 2, "incarnation": 0, "cause": "machine silent", "owner": "owner-2"}]
    # A joiner's request is answered in the next tick: no second lease wait.
    nonce = "n"
    index = store.add(contract.JOIN_REQUESTS, 1)
    store.set(contract.join_request_key(index), json.dumps({"rank": 2, "nonce": nonce,
                                                            "mac": contract.token_mac("tok", nonce)}))
    run(machines, now, now + 1.0)
    verdict = json.loads(store.get(contract.join_verdict_key(index)))
    assert verdict["admitted"] and "recorded lost (machine silent)" in verdict["reason"]


def test_a_supervisor_back_from_a_partition_is_not_taken_for_alive_and_a_joined_one_is_watched_again():
    store = dist.HashStore()
    machines = embedded(store)
    m = machines[0].membership
    now = run(machines, 0.0, 2.0)
    machines[3].alive = False
    now = run(machines, now, now + 8.0)
    assert m.incarnation(3) == 1
    machines[3].alive = True  # the partition heals: it renews under its old id, and the leader ignores it
    now = run(machines, now, now + 8.0)
    assert m.incarnation(3) == 1 and len(m.lost_machines()) == 1, "recorded once, not again, not alive"
    joined = Machine(store, 3, hosted=False, external=False, owner="new-machine")
    joined.membership.record_trainer(3, 2)
    machines[3] = joined
    now = run(machines, now, now + 3.0)
    joined.alive = False  # the new machine goes silent too: it is judged like any other
    now = run(machines, now, now + 8.0)
    assert m.incarnation(3) == 3 and m.lost_machines()[3]["owner"] == "new-machine"
