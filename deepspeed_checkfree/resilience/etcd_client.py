"""Talking to an etcd cluster's v3 API through its gRPC JSON gateway (``/v3/...``, etcd >= 3.4) with ``etcd3gw``:
fail-over between the members' endpoints, TLS and user/password options, and the store's error classes.

One request goes to the endpoint that answered last; when it does not answer (refused, timed out, no leader) the
next one is tried, so one dead member of three costs at most one failed request per process. When no endpoint
answers until the caller's deadline, :class:`StoreUnreachable` names them all with each one's last error.
"""
from __future__ import annotations

import base64
import json
import logging
import threading
import time
from typing import Any, Dict, Optional, Sequence

import torch.distributed as dist

from ..errors import CheckFreeError
from .store_address import StoreURL

logger = logging.getLogger(__name__)

API_PATH = "/v3/"  # the gateway's path from etcd 3.4 on (3.3 served /v3beta/); pinned to skip a discovery request
# gRPC codes (the gateway's JSON "code") that mean "this member cannot serve now, another may": UNAVAILABLE (no
# leader, leader changed, request timed out), DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED (too many requests).
TRANSIENT_CODES = {14, 4, 8}
UNAUTHENTICATED = 16  # an auth token the member does not know (expired, or issued before a restart)
RETRY_PAUSE_S = 0.05


class StoreError(CheckFreeError, dist.DistStoreError):
    """The job's external store failed; also a ``torch.distributed.DistStoreError``, as c10d's own stores raise."""


class StoreUnreachable(StoreError):
    """No etcd endpoint answered within the store's timeout."""


class StoreKeyTimeout(StoreError):
    """Keys waited for were not set within the timeout."""


class StoreAccessDenied(StoreError):
    """etcd refused the request: authentication failed or the user's role does not cover the job's keys."""


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str) -> bytes:
    return base64.b64decode(text)


def prefix_end(prefix: bytes) -> bytes:
    """The etcd ``range_end`` that selects every key starting with ``prefix``."""
    end = bytearray(prefix)
    while end and end[-1] == 0xFF:
        end.pop()
    if not end:
        return b"\0"  # every key
    end[-1] += 1
    return bytes(end)


def _grpc_error(exc: Exception) -> tuple:
    """(gRPC code or None, message) of an etcd3gw error."""
    text = getattr(exc, "detail_text", None) or ""
    try:
        body = json.loads(text)
        return body.get("code"), body.get("message") or body.get("error") or text
    except (ValueError, AttributeError):
        return None, text or " ".join(str(a) for a in exc.args) or type(exc).__name__


def _transport_reason(exc: Exception) -> str:
    """What went wrong with a request that got no answer, in a few words."""
    text = _grpc_error(exc)[1]
    for needle, reason in (("refused", "connection refused"), ("timed out", "timed out"),
                           ("Timeout", "timed out"), ("Name or service not known", "unknown host"),
                           ("CERTIFICATE_VERIFY_FAILED", "TLS certificate verification failed"),
                           ("SSL", "TLS error"), ("reset", "connection reset")):
        if needle in text:
            return reason
    return text.splitlines()[0][:160] if text else type(exc).__name__


