"""The contract between the per-rank supervisor and the trainer it starts: environment variables, exit codes, the
warm spare's activation line, the job store's key names, the files the supervisor writes (``--pid-dir``) and where
both find the DeepSpeed config on the script's command line. Both sides import these names; no other module
spells the strings. Standard library only (and this package's errors), so any layer may import it.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import sys
from dataclasses import dataclass
from typing import Dict, Mapping, MutableMapping, Optional, Sequence, TextIO

from ..errors import ConfigError

# ---------------------------------------------------------------------------------------------------------------
# Environment variables
# ---------------------------------------------------------------------------------------------------------------

# Set by the user on every rank and on every machine that joins later.
TOKEN_ENV = "CHECKFREE_JOB_TOKEN"
STORE_PORT_ENV = "CHECKFREE_STORE_PORT"  # also set by the supervisor for its trainer
STORE_PORT_OFFSET = 1  # default store port: MASTER_PORT + 1 (MASTER_PORT itself is the launcher's)
DUMP_ENV = "CHECKFREE_DUMP_DIR"  # debugging and verification aid: the trainer dumps states around each rebuild
PID_DIR_ENV = "CHECKFREE_PID_DIR"  # default of the supervisor's --pid-dir
SUPERVISOR_EVENTS_ENV = "CHECKFREE_SUPERVISOR_EVENTS"  # default of the supervisor's --events-file

# Set by the supervisor for the trainer it starts.
SUPERVISED_ENV = "CHECKFREE_SUPERVISED"
INCARNATION_ENV = "CHECKFREE_INCARNATION"  # how many times this rank's trainer has been (re)started
SPARE_ENV = "CHECKFREE_SPARE"  # a warm spare: waits for its activation line on stdin
STORE_ADDR_ENV = "CHECKFREE_STORE_ADDR"
# The external store's URL (etcd://...): the default of the supervisor's --store, and what it passes to its trainer,
# which then keeps its membership and its process groups' rendezvous there too. Unset: the embedded store.
STORE_URL_ENV = "CHECKFREE_STORE"
HEARTBEAT_FD_ENV = "CHECKFREE_HEARTBEAT_FD"  # the write end of the pipe the trainer's heartbeat goes to
SUPERVISOR_PID_ENV = "CHECKFREE_SUPERVISOR_PID"  # the trainer ends itself when this process is gone
SUPERVISOR_ID_ENV = "CHECKFREE_SUPERVISOR_ID"    # the supervisor's id in its lease (a leaving trainer names it)
DRAIN_TIMEOUT_ENV = "CHECKFREE_DRAIN_TIMEOUT_S"  # a trainer told to leave (SIGTERM) hands over within this long
DRAIN_TIMEOUT_S = 25.0  # its default (the supervisor's --drain-timeout): inside Kubernetes' 30 s grace period
_TRUE = "1"


def trainer_env(*, rank: int, world_size: int, local_rank: int, master_addr: str, master_port: int,
                store_port: int, incarnation: int, spare: bool = False, heartbeat_fd: Optional[int] = None,
                supervisor_pid: Optional[int] = None, store_url: Optional[str] = None,
                supervisor_id: Optional[str] = None, drain_timeout_s: Optional[float] = None) -> Dict[str, str]:
    """The variables the supervisor adds to its own environment for a trainer: the store is ``store_url`` (etcd)
    when given, else the embedded one on the master."""
    env = dict(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_rank), MASTER_ADDR=master_addr,
               MASTER_PORT=str(master_port))
    env.update({SUPERVISED_ENV: _TRUE, INCARNATION_ENV: str(incarnation), STORE_ADDR_ENV: master_addr,
                STORE_PORT_ENV: str(store_port)})
    if store_url:
        env[STORE_URL_ENV] = store_url
    if spare:
        env[SPARE_ENV] = _TRUE
    if heartbeat_fd is not None:
        env[HEARTBEAT_FD_ENV] = str(heartbeat_fd)
    if supervisor_pid is not None:
        env[SUPERVISOR_PID_ENV] = str(supervisor_pid)
    if supervisor_id is not None:
        env[SUPERVISOR_ID_ENV] = supervisor_id
    if drain_timeout_s is not None:
        env[DRAIN_TIMEOUT_ENV] = f"{drain_timeout_s:g}"
    return env


def supervised(environ: Mapping[str, str] = os.environ) -> bool:
    """True when this process was started by the CheckFree supervisor."""
    return environ.get(SUPERVISED_ENV) == _TRUE


def is_spare(environ: Mapping[str, str] = os.environ) -> bool:
    """True when this process was started as a warm spare (it must wait for :func:`read_activation`)."""
    return environ.get(SPARE_ENV) == _TRUE


def incarnation_from_env(environ: Mapping[str, str] = os.environ) -> int:
    """This trainer's incarnation: 0 for the first trainer of a rank, n for its n-th replacement."""
    return int(environ.get(INCARNATION_ENV, "0"))


