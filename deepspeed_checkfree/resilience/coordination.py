"""Where the job's coordination state lives: which store, how to reach it, and the checks around it.

Embedded store (the default): rank 0's supervisor hosts a TCPStore on the master address, every other process is
its client (through :class:`.DeadlineStore`, so no request outlives the store's timeout when the host vanishes),
and rank 0's supervisor does the job-level duties (:mod:`.coordinator`). Losing rank 0's machine loses the store,
and the job stops. External store (``--store etcd://h1:2379,h2:2379,h3:2379``): every supervisor and trainer is a
client of the etcd cluster (:class:`.EtcdStore`, keys under the token's prefix); no machine is special, and the
job-level duties go to a leader elected through the store.
"""
from __future__ import annotations

import logging
import os
import socket
from datetime import timedelta
from typing import Mapping, Optional, Sequence, Tuple

import torch.distributed as dist

from ..core.fault_policy import COMMUNICATION, classify
from ..errors import ConfigError
from .contract import (STORE_ADDR_ENV, STORE_PORT_ENV, STORE_URL_ENV, TOKEN_ENV, deepspeed_config_path, lease_key,
                       read_deepspeed_config)
from .etcd_store import EtcdStore
from .joins import JoinRefused
from .membership import Membership
from .store_access import DeadlineStore, connected
from .store_address import parse_store_url

logger = logging.getLogger("deepspeed_checkfree.supervisor")

# etcd's TLS and authentication options, from the environment (a supervisor's trainers inherit it): the
# EtcdStore constructor's argument for each variable.
ETCD_OPTION_ENV = {"CHECKFREE_ETCD_CA_CERT": "ca_cert", "CHECKFREE_ETCD_CLIENT_CERT": "client_cert",
                   "CHECKFREE_ETCD_CLIENT_KEY": "client_key", "CHECKFREE_ETCD_USER": "username",
                   "CHECKFREE_ETCD_PASSWORD": "password"}
ETCD_TOKEN_AUTH_ENV = "CHECKFREE_ETCD_TOKEN_AUTH"  # "1": authenticate as the job's own etcd user (grant_job_access)


class StoreLost(Exception):
    """The job's store cannot be reached any more (the embedded store's host is gone, or etcd does not answer)."""


def is_store_failure(err: BaseException) -> bool:
    """Whether ``err`` means the job's store failed: a lost connection, or any store error (the etcd store's are
    CheckFree errors as well as torch's ``DistStoreError``)."""
    return isinstance(err, (StoreLost, dist.DistStoreError)) or classify(err) == COMMUNICATION


def etcd_options(environ: Mapping[str, str] = os.environ) -> dict:
    """The :class:`.EtcdStore` options set in the environment (TLS files, an etcd user, or the job's own user)."""
    options = {arg: environ[var] for var, arg in ETCD_OPTION_ENV.items() if environ.get(var)}
    if environ.get(ETCD_TOKEN_AUTH_ENV) == "1":
        options["token_auth"] = True
    return options


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket listening on ``host`` only (torch's TCPStore on its own would listen on every interface)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(512)
    return sock


def host_store(host: str, port: int, timeout_s: float) -> Tuple[DeadlineStore, socket.socket]:
    """Start the job's embedded store server bound to ``host``; returns (its client, the listening socket); keep
    both alive."""
    sock = listening_socket(host, port)
    store = dist.TCPStore(host, port, is_master=True, wait_for_workers=False, master_listen_fd=sock.fileno(),
                          timeout=timedelta(seconds=timeout_s), use_libuv=True)
    return DeadlineStore(store, timedelta(seconds=timeout_s), describe=describe_store(None, host, port),
                         connect=lambda: _client(host, port, timeout_s)), sock


def _client(host: str, port: int, timeout_s: float) -> dist.TCPStore:
    return dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout_s))


def connect_store(host: str, port: int, timeout_s: float) -> DeadlineStore:
    """A client of the job's embedded store: no request outlives ``timeout_s``."""
    return connected(lambda: _client(host, port, timeout_s), timedelta(seconds=timeout_s),
                     describe_store(None, host, port))


