"""How every process reads and waits on the job's store, with a deadline that does not depend on TCP.

torch's ``TCPStore`` client blocks in a socket read with no deadline when the store's machine vanishes without
closing its connections (its ``add``, ``set`` and ``check`` never return; measured with torch 2.13: still blocked
after 120 s). :class:`DeadlineStore` wraps a client so that every call ends by a deadline: the call runs on the
wrapper's own thread, and a caller that has waited past the deadline gets :class:`StoreUnresponsive` (a
``DistNetworkError``, so every layer treats it as a lost store). The connection is then given up: the thread may
stay blocked in it, and every later call fails at once.

The reads that the coordination makes often are one request each on every store the job uses:
:func:`get_if_set` (a compare-and-set that cannot match, on a TCPStore), :func:`values_if_set` (``check`` then
``multi_get`` when every key is set) and :func:`wait_for` (a blocking ``get`` with a timeout on a TCPStore, a watch
on etcd), and :func:`request_count` tells how many requests a store has made (benchmarks and the tests that pin the
coordination's cost).
"""
from __future__ import annotations

import os
import queue
import socket
import threading
import time
from concurrent.futures import Future
from datetime import timedelta
from typing import Any, Callable, List, Optional, Sequence

import torch.distributed as dist

# compare_set(key, MISSING, MISSING) returns MISSING for an unset key without creating it, and the value otherwise
MISSING = b"\x00checkfree-unset\x00"
# A blocking wait is cut into pieces of at most this long, so a waiting thread can notice a stop or a deadline.
WAIT_PIECE_S = 30.0


class StoreUnresponsive(dist.DistNetworkError):
    """The job's store did not answer a request within its deadline (its machine is gone or cut off)."""


class DeadlineStore(dist.Store):
    """A store client whose every call ends within a deadline: ``timeout`` for a plain request, and the wait's own
    length (plus ``timeout``) for a call that waits for keys.

    Args:
        inner: a TCPStore client (any c10d store works; a HashStore in tests).
        timeout: how long a request may go unanswered before the store counts as lost.
        describe: the store in words, for the error message.
        connect: makes a new client like ``inner`` (for :meth:`clone`); None: clone ``inner``.
    """

    def __init__(self, inner: dist.Store, timeout: timedelta, describe: str = "the job's store",
                 connect: Optional[Callable[[], dist.Store]] = None, sockets: Sequence[int] = ()) -> None:
        super().__init__()  # the pybind trampoline needs it
        self.inner, self._timeout, self.describe, self._connect = inner, timeout, describe, connect
        self.sockets = tuple(sockets)  # the client's connection (file descriptors), for close()
        self.requests = 0
        self._broken: Optional[str] = None
        self._calls: "queue.SimpleQueue[Optional[tuple]]" = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="checkfree-store", daemon=True)
        self._thread.start()

    # the call thread ----------------------------------------------------------------------------------------------

    def _serve(self) -> None:
        while True:
            item = self._calls.get()
            if item is None:
                return
            future, fn, args = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as err:  # noqa: BLE001 - handed to the caller
                future.set_exception(err)

    def _call(self, name: str, fn: Callable, *args: Any, wait_s: float = 0.0) -> Any:
        if self._broken is not None:
            raise StoreUnresponsive(self._broken)
        self.requests += 1
        future: Future = Future()
        self._calls.put((future, fn, args))
        limit = self._timeout.total_seconds() + wait_s
        try:
            return future.result(timeout=limit)
        except TimeoutError:
            self._broken = (f"{self.describe} did not answer a {name} request within {limit:.0f} s: its machine is "
                            f"gone or cut off from this one")
            raise StoreUnresponsive(self._broken) from None

    def close(self) -> None:
        """Give the connection up now: a call blocked in it (a wait) fails at once, and so does every later one.

        A thread blocked in a TCPStore call when the interpreter shuts down, whose call then returns (its store
        closed), aborts the whole process ("terminate called without an active exception"): a process ends its
        waits this way before it exits."""
        self._broken = self._broken or f"{self.describe}: this client was closed"
        for fd in self.sockets:
            try:
                socket.socket(fileno=os.dup(fd)).shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._calls.put(None)

    # c10d's Store --------------------------------------------------------------------------------------------------

    def set(self, key: str, value) -> None:
        self._call("set", self.inner.set, key, value)

    def get(self, key: str) -> bytes:
        return self._call("get", self.inner.get, key, wait_s=self._timeout.total_seconds())

    def add(self, key: str, amount: int) -> int:
        return self._call("add", self.inner.add, key, amount)

    def compare_set(self, key: str, expected, desired) -> bytes:
        return self._call("compare_set", self.inner.compare_set, key, expected, desired)

    def check(self, keys: List[str]) -> bool:
        return self._call("check", self.inner.check, list(keys))

    def wait(self, keys: List[str], timeout: Optional[timedelta] = None) -> None:
        wait = self._timeout if timeout is None else timeout
        args = (list(keys),) if timeout is None else (list(keys), timeout)
        self._call("wait", self.inner.wait, *args, wait_s=wait.total_seconds())

    def multi_get(self, keys: List[str]) -> List[bytes]:
        return self._call("multi_get", self.inner.multi_get, list(keys), wait_s=self._timeout.total_seconds())

    def multi_set(self, keys: List[str], values) -> None:
        self._call("multi_set", self.inner.multi_set, list(keys), list(values))

    def append(self, key: str, value) -> None:
        self._call("append", self.inner.append, key, value)

    def delete_key(self, key: str) -> bool:
        return self._call("delete_key", self.inner.delete_key, key)

    def num_keys(self) -> int:
        return self._call("num_keys", self.inner.num_keys)

    def has_extended_api(self) -> bool:
        return self.inner.has_extended_api()

    def clone(self) -> "DeadlineStore":
        """A second connection with the same deadlines (a thread that blocks in waits needs its own)."""
        if self._connect is None:
            return DeadlineStore(self.inner.clone(), self._timeout, self.describe)
        return connected(self._connect, self._timeout, self.describe)

    def set_timeout(self, timeout: timedelta) -> None:
        self._timeout = timeout
        self._call("set_timeout", self.inner.set_timeout, timeout)

    @property
    def timeout(self) -> timedelta:
        return self._timeout

    # beyond c10d ---------------------------------------------------------------------------------------------------

    def get_if_set(self, key: str) -> Optional[bytes]:
        value = self.compare_set(key, MISSING, MISSING)
        return None if value == MISSING else value

    def wait_for(self, key: str, timeout_s: float) -> Optional[bytes]:
        """``key``'s value once it is set, or None after ``timeout_s``: one request that the server answers when the
        key is set (TCPStore's ``get`` blocks server-side until then).

        TCPStore's server (torch 2.13, libuv) also wakes the waiters of a key when another client compare-and-sets
        that key while it is unset (which :meth:`get_if_set` does), and the woken ``get`` then returns an empty
        value: such a wake is not the key being set, and the wait goes on. (Every key the coordination waits for
        holds a non-empty value.)"""
        inner = self.inner

        def blocking_get() -> Optional[bytes]:
            before = inner.timeout
            deadline = time.monotonic() + timeout_s
            try:
                while True:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return None
                    inner.set_timeout(timedelta(seconds=left))
                    try:
                        value = inner.get(key)
                    except dist.DistStoreError as err:
                        if "timeout" in str(err).lower():
                            return None
                        raise
                    if value:
                        return value
            finally:
                inner.set_timeout(before)

        return self._call("wait_for", blocking_get, wait_s=timeout_s)


