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
from typing import Callable, Dict, List, Mapping, Optional

import torch.distributed as dist

POLL_S = 0.01  # a check is one round trip to the store (~0.2 ms; etcd: ~1-3 ms)
DEATH_POLL_S = 0.05  # asking for deaths (one counter, see death_watch.deaths_since_arrival): less often


class GenerationStore(dist.Store):
    """The keys under ``prefix`` of a store (the job's), whose blocking ``get``/``wait`` end when ``dead_members()``
    names a member.

    Args:
        inner: the store the keys live in.
        dead_members: returns the ranks of this generation's members that have died (empty while all live).
        generation: for the error message.
        timeout: the waits' own timeout.
        prefix: every key is ``prefix/key`` in ``inner`` (as a ``PrefixStore`` has it); none if empty.
        poll_max_s: a wait polls every :data:`POLL_S`, backing off to this (an external store, where every poll
            is an HTTP request that its members serve for every waiting rank, is polled less eagerly).
        death_poll_s: how often a wait asks ``dead_members()``.

    On a store that reads keys without waiting (the etcd store's ``get_if_set`` and ``values_if_set``) a wait
    polls with those reads and keeps what it found: the ``get`` that follows a ``wait`` for its key (gloo's
    rendezvous does that for every peer) costs no request, and a ``get`` alone costs one per poll.
    """

    def __init__(self, inner: dist.Store, dead_members: Callable[[], List[int]], generation: int,
                 timeout: timedelta, prefix: str = "", poll_max_s: float = POLL_S,
                 death_poll_s: float = DEATH_POLL_S) -> None:
        super().__init__()
        self.inner, self.dead_members, self.generation = inner, dead_members, generation
        self.prefix = prefix
        self._timeout = timeout
        self.poll_max_s, self.death_poll_s = poll_max_s, death_poll_s
        self._found: Dict[str, bytes] = {}  # what the last wait read, for the get that follows (dropped on a write)

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _keys(self, keys) -> List[str]:
        return [self._key(k) for k in keys]

    # the waits ---------------------------------------------------------------------------------------------------

    def _wait_for(self, keys: List[str], timeout: Optional[timedelta] = None,
                  present: Optional[Callable[[], bool]] = None) -> None:
        """Return once ``present()`` (default: every key of ``keys`` is set); ``keys`` name the wait in errors."""
        full = self._keys(keys)
        present = present or (lambda: self.inner.check(full))
        limit = (timeout or self._timeout).total_seconds()
        deadline = time.monotonic() + limit
        next_death_check, pause = 0.0, POLL_S
        while not present():
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
        if key in self._found:
            return self._found.pop(key)
        get_if_set = getattr(self.inner, "get_if_set", None)
        if get_if_set is None:
            self._wait_for([key])
            return self.inner.get(self._key(key))
        full, found = self._key(key), []

        def present() -> bool:
            value = get_if_set(full)
            if value is not None:
                found.append(value)
            return value is not None

        self._wait_for([key], present=present)
        return found[0]

    def wait(self, keys: List[str], timeout: Optional[timedelta] = None) -> None:
        keys = list(keys)
        values_if_set = getattr(self.inner, "values_if_set", None)
        if values_if_set is None:
            self._wait_for(keys, timeout)
            return
        full = self._keys(keys)

        def present() -> bool:
            values = values_if_set(full)
            if any(v is None for v in values):
                return False
            self._found = dict(zip(keys, values))
            return True

        self._wait_for(keys, timeout, present=present)

    def _written(self, *keys: str) -> None:
        for key in keys:
            self._found.pop(key, None)

    # the rest is the inner store's ----------------------------------------------------------------------------------

    def set(self, key: str, value) -> None:
        self._written(key)
        self.inner.set(self._key(key), value)

    def add(self, key: str, amount: int) -> int:
        self._written(key)
        return self.inner.add(self._key(key), amount)

    def compare_set(self, key: str, expected, desired) -> bytes:
        self._written(key)
        return self.inner.compare_set(self._key(key), expected, desired)

    def check(self, keys: List[str]) -> bool:
        return self.inner.check(self._keys(keys))

    def append(self, key: str, value) -> None:
        self._written(key)
        self.inner.append(self._key(key), value)

    def multi_get(self, keys: List[str]) -> List[bytes]:
        keys = list(keys)
        self.wait(keys)
        if all(k in self._found for k in keys):
            return [self._found.pop(k) for k in keys]
        return self.inner.multi_get(self._keys(keys))

    def multi_set(self, keys: List[str], values) -> None:
        self._written(*keys)
        self.inner.multi_set(self._keys(keys), values)

    def has_extended_api(self) -> bool:
        return self.inner.has_extended_api()

    def delete_key(self, key: str) -> bool:
        self._written(key)
        return self.inner.delete_key(self._key(key))

    def num_keys(self) -> int:
        return self.inner.num_keys()

    def clone(self) -> "GenerationStore":
        """A second connection with the same waits (gloo uses one per background thread)."""
        return GenerationStore(self.inner.clone(), self.dead_members, self.generation, self._timeout, self.prefix,
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
