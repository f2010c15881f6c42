"""The rendezvous store of one generation: waits that give up as soon as a member of the generation dies.

Forming a process group blocks in the store until every member has published its address (gloo's full mesh, NCCL's
unique id). If a member dies meanwhile, for example a replacement killed while the group forms, a plain store
waits for the group's start-up timeout (minutes). This store polls instead, and between polls asks the job's
membership whether a member of this generation has been replaced since it arrived (its supervisor saw it die and
moved its rank's incarnation on); then it raises at once, and the survivors form the next generation.
"""
from __future__ import annotations

import time
from datetime import timedelta
from typing import Callable, List, Mapping, Optional

import torch.distributed as dist

POLL_S = 0.01  # a check is one round trip to the store (~0.2 ms; etcd: ~1-3 ms)
DEATH_POLL_S = 0.05  # asking for deaths takes one round trip per member: less often


class GenerationStore(dist.Store):
    """A store (usually a PrefixStore on the job's store) whose blocking ``get``/``wait`` end when
    ``dead_members()`` names a member.

    Args:
        inner: the store the keys live in.
        dead_members: returns the ranks of this generation's members that have died (empty while all live).
        generation: for the error message.
        timeout: the waits' own timeout.
        poll_max_s: a wait polls every :data:`POLL_S`, backing off to this (an external store, where every poll
            is an HTTP request that its members serve for every waiting rank, is polled less eagerly).
        death_poll_s: how often a wait asks ``dead_members()``.
    """

    def __init__(self, inner: dist.Store, dead_members: Callable[[], List[int]], generation: int,
                 timeout: timedelta, poll_max_s: float = POLL_S, death_poll_s: float = DEATH_POLL_S) -> None:
        super().__init__()
        self.inner, self.dead_members, self.generation = inner, dead_members, generation
        self._timeout = timeout
        self.poll_max_s, self.death_poll_s = poll_max_s, death_poll_s

    # the waits ---------------------------------------------------------------------------------------------------

    def _wait_for(self, keys: List[str], timeout: Optional[timedelta] = None) -> None:
        limit = (timeout or self._timeout).total_seconds()
        deadline = time.monotonic() + limit
        next_death_check, pause = 0.0, POLL_S
        while not self.inner.check(keys):
            now = time.monotonic()
            dead: List[int] = []
            if now >= next_death_check:
                dead, next_death_check = self.dead_members(), now + self.death_poll_s
            if dead:
                raise dist.DistNetworkError(
                    f"rank(s) {dead} died while generation {self.generation} formed its process group (their "
                    f"supervisors saw the trainers exit): the survivors form the next generation")
            if time.monotonic() > deadline:
                raise dist.DistStoreError(f"timed out waiting {limit:.0f} s for keys {keys} while generation "
                                          f"{self.generation} formed its process group")
            time.sleep(pause)
            pause = min(pause * 1.5, self.poll_max_s)

    def get(self, key: str) -> bytes:
        self._wait_for([key])
        return self.inner.get(key)

    def wait(self, keys: List[str], timeout: Optional[timedelta] = None) -> None:
        self._wait_for(list(keys), timeout)

    # the rest is the inner store's ----------------------------------------------------------------------------------

    def set(self, key: str, value) -> None:
        self.inner.set(key, value)

    def add(self, key: str, amount: int) -> int:
        return self.inner.add(key, amount)

    def compare_set(self, key: str, expected, desired) -> bytes:
        return self.inner.compare_set(key, expected, desired)

    def check(self, keys: List[str]) -> bool:
        return self.inner.check(keys)

    def append(self, key: str, value) -> None:
        self.inner.append(key, value)

    def multi_get(self, keys: List[str]) -> List[bytes]:
        self._wait_for(list(keys))
        return self.inner.multi_get(keys)

    def multi_set(self, keys: List[str], values) -> None:
        self.inner.multi_set(keys, values)

    def has_extended_api(self) -> bool:
        return self.inner.has_extended_api()

    def delete_key(self, key: str) -> bool:
        return self.inner.delete_key(key)

    def num_keys(self) -> int:
        return self.inner.num_keys()

    def clone(self) -> "GenerationStore":
        """A second connection with the same waits (gloo uses one per background thread)."""
        return GenerationStore(self.inner.clone(), self.dead_members, self.generation, self._timeout,
                               self.poll_max_s, self.death_poll_s)

    def set_timeout(self, timeout: timedelta) -> None:
        self._timeout = timeout

    @property
    def timeout(self) -> timedelta:
        return self._timeout


def replaced_members(incarnations: Mapping[int, int], current: Callable[[int], Optional[int]]) -> List[int]:
    """The ranks whose supervisor has moved the incarnation on since they arrived (``incarnations``: rank -> the
    incarnation it arrived as; ``current(rank)``: the rank's incarnation now)."""
    return [r for r, inc in incarnations.items() if (current(r) or 0) != inc]
