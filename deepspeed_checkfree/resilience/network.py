"""Which network interface a trainer's gloo uses to reach the other machines of the job.

Without ``GLOO_SOCKET_IFNAME``, torch's gloo binds to the first address of this machine's hostname that it can bind,
else to 127.0.0.1, and advertises that address to its peers (c10d ``GlooDeviceFactory::makeDefaultDevice``). Where
the hostname resolves to loopback (Debian's default ``127.0.1.1 <hostname>`` does), every peer on another machine is
told to connect to itself, and the process group never forms. When the job spans machines, the supervisor therefore
gives its trainer the interface that routes to the master address (logged), or stops before starting a trainer
with the fix, instead of a wait that ends blaming absent ranks. ``NCCL_SOCKET_IFNAME`` is never set here: NCCL
picks its own interfaces (skipping loopback), and GPU clusters often want InfiniBand ones.

:func:`choose_gloo_interface` is the pure decision; :func:`probe` reads the facts it needs from this machine.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import ipaddress
import logging
import socket
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, MutableMapping, Optional, Sequence

from .store_address import parse_store_url

logger = logging.getLogger(__name__)

GLOO_IFNAME_ENV = "GLOO_SOCKET_IFNAME"
NCCL_IFNAME_ENV = "NCCL_SOCKET_IFNAME"
GLOO_FALLBACK = "127.0.0.1"  # what gloo binds when no address of the hostname can be bound


@dataclass(frozen=True)
class NetworkFacts:
    """What the decision needs to know about this machine.

    Attributes:
        gloo_ifname: ``$GLOO_SOCKET_IFNAME`` (None or "" when unset).
        hostname: this machine's hostname.
        hostname_address: the first address of ``hostname`` that binds here (gloo's default), None if none does.
        peer: how the job names its other machines' side: the master address (or, when that does not resolve, an
            endpoint of the external store).
        peer_address: ``peer`` resolved; None when it does not resolve.
        route_source: this machine's address on its route to ``peer_address``; None without a route.
        interfaces: every interface's addresses.
    """

    gloo_ifname: Optional[str]
    hostname: str
    hostname_address: Optional[str]
    peer: str
    peer_address: Optional[str]
    route_source: Optional[str]
    interfaces: Mapping[str, Sequence[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class InterfaceChoice:
    """The decision: ``ifname`` to give the trainer as ``GLOO_SOCKET_IFNAME`` (None: change nothing), why, and whether
    the trainer cannot work at all (``error``: ``reason`` then says what to set)."""

    ifname: Optional[str]
    reason: str
    error: bool = False


def gloo_ifname_set(value: Optional[str]) -> bool:
    # torch reads GLOO_SOCKET_IFNAME only when it is longer than one character (ProcessGroupGloo's constructor).
    return value is not None and len(value) > 1


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%")[0]).is_loopback
    except ValueError:
        return False


def choose_gloo_interface(facts: NetworkFacts) -> InterfaceChoice:
    """Whether the trainer's gloo needs an interface named, and which (see the module docstring)."""
    if gloo_ifname_set(facts.gloo_ifname):
        return InterfaceChoice(None, f"{GLOO_IFNAME_ENV}={facts.gloo_ifname} is set")
    default = facts.hostname_address or GLOO_FALLBACK
    if not is_loopback(default):
        return InterfaceChoice(None, f"gloo binds the hostname's address {default}")
    if facts.peer_address is not None and is_loopback(facts.peer_address):
        return InterfaceChoice(None, f"the master address {facts.peer} is loopback: the job runs on this machine")
    why = (f"this machine's hostname {facts.hostname!r} resolves to {default} (loopback), so without "
           f"{GLOO_IFNAME_ENV} gloo would tell the other machines to connect to {default}")
    if facts.peer_address is None:
        problem = f"and the master address {facts.peer!r} does not resolve here"
    elif facts.route_source is None:
        problem = f"and this machine has no route to the master address {facts.peer_address}"
    else:
        ifname = interface_of(facts.route_source, facts.interfaces)
        if ifname is not None and not is_loopback(facts.route_source):
            return InterfaceChoice(ifname, f"{why}: the trainer's gloo uses interface {ifname} ({facts.route_source}), "
                                           f"which routes to the master address {facts.peer_address}. Set "
                                           f"{GLOO_IFNAME_ENV} to choose another")
        problem = (f"and no interface of this machine holds {facts.route_source}, its address on the route to "
                   f"{facts.peer_address}")
    return InterfaceChoice(None, error=True, reason=(
        f"{why}, {problem}. Set {GLOO_IFNAME_ENV} on every machine to the network interface that reaches the master "
        f"address (`ip route get {facts.peer_address or facts.peer}` names it; on GPUs set {NCCL_IFNAME_ENV} too if "
        f"NCCL picks the wrong one), or make the hostname resolve to this machine's address (/etc/hosts)"))