# ---------------------------------------------------------------------------------------------------------------
# A warm spare's activation: one line on its stdin; stdin closed without a line means "not needed, exit"
# ---------------------------------------------------------------------------------------------------------------

def activation_line(incarnation: int) -> str:
    """What the supervisor writes to a spare's stdin to make it the trainer of ``incarnation``."""
    return f"{incarnation}\n"


def read_activation(stream: TextIO) -> Optional[int]:
    """Block until the supervisor activates this spare; return its incarnation, or None when it never will."""
    line = stream.readline()
    return int(line) if line else None


def activated(environ: MutableMapping[str, str], incarnation: int) -> None:
    """Turn a spare's environment into that of the active trainer of ``incarnation`` (for the training script)."""
    environ[INCARNATION_ENV] = str(incarnation)
    environ.pop(SPARE_ENV, None)


# ---------------------------------------------------------------------------------------------------------------
# The trainer's heartbeat: one line per beat on a pipe to its supervisor, carrying the silence after which the
# supervisor may kill it as hung (the trainer knows its config's detection_timeout_s; the supervisor does not)
# ---------------------------------------------------------------------------------------------------------------

def heartbeat_line(timeout_s: float) -> bytes:
    """One beat; ``math.inf`` says "done: do not judge me any more" (the trainer finished and is exiting)."""
    return f"{timeout_s:.3f}\n".encode()


def last_heartbeat_timeout(data: bytes) -> Optional[float]:
    """The timeout carried by the last complete beat in ``data``; None if it holds none."""
    lines = data.split(b"\n")[:-1]
    return float(lines[-1]) if lines else None


def finished_fact(rank: int) -> str:
    """Fact: ``rank``'s trainer completed the job (a crash while it exits is then no loss)."""
    return f"finished/{rank}"


LEASE_INTERVAL_S = 1.0  # a supervisor renews its rank's lease this often
LEASE_TIMEOUT_S = 5.0   # a supervisor whose lease has not been renewed for this long is gone (its machine lost)


def lease_key(rank: int) -> str:
    """The key ``rank``'s supervisor renews every :data:`LEASE_INTERVAL_S` while it runs (a job key): see
    :func:`lease_value`."""
    return f"lease/{rank}"


def lease_value(renewals: int, wall_time: float, owner: str) -> str:
    """A lease's value: how often it was renewed, the supervisor's wall-clock time of the renewal (what dates the
    start of an outage when its machine goes silent) and the supervisor's own id (a supervisor recorded lost that
    comes back after a partition renews under its old id, and is not taken for the rank's new owner)."""
    return f"{renewals} {wall_time:.6f} {owner}"


@dataclass(frozen=True)
class Lease:
    renewals: int = 0               # 0: never renewed
    time: Optional[float] = None    # the supervisor's time.time() at its last renewal
    owner: Optional[str] = None     # the renewing supervisor's id


def parse_lease(value: Optional[bytes]) -> Lease:
    """A lease's value, parsed; ``Lease()`` when it was never renewed."""
    if not value:
        return Lease()
    count, when, owner = (value.decode().split(" ") + ["", ""])[:3]
    return Lease(int(count), float(when) if when else None, owner or None)


