"""The rendezvous store of one generation: waits that give up as soon as the generation is aborted, and that read
every member's published address in one request.

Forming a process group blocks in the store until every member has published its address (gloo's full mesh,
NCCL's unique id). If a member dies meanwhile, for example a replacement killed while the group forms, a plain store
waits for the group's start-up timeout (minutes). This store polls instead, and between polls reads the
generation's abort record (its supervisor saw it die, the leader saw its machine go silent, or another member
failed): then it raises at once, and the survivors form the next generation.

gloo publishes one key per member (``<group>/<rank>``) and then waits for and reads each of them: N requests per
member, N² per group. Here a key whose last segment is a number is *published*: written, and appended to one log per
group prefix (etcd: read back with the others by one range read of the prefix). A wait reads every address
published so far in one request; only for a key that is not there yet does it block on that key (one request that
the store answers when it is written), then read the log again. Forming a group so costs each member a few requests
whatever its size, plus two for each time it has to wait for a member that is late.
"""
from __future__ import annotations

import re
import struct
import time
from datetime import timedelta
from typing import Callable, Dict, List, Optional

import torch.distributed as dist

from .store_access import get_if_set, wait_for

POLL_S = 0.01  # a check is one round trip to the store (~0.2 ms; etcd: ~1-3 ms)
DEATH_POLL_S = 0.05  # reading the abort record: less often
BLOCK_PIECES = 5  # a blocking wait for a late member's address lasts this many death polls
LOG = "__published"  # the log of one prefix's published keys
_PUBLISHED = re.compile(r"^(.*/)?(\d+)$")
_HEADER = struct.Struct("!II")  # one log entry: key length, value length, then both


def _split(key: str):
    """(prefix, key) of a published key (last segment a number), else None."""
    match = _PUBLISHED.match(key)
    return None if match is None else (match.group(1) or "", key)


def encode_entry(key: str, value: bytes) -> bytes:
    raw = key.encode()
    return _HEADER.pack(len(raw), len(value)) + raw + value


def decode_log(data: bytes) -> Dict[str, bytes]:
    """Every entry of a published-keys log (a later entry of a key wins)."""
    found, i = {}, 0
    while i + _HEADER.size <= len(data):
        klen, vlen = _HEADER.unpack_from(data, i)
        i += _HEADER.size
        found[data[i:i + klen].decode()] = bytes(data[i + klen:i + klen + vlen])
        i += klen + vlen
    return found