def interface_of(address: str, interfaces: Mapping[str, Sequence[str]]) -> Optional[str]:
    """The interface that holds ``address``, if any."""
    want = ipaddress.ip_address(address.split("%")[0])
    for name, addresses in interfaces.items():
        if any(ipaddress.ip_address(a.split("%")[0]) == want for a in addresses):
            return name
    return None


# ---------------------------------------------------------------------------------------------------------------
# The facts, read from this machine
# ---------------------------------------------------------------------------------------------------------------

def _resolve(host: str) -> List[tuple]:
    try:
        return socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return []


def bindable_address(host: str) -> Optional[str]:
    """The first address of ``host`` that a socket can bind here: the one gloo's default device takes."""
    for family, kind, proto, _, sockaddr in _resolve(host):
        try:
            with socket.socket(family, kind, proto) as s:
                s.bind(sockaddr)
        except OSError:
            continue
        return sockaddr[0]
    return None


def route_source(address: str) -> Optional[str]:
    """This machine's address on its route to ``address`` (a UDP connect sends nothing); None without a route."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((address, 9))
            return s.getsockname()[0]
    except OSError:
        return None


class _IfAddrs(ctypes.Structure):
    """libc's ``struct ifaddrs``."""

    _fields_ = [("next", ctypes.c_void_p), ("name", ctypes.c_char_p), ("flags", ctypes.c_uint),
                ("addr", ctypes.c_void_p), ("netmask", ctypes.c_void_p), ("ifu", ctypes.c_void_p),
                ("data", ctypes.c_void_p)]


# Where the address lies in a sockaddr_in (after family and port) and a sockaddr_in6 (after flowinfo too).
_ADDRESS_AT = {socket.AF_INET: (4, 4), socket.AF_INET6: (8, 16)}


def interface_addresses() -> Dict[str, List[str]]:
    """Every interface's IPv4 and IPv6 addresses, secondary ones included (libc's getifaddrs, which gloo reads too).

    Raises:
        OSError: getifaddrs failed.
    """
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    head = ctypes.c_void_p()
    if libc.getifaddrs(ctypes.byref(head)) != 0:
        raise OSError(ctypes.get_errno(), "getifaddrs failed")
    found: Dict[str, List[str]] = {}
    try:
        entry = head.value
        while entry:
            ifa = _IfAddrs.from_address(entry)
            family = ctypes.c_ushort.from_address(ifa.addr).value if ifa.addr else None
            if family in _ADDRESS_AT:
                offset, size = _ADDRESS_AT[family]
                address = socket.inet_ntop(family, ctypes.string_at(ifa.addr + offset, size))
                found.setdefault(ifa.name.decode(), []).append(address)
            entry = ifa.next
    finally:
        libc.freeifaddrs(head)
    return found


def peers(master_addr: str, store_url: Optional[str]) -> List[str]:
    """Where the job's other machines are: the master address, then the external store's endpoints."""
    return [master_addr, *([h for h, _ in parse_store_url(store_url).endpoints] if store_url else [])]


def probe(environ: Mapping[str, str], candidates: Sequence[str]) -> NetworkFacts:
    """The facts of this machine, for the first of ``candidates`` (see :func:`peers`) that resolves."""
    peer, resolved = candidates[0], None
    for candidate in candidates:
        found = _resolve(candidate)
        if found:
            peer, resolved = candidate, found[0][4][0]
            break
    hostname = socket.gethostname()
    return NetworkFacts(gloo_ifname=environ.get(GLOO_IFNAME_ENV), hostname=hostname,
                        hostname_address=bindable_address(hostname), peer=peer, peer_address=resolved,
                        route_source=route_source(resolved) if resolved else None,
                        interfaces=_interfaces_or_none())


def _interfaces_or_none() -> Dict[str, List[str]]:
    try:
        return interface_addresses()
    except OSError as err:  # (then no interface holds the route's address, and the decision says what to set)
        logger.warning("cannot list this machine's network interfaces: %s", err)
        return {}


def set_gloo_interface(environ: MutableMapping[str, str], *, master_addr: str, store_url: Optional[str], rank: int,
                       events, prefix: str) -> bool:
    """Before the supervisor starts a trainer: set ``GLOO_SOCKET_IFNAME`` in ``environ`` where gloo needs it (one
    log line). Returns False when no trainer could reach the other machines (logged with the fix, and recorded)."""
    if gloo_ifname_set(environ.get(GLOO_IFNAME_ENV)):  # the user's choice: not even probed
        return True
    choice = choose_gloo_interface(probe(environ, peers(master_addr, store_url)))
    if choice.error:
        logger.error("%s cannot start a trainer: %s", prefix, choice.reason)
        events.write("job_stopped", rank=rank, stopped_by=rank, cause="network", reason=choice.reason,
                     trainer_returncode=None)
        return False
    if choice.ifname is not None:
        environ[GLOO_IFNAME_ENV] = choice.ifname
        logger.warning("%s %s=%s for the trainer: %s", prefix, GLOO_IFNAME_ENV, choice.ifname, choice.reason)
    return True