def draining_fact(rank: int) -> str:
    """Fact: ``rank``'s supervisor got a preemption notice and its trainer is handing over: {"notice", "deadline",
    "owner"} (JSON). A join for the rank waits for the trainer to leave instead of being refused as alive."""
    return f"draining/{rank}"


def lost_fact(rank: int) -> str:
    """Fact: ``rank``'s machine was lost (its supervisor went silent, or it left on a preemption notice), so a
    machine that joins may take the rank over at once: {"incarnation", "cause", "owner", "time"} (JSON)."""
    return f"lost/{rank}"


# ---------------------------------------------------------------------------------------------------------------
# Exit codes
# ---------------------------------------------------------------------------------------------------------------

# A trainer that exits with this code has stopped on purpose (unrecoverable failure, by policy or by nature):
# its supervisor does not start a replacement.
STOPPED_EXIT_CODE = 78
# The supervisor of a machine that asked to join and was refused (wrong token, rank out of range, rank alive).
JOIN_REFUSED_EXIT_CODE = 3
# A supervisor that lost the job's store (rank 0's supervisor or machine is gone) ends with this code.
STORE_LOST_EXIT_CODE = 80
# A supervisor (and its trainer) whose rank was recorded lost while it was cut off (a partition that healed): the
# job went on without it, so it ends instead of coming back as a second copy of the rank.
FENCED_EXIT_CODE = 81
# A trainer that left the job on a preemption notice (its state handed over or parked): nothing is respawned.
LEFT_EXIT_CODE = 82


# ---------------------------------------------------------------------------------------------------------------
# Store keys. Job keys live under key_prefix(token); the join-request keys are public, because a joiner does not
# know the job prefix before it is admitted.
# ---------------------------------------------------------------------------------------------------------------

def token_mac(token: str, message: str) -> str:
    """HMAC-SHA256 of ``message`` under the job token (hex)."""
    return hmac.new(token.encode(), message.encode(), hashlib.sha256).hexdigest()


def key_prefix(token: str) -> str:
    """Where the job keeps its keys: unguessable without the token."""
    return "cf/" + token_mac(token, "checkfree-job")[:32]


def rank_generation_key(rank: int) -> str:
    """The last generation ``rank`` arrived for."""
    return f"rank_gen/{rank}"


def member_key(generation: int, rank: int) -> str:
    """What ``rank`` said of itself when it arrived for ``generation`` (JSON)."""
    return f"g/{generation}/member/{rank}"


def members_prefix(generation: int) -> str:
    """Every member entry of ``generation`` starts with this (counted on etcd, where it replaces the arrival
    counter)."""
    return f"g/{generation}/member/"


def generation_prefix(generation: int) -> str:
    """Every key of ``generation`` (members, formed, the process group's rendezvous) starts with this."""
    return f"g/{generation}/"


def formed_key(generation: int) -> str:
    """How ``generation``'s arrival ended: every member's entry (JSON, written once every rank has arrived; its
    process group forms), or :data:`ABORTED`. The one key everyone who arrived waits on."""
    return f"g/{generation}/formed"


ABORTED = "aborted"  # formed_key's value for a generation that failed before it formed: everyone moves to the next


def arrivals_key(generation: int) -> str:
    """Counter: arrivals for ``generation`` (the arrival that reaches the world size checks the members)."""
    return f"g/{generation}/arrivals"


def written_key(generation: int) -> str:
    """The keys ``generation``'s ranks wrote for its process groups, one per line (the leader deletes them with the
    generation where the store cannot delete by prefix)."""
    return f"g/{generation}/written"


def abort_key(generation: int) -> str:
    """Set (JSON: who and why) when ``generation`` has failed: a member died, went silent or leaves, or a member
    detected a failure. Every trainer's death watch waits on it."""
    return f"g/{generation}/abort"


def group_store_prefix(generation: int) -> str:
    """The prefix ``generation``'s process group rendezvouses under."""
    return f"g/{generation}/pg"


def fact_key(name: str) -> str:
    """A job-wide fact (JSON)."""
    return f"fact/{name}"


def incarnation_fact(rank: int) -> str:
    """Fact: the incarnation of ``rank``'s active trainer (written by its supervisor)."""
    return f"incarnation/{rank}"


