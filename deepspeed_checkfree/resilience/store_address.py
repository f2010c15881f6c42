"""PURE: the address of an external job store (``etcd://h1:2379,h2:2379``) and the etcd names the job token
derives (key prefix, user, role, password). Standard library only, so it is tested with no process and no etcd.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

from ..errors import ConfigError
from .contract import token_mac

# etcd:// talks plain HTTP to etcd's gRPC JSON gateway, etcds:// HTTPS (TLS; give the CA and client certificates
# to the store's constructor).
SCHEMES = {"etcd": "http", "etcds": "https"}
DEFAULT_ETCD_PORT = 2379  # etcd's registered client port, what etcdctl assumes too
URL_FORM = "etcd://host:port[,host:port...] (or etcds:// for TLS), e.g. etcd://10.0.0.1:2379,10.0.0.2:2379"


@dataclass(frozen=True)
class StoreURL:
    """A parsed store address.

    Attributes:
        scheme: ``"etcd"`` (HTTP) or ``"etcds"`` (HTTPS).
        endpoints: ``(host, port)`` of each etcd member's client URL, in the order given (the store tries them in
            that order and stays on the first that answers).
    """

    scheme: str
    endpoints: Tuple[Tuple[str, int], ...]

    @property
    def protocol(self) -> str:
        return SCHEMES[self.scheme]

    def endpoint_names(self) -> str:
        """``"h1:2379,h2:2379"``: how errors name the endpoints."""
        return ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self.endpoints)

    def __str__(self) -> str:
        return f"{self.scheme}://{self.endpoint_names()}"


def _bad(url: str, rule: str) -> ConfigError:
    return ConfigError(f"store URL {url!r}: {rule}. The form is {URL_FORM}.")


def _endpoint(url: str, item: str) -> Tuple[str, int]:
    item = item.strip()
    if not item:
        raise _bad(url, "an endpoint between commas is empty; remove the extra comma")
    if item.startswith("["):  # [IPv6]:port
        host, sep, rest = item[1:].partition("]")
        if not sep or not host:
            raise _bad(url, f"endpoint {item!r} opens an IPv6 address with '[' but does not close it")
        if rest and not rest.startswith(":"):
            raise _bad(url, f"endpoint {item!r}: after ']' only ':port' may follow")
        port_text = rest[1:] if rest else ""
    else:
        host, sep, port_text = item.rpartition(":")
        if not sep:
            host, port_text = item, ""
        if ":" in host:
            raise _bad(url, f"endpoint {item!r} looks like an IPv6 address: write it as [{host}]:{port_text or 2379}")
    if not host:
        raise _bad(url, f"endpoint {item!r} has no host")
    if sep and not port_text:
        raise _bad(url, f"endpoint {item!r} ends with ':' but gives no port")
    if not port_text:
        return host, DEFAULT_ETCD_PORT
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise _bad(url, f"endpoint {item!r}: the port must be a number from 1 to 65535, got {port_text!r}")
    return host, int(port_text)


def parse_store_url(url: str) -> StoreURL:
    """Parse ``etcd://host:port[,host:port...]`` (``etcds://`` for TLS). A missing port means 2379.

    Raises:
        ConfigError: unknown scheme, empty host list, bad port, a path or query after the hosts; the message states
            the rule, what it got and the form to use.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise _bad(url, "it has no scheme")
    if scheme.lower() not in SCHEMES:
        raise _bad(url, f"unknown scheme {scheme!r}; the external store is etcd: use one of "
                        f"{', '.join(s + '://' for s in SCHEMES)}")
    rest = rest[:-1] if rest.endswith("/") else rest
    if any(c in rest for c in "/?#@"):
        raise _bad(url, "only a comma-separated list of host:port may follow the scheme (no path, query or "
                        "user@; give credentials to the store's constructor)")
    if not rest.strip():
        raise _bad(url, "the list of etcd endpoints is empty")
    endpoints = tuple(_endpoint(url, item) for item in rest.split(","))
    if len(set(endpoints)) != len(endpoints):
        raise _bad(url, "an endpoint is listed twice; list each etcd member once")
    return StoreURL(scheme.lower(), endpoints)


# ---------------------------------------------------------------------------------------------------------------
# Names derived from the job token. Each is an HMAC of a fixed label under the token: knowing one (the prefix is
# visible to anyone who can list etcd's keys) reveals neither the token nor the others.
# ---------------------------------------------------------------------------------------------------------------

def etcd_key_prefix(token: str) -> str:
    """Where the job's keys live in etcd: ``/checkfree/<32 hex>/``. Never contains the token itself."""
    return f"/checkfree/{token_mac(token, 'checkfree-etcd-prefix')[:32]}/"


def etcd_job_user(token: str) -> str:
    """The etcd user (and role) :func:`~.etcd_access.grant_job_access` creates for the job."""
    return f"checkfree-{token_mac(token, 'checkfree-etcd-user')[:24]}"


def etcd_job_password(token: str) -> str:
    """The password of :func:`etcd_job_user`: only a holder of the token can compute it."""
    return token_mac(token, "checkfree-etcd-password")
