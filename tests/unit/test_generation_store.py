"""The generation store ends a process group's formation as soon as a member dies (one real process, gloo)."""
from __future__ import annotations

import time
from datetime import timedelta

import pytest
import torch.distributed as dist

from deepspeed_checkfree.core.fault_policy import COMMUNICATION, classify
from deepspeed_checkfree.resilience.generation_store import GenerationStore, replaced_members


def test_replaced_members_are_those_whose_incarnation_moved_on():
    now = {0: 0, 1: 2, 2: None}
    assert replaced_members({0: 0, 1: 1, 2: 0}, now.get) == [1]
    assert replaced_members({0: 0, 1: 2, 2: 0}, now.get) == []


def test_a_member_dying_while_the_group_forms_ends_the_wait_at_once():
    # Rank 1 never publishes its address; 0.3 s in, its supervisor records a new incarnation. gloo's rendezvous
    # would otherwise wait for the 60 s timeout.
    inner = dist.HashStore()
    started = time.monotonic()
    died = lambda: [1] if time.monotonic() - started > 0.3 else []  # noqa: E731
    store = GenerationStore(inner, died, generation=3, timeout=timedelta(seconds=60))
    with pytest.raises(Exception) as err:
        dist.init_process_group("gloo", store=store, rank=0, world_size=2, timeout=timedelta(seconds=60))
    took = time.monotonic() - started
    assert took < 5, f"the formation waited {took:.1f} s"
    assert classify(err.value) == COMMUNICATION, repr(err.value)
    assert "died while generation 3 formed" in str(err.value)
    assert not dist.is_initialized()


def test_without_a_death_the_wait_ends_at_the_store_timeout_with_a_clear_error():
    store = GenerationStore(dist.HashStore(), lambda: [], generation=1, timeout=timedelta(seconds=0.3))
    with pytest.raises(dist.DistStoreError, match="timed out waiting 0 s for keys \\['k'\\] while generation 1"):
        store.get("k")
    store.set("k", b"v")
    assert store.get("k") == b"v" and store.check(["k"]) and store.add("n", 2) == 2


def test_a_group_forms_through_it_when_every_member_lives():
    store = GenerationStore(dist.TCPStore("127.0.0.1", 0, 1, is_master=True), lambda: [], generation=0,
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
        assert isinstance(clone, GenerationStore) and clone.dead_members is store.dead_members
    finally:
        dist.destroy_process_group()


def test_its_keys_lie_under_the_prefix_as_a_prefix_stores_do():
    inner = dist.HashStore()
    store = GenerationStore(inner, lambda: [], generation=2, timeout=timedelta(seconds=5), prefix="cf/x/g/2/pg")
    store.set("addr/0", b"a")
    assert store.add("n", 3) == 3 and store.compare_set("c", "", "v") == b"v"
    store.multi_set(["m1", "m2"], ["1", "2"])
    plain = dist.PrefixStore("cf/x/g/2/pg", inner)
    assert plain.get("addr/0") == b"a" and plain.get("n") == b"3" and plain.get("c") == b"v"
    assert store.get("addr/0") == b"a" and store.multi_get(["m1", "m2"]) == [b"1", b"2"]
    assert store.check(["addr/0", "m2"]) and not store.check(["addr/1"])
    assert store.delete_key("addr/0") and not plain.check(["addr/0"])
    assert store.clone().prefix == "cf/x/g/2/pg"
