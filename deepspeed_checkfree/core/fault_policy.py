"""The fault policy as pure decisions: which exceptions mean a lost peer, what a supervisor does when its trainer or
its warm spare exits, whether a join is admitted, when a trainer that still runs counts as hung. The supervisor and
the trainer (:mod:`deepspeed_checkfree.resilience`) carry the decisions out; the README's fault table lists them.

The rule for exceptions: only a communication failure (a peer that died, hung or cannot be reached) is recovered,
by re-forming the process group and replaying the step. Every other exception (a config error, a shape bug, an
out-of-memory error, an assertion) stops the whole job at once with its message: replaying it would only raise it
again, and respawning the trainer would loop.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

from ..errors import CheckFreeError, ConfigError

# Kinds of exception (:func:`classify`).
COMMUNICATION = "communication"  # a lost or unreachable peer: recovered
CONFIG = "config"                # the configuration is invalid: the job stops (exit code 78), nothing is respawned
STOP = "stop"                    # CheckFree stopped on purpose (nothing to rebuild from, join timeout, ...)
PROGRAM = "program"              # any other exception (bug, out of memory, assertion): the job stops

# torch.distributed's own exception types (matched by name: core/ does not import torch.distributed).
_DIST_ERRORS = frozenset({"DistError", "DistBackendError", "DistNetworkError", "DistStoreError"})
# gloo and NCCL raise plain RuntimeErrors; these phrases are what their transports say when a peer is gone.
_TRANSPORT_PHRASES = ("connection closed by peer", "connection reset by peer", "timed out waiting",
                      "pair closure", "connectfullmesh", "broken pipe", "connection refused", "socket timeout",
                      "wait timeout", "nccl error", "ncclremoteerror", "ncclsystemerror", "watchdog caught",
                      "communicator was aborted", "/gloo/")


def classify(err: BaseException) -> str:
    """The kind of ``err``: :data:`COMMUNICATION`, :data:`CONFIG`, :data:`STOP` or :data:`PROGRAM`.

    A communication failure is one of torch.distributed's error types, a ``ConnectionError``/``TimeoutError``, or a
    ``RuntimeError`` whose message is a gloo/NCCL transport failure; so is an exception explicitly raised from one
    (``raise X from comm_error``).
    """
    if isinstance(err, ConfigError):
        return CONFIG
    if isinstance(err, CheckFreeError):
        return STOP
    if _is_communication(err) or (err.__cause__ is not None and _is_communication(err.__cause__)):
        return COMMUNICATION
    return PROGRAM


def _is_communication(err: BaseException) -> bool:
    if any(c.__name__ in _DIST_ERRORS for c in type(err).__mro__):
        return True
    if isinstance(err, (ConnectionError, TimeoutError)):
        return True
    if type(err) is RuntimeError:  # subclasses (NotImplementedError, RecursionError, ...) are program errors
        text = str(err).lower()
        return any(p in text for p in _TRANSPORT_PHRASES)
    return False


# ---------------------------------------------------------------------------------------------------------------
# The supervisor: its trainer exited
# ---------------------------------------------------------------------------------------------------------------

FINISH = "finish"            # the trainer completed the job
STOP_JOB = "stop_job"        # stop this rank and tell every rank to stop
REPLACE = "replace"          # start a replacement that rebuilds the stage (the others keep their state)
FRESH_START = "fresh_start"  # no step has completed yet: every rank starts over from initialisation
FENCED = "fenced"            # the rank was recorded lost while this machine was cut off: end, the job goes on
LEFT = "left"                # the trainer left on a preemption notice, its stage handed over: end, the job goes on


@dataclass(frozen=True)
class ExitDecision:
    action: str
    reason: str


def on_trainer_exit(returncode: int, *, stopped_code: int, job_stopped: bool, job_has_progress: bool,
                    group_formed: bool, restarts: int, max_restarts: int, trainer_finished: bool = False,
                    fenced_code: Optional[int] = None, left_code: Optional[int] = None) -> ExitDecision:
    """What the supervisor does when its active trainer exited with ``returncode``.

    Args:
        returncode: the trainer's exit code (negative: killed by that signal).
        stopped_code: the exit code of a trainer that stopped the job on purpose.
        job_stopped: some rank already stopped the job.
        job_has_progress: some rank has completed a step of this job.
        group_formed: the trainer had taken part in a formed process group (its peers may be blocked on it).
        restarts: replacements started so far for losses of this rank.
        max_restarts: the supervisor's ``--max-restarts``.
        trainer_finished: the trainer recorded that it completed the job (before it crashed while exiting).
        fenced_code: the exit code of a trainer that found its rank recorded lost (it was cut off).
        left_code: the exit code of a trainer that left on a preemption notice.
    """
    if returncode == 0 or trainer_finished:
        return ExitDecision(FINISH, "the trainer completed the job")
    if left_code is not None and returncode == left_code:
        return ExitDecision(LEFT, "the trainer left the job on a preemption notice and handed its stage over: the "
                            "job goes on without this machine")
    if fenced_code is not None and returncode == fenced_code:
        return ExitDecision(FENCED, "the job recorded this rank as lost while this machine was cut off, and went on "
                            "without it: this machine ends instead of coming back as a second copy of the rank")
    if returncode == stopped_code:
        return ExitDecision(STOP_JOB, "the trainer stopped the job on purpose (its log and the events file say why)")
    if job_stopped:
        return ExitDecision(STOP_JOB, "another rank stopped the job")
    if restarts >= max_restarts:
        return ExitDecision(STOP_JOB, f"the trainer died {restarts + 1} times, more than --max-restarts="
                            f"{max_restarts}. Look at its log for the cause, or raise --max-restarts.")
    if not job_has_progress and group_formed:
        # Nothing is lost yet, but the other ranks may be blocked in the engine build on the dead one, for as long
        # as the start-up timeout: starting everyone over is both correct and quick.
        return ExitDecision(FRESH_START, "the trainer died before the job completed its first step: every rank "
                            "starts over from initialisation")
    return ExitDecision(REPLACE, "a replacement rebuilds the stage from its neighbours")


SPARE_RESTART = "restart"  # start another spare
SPARE_DROP = "drop"        # keep no spare from now on (a replacement then pays the start-up)


def on_spare_exit(returncode: int, *, stopped_code: int, consecutive_deaths: int, max_consecutive: int = 3
                  ) -> ExitDecision:
    """What the supervisor does when its warm spare exited before it was needed.

    Args:
        returncode: the spare's exit code.
        stopped_code: the exit code of a trainer that stopped on purpose (a spare does so on a config error).
        consecutive_deaths: spare deaths in a row, this one included.
        max_consecutive: give up keeping a spare after this many deaths in a row (no restart loop).
    """
    if returncode == stopped_code:
        return ExitDecision(SPARE_DROP, f"the spare stopped (exit code {stopped_code}: an error it cannot recover "
                            f"from, e.g. in the config); no spare is restarted")
    if consecutive_deaths >= max_consecutive:
        return ExitDecision(SPARE_DROP, f"the spare died {consecutive_deaths} times in a row; no spare is kept "
                            f"from now on (a replacement pays the start-up)")
    return ExitDecision(SPARE_RESTART, "another spare is started")


GLOO_CONNECT_WAIT_FACTOR = 5  # gloo waits this times a pair's timeout for a peer to connect in (tcp/pair.h)
CONNECT_FLOOR_S = 10.0        # the least a group's connect may wait for a living peer (today's bound at T = 2 s)


def gloo_pair_timeout_s(detection_timeout_s: float) -> float:
    """The timeout a gloo group's pairs are created with, so that its connect ends within
    max(``detection_timeout_s``, ``CONNECT_FLOOR_S``) when a peer died after publishing its address.

    gloo's full-mesh connect has two sides per pair. The active side connects to the published address and retries
    a refused one until the pair's timeout; the passive side waits for the peer to connect in, for
    ``GLOO_CONNECT_WAIT_FACTOR`` times that timeout, with no socket anything could cut. A group created with the
    start-up allowance (minutes) would so hold a survivor 5x as long when a replacement dies in the rendezvous. A
    living peer listens before it publishes and connects right after it read the others' addresses, so this bound
    is only ever reached by a dead one; the floor keeps a loaded machine's slow peer from failing a formation."""
    return max(detection_timeout_s, CONNECT_FLOOR_S) / GLOO_CONNECT_WAIT_FACTOR


