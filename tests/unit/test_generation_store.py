"""The generation store ends a process group's formation as soon as the generation is aborted, and reads every
member's published address in one request (one real process with gloo; simulated members as threads)."""
from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
import torch.distributed as dist

from deepspeed_checkfree.core.fault_policy import COMMUNICATION, classify
from deepspeed_checkfree.resilience.generation_store import GenerationStore, decode_log, encode_entry

from .test_death_watch import Counting


def never() -> None:
    return None


def test_an_abort_while_the_group_forms_ends_the_wait_at_once():
    # Rank 1 never publishes its address; 0.3 s in, the generation is aborted (its supervisor saw it die). gloo's
    # rendezvous would otherwise wait for the 60 s timeout.
    started = time.monotonic()
    aborted = lambda: ({"reason": "rank 1's trainer died"} if time.monotonic() - started > 0.3 else None)  # noqa
    store = GenerationStore(dist.HashStore(), aborted, generation=3, timeout=timedelta(seconds=60))
    with pytest.raises(Exception) as err:
        dist.init_process_group("gloo", store=store, rank=0, world_size=2, timeout=timedelta(seconds=60))
    took = time.monotonic() - started
    assert took < 5, f"the formation waited {took:.1f} s"
    assert classify(err.value) == COMMUNICATION, repr(err.value)
    assert "generation 3 was aborted while it formed its process group (rank 1's trainer died)" in str(err.value)
    assert not dist.is_initialized()


def test_without_an_abort_the_wait_ends_at_the_store_timeout_with_a_clear_error():
    store = GenerationStore(dist.HashStore(), never, generation=1, timeout=timedelta(seconds=0.3))
    with pytest.raises(dist.DistStoreError, match="timed out waiting 0 s for keys \\['k'\\] while generation 1"):
        store.get("k")
    store.set("k", b"v")
    assert store.get("k") == b"v" and store.check(["k"]) and store.add("n", 2) == 2


def test_a_group_forms_through_it_when_every_member_lives():
    store = GenerationStore(dist.TCPStore("127.0.0.1", 0, 1, is_master=True), never, generation=0,
                            timeout=timedelta(seconds=30))
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    # c10d holds only the C++ side of a Python store: the trainer keeps the Python object referenced, or later
    # groups fail with "Not implemented"; this test keeps it in `store`.
    try:
        sub = dist.new_group(ranks=[0])
        t = __import__("torch").ones(2)
        dist.all_reduce(t, group=sub)
        assert t.tolist() == [1.0, 1.0]
        clone = store.clone()
        assert isinstance(clone, GenerationStore) and clone.aborted is store.aborted
    finally:
        dist.destroy_process_group()


def test_its_keys_lie_under_the_prefix_and_published_keys_in_one_log_per_group():
    inner = dist.HashStore()
    store = GenerationStore(inner, never, generation=2, timeout=timedelta(seconds=5), prefix="cf/x/g/2/pg")
    store.set("0//cpu//0/0", b"addr-a")
    store.set("0//cpu//0/1", b"addr-b")
    store.set("name", b"plain")
    assert store.add("n", 3) == 3 and store.compare_set("c", "", "v") == b"v"
    plain = dist.PrefixStore("cf/x/g/2/pg", inner)
    assert plain.get("name") == b"plain" and plain.get("n") == b"3" and plain.get("c") == b"v"
    assert plain.get("0//cpu//0/0") == b"addr-a", "(a late member's blocking wait wakes on the key itself)"
    assert decode_log(plain.get("0//cpu//0/__published")) == {"0//cpu//0/0": b"addr-a", "0//cpu//0/1": b"addr-b"}
    reader = GenerationStore(inner, never, generation=2, timeout=timedelta(seconds=5), prefix="cf/x/g/2/pg")
    assert reader.get("0//cpu//0/1") == b"addr-b" and reader.multi_get(["name", "0//cpu//0/0"]) == [b"plain",
                                                                                                     b"addr-a"]
    assert reader.check(["0//cpu//0/0", "name"]) and not reader.check(["0//cpu//0/7"])
    assert store.clone().prefix == "cf/x/g/2/pg"
    assert decode_log(encode_entry("a/1", b"x") + encode_entry("a/1", b"y")) == {"a/1": b"y"}, "the last one wins"


@pytest.mark.parametrize("world", [4, 16, 64])
def test_forming_a_group_costs_each_member_a_few_requests_whatever_its_size(world):
    # gloo's full mesh, as it uses the store (measured with torch 2.13): each member sets its own address, then
    # waits for and reads every member's, one key at a time. The members start together (they all leave the
    # arrival when the generation forms); the last one is late, as a replacement that builds its engine is.
    store = Counting()
    group = "0//cpu//0"
    requests = {}
    start = threading.Barrier(world)

    def member(rank: int) -> None:
        client = store.view()
        mine = GenerationStore(client, never, generation=0, timeout=timedelta(seconds=30), prefix="g/0/pg")
        start.wait()
        if rank == world - 1:
            time.sleep(0.3)
        mine.set(f"{group}/{rank}", f"address of {rank}".encode())
        for peer in range(world):
            mine.wait([f"{group}/{peer}"])
            assert mine.get(f"{group}/{peer}") == f"address of {peer}".encode()
        requests[rank] = client.requests

    threads = [threading.Thread(target=member, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(requests) == world
    per_member = sum(requests.values()) / world
    assert per_member <= 16, f"{per_member:.1f} requests per member for {world} members: {requests}"
