"""The job's store in an etcd cluster: a ``torch.distributed.Store`` that survives the loss of any one machine,
usable wherever the embedded TCPStore is (``dist.init_process_group(backend, store=...)``, :class:`.Membership`).

Client choice: etcd's v3 API through its gRPC JSON gateway, with ``etcd3gw`` (OpenStack's, maintained, pure Python
over ``requests``). Not torch's ``elastic.rendezvous.etcd_store.EtcdStore``: it speaks the v2 API, which etcd 3.4
(Debian's ``etcd-server``) serves only with ``--enable-v2``, which is deprecated and removed in etcd 3.6, through
``python-etcd``, whose last release is 0.4.5 (2017). Not the gRPC ``etcd3`` package: last release 2020.
"""
from __future__ import annotations

import time
import uuid
from datetime import timedelta
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch.distributed as dist

from .etcd_client import (EtcdEndpoints, StoreAccessDenied, StoreError, StoreKeyTimeout,  # noqa: F401
                          StoreUnreachable, b64, prefix_end, unb64)
from .store_address import StoreURL, etcd_job_password, etcd_job_user, etcd_key_prefix, parse_store_url

DEFAULT_TIMEOUT = timedelta(seconds=300)  # c10d's default store timeout (kDefaultTimeout)
MAX_TXN_OPS = 100  # etcd's --max-txn-ops defaults to 128
POLL_FIRST_S, POLL_MAX_S = 0.005, 0.1


def _bytes(value: Union[str, bytes, bytearray]) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)