def pid_fact(rank: int, incarnation: int) -> str:
    """Fact: the pid of ``rank``'s trainer of ``incarnation``."""
    return f"pid/{rank}/{incarnation}"


def death_fact(rank: int, incarnation: int) -> str:
    """Fact: when and how ``rank``'s trainer of ``incarnation`` died (a :class:`TrainerDeath`)."""
    return f"death/{rank}/{incarnation}"


def leaving_fact(rank: int, incarnation: int) -> str:
    """Fact: ``rank``'s trainer of ``incarnation`` is leaving (a preemption notice or a planned drain): JSON."""
    return f"leaving/{rank}/{incarnation}"


def handover_key(rank: int, incarnation: int, name: str) -> str:
    """A key of the hand-over of ``rank``'s state from its leaving trainer of ``incarnation``: "taker" (who takes it
    directly, or "parking"), "parked" (where it was parked), and the two-process worlds' rendezvous prefixes."""
    return f"handover/{rank}/{incarnation}/{name}"


def inbox_key(rank: int) -> str:
    """The request a leaving rank or a successor makes of ``rank``'s trainer while it waits for a generation: park
    a stage's state, or hand a parked one over (JSON; one at a time, claimed by compare-and-set)."""
    return f"inbox/{rank}"


SIGNALS_KEY = "signals"  # counter of the job-wide signals to every supervisor (stop, fresh start, a rank lost)


def signal_key(index: int) -> str:
    """The ``index``-th job-wide signal (1-based, JSON); each supervisor waits for the next one."""
    return f"signal/{index}"


STOPPED_FACT = "stopped"    # fact: the job stopped: {"rank", "cause", "reason"} of the first rank that stopped it
PROGRESS_FACT = "progress"  # fact: some rank has completed a step of this job
FRESH_START_KEY = "fresh_start"  # counter: every rank's trainer starts over (a death before the first step)
STOP_ACKS_KEY = "stop_acks"      # counter: supervisors that have seen the stop (rank 0's keeps the store up till all)
DONE_KEY = "done"  # counter: trainers that finished the job (rank 0's supervisor keeps the store up until all did)
# counter: how often any supervisor moved its rank's incarnation on (a death watch polls this one key, however large
# the world, and looks at each rank's incarnation only when it moved)
INCARNATION_MOVES_KEY = "incarnation_moves"
LEADER_KEY = "leader"  # "<rank>:<epoch>" of the supervisor doing the job-level duties (external store only)
JOIN_REQUESTS = "cf-join/requests"  # counter of join requests, and the prefix of each request


def join_request_key(index: int) -> str:
    """The ``index``-th join request (1-based, JSON)."""
    return f"{JOIN_REQUESTS}/{index}"


def join_verdict_key(index: int) -> str:
    """The supervisor's verdict on the ``index``-th join request (JSON)."""
    return f"{join_request_key(index)}/verdict"


@dataclass(frozen=True)
class TrainerDeath:
    """The record of a lost trainer (written by its supervisor when it exits, by the leader when its machine went
    silent, by the leaving rank on a drain); the trainers read it to date the start of the outage."""

    time: float                  # trainer death: when the supervisor saw the exit; machine silent: the last lease
                                 # renewal; preemption: when the notice came (time.time() of the writer)
    returncode: Optional[int]    # negative: killed by that signal; None when no exit was seen
    cause: str = "trainer death"  # core.rejoin's TRAINER_DEATH, MACHINE_SILENT or PREEMPTION
    left: Optional[float] = None  # preemption: when the trainer left its generation (the drain's end)


# ---------------------------------------------------------------------------------------------------------------
# The DeepSpeed config on the training script's command line
# ---------------------------------------------------------------------------------------------------------------

DS_CONFIG_FLAGS = ("--deepspeed_config", "--deepspeed-config")  # DeepSpeed's own flag (add_config_arguments)


