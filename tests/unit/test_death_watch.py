"""The death watch waits for its generation's abort record with one blocking request and aborts the generation's
communication once, as soon as the record appears (a HashStore stands in for the job's store)."""
from __future__ import annotations

import threading
import time
from datetime import timedelta

import torch.distributed as dist

from deepspeed_checkfree.resilience.death_watch import DeathWatch, aborted_reader
from deepspeed_checkfree.resilience.membership import Membership
from deepspeed_checkfree.resilience.store_access import MISSING


class Counting(dist.Store):
    """A view of a shared in-memory store (``HashStore``) that counts the requests made through it."""

    def __init__(self, shared: dist.Store = None) -> None:
        super().__init__()
        self.shared = dist.HashStore() if shared is None else shared
        self.requests = 0

    def view(self) -> "Counting":
        """Another client of the same store, with a count of its own."""
        return Counting(self.shared)

    def _count(self, result):
        self.requests += 1
        return result

    def set(self, key, value):
        return self._count(self.shared.set(key, value))

    def get(self, key):
        return self._count(self.shared.get(key))

    def add(self, key, amount):
        return self._count(self.shared.add(key, amount))

    def check(self, keys):
        return self._count(self.shared.check(keys))

    def wait(self, keys, timeout=None):
        return self._count(self.shared.wait(keys) if timeout is None else self.shared.wait(keys, timeout))

    def compare_set(self, key, expected, desired):
        return self._count(self.shared.compare_set(key, expected, desired))

    def multi_get(self, keys):
        return self._count(self.shared.multi_get(keys))

    def multi_set(self, keys, values):
        return self._count(self.shared.multi_set(keys, values))

    def append(self, key, value):
        return self._count(self.shared.append(key, value))

    def delete_key(self, key):
        return self._count(self.shared.delete_key(key))

    def num_keys(self):
        return self.shared.num_keys()

    # as the embedded store's client (store_access.DeadlineStore) reads: one request each

    def get_if_set(self, key):
        value = self.compare_set(key, MISSING, MISSING)
        return None if value == MISSING else value

    def wait_for(self, key, timeout_s):
        self.requests += 1
        try:
            self.shared.wait([key], timedelta(seconds=timeout_s))
        except dist.DistStoreError:
            return None
        return self.shared.get(key)

    def has_extended_api(self):
        return True

    def clone(self):
        return self.view()


def test_it_aborts_once_when_the_generation_is_aborted_and_never_for_another_or_while_disarmed():
    store = Counting()
    writer = Membership(store.view(), "tok", 2, 4, 1.0)
    watch = DeathWatch(Membership(store, "tok", 0, 4, 1.0), wait_s=0.2)
    calls, fired = [], threading.Event()
    try:
        watch.arm(5, lambda: (calls.append(5), fired.set()))
        time.sleep(0.3)
        writer.abort(4, "an older generation: not this watch's business")
        time.sleep(0.3)
        assert not calls
        t0 = time.monotonic()
        writer.abort(5, "rank 2's trainer died")
        assert fired.wait(2.0) and time.monotonic() - t0 < 0.5
        time.sleep(0.3)
        assert calls == [5] and watch.fired["reason"] == "rank 2's trainer died", "one abort per arming"
        fired.clear()
        watch.arm(6, lambda: (calls.append(6), fired.set()))
        watch.disarm()
        writer.abort(6, "after the disarm")
        time.sleep(0.3)
        assert calls == [5]
    finally:
        watch.close(join_s=2.0)


def test_a_quiet_generation_costs_one_blocking_request_per_wait():
    store = Counting()
    watch = DeathWatch(Membership(store, "tok", 0, 4, 1.0), wait_s=0.5)
    try:
        watch.arm(0, lambda: None)
        time.sleep(1.6)
        assert store.requests <= 5, f"{store.requests} requests in 1.6 s (one per 0.5 s wait)"
    finally:
        watch.close(join_s=2.0)


def test_the_rendezvous_reads_the_abort_record_in_one_request():
    store = Counting()
    membership = Membership(store, "tok", 0, 4, 1.0)
    aborted = aborted_reader(membership, 3)
    before = store.requests
    assert aborted() is None and store.requests - before == 1
    membership.abort(3, "rank 1's machine is silent")
    assert aborted()["reason"] == "rank 1's machine is silent"