class EtcdStore(dist.Store):
    """A c10d store whose keys live in etcd under a prefix derived from the job token.

    Every key ``k`` is stored as ``/checkfree/<hash of the token>/k/<k>``; the hash is an HMAC of a fixed label
    under the token, so the token itself never reaches etcd. Blocking calls (``get``, ``wait``) poll etcd (every
    5 ms, backing off to 100 ms); every call gives up after the store's timeout (:meth:`set_timeout`) with an
    error naming the keys or the endpoints.

    Args:
        url: ``etcd://host:port[,host:port...]`` (``etcds://`` for TLS), or a parsed :class:`.StoreURL`. List every
            member: a request fails over to the next when one does not answer.
        token: the job token (``$CHECKFREE_JOB_TOKEN``).
        timeout: how long ``get``/``wait`` wait for keys, and how long any call retries while no endpoint answers.
        ca_cert: PEM file of the CA of etcd's server certificates (TLS; default: certifi's CAs; the environment's
            ``REQUESTS_CA_BUNDLE`` and proxy variables are ignored).
        client_cert, client_key: this process's certificate and key, for etcd with ``--client-cert-auth``.
        username, password: an etcd user, for etcd with authentication enabled.
        token_auth: authenticate as the job's own user, whose name and password derive from the token; an
            administrator creates it once with :func:`.etcd_access.grant_job_access`. Excludes username/password.
        connect_timeout_s: how long connecting to one endpoint may take before the next is tried.
        request_timeout_s: how long one request may wait for its answer before another member is asked (a call may
            overrun ``timeout`` by this). A write caught in the loss of etcd's leader gets etcd's own answer only
            after about 5 s; this bounds what that loss costs instead. Healthy requests take milliseconds.

    Raises:
        ConfigError: the URL is malformed. CheckFreeError: incompatible options, or etcd3gw is not installed.
    """

    def __init__(self, url: Union[str, StoreURL], token: str, *, timeout: timedelta = DEFAULT_TIMEOUT,
                 ca_cert: Optional[str] = None, client_cert: Optional[str] = None, client_key: Optional[str] = None,
                 username: Optional[str] = None, password: Optional[str] = None, token_auth: bool = False,
                 connect_timeout_s: float = 1.0, request_timeout_s: float = 2.0) -> None:
        super().__init__()  # the pybind trampoline needs it
        if not token:
            raise StoreError("the etcd store needs the job token: its keys live under a prefix derived from it")
        if token_auth and (username or password):
            raise StoreError("token_auth=True derives the etcd user from the token: do not also pass username/password")
        if token_auth:
            username, password = etcd_job_user(token), etcd_job_password(token)
        self.url = url if isinstance(url, StoreURL) else parse_store_url(url)
        self._token = token
        self._options = dict(ca_cert=ca_cert, client_cert=client_cert, client_key=client_key, username=username,
                             password=password, connect_timeout_s=connect_timeout_s,
                             request_timeout_s=request_timeout_s)
        self.etcd = EtcdEndpoints(self.url, **self._options)
        self.prefix = etcd_key_prefix(token)
        self._keys = f"{self.prefix}k/".encode()  # the c10d keys
        self._receipts = f"{self.prefix}r/".encode()  # see _update
        self._last_receipt: Optional[str] = None  # deleted by the next update's transaction (or by close)
        self.set_timeout(timeout)

    def __repr__(self) -> str:
        return f"EtcdStore({self.url}, prefix={self.prefix!r})"

    # ------------------------------------------------------------------------------------------------------
    # helpers
    # ------------------------------------------------------------------------------------------------------

    def _key(self, key: str) -> bytes:
        return self._keys + _bytes(key)

    def _deadline(self, timeout: Optional[timedelta] = None) -> float:
        return time.monotonic() + (self.timeout if timeout is None else timeout).total_seconds()

    def _post(self, path: str, payload: dict, deadline: Optional[float] = None) -> dict:
        return self.etcd.post(path, payload, self._deadline() if deadline is None else deadline)

    def _range(self, key: bytes, deadline: Optional[float] = None) -> Optional[dict]:
        """The key-value record of ``key`` (value and revisions), None when it is not set."""
        kvs = self._post("kv/range", {"key": b64(key)}, deadline).get("kvs")
        return kvs[0] if kvs else None

    def _present(self, keys: Sequence[bytes], deadline: float) -> List[bool]:
        found: List[bool] = []
        for i in range(0, len(keys), MAX_TXN_OPS):
            chunk = keys[i:i + MAX_TXN_OPS]
            ops = [{"request_range": {"key": b64(k), "count_only": True}} for k in chunk]
            out = self.etcd.txn([], ops, [], deadline)
            found += [int(r["response_range"].get("count", 0)) > 0 for r in out.get("responses", [])]
        return found

    def _wait(self, keys: Sequence[str], timeout: Optional[timedelta], deadline: Optional[float] = None) -> None:
        encoded = [self._key(k) for k in keys]
        wait_s = (self.timeout if timeout is None else timeout).total_seconds()
        deadline = time.monotonic() + wait_s if deadline is None else deadline
        pause = POLL_FIRST_S
        while True:
            present = self._present(encoded, deadline)
            missing = [k for k, here in zip(keys, present) if not here]
            if not missing:
                return
            if time.monotonic() >= deadline:
                raise StoreKeyTimeout(
                    f"key{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing[:8]))}"
                    f"{' ...' if len(missing) > 8 else ''} not set within {wait_s:g} s in the etcd store at "
                    f"{self.url} (job prefix {self.prefix}): the process that should set it has not (yet); is it "
                    f"running with the same job token and store URL? Raise the store's timeout if it is just slow")
            time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
            pause = min(pause * 1.5, POLL_MAX_S)

    def _update(self, key: str, change: Callable[[Optional[bytes]], bytes]) -> bytes:
        """Atomically replace ``key``'s value ``v`` (None when unset) by ``change(v)``; return the new value.

        A compare-and-swap transaction on the key's revision, retried on conflict. The transaction also writes a
        receipt under a fresh id: when the answer is lost (the member died after committing), the retry finds the
        receipt and does not apply the change twice (an ``add`` counted twice would open a barrier early). The same
        transaction deletes this store's previous receipt, so an update costs two requests (a read and the
        transaction) and at most one receipt of each store is left over until :meth:`close`.
        """
        etcd_key = b64(self._key(key))
        receipt = b64(self._receipts + uuid.uuid4().hex.encode())
        deadline = self._deadline()
        record = self._range(self._key(key), deadline)
        while True:
            old = unb64(record["value"]) if record and "value" in record else (b"" if record else None)
            new = change(old)
            if record is None:
                compare = {"key": etcd_key, "target": "CREATE", "result": "EQUAL", "create_revision": 0}
            else:
                compare = {"key": etcd_key, "target": "MOD", "result": "EQUAL",
                           "mod_revision": record["mod_revision"]}
            ops = [{"request_put": {"key": etcd_key, "value": b64(new)}},
                   {"request_put": {"key": receipt, "value": b64(new)}}]
            if self._last_receipt is not None:
                ops.append({"request_delete_range": {"key": self._last_receipt}})
            out = self.etcd.txn([compare], ops, [{"request_range": {"key": etcd_key}}], deadline)
            if out.get("succeeded"):
                break
            kvs = out["responses"][0]["response_range"].get("kvs")
            record = kvs[0] if kvs else None
            done = self._range(unb64(receipt), deadline)
            if done is not None:  # an earlier attempt of ours committed and only its answer was lost
                new = unb64(done.get("value", ""))
                break
        self._last_receipt = receipt
        return new

    # ------------------------------------------------------------------------------------------------------
    # the c10d Store interface
    # ------------------------------------------------------------------------------------------------------

    def set(self, key: str, value: Union[str, bytes]) -> None:
        self._post("kv/put", {"key": b64(self._key(key)), "value": b64(_bytes(value))})

    def get(self, key: str) -> bytes:
        """The value of ``key``, waiting up to the store's timeout for it to be set.

        Raises:
            StoreKeyTimeout: not set within the timeout (the message names the key and the endpoints).
            StoreUnreachable: no etcd endpoint answered within the timeout.
        """
        deadline = self._deadline()
        while True:
            record = self._range(self._key(key), deadline)
            if record is not None:
                return unb64(record.get("value", ""))
            # (a key deleted between the wait and the read is waited for again)
            self._wait([key], self.timeout, deadline)

    def add(self, key: str, amount: int) -> int:
        """Add ``amount`` to the integer at ``key`` (0 when unset), atomically; return the new value. ``add(key, 0)``
        only reads: unlike TCPStore's, it does not create an unset key."""
        if amount == 0:  # a read of a counter (leases, the join-request count): one request, and no write
            record = self._range(self._key(key))
            return int(unb64(record.get("value", "")) or b"0") if record is not None else 0
        return int(self._update(key, lambda old: str(int(old or b"0") + amount).encode()))

    def compare_set(self, key: str, expected_value: Union[str, bytes], desired_value: Union[str, bytes]) -> bytes:
        """TCPStore's rule: set ``desired_value`` when the key holds ``expected_value`` (or is unset and
        ``expected_value`` is empty) and return it; else return the current value (``expected_value`` if unset)."""
        expected, desired = _bytes(expected_value), _bytes(desired_value)
        etcd_key = b64(self._key(key))
        deadline = self._deadline()
        while True:
            if expected:
                compare = {"key": etcd_key, "target": "VALUE", "result": "EQUAL", "value": b64(expected)}
            else:  # an empty expected value matches an unset key (and a key holding b"")
                compare = {"key": etcd_key, "target": "CREATE", "result": "EQUAL", "create_revision": 0}
            out = self.etcd.txn([compare], [{"request_put": {"key": etcd_key, "value": b64(desired)}}],
                                [{"request_range": {"key": etcd_key}}], deadline)
            if out.get("succeeded"):
                return desired
            kvs = out["responses"][0]["response_range"].get("kvs")
            if not kvs:
                return expected  # unset, and a non-empty value was expected (or it was deleted meanwhile)
            current = unb64(kvs[0].get("value", ""))
            if current == expected:  # empty value expected and held: set it, comparing the revision
                if self.etcd.txn([{"key": etcd_key, "target": "MOD", "result": "EQUAL",
                                   "mod_revision": kvs[0]["mod_revision"]}],
                                 [{"request_put": {"key": etcd_key, "value": b64(desired)}}], [],
                                 deadline).get("succeeded"):
                    return desired
                continue
            return current

    def wait(self, keys: Sequence[str], timeout: Optional[timedelta] = None) -> None:
        """Block until every key in ``keys`` is set.

        Raises:
            StoreKeyTimeout: some were not set within ``timeout`` (default: the store's); they are named.
        """
        self._wait(list(keys), timeout)

    def check(self, keys: Sequence[str]) -> bool:
        """True when every key in ``keys`` is set (no waiting)."""
        return all(self._present([self._key(k) for k in keys], self._deadline()))

    def delete_key(self, key: str) -> bool:
        out = self._post("kv/deleterange", {"key": b64(self._key(key))})
        return int(out.get("deleted", 0)) > 0

    def num_keys(self) -> int:
        """How many keys the job has in the store (all of them, as TCPStore counts)."""
        out = self._post("kv/range", {"key": b64(self._keys), "range_end": b64(prefix_end(self._keys)),
                                      "count_only": True})
        return int(out.get("count", 0))

    def append(self, key: str, value: Union[str, bytes]) -> None:
        self._update(key, lambda old: (old or b"") + _bytes(value))

    def multi_get(self, keys: Sequence[str]) -> List[bytes]:
        return [self.get(k) for k in keys]

    def multi_set(self, keys: Sequence[str], values: Sequence[Union[str, bytes]]) -> None:
        puts = [{"request_put": {"key": b64(self._key(k)), "value": b64(_bytes(v))}} for k, v in zip(keys, values)]
        deadline = self._deadline()
        for i in range(0, len(puts), MAX_TXN_OPS):
            self.etcd.txn([], puts[i:i + MAX_TXN_OPS], [], deadline)

    def set_and_count(self, keys: Sequence[str], values: Sequence[Union[str, bytes]], sub_prefix: str) -> int:
        """Set the keys (at most :data:`MAX_TXN_OPS` - 1) and count the job's keys that start with ``sub_prefix``,
        in one transaction: the count includes these writes and every write committed before them, so of several
        writers of keys under the prefix the last to commit sees them all (a generation's arrival: no contended
        counter, one request)."""
        if len(keys) >= MAX_TXN_OPS:
            raise ValueError(f"set_and_count writes at most {MAX_TXN_OPS - 1} keys in one transaction, not {len(keys)}")
        start = self._key(sub_prefix)
        ops = [{"request_put": {"key": b64(self._key(k)), "value": b64(_bytes(v))}} for k, v in zip(keys, values)]
        ops.append({"request_range": {"key": b64(start), "range_end": b64(prefix_end(start)), "count_only": True}})
        out = self.etcd.txn([], ops, [], self._deadline())
        return int(out["responses"][-1]["response_range"].get("count", 0))

    def has_extended_api(self) -> bool:
        return True

    def clone(self) -> "EtcdStore":
        return EtcdStore(self.url, self._token, timeout=self.timeout, **self._options)

    # ------------------------------------------------------------------------------------------------------
    # beyond c10d
    # ------------------------------------------------------------------------------------------------------

    @property
    def requests(self) -> int:
        """HTTP requests this store has sent."""
        return self.etcd.requests

    def wait_for(self, key: str, timeout_s: float) -> Optional[bytes]:
        """``key``'s value once it is set, None after ``timeout_s``: a read, then a watch that etcd answers when
        the key is written (two requests however long the wait; polling reads if the watch cannot be opened)."""
        etcd_key = self._key(key)
        deadline = time.monotonic() + timeout_s
        while True:
            out = self._post("kv/range", {"key": b64(etcd_key)})
            kvs = out.get("kvs")
            if kvs:
                return unb64(kvs[0].get("value", ""))
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            revision = int(out.get("header", {}).get("revision", 0)) + 1
            try:
                event = self.etcd.watch_once(b64(etcd_key), revision, left)
            except StoreError:
                time.sleep(min(POLL_MAX_S, max(0.0, deadline - time.monotonic())))
                continue
            if event is not None and event.get("type", "PUT") == "PUT":
                return unb64(event.get("kv", {}).get("value", ""))

    def get_if_set(self, key: str) -> Optional[bytes]:
        """The value of ``key``, None when it is unset (no waiting): one request where ``check`` then ``get`` take
        two."""
        record = self._range(self._key(key))
        return None if record is None else unb64(record.get("value", ""))

    def values_if_set(self, keys: Sequence[str]) -> List[Optional[bytes]]:
        """The value of each key, None where it is unset (no waiting), read together: one request per
        :data:`MAX_TXN_OPS` keys (the members of a generation, every rank's lease)."""
        deadline = self._deadline()
        values: List[Optional[bytes]] = []
        for i in range(0, len(keys), MAX_TXN_OPS):
            ops = [{"request_range": {"key": b64(self._key(k))}} for k in keys[i:i + MAX_TXN_OPS]]
            for response in self.etcd.txn([], ops, [], deadline).get("responses", []):
                kvs = response["response_range"].get("kvs")
                values.append(unb64(kvs[0].get("value", "")) if kvs else None)
        return values

    def values_with_prefix(self, sub_prefix: str) -> Dict[str, bytes]:
        """Every key of the job that starts with ``sub_prefix``, with its value: one range request (a generation's
        published addresses, read together)."""
        start = self._key(sub_prefix)
        out = self._post("kv/range", {"key": b64(start), "range_end": b64(prefix_end(start))})
        skip = len(self._keys)
        return {unb64(kv["key"])[skip:].decode(): unb64(kv.get("value", "")) for kv in out.get("kvs", [])}

    def delete_prefix(self, sub_prefix: str) -> int:
        """Delete every key of the job that starts with ``sub_prefix`` (e.g. a finished generation's
        ``PrefixStore`` keys: pass its prefix followed by ``/``); return how many were deleted. An empty
        ``sub_prefix`` deletes all the job's keys."""
        start = self._key(sub_prefix)
        out = self._post("kv/deleterange", {"key": b64(start), "range_end": b64(prefix_end(start))})
        return int(out.get("deleted", 0))

    def close(self) -> None:
        """Delete this store's last update receipt and close the HTTP connections (the job's keys stay)."""
        if self._last_receipt is not None:
            try:
                self.etcd.post("kv/deleterange", {"key": self._last_receipt}, time.monotonic() + 1.0)
            except StoreError:
                pass  # etcd is gone: one small key is left behind
            self._last_receipt = None
        self.etcd.close()