def startup_timeout_s(detection_timeout_s: float) -> float:
    """How long a trainer may take to start, build its engine and form a group, during which neither a peer's
    wait nor its supervisor's heartbeat check holds it to ``detection_timeout_s``: a fresh process pays first-use
    costs (imports, op loading, allocation) the running ones paid long ago, and on a loaded machine a thread may
    not run for seconds while a C extension loads."""
    return max(120.0, 10.0 * detection_timeout_s)


def heartbeat_overdue(now: float, last_beat: Optional[float], timeout_s: Optional[float]) -> Optional[float]:
    """Seconds since the trainer's last heartbeat if that exceeds ``timeout_s``, else None. A trainer that never
    beat yet (still importing) or announced no timeout is not judged."""
    if last_beat is None or timeout_s is None:
        return None
    silent = now - last_beat
    return silent if silent > timeout_s else None


# ---------------------------------------------------------------------------------------------------------------
# Joins: admitted only for a rank whose machine is gone
# ---------------------------------------------------------------------------------------------------------------

# ---------------------------------------------------------------------------------------------------------------
# Machines that go silent: the leader watches every supervisor's lease
# ---------------------------------------------------------------------------------------------------------------

def silent_ranks(renewed_at: Dict[int, Optional[float]], now: float, lease_timeout_s: float,
                 recorded: Iterable[int] = ()) -> List[int]:
    """The ranks whose supervisor has been silent for longer than ``lease_timeout_s``, not yet recorded as lost.

    Args:
        renewed_at: rank -> when the watcher last saw its lease change (its clock); None while the rank's supervisor
            has never renewed it (still starting: its absence shows as a generation that does not form, which the
            join timeout bounds, never as a false loss).
        now: the watcher's clock.
        lease_timeout_s: silence after which a supervisor counts as gone.
        recorded: ranks already recorded as lost (their active incarnation has a loss record).
    """
    skip = set(recorded)
    return [r for r, seen in sorted(renewed_at.items())
            if seen is not None and r not in skip and now - seen > lease_timeout_s]