def deepspeed_config_path(script_args: Sequence[str]) -> Optional[str]:
    """The DeepSpeed config file a training script is given: ``--deepspeed_config PATH`` (also ``--deepspeed-config``,
    and either with ``=PATH``; the last one counts, as with argparse); None without one."""
    path = None
    for i, arg in enumerate(script_args):
        if arg in DS_CONFIG_FLAGS and i + 1 < len(script_args):
            path = script_args[i + 1]
        elif arg.startswith(tuple(f + "=" for f in DS_CONFIG_FLAGS)):
            path = arg.split("=", 1)[1]
    return path


def read_deepspeed_config(argv: Optional[Sequence[str]] = None) -> Optional[dict]:
    """The DeepSpeed config (a JSON file) named by ``--deepspeed_config`` in ``argv`` (default: this process's
    arguments), for a script that hands its config only to ``deepspeed.initialize``; None without the flag.

    Raises:
        ConfigError: the file cannot be read, or does not hold a JSON object.
    """
    path = deepspeed_config_path(sys.argv[1:] if argv is None else argv)
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except OSError as err:
        raise ConfigError(f"cannot read the DeepSpeed config {path!r} given by --deepspeed_config: "
                          f"{err.strerror or err}") from err
    except ValueError as err:
        raise ConfigError(f"the DeepSpeed config {path!r} given by --deepspeed_config is not JSON: {err}") from err
    if not isinstance(config, dict):
        raise ConfigError(f"the DeepSpeed config {path!r} given by --deepspeed_config must hold a JSON object "
                          f"({{\"train_batch_size\": ...}}), not a {type(config).__name__}")
    return config


# ---------------------------------------------------------------------------------------------------------------
# Files the supervisor writes (--pid-dir)
# ---------------------------------------------------------------------------------------------------------------

def pid_file(pid_dir: str, rank: int) -> str:
    """Where the supervisor writes the pid of ``rank``'s active trainer (``--pid-dir``): the process to kill."""
    return os.path.join(pid_dir, f"rank{rank}.pid")


def spare_pid_file(pid_dir: str, rank: int) -> str:
    """Where the supervisor writes the pid of ``rank``'s warm spare (``--pid-dir``); absent while it has none."""
    return os.path.join(pid_dir, f"rank{rank}.spare.pid")


def write_pid_file(path: str, pid: int) -> None:
    """Replace the pid file at ``path`` in one step (a reader never sees it half written)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.write(str(pid))
    os.replace(path + ".tmp", path)


def remove_pid_file(path: str) -> None:
    """Remove the pid file at ``path`` (its process is gone and has no successor); gone already is fine."""
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def supervisor_pid_file(pid_dir: str, rank: int) -> str:
    """Where ``rank``'s supervisor writes its own pid (``--pid-dir``)."""
    return os.path.join(pid_dir, f"supervisor{rank}.pid")


def spare_ready_file(pid_dir: str, rank: int) -> str:
    """Where ``rank``'s warm spare writes its pid once it has prepared everything and waits (``--pid-dir``): a kill
    of the active trainer from then on is taken over without any start-up in the outage."""
    return os.path.join(pid_dir, f"rank{rank}.spare.ready")


def ready_spare(pid_dir: str, rank: int) -> Optional[int]:
    """The pid of ``rank``'s current warm spare once it has said it is ready (its pid in :func:`spare_ready_file`
    is the one in :func:`spare_pid_file`); None before, or when it has none."""
    pids = []
    for path in (spare_pid_file(pid_dir, rank), spare_ready_file(pid_dir, rank)):
        try:
            with open(path) as f:
                pids.append(f.read().strip())
        except FileNotFoundError:
            return None
    return int(pids[0]) if pids[0] == pids[1] else None


def started_file(pid_dir: str, rank: int) -> str:
    """Where ``rank``'s supervisor appends one ``ROLE PID`` line per process it starts (``--pid-dir``): tests check
    that none survives the job."""
    return os.path.join(pid_dir, f"rank{rank}.started")


def dump_file(dump_dir: str, generation: int, when: str, rank: int) -> str:
    """Where the trainer of ``rank`` dumps its state ``when`` ("before"/"after") rebuilding in ``generation``, or
    ("resumed") once it completed that generation's first step."""
    return os.path.join(dump_dir, f"g{generation}-{when}-rank{rank}.pt")
