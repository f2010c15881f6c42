"""What the coordination costs the job's store, pinned at small world sizes so that a regression to requests that
grow with the world fails here (the benchmark, benchmarks/coordination_scale.py, measures it at scale). Every
member is a client of its own (Counting) on one in-memory store; the etcd store's batched reads are tested against
a real etcd in tests/distributed/test_etcd_store.py."""
from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
import torch.distributed as dist

from deepspeed_checkfree.core.rejoin import MemberInfo
from deepspeed_checkfree.events import EventLog
from deepspeed_checkfree.resilience.contract import TrainerDeath, abort_key, formed_key, rank_generation_key
from deepspeed_checkfree.resilience.coordinator import Coordinator
from deepspeed_checkfree.resilience.membership import Membership
from deepspeed_checkfree.resilience.store_access import DeadlineStore

from ..harness.ports import free_port
from .test_death_watch import Counting


def arrive_together(world: int, generation: int = 0) -> dict:
    """Every rank arrives for ``generation`` at once; returns rank -> the requests its arrival made."""
    shared = Counting()
    clients = {r: shared.view() for r in range(world)}
    for r in range(world):
        Membership(clients[r], "tok", r, world, 10.0).record_trainer(r, 0)
        clients[r].requests = 0
    formed = {}

    def arrive(rank: int) -> None:
        m = Membership(clients[rank], "tok", rank, world, 10.0)
        formed[rank] = m.arrive(generation, MemberInfo(rank, True, 0, 0, rank))

    threads = [threading.Thread(target=arrive, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(formed) == world and all(g == generation and len(m) == world for g, m in formed.values())
    return {r: c.requests for r, c in clients.items()}


@pytest.mark.parametrize("world", [4, 16])
def test_an_arrival_costs_each_member_a_handful_of_requests_whatever_the_world_size(world):
    # Each member: two reads (its generation's end, its rank's active incarnation: one request on etcd), one write
    # (its entry), one add (the count), one blocking read of the member list. The arrival that completes the count
    # also checks the members (two requests: every entry and incarnation at once) and writes the list.
    requests = arrive_together(world)
    assert sorted(requests.values())[:-1] == [5] * (world - 1), requests
    assert max(requests.values()) <= 5 + 3, requests


def test_a_quiet_supervisor_costs_the_store_one_request_a_second_and_the_leader_two():
    shared = Counting()
    clients = [shared.view() for _ in range(4)]
    coordinators = [Coordinator(Membership(c, "tok", r, 4, 1.0), "tok", owner=f"o{r}", hosted=r == 0,
                                external=False, lease_timeout_s=5.0, events=EventLog(None), prefix=f"[{r}]")
                    for r, c in enumerate(clients)]
    for now in (0.0, 1.0, 2.0):  # start-up: every lease comes to exist
        for c in coordinators:
            c.tick(now)
    for c in clients:
        c.requests = 0
    for now in (3.0, 4.0, 5.0, 6.0, 7.0):
        for c in coordinators:
            c.tick(now)
            c.tick(now + 0.5)  # (the supervisor ticks four times a second: only once a second does it cost)
    assert [c.requests for c in clients] == [10, 5, 5, 5], [c.requests for c in clients]


def test_a_trainer_exit_is_decided_on_facts_read_together_and_its_loss_recorded_in_one_write():
    shared = Counting()
    supervisor = Membership(shared.view(), "tok", 1, 2, join_timeout_s=1.0)
    assert supervisor.exit_facts(1) == dict(job_stopped=False, job_has_progress=False, group_formed=False,
                                            trainer_finished=False, generation=-1)
    shared.shared.set(supervisor.key(rank_generation_key(1)), "3")
    shared.shared.set(supervisor.key(formed_key(3)), '{"0": {}, "1": {}}')
    supervisor.record_progress()
    assert supervisor.exit_facts(1) == dict(job_stopped=False, job_has_progress=True, group_formed=True,
                                            trainer_finished=False, generation=3)
    writes = shared.view()
    Membership(writes, "tok", 1, 2, 1.0).record_loss(1, 0, TrainerDeath(time=12.5, returncode=-9), generation=3)
    assert writes.requests == 3, "the incarnation and the death in one write, then the abort (two)"
    assert supervisor.incarnation(1) == 1 and supervisor.death(1, 0) == TrainerDeath(time=12.5, returncode=-9)


def test_a_finished_generation_is_deleted_key_by_key_on_a_store_without_prefix_deletes():
    from deepspeed_checkfree.resilience.contract import formed_key, member_key, rank_generation_key
    shared = Counting()
    world = 2
    ranks = [Membership(shared.view(), "tok", r, world, 5.0) for r in range(world)]
    for r in range(world):
        ranks[r].record_trainer(r, 0)
    results = {}
    threads = [threading.Thread(target=lambda r=r: results.setdefault(
        r, ranks[r].arrive(3, MemberInfo(r, True, 0, 0, r)))) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    pg = f"{ranks[0].key('g/3/pg')}/0//cpu//0/0"
    shared.shared.set(pg, "address")
    ranks[0].register_written(3, [pg])
    before = shared.shared.num_keys()
    assert ranks[1].delete_generation(3) == world + 4, "members, count, end, the registered key, the list"
    assert shared.shared.num_keys() == before - (world + 4)
    assert not shared.shared.check([pg]) and not shared.shared.check([ranks[0].key(formed_key(3))])
    assert shared.shared.check([ranks[0].key(rank_generation_key(0))]), "job-wide keys stay"
    assert not shared.shared.check([ranks[0].key(member_key(3, 1))])


class CountingGets(dist.Store):
    """A TCPStore client that counts the ``get`` requests it sends (a blocking wait's, woken or not)."""

    def __init__(self, inner: dist.Store) -> None:
        super().__init__()
        self.inner, self.gets = inner, 0

    def get(self, key):
        self.gets += 1
        return self.inner.get(key)

    def set_timeout(self, timeout):
        self.inner.set_timeout(timeout)

    @property
    def timeout(self):
        return self.inner.timeout


@pytest.mark.parametrize("waited", ["formed", "abort"])
def test_reading_a_generation_s_end_or_abort_does_not_wake_the_ranks_waiting_for_it(waited):
    # A real TCPStore (torch 2.13's libuv server) wakes the waiters of an unset key when a client compare-and-sets
    # it; each woken waiter asks again (N members x N reads). The members wait for the generation's end, the death
    # watches for its abort record; formed(), exit_facts() and abort_reason() (a rendezvous polls it) read with check.
    port = free_port()
    server = dist.TCPStore("127.0.0.1", port, 1, True, timeout=timedelta(seconds=30), use_libuv=True)
    waiter = CountingGets(dist.TCPStore("127.0.0.1", port, 1, False, timeout=timedelta(seconds=30)))
    reader = Membership(DeadlineStore(dist.TCPStore("127.0.0.1", port, 1, False, timeout=timedelta(seconds=30)),
                                      timedelta(seconds=30)), "tok", 1, 2, 10.0)
    key = reader.key(formed_key(0) if waited == "formed" else abort_key(0))
    server.set(reader.key(rank_generation_key(1)), "0")
    got = []
    waiting = threading.Thread(target=lambda: got.append(DeadlineStore(waiter, timedelta(seconds=30)).wait_for(
        key, 20.0)))
    waiting.start()
    time.sleep(0.3)  # (the waiter blocks in its get)
    for _ in range(5):
        assert not reader.formed(0) and reader.abort_reason(0) is None
        assert reader.exit_facts(1)["group_formed"] is False
    server.set(key, '{"reason": "set"}')
    waiting.join(20)
    assert got == [b'{"reason": "set"}'] and waiter.gets == 1, (got, waiter.gets)