# ---------------------------------------------------------------------------------------------------------------
# Detection: what made a rank notice the failure, for its log line
# ---------------------------------------------------------------------------------------------------------------

BY_RECORD = "an abort record in the job's store"
BY_TIMEOUT = "a timeout (detection_timeout_s)"
BY_CLOSED = "a closed connection"
BY_ERROR = "an error"


def detection_trigger(error_text: str, aborted_by_record: bool) -> str:
    """What made this rank notice a failure: the job's store told it (its death watch read the generation's abort
    record, written for a dead trainer, a silent machine, a drain or another rank's failure, and cut this rank's
    own connections, so the connection error that follows is its own doing), a peer's wait that timed out, or a
    connection a peer closed (its process died, or it cut its connections after its own detection)."""
    if aborted_by_record:
        return BY_RECORD
    text = error_text.lower()
    if "timed out" in text or "timeout" in text:
        return BY_TIMEOUT
    if any(p in text for p in ("closed by peer", "reset by peer", "broken pipe", "pair closure", "connection refused")):
        return BY_CLOSED
    return BY_ERROR


ADMIT = "admit"
REFUSE = "refuse"
PENDING = "pending"  # the rank's supervisor has not been silent for long enough yet: decide later


def join_verdict(*, token_ok: bool, rank: int, world_size: int, now: float, requested_at: float,
                 lease_renewed_at: Optional[float], lease_timeout_s: float, token_env: str,
                 recorded_lost: Optional[str] = None, draining: bool = False,
                 standby: bool = False) -> Tuple[str, str]:
    """Whether a machine that asked to take over ``rank`` is admitted.

    A rank's supervisor renews a lease while it runs (and replaces its trainer itself when that dies); a join
    replaces only a rank whose supervisor has been silent for ``lease_timeout_s``: its machine is gone, or its
    supervisor was killed or gave up.

    Args:
        token_ok: the request carries the job token's MAC.
        rank, world_size: the requested rank and the job's size.
        now: the reviewer's clock (monotonic).
        requested_at: when the reviewer first saw the request (same clock).
        lease_renewed_at: when the reviewer last saw the rank's lease renewed (same clock); None if never.
        lease_timeout_s: silence after which a supervisor counts as gone.
        token_env: the variable that holds the token (for the message).
        recorded_lost: how the rank's active trainer was recorded lost (its machine silent, a preemption notice),
            if it was: the rank is free at once, without waiting for the lease timeout again.
        draining: the rank's supervisor got a preemption notice (its lease still moves while its trainer hands
            over): the join waits for the leaving record instead of being refused.
        standby: the joiner stands by for the rank (``--standby``): while the rank's supervisor lives, the join
            waits instead of being refused, and is admitted the moment the rank is recorded lost or leaves.

    Returns:
        (:data:`ADMIT`, :data:`REFUSE` or :data:`PENDING`, the reason in words).
    """
    if not token_ok:
        return REFUSE, f"the job token does not match the job's. Set {token_env} to the token the job was launched with"
    if not 0 <= rank < world_size:
        return REFUSE, f"rank {rank} is not in 0..{world_size - 1}"
    if recorded_lost is not None:
        return ADMIT, f"token verified; rank {rank} was recorded lost ({recorded_lost})"
    if draining:
        return PENDING, f"rank {rank} is leaving on a preemption notice: admitted once it has handed over"
    silent_since = requested_at if lease_renewed_at is None else lease_renewed_at
    if standby and now - silent_since <= lease_timeout_s:
        return PENDING, (f"standing by for rank {rank}: admitted when its machine is lost or leaves on a preemption "
                         f"notice")
    if not standby and lease_renewed_at is not None and lease_renewed_at > requested_at:
        return REFUSE, (f"rank {rank} is alive: its supervisor renewed its lease after the request. A join replaces "
                        f"only a rank whose machine is gone (supervisor silent for {lease_timeout_s:g} s); a dead "
                        f"trainer is replaced by its own supervisor. To move a live rank, stop its supervisor first; "
                        f"to wait for the rank to need a replacement, join with --standby")
    if now - silent_since > lease_timeout_s:
        return ADMIT, f"token verified; the supervisor of rank {rank} has been silent for {now - silent_since:.1f} s"
    return PENDING, "waiting to see whether the rank's supervisor is alive"