class GenerationStore(dist.Store):
    """The keys under ``prefix`` of a store (the job's), whose blocking ``get``/``wait`` end when ``aborted()``
    returns a record.

    Args:
        inner: the store the keys live in.
        aborted: returns the generation's abort record (None while it stands).
        generation: for the error message.
        timeout: the waits' own timeout.
        prefix: every key is ``prefix/key`` in ``inner`` (as a ``PrefixStore`` has it); none if empty.
        poll_max_s: a wait polls every :data:`POLL_S`, backing off to this (an external store, where every poll
            is an HTTP request that its members serve for every waiting rank, is polled less eagerly).
        death_poll_s: how often a wait reads the abort record.
    """

    KEEPS_OWN_WAIT_TIMEOUT = True  # (a caller's shorter wait timeout does not apply: ds_internals.bound_gloo_connect)

    def __init__(self, inner: dist.Store, aborted: Callable[[], Optional[dict]], generation: int,
                 timeout: timedelta, prefix: str = "", poll_max_s: float = POLL_S,
                 death_poll_s: float = DEATH_POLL_S, on_published: Optional[Callable[[], None]] = None) -> None:
        super().__init__()
        self.on_published = on_published  # called after this member published its first key (a test's hook)
        self.inner, self.aborted, self.generation = inner, aborted, generation
        self.prefix = prefix
        self._timeout = timeout
        self.poll_max_s, self.death_poll_s = poll_max_s, death_poll_s
        self._published: Dict[str, bytes] = {}  # published keys read so far (they are written once)
        self.written: List[str] = []  # every key this member wrote (the leader deletes them with the generation)
        self._by_range = hasattr(inner, "values_with_prefix")  # etcd: read a prefix in one request

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _keys(self, keys) -> List[str]:
        return [self._key(k) for k in keys]

    # published keys ------------------------------------------------------------------------------------------------

    def _wrote(self, *keys: str) -> None:
        self.written.extend(self._key(k) for k in keys)

    def _publish(self, key: str, group: str, value) -> None:
        value = value.encode() if isinstance(value, str) else bytes(value)
        self._wrote(key)
        if not self._by_range:
            self._wrote(group + LOG)
            self.inner.append(self._key(group + LOG), encode_entry(key, value))
        self.inner.set(self._key(key), value)  # (what a late member's blocking wait wakes on)
        self._published[key] = value
        if self.on_published is not None:
            hook, self.on_published = self.on_published, None
            hook()

    def _read_published(self, group: str) -> None:
        """Everything published under ``group`` so far, in one request."""
        if self._by_range:
            start = self._key(group)
            found = {k[len(self._key("")):]: v for k, v in self.inner.values_with_prefix(start).items()}
        else:
            log = get_if_set(self.inner, self._key(group + LOG))
            found = decode_log(log) if log else {}
        self._published.update({k: v for k, v in found.items() if _split(k) is not None})

    # the waits ---------------------------------------------------------------------------------------------------

    def _wait_for(self, keys: List[str], timeout: Optional[timedelta] = None) -> None:
        """Return once every key of ``keys`` is set; raise when the generation is aborted or after the timeout.

        The store's own timeout (the generation's start-up allowance) is the least a wait lasts: a caller's shorter
        one (gloo passes its connect timeout) must not cut the wait for a peer that is still starting, and a peer
        that died ends the wait early through the abort record."""
        limit = max(timeout or self._timeout, self._timeout).total_seconds()
        deadline = time.monotonic() + limit
        next_death_check, pause = 0.0, POLL_S
        while True:
            missing = [k for k in keys if k not in self._published]
            plain = [k for k in missing if _split(k) is None]
            for group in {_split(k)[0] for k in missing if _split(k) is not None}:
                self._read_published(group)
            late = [k for k in missing if _split(k) is not None and k not in self._published]
            if not late and (not plain or self.inner.check(self._keys(plain))):
                return
            now = time.monotonic()
            if now >= next_death_check:
                record, next_death_check = self.aborted(), now + self.death_poll_s
                if record is not None:
                    raise dist.DistNetworkError(
                        f"generation {self.generation} was aborted while it formed its process group "
                        f"({record.get('reason', record)}): the survivors form the next generation")
            if time.monotonic() > deadline:
                raise dist.DistStoreError(f"timed out waiting {limit:.0f} s for keys {keys} while generation "
                                          f"{self.generation} formed its process group")
            if late:
                # A member that has not published yet: one request that the store answers when it does (or after a
                # piece of the wait, for a look at the abort record), instead of polling.
                piece = min(self.death_poll_s * BLOCK_PIECES, max(0.0, deadline - time.monotonic()))
                if wait_for(self.inner, self._key(late[0]), piece) is None:
                    next_death_check = 0.0
                continue
            time.sleep(pause)
            pause = min(pause * 1.5, self.poll_max_s)

    def get(self, key: str) -> bytes:
        if _split(key) is None:
            self._wait_for([key])
            return self.inner.get(self._key(key))
        self._wait_for([key])
        return self._published[key]

    def wait(self, keys: List[str], timeout: Optional[timedelta] = None) -> None:
        self._wait_for(list(keys), timeout)

    def check(self, keys: List[str]) -> bool:
        keys = list(keys)
        for group in {_split(k)[0] for k in keys if _split(k) is not None and k not in self._published}:
            self._read_published(group)
        plain = [k for k in keys if _split(k) is None]
        return all(k in self._published for k in keys if _split(k) is not None) and (
            not plain or self.inner.check(self._keys(plain)))

    def set(self, key: str, value) -> None:
        split = _split(key)
        if split is not None:
            self._publish(key, split[0], value)
        else:
            self._wrote(key)
            self.inner.set(self._key(key), value)

    def multi_get(self, keys: List[str]) -> List[bytes]:
        return [self.get(k) for k in keys]

    def multi_set(self, keys: List[str], values) -> None:
        for k, v in zip(keys, values):
            self.set(k, v)

    # the rest is the inner store's ----------------------------------------------------------------------------------

    def add(self, key: str, amount: int) -> int:
        self._wrote(key)
        return self.inner.add(self._key(key), amount)

    def compare_set(self, key: str, expected, desired) -> bytes:
        self._wrote(key)
        return self.inner.compare_set(self._key(key), expected, desired)

    def append(self, key: str, value) -> None:
        self._wrote(key)
        self.inner.append(self._key(key), value)

    def has_extended_api(self) -> bool:
        return self.inner.has_extended_api()

    def delete_key(self, key: str) -> bool:
        self._published.pop(key, None)
        return self.inner.delete_key(self._key(key))

    def num_keys(self) -> int:
        return self.inner.num_keys()

    def clone(self) -> "GenerationStore":
        """A second connection with the same waits (gloo uses one per background thread)."""
        twin = GenerationStore(self.inner.clone(), self.aborted, self.generation, self._timeout, self.prefix,
                               self.poll_max_s, self.death_poll_s, self.on_published)
        twin.written = self.written  # (one list of what this member wrote)
        return twin

    def set_timeout(self, timeout: timedelta) -> None:
        self._timeout = timeout

    @property
    def timeout(self) -> timedelta:
        return self._timeout