class EtcdEndpoints:
    """Requests to the v3 API of one etcd cluster, failing over between its members.

    Args:
        url: the parsed store URL (``etcds://`` for TLS).
        ca_cert: PEM file of the CA that signed etcd's server certificates (TLS; default: certifi's CAs; the
            environment's CA bundle and proxy variables are ignored).
        client_cert, client_key: PEM files of this client's certificate and key, for etcd started with
            ``--client-cert-auth`` (TLS).
        username, password: an etcd user, for etcd with authentication enabled (``etcdctl auth enable``).
        connect_timeout_s: how long one connection attempt to one endpoint may take before the next is tried.
        request_timeout_s: how long one request may wait for its answer; a call can overrun its deadline by this.
    """

    def __init__(self, url: StoreURL, *, ca_cert: Optional[str] = None, client_cert: Optional[str] = None,
                 client_key: Optional[str] = None, username: Optional[str] = None, password: Optional[str] = None,
                 connect_timeout_s: float = 1.0, request_timeout_s: float = 2.0) -> None:
        try:
            import etcd3gw
            import requests
        except ImportError as e:
            raise CheckFreeError(f"the etcd store needs the etcd3gw package ({e}): pip install "
                                 f"'deepspeed_checkfree[etcd]' (or etcd3gw==2.7.0)") from e
        if (client_cert is None) != (client_key is None):
            raise CheckFreeError("TLS client authentication needs both client_cert and client_key; got only "
                                 f"{'client_cert' if client_key is None else 'client_key'}")
        if (username is None) != (password is None):
            raise CheckFreeError("etcd authentication needs both username and password; got only one")
        if url.protocol == "http" and (ca_cert or client_cert):
            raise CheckFreeError(f"TLS certificates were given but the store URL {url} is plain HTTP: write "
                                 f"etcds://{url.endpoint_names()}")
        self.url = url
        self.exceptions = etcd3gw.exceptions
        self.session = requests.Session()
        # Not from the environment: requests lets $REQUESTS_CA_BUNDLE / $CURL_CA_BUNDLE override ``ca_cert`` (its
        # issue 3829), and a cluster-internal etcd must not be reached through $HTTPS_PROXY.
        self.session.trust_env = False
        if ca_cert:
            self.session.verify = ca_cert
        if client_cert:
            self.session.cert = (client_cert, client_key)
        self.username, self.password = username, password
        self.clients = [etcd3gw.Etcd3Client(host=h, port=p, protocol=url.protocol, api_path=API_PATH,
                                            timeout=(connect_timeout_s, request_timeout_s), session=self.session)
                        for h, p in url.endpoints]
        self.current = 0
        self.auth_lock = threading.Lock()
        self.authenticated = False
        self.authentications = 0  # how many auth tokens this client got (a new one after each expiry)
        self.requests = 0  # HTTP requests sent (what the coordination costs the cluster)
        self.connect_timeout_s = connect_timeout_s

    def names(self) -> str:
        return self.url.endpoint_names()

    def post(self, path: str, payload: Dict[str, Any], deadline: float, *, auth: bool = True) -> Dict[str, Any]:
        """POST ``payload`` to ``/v3/<path>`` on the first endpoint that answers; retry round the endpoints until
        ``deadline`` (a ``time.monotonic()`` value).

        Raises:
            StoreUnreachable: no endpoint answered before the deadline.
            StoreAccessDenied: etcd refused the credentials or the keys.
            StoreError: etcd answered with another error.
        """
        if auth and self.username and not self.authenticated:
            self.authenticate(deadline)
        last: Dict[int, str] = {}
        reauthenticated = False
        while True:
            for attempt in range(len(self.clients)):
                i = (self.current + attempt) % len(self.clients)
                client = self.clients[i]
                self.requests += 1
                try:
                    out = client.post(client.get_url(path), json=payload)
                except (self.exceptions.ConnectionFailedError, self.exceptions.ConnectionTimeoutError,
                        self.exceptions.InternalServerError) as e:
                    last[i] = _transport_reason(e)
                    continue
                except self.exceptions.Etcd3Exception as e:
                    code, message = _grpc_error(e)
                    if code in TRANSIENT_CODES:
                        last[i] = message
                        continue
                    if code == UNAUTHENTICATED and auth and self.username and not reauthenticated:
                        # A simple token expires after etcd's --auth-token-ttl unused: get a new one, once.
                        reauthenticated = True
                        self.authenticated = False
                        self.authenticate(deadline)
                        break
                    raise self.refusal(path, code, message) from e
                if i != self.current:
                    logger.warning("etcd endpoint %s did not answer (%s); now using %s", self.endpoint(self.current),
                                   last.get(self.current, "?"), self.endpoint(i))
                    self.current = i
                return out
            else:
                if time.monotonic() >= deadline:
                    raise self.unreachable(last)
                time.sleep(min(RETRY_PAUSE_S, max(0.0, deadline - time.monotonic())))

    def watch_once(self, key: str, start_revision: int, timeout_s: float) -> Optional[Dict[str, Any]]:
        """The first event on ``key`` (base64) from ``start_revision`` on, or None when none came within
        ``timeout_s``: one streamed request that etcd answers when the key changes (a long poll, no polling).

        Raises:
            StoreUnreachable: the current endpoint did not accept the watch (the caller falls back to reads, which
                fail over).
        """
        client = self.clients[self.current]
        self.requests += 1
        body = {"create_request": {"key": key, "start_revision": int(start_revision)}}
        try:
            response = self.session.post(client.get_url("watch"), json=body, stream=True,
                                         timeout=(self.connect_timeout_s, max(0.05, timeout_s)))
        except Exception as e:  # noqa: BLE001 - requests' connection errors: fall back to the polling reads
            raise self.unreachable({self.current: _transport_reason(e)}) from e
        try:
            for line in response.iter_lines():
                if not line.strip():
                    continue
                result = json.loads(line).get("result", {})
                if result.get("events"):
                    return result["events"][0]
        except Exception as e:  # noqa: BLE001 - the read timed out (nothing changed), or the stream broke
            if "timed out" in str(e) or "Read timed out" in repr(e):
                return None
            raise self.unreachable({self.current: _transport_reason(e)}) from e
        finally:
            response.close()
        return None

    def endpoint(self, i: int) -> str:
        return self.names().split(",")[i]

    def unreachable(self, last: Dict[int, str]) -> StoreUnreachable:
        seen = "; ".join(f"{self.endpoint(i)}: {why}" for i, why in sorted(last.items()))
        return StoreUnreachable(
            f"etcd unreachable at {self.url}: no endpoint answered within the store's timeout ({seen}); check that "
            f"the etcd cluster is up and a majority of its members run, that this machine reaches them, and that the "
            f"URL lists their client URLs (--advertise-client-urls)")

    def refusal(self, path: str, code: Optional[int], message: str) -> StoreError:
        if code in (UNAUTHENTICATED, 7) or "user name is empty" in message or "authentication failed" in message:
            how = (f"user {self.username!r}" if self.username else "no user: etcd has authentication enabled, so pass "
                   "username/password (or token_auth=True after grant_job_access)")
            return StoreAccessDenied(f"etcd at {self.url} refused {path} ({message}) with {how}; a process needs the "
                                     f"job's token (or credentials whose role covers the job's key prefix)")
        return StoreError(f"etcd at {self.url} answered {path} with error {code}: {message}")

    def authenticate(self, deadline: float) -> None:
        """Get an auth token for ``username`` and send it with every request."""
        with self.auth_lock:
            if self.authenticated:
                return  # another thread did it meanwhile
            self.session.headers.pop("Authorization", None)
            out = self.post("auth/authenticate", {"name": self.username, "password": self.password}, deadline,
                            auth=False)
            self.session.headers["Authorization"] = out["token"]
            self.authenticated = True
            self.authentications += 1
            logger.debug("etcd user %s authenticated at %s (token %d)", self.username, self.url, self.authentications)

    def txn(self, compare: Sequence[dict], success: Sequence[dict], failure: Sequence[dict],
            deadline: float) -> Dict[str, Any]:
        return self.post("kv/txn", {"compare": list(compare), "success": list(success), "failure": list(failure)},
                         deadline)

    def close(self) -> None:
        self.session.close()
