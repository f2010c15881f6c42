"""Where the job's coordination state lives, and which supervisor does the job-level duties.

Embedded store (the default): rank 0's supervisor hosts a TCPStore on the master address, every other process is
its client, and rank 0's supervisor answers joins. Losing rank 0's machine loses the store, and the job stops.
External store (``--store etcd://h1:2379,h2:2379,h3:2379``): every supervisor and trainer is a client of the etcd
cluster (:class:`.EtcdStore`, keys under the token's prefix); no machine is special. The job-level duties (answering
joins, deleting finished generations' keys) go to a leader elected through the store
(:mod:`deepspeed_checkfree.core.leadership`), and move to another live supervisor when the leader's machine is lost.
"""
from __future__ import annotations

import logging
import os
from datetime import timedelta
from typing import Mapping, Optional, Sequence, Tuple

import torch.distributed as dist

from ..core import leadership
from ..core.fault_policy import COMMUNICATION, classify
from ..errors import ConfigError
from ..events import EventLog
from .contract import (LEADER_KEY, LEASE_INTERVAL_S, STORE_ADDR_ENV, STORE_PORT_ENV, STORE_URL_ENV, TOKEN_ENV,
                       deepspeed_config_path, generation_prefix, lease_key, read_deepspeed_config)
from .etcd_store import EtcdStore
from .membership import JoinRefused, JoinReviewer, Membership, connect_store, host_store
from .store_address import parse_store_url

logger = logging.getLogger("deepspeed_checkfree.supervisor")

STAGGER_S = LEASE_INTERVAL_S  # rank r takes a silent leader's duties over r seconds after rank 1 would

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


def death_watch_interval(environ: Mapping[str, str] = os.environ) -> float:
    """How often a trainer's death watch reads the death records: every 50 ms on the embedded store; every 250 ms
    on etcd, where each read is a linearizable request every trainer makes all through training (at 50 ms, with 3
    members on the trainers' 2 cores, failure-free steps were 30% slower). A dead process's neighbours, and through
    the connection cut every rank, learn of it at once either way."""
    return 0.25 if environ.get(STORE_URL_ENV) else 0.05


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