def connected(connect: Callable[[], dist.Store], timeout: timedelta, describe: str) -> DeadlineStore:
    """A client made by ``connect()``, with deadlines, that knows its connection (see :meth:`DeadlineStore.close`)."""
    before = set(_socket_fds())
    inner = connect()
    return DeadlineStore(inner, timeout, describe, connect, sockets=[fd for fd in _socket_fds() if fd not in before])


def _socket_fds() -> List[int]:
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:  # not Linux: close() cannot cut a blocked call short
        return []
    found = []
    for name in names:
        try:
            if os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                found.append(int(name))
        except OSError:
            continue
    return found


# ---------------------------------------------------------------------------------------------------------------
# The reads, on whichever store the job uses (TCPStore through DeadlineStore, etcd, a HashStore in tests)
# ---------------------------------------------------------------------------------------------------------------

def get_if_set(store: dist.Store, key: str) -> Optional[bytes]:
    """``key``'s value, None when unset: one request."""
    method = getattr(store, "get_if_set", None)
    if method is not None:
        return method(key)
    value = store.compare_set(key, MISSING, MISSING)
    return None if value == MISSING else value


def get_waited_for(store: dist.Store, key: str) -> Optional[bytes]:
    """``key``'s value, None when unset, for a key that others wait on (:func:`wait_for`): one request while it is
    unset. On a TCPStore it is ``check`` first: :func:`get_if_set`'s compare-and-set on an unset key would wake
    every waiter of that key, each of which then asks again (N arrivals x N waiters requests)."""
    if hasattr(store, "values_if_set") or not hasattr(store, "check"):
        return get_if_set(store, key)
    return store.get(key) if store.check([key]) else None


def values_if_set(store: dist.Store, keys: Sequence[str], waited: Sequence[str] = ()) -> List[Optional[bytes]]:
    """Each key's value, None where unset: one request on etcd; on another store two when more than two keys are
    all set (``check`` then ``multi_get``), else one per key, those in ``waited`` (keys that others wait on) read
    without waking their waiters (:func:`get_waited_for`)."""
    keys = list(keys)
    method = getattr(store, "values_if_set", None)
    if method is not None:
        return method(keys)
    if not keys:
        return []
    if len(keys) > 2 and store.check(keys):  # (for one or two keys, reading each costs no more)
        return list(store.multi_get(keys))
    return [get_waited_for(store, k) if k in waited else get_if_set(store, k) for k in keys]


def wait_for(store: dist.Store, key: str, timeout_s: float) -> Optional[bytes]:
    """``key``'s value once it is set, None after ``timeout_s``. One request where the store can block on the
    server's side (TCPStore, and a watch on etcd); a HashStore (tests) waits in-process."""
    method = getattr(store, "wait_for", None)
    if method is not None:
        return method(key, timeout_s)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            store.wait([key], timedelta(seconds=max(0.001, deadline - time.monotonic())))
        except dist.DistStoreError:
            return None
        value = store.get(key)
        if value or time.monotonic() >= deadline:  # (see DeadlineStore.wait_for: an empty value is a false wake)
            return value or None


def request_count(store: dist.Store) -> Optional[int]:
    """How many requests ``store`` has made so far (None for a store that does not count them)."""
    return getattr(store, "requests", None)