def open_store(*, store_url: Optional[str], token: str, master_addr: str, store_port: int, timeout_s: float,
               host: bool = False) -> Tuple[dist.Store, object]:
    """The job's store: ``(store, server)``; ``server`` (the listening socket) only when this process hosts it.

    Args:
        store_url: ``etcd://...``/``etcds://...``: the external store; None: the embedded one.
        token: the job token (the etcd store's key prefix derives from it).
        master_addr, store_port: where the embedded store listens.
        timeout_s: how long a wait for keys (and, on etcd, an unreachable cluster) lasts before an error.
        host: host the embedded store (rank 0's supervisor); ignored with an external store.
    """
    if store_url:
        return EtcdStore(store_url, token, timeout=timedelta(seconds=timeout_s), **etcd_options()), None
    if host:
        return host_store(master_addr, store_port, timeout_s=timeout_s)
    return connect_store(master_addr, store_port, timeout_s=timeout_s), None


def prepare_client(environ: Mapping[str, str] = os.environ) -> None:
    """Import the external store's HTTP client now, if the job uses one: a warm spare does it while it waits, so a
    replacement does not pay for it in the outage."""
    if environ.get(STORE_URL_ENV):
        import etcd3gw  # noqa: F401
        import requests  # noqa: F401


def trainer_store(token: str, timeout_s: float, environ: Mapping[str, str] = os.environ) -> dist.Store:
    """The job's store, for a trainer: the one its supervisor named in the environment."""
    store, _ = open_store(store_url=environ.get(STORE_URL_ENV), token=token, master_addr=environ[STORE_ADDR_ENV],
                          store_port=int(environ[STORE_PORT_ENV]), timeout_s=timeout_s)
    return store


def configured_store(script_args: Sequence[str]) -> Tuple[Optional[str], Optional[str]]:
    """``checkfree.store`` of the DeepSpeed config the training script is given (``--deepspeed_config PATH``), and
    that path; (None, None) without one. A config that cannot be read or parsed counts as naming no store: the
    trainer reports it and stops the job (exit code 78, with its ``stopped`` record), as for any config error.

    Raises:
        ConfigError: ``checkfree.store`` is not a string.
    """
    path = deepspeed_config_path(script_args)
    if path is None:
        return None, None
    try:
        ds_config = read_deepspeed_config(script_args)
    except ConfigError:
        return None, path
    section = ds_config.get("checkfree")
    if isinstance(section, str):  # a YAML/JSON file of its own: parsed by the schema (which imports DeepSpeed)
        from ..core.config import CheckFreeConfig
        try:
            return CheckFreeConfig.from_ds_config(ds_config).store, path
        except ConfigError:
            return None, path
    # (the trainer validates the whole section; the supervisor needs only this key, without importing DeepSpeed)
    store = section.get("store") if isinstance(section, dict) else None
    if store is not None and not isinstance(store, str):
        raise ConfigError(f"checkfree.store in {path} must be a URL string (etcd://host:port,...), got {store!r}")
    return store, path


def choose_store(flag: Optional[str], script_args: Sequence[str]) -> Optional[str]:
    """The job's store URL: the supervisor's ``--store`` (or ``$CHECKFREE_STORE``) and the config's
    ``checkfree.store`` may each give it, but never two different stores (ranks on different stores would form two
    jobs).

    Raises:
        ConfigError: a malformed URL, or the two disagree.
    """
    configured, path = configured_store(script_args)
    chosen = [str(parse_store_url(u)) if u else None for u in (flag, configured)]
    if chosen[0] and chosen[1] and chosen[0] != chosen[1]:
        raise ConfigError(f"the supervisor's --store (or ${STORE_URL_ENV}) is {chosen[0]} but checkfree.store in "
                          f"{path} is {chosen[1]}: every rank must use one store. Give one of them, or the same "
                          f"URL in both.")
    return chosen[0] or chosen[1]