class Coordinator:
    """One supervisor's share of the job-level work, called every store tick (:meth:`tick`): renew this rank's
    lease; with the embedded store, answer joins if this supervisor hosts it; with an external store, claim or
    follow the leadership and, while leading, answer joins and delete the keys of finished generations.

    Args:
        membership: this supervisor's view of the job (its store is the job's).
        token: the job token (join requests carry its MAC).
        hosted: this supervisor hosts the embedded store (it does the duties, no election).
        external: the store is external (elect a leader).
        lease_timeout_s: silence after which a supervisor counts as gone.
        events: where detections and decisions are written.
        prefix: the log lines' identity prefix.
    """

    def __init__(self, membership: Membership, token: str, *, hosted: bool, external: bool, lease_timeout_s: float,
                 events: EventLog, prefix: str) -> None:
        self.membership, self.token, self.events, self.prefix = membership, token, events, prefix
        self.rank, self.external, self.lease_timeout_s = membership.rank, external, lease_timeout_s
        self.reviewer: Optional[JoinReviewer] = (JoinReviewer(membership, token, lease_timeout_s=lease_timeout_s)
                                                 if hosted else None)
        self.next_lease = 0.0
        self.next_leader_check = 0.0
        self.started_at: Optional[float] = None
        self.holder: Optional[leadership.Holder] = None
        # (holder, its lease counter, monotonic time the counter was last seen to move)
        self.holder_lease: Tuple[Optional[leadership.Holder], int, float] = (None, 0, 0.0)
        self.deleted_below = 0

    @property
    def leading(self) -> bool:
        return self.reviewer is not None

    def tick(self, now: float) -> None:
        """Raises: StoreLost: the store did not answer (torch's store errors are RuntimeErrors)."""
        try:
            if now >= self.next_lease:
                self.membership.renew_lease(self.rank)
                self.next_lease = now + LEASE_INTERVAL_S
            if self.external and now >= self.next_leader_check:
                self.next_leader_check = now + LEASE_INTERVAL_S
                self._lead_or_follow(now)
                if self.leading:
                    self._delete_finished_generations()
            if self.reviewer is not None:
                self._review(now)
        except (RuntimeError, OSError) as err:
            raise StoreLost(str(err)) from err

    # the leadership (external store) ----------------------------------------------------------------------------

    def _read_holder(self) -> Optional[leadership.Holder]:
        value = self.membership.values_if_set([self.membership.key(LEADER_KEY)])[0]
        return None if value is None else leadership.parse_holder(value.decode())

    def _lead_or_follow(self, now: float) -> None:
        if self.started_at is None:
            self.started_at = now
        holder = self._read_holder()
        silent_s = None
        if holder is not None and holder.rank != self.rank:
            lease = self.membership.lease(holder.rank)
            if (holder, lease) != self.holder_lease[:2]:
                self.holder_lease = (holder, lease, now)
            silent_s = now - self.holder_lease[2]
        self.holder = holder
        action = leadership.leader_action(rank=self.rank, holder=holder, waited_s=now - self.started_at,
                                          holder_silent_s=silent_s, lease_timeout_s=self.lease_timeout_s,
                                          stagger_s=STAGGER_S)
        if action == leadership.CLAIM:
            wanted = leadership.successor(holder, self.rank).value()
            standing = self.membership.store.compare_set(self.membership.key(LEADER_KEY),
                                                         holder.value() if holder else "", wanted)
            self.holder = leadership.parse_holder(standing.decode())
            if self.holder is not None and self.holder.rank == self.rank:
                self._became_leader(holder, silent_s, now)
                return
        if self.holder is None or self.holder.rank != self.rank:
            if self.reviewer is not None:
                logger.warning("%s no longer leads the job's coordination: rank %s does now", self.prefix,
                               self.holder.rank if self.holder else None)
                self.events.write("leader_lost", rank=self.rank,
                                  leader=self.holder.rank if self.holder else None)
            self.reviewer = None
        elif self.reviewer is None:  # (restarted with the key still ours)
            self._became_leader(None, None, now)

    def _became_leader(self, previous: Optional[leadership.Holder], silent_s: Optional[float], now: float) -> None:
        # The join reviewer starts from what this supervisor saw of the previous leader's lease, so a join for the
        # lost leader's rank is admitted as soon as that rank has been silent for the lease timeout.
        seen = {previous.rank: self.holder_lease[1:]} if previous is not None else {}
        self.reviewer = JoinReviewer(self.membership, self.token, lease_timeout_s=self.lease_timeout_s, leases=seen)
        self.deleted_below = 0
        if previous is None:
            logger.info("%s leads the job's coordination (answers joins)", self.prefix)
            self.events.write("leader", rank=self.rank, epoch=self.holder.epoch, previous=None)
        else:
            logger.warning("%s took over the job's coordination from rank %d, whose supervisor has been silent for "
                           "%.1f s (lease timeout %.1f s): this supervisor now answers joins", self.prefix,
                           previous.rank, silent_s or 0.0, self.lease_timeout_s)
            self.events.write("leader", rank=self.rank, epoch=self.holder.epoch, previous=previous.rank,
                              previous_silent_s=round(silent_s or 0.0, 3))

    def _delete_finished_generations(self) -> None:
        store = self.membership.store
        if not hasattr(store, "delete_prefix"):
            return
        lasts = self.membership.last_generations()
        gone = leadership.generations_to_delete(lasts, self.deleted_below)
        for generation in gone:
            deleted = store.delete_prefix(self.membership.key(generation_prefix(generation)))
            logger.debug("%s deleted generation %d's %d keys", self.prefix, generation, deleted)
        self.deleted_below = gone.stop

    # joins --------------------------------------------------------------------------------------------------------

    def _review(self, now: float) -> None:
        for req, admitted, reason in self.reviewer.review(now):
            what = "admitted a new machine" if admitted else "refused a join"
            log = logger.warning if admitted else logger.error
            log("%s %s for rank %s (%s, pid %s): %s", self.prefix, what, req.get("rank"), req.get("host"),
                req.get("pid"), reason)
            self.events.write("join_admitted" if admitted else "join_refused", rank=req.get("rank"),
                              host=req.get("host"), reason=reason)