def check_trainer_store(configured: Optional[str], environ: Mapping[str, str] = os.environ) -> None:
    """A trainer whose config names a store (``checkfree.store``) must run on that store, which its supervisor
    chose (the supervisor reads the key only from ``--deepspeed_config``).

    Raises:
        ConfigError: the supervisor uses another store, or the embedded one.
    """
    if configured is None:
        return
    wanted, used = str(parse_store_url(configured)), environ.get(STORE_URL_ENV)
    if wanted != used:
        raise ConfigError(f"checkfree.store is {wanted}, but this trainer's supervisor uses "
                          f"{used or 'the embedded store'}: start the supervisor with --store {wanted} (it reads "
                          f"checkfree.store itself only from the script's --deepspeed_config argument)")


def store_ports(environ: Mapping[str, str] = os.environ) -> Tuple[int, ...]:
    """The ports a trainer's store connections go to (the etcd members', or the embedded store's): the connection
    cut of a failed generation leaves them alone (:mod:`.connection_cut`)."""
    url = environ.get(STORE_URL_ENV)
    if url:
        return tuple(port for _, port in parse_store_url(url).endpoints)
    return (int(environ[STORE_PORT_ENV]),)


def rendezvous_polling(environ: Mapping[str, str] = os.environ) -> dict:
    """How a generation's rendezvous store polls (:class:`.GenerationStore`'s options): the embedded store's polls
    cost microseconds; etcd serves each as a linearizable read, for every waiting rank, on the cores the replacement
    builds its engine on, so waits back off to 50 ms (each poll is one read, which returns what it waited for) and
    ask for dead members (one counter) every 100 ms. (Polling more eagerly made the 4-stage outage slower here:
    backing off to 20 ms, +0.31 and +0.47 s over the embedded store against +0.27 s; a first poll at 2 ms, +0.39 s.
    The extra reads compete with the trainers for the cores.)"""
    return dict(poll_max_s=0.05, death_poll_s=0.1) if environ.get(STORE_URL_ENV) else {}


def describe_store(store_url: Optional[str], master_addr: str, store_port: int) -> str:
    """The store in words, for messages."""
    if store_url:
        return f"the etcd store {store_url}"
    return f"the embedded store at {master_addr}:{store_port} (hosted by rank 0's supervisor)"


def check_job_exists(membership: Membership, store_url: str) -> None:
    """Before a join on etcd: the job's keys exist under this token's prefix (a wrong token sees an empty prefix,
    where no supervisor would ever answer).

    Raises:
        JoinRefused: no supervisor of a job with this token has a lease in the store.
    """
    if not any(membership.store.check([membership.key(lease_key(r))]) for r in range(membership.world_size)):
        raise JoinRefused(f"join refused for rank {membership.rank}: no job with this token runs in the etcd store "
                          f"{store_url}. Set {TOKEN_ENV} to the token the job was launched with, and --store to its "
                          f"store URL")


def check_not_a_previous_run(membership: Membership, store_url: str) -> None:
    """At a launch on etcd (not a join): the token's keys are not those of an earlier run that finished or stopped.
    etcd keeps them after the job (the embedded store goes with it), and a new run with the same token would read
    them as its own.

    Raises:
        JoinRefused: the token's keys hold a finished or stopped job (the message says how to start afresh).
    """
    done, stop = membership.finished(), membership.stopped()
    if done < membership.world_size and stop is None:
        return
    what = (f"a job that finished ({done} trainers done)" if done >= membership.world_size else
            f"a job that stopped (rank {stop['rank']}: {stop['reason']})")
    raise JoinRefused(f"rank {membership.rank} cannot start: the etcd store {store_url} holds {what} under this "
                      f"token. Use a new {TOKEN_ENV} for each run, or delete the earlier run's keys first: python -c "
                      f"\"from deepspeed_checkfree.resilience.etcd_store import EtcdStore; "
                      f"EtcdStore('{store_url}', '<token>').delete_prefix('')\"")
