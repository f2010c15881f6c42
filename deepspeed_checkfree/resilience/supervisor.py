"""The per-rank supervisor: what the launcher starts instead of the training script.

    deepspeed --num_gpus 4 -m deepspeed_checkfree.supervisor launch/train.py --deepspeed_config cfg.json ...
    torchrun --nproc_per_node 4 -m deepspeed_checkfree.supervisor launch/train.py ...

It starts the training script as a child and, when the child dies, starts a replacement that rebuilds its stage
from the neighbours, so the launcher never sees a failure. It kills a child that stops beating (hung) and replaces
it alike; it ends its children when it is told to end or when any rank stops the job (nothing is respawned after
exit code 78); and a child ends itself when its supervisor dies. The fault table of the README lists every case.
By default rank 0's supervisor also hosts the job's persistent store (bound to the master address only) and admits
machines that join with the job token for a rank whose supervisor is gone. With ``--store etcd://h1:2379,...`` the
store is an etcd cluster instead, and any machine, rank 0's included, can be lost and replaced: the joins are then
answered by a leader among the live supervisors (:mod:`.coordination`). A new machine that replaces a lost one runs
the same command with ``--join``:

    CHECKFREE_JOB_TOKEN=... python -m deepspeed_checkfree.supervisor --join --rank 2 --world-size 4 \
        --master-addr HOST --master-port PORT [--store etcd://...] launch/train.py --deepspeed_config cfg.json ...
(``--standby`` too: started ahead of a loss or a notice, it takes the rank over the moment it is free.)
"""
from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
import uuid
from typing import List, Optional

from ..core import fault_policy as policy
from ..events import EventLog, identity
from .children import Child, Launcher, cause_of
from .contract import (FENCED_EXIT_CODE, JOIN_REFUSED_EXIT_CODE, LEFT_EXIT_CODE, SIGNALS_KEY, STOPPED_EXIT_CODE,
                       STORE_LOST_EXIT_CODE, STORE_PORT_ENV, STORE_PORT_OFFSET, TrainerDeath, supervisor_pid_file)
from .coordination import (StoreLost, check_job_exists, check_not_a_previous_run, describe_store,
                           is_store_failure, open_store)
from .coordinator import Coordinator
from .etcd_client import StoreError
from .joins import JoinRefused, StandbyEnded, join_job
from .membership import Membership, job_token
from .network import set_gloo_interface
from .signal_watch import SignalWatch
from .stall_watch import supervisor_stall_watch
from .supervisor_drain import Draining
from .supervisor_args import parse_args  # noqa: F401 - (the command line, also this module's name)

logger = logging.getLogger("deepspeed_checkfree.supervisor")

STOP_GRACE_S = 3.0    # a trainer told to end (job stopped, SIGTERM) gets this long before SIGKILL
STOP_LINGER_S = 10.0  # rank 0's supervisor keeps the store up this long for the others to see a stop
STORE_TICK_S = 0.25   # how often the supervisor looks at its children and its share of the job-level work


class Terminated(Exception):
    """The supervisor was told to end (SIGTERM, SIGHUP, SIGINT)."""


class Supervisor(Draining):
    """Keeps one rank's trainer alive. See the module docstring."""

    def __init__(self, args: argparse.Namespace) -> None:
        env = os.environ
        self.args = args
        self.rank = args.rank if args.rank is not None else int(env["RANK"])
        self.world_size = args.world_size if args.world_size is not None else int(env["WORLD_SIZE"])
        local = args.local_rank if args.local_rank is not None else args.launcher_local_rank
        self.local_rank = local if local is not None else int(env.get("LOCAL_RANK", "0"))
        self.master_addr = args.master_addr or env["MASTER_ADDR"]
        self.master_port = args.master_port or int(env["MASTER_PORT"])
        self.store_port = args.store_port or int(env.get(STORE_PORT_ENV, self.master_port + STORE_PORT_OFFSET))
        self.token = job_token()
        self.owner = uuid.uuid4().hex[:16]  # this supervisor's id in its lease (a fenced one is told apart by it)
        self.events = EventLog(args.events_file)
        self.store_url: Optional[str] = args.store
        self.server = None
        self.active: Optional[Child] = None
        self.spare: Optional[Child] = None
        self.spare_deaths = 0      # in a row, since the last activation
        self.keep_spare = not args.no_spare
        self.seen_fresh_start = 0  # the fresh-start epoch this rank's trainer belongs to
        self.incarnation = 0
        self._lost_seen = 0  # the "lost" signals passed on to the coordinator
        self.launcher = Launcher(args.script, list(args.script_args), dict(
            rank=self.rank, world_size=self.world_size, local_rank=self.local_rank, master_addr=self.master_addr,
            master_port=self.master_port, store_port=self.store_port, supervisor_pid=os.getpid(),
            supervisor_id=self.owner, drain_timeout_s=args.drain_timeout,
            store_url=self.store_url), self.rank, args.pid_dir)

    def _prefix(self) -> str:
        return identity(rank=self.rank)

    def join_command(self, rank: int) -> str:
        """The command a user runs on a new machine to take over ``rank`` (for the log lines)."""
        words = ["python", "-m", "deepspeed_checkfree.supervisor", "--join", "--rank", str(rank), "--world-size",
                 str(self.world_size), "--master-addr", self.master_addr, "--master-port", str(self.master_port)]
        if self.store_url:
            words += ["--store", self.store_url]
        return (f"CHECKFREE_JOB_TOKEN=<the job's token> {shlex.join(words + [self.args.script])} "
                f"{shlex.join(self.args.script_args)}").rstrip()

    def connect(self) -> None:
        # Without an external store, rank 0's supervisor hosts the embedded one: it outlives its trainers, so the
        # store (and every survivor's rendezvous) does too.
        hosted = self.rank == 0 and not self.args.join and not self.store_url
        self.store, self.server = open_store(store_url=self.store_url, token=self.token, master_addr=self.master_addr,
                                             store_port=self.store_port, timeout_s=self.args.store_timeout,
                                             host=hosted)
        self.membership = Membership(self.store, self.token, self.rank, self.world_size, join_timeout_s=600)
        self.coordinator = Coordinator(self.membership, self.token, owner=self.owner, hosted=hosted,
                                       external=bool(self.store_url), lease_timeout_s=self.args.lease_timeout,
                                       events=self.events, prefix=self._prefix(), join_command=self.join_command)

    def _watch_signals(self) -> None:
        seen = self.store.add(self.membership.key(SIGNALS_KEY), 0)
        self.signals = SignalWatch(Membership(self.store.clone(), self.token, self.rank, self.world_size, 600), seen)

    # ------------------------------------------------------------------------------------------------------
    # Children
    # ------------------------------------------------------------------------------------------------------

    def _activate(self, incarnation: int) -> Child:
        """The trainer of ``incarnation``: the warm spare if it is alive, else a new process; then a new spare."""
        child, spare = None, self.spare
        self.spare = None
        if spare is not None and spare.poll() is None:
            if spare.activate(incarnation):
                child = spare
            else:
                spare.end(grace_s=0)
        if child is None:
            child = self.launcher.start(incarnation)
        self.spare_deaths = 0
        self.launcher.announce_spare(None)
        if self.keep_spare:
            self.spare = self.launcher.start(None)
        return child

    def _announce(self, child: Child, incarnation: int) -> None:
        self.membership.record_trainer(self.rank, incarnation, child.pid)
        self.launcher.announce_active(child.pid)

    def _check_spare(self) -> None:
        if self.spare is None or self.spare.poll() is None:
            return
        rc, pid = self.spare.poll(), self.spare.pid
        self.spare.end(grace_s=0)
        self.spare_deaths += 1
        decision = policy.on_spare_exit(rc, stopped_code=STOPPED_EXIT_CODE, consecutive_deaths=self.spare_deaths)
        self.spare = self.launcher.start(None) if decision.action == policy.SPARE_RESTART else None
        new = f"; new spare pid {self.spare.pid}" if self.spare is not None else ""
        logger.warning("%s warm spare pid %d died (%s): %s%s", self._prefix(), pid, cause_of(rc), decision.reason, new)
        self.events.write("spare_died", rank=self.rank, pid=pid, returncode=rc, action=decision.action,
                          reason=decision.reason, new_spare_pid=self.spare.pid if self.spare is not None else None)
        if self.spare is None:
            self.keep_spare = False
            self.launcher.announce_spare(None)

    # ------------------------------------------------------------------------------------------------------
    # The job's store: lease, leader duties, signals
    # ------------------------------------------------------------------------------------------------------

    def _store_tick(self, now: float) -> None:
        self.stall.turn()
        try:
            self.coordinator.note_lost(self.signals.lost[self._lost_seen:])
            self._lost_seen = len(self.signals.lost)
            self.coordinator.tick(now)  # lease, and the job-level duties if this supervisor has them
        except (RuntimeError, OSError) as err:
            raise StoreLost(str(err)) from err
        if self.signals.error is not None:
            raise StoreLost(str(self.signals.error)) from self.signals.error

    def _fenced(self) -> Optional[dict]:
        return next((s for s in self.signals.lost if s.get("rank") == self.rank and s.get("owner") == self.owner),
                    None)

    def _watch(self) -> str:
        """Watch the active trainer until it exits ("exited"), the job stops ("stopped"), every rank starts over
        ("fresh_start") or this rank was recorded lost while it was cut off ("fenced"); meanwhile keep the spare,
        the lease, the heartbeat and (its leader) the job-level duties."""
        hung_killed = False
        next_tick = 0.0
        while self.active.poll() is None:
            now = time.monotonic()
            silent = self.active.pipe.poll(now)
            if silent is not None and not hung_killed:
                logger.error("%s trainer pid %d is hung: no heartbeat for %.1f s (timeout %.1f s = "
                             "detection_timeout_s). Killing it; it is replaced like a dead one and never rejoins "
                             "with stale state.", self._prefix(), self.active.pid, silent, self.active.pipe.timeout_s)
                self.events.write("trainer_hung", rank=self.rank, pid=self.active.pid, silent_s=round(silent, 3))
                self.active.popen.kill()
                hung_killed = True
            if self.drain_at is not None:
                return "drain"
            self._check_spare()
            if now >= next_tick or len(self.signals.lost) > self._lost_seen:  # (a loss: the leader looks at once)
                next_tick = now + STORE_TICK_S
                self._store_tick(now)
            if self._fenced() is not None:
                return "fenced"
            if self.rank in self.signals.drains and self.drain_at is None:
                self.note_drain("checkfree drain")
            if self.signals.stop:
                self._end_active_for_stop()
                return "stopped"
            if self.signals.fresh_start > self.seen_fresh_start:
                self.seen_fresh_start = self.signals.fresh_start
                try:
                    if not self.membership.has_progress():
                        return "fresh_start"
                except (RuntimeError, OSError) as err:
                    raise StoreLost(str(err)) from err
            time.sleep(0.02)
        return "exited"

    def _end_active_for_stop(self) -> None:
        try:
            self.active.popen.wait(timeout=STOP_GRACE_S)  # it may be stopping by itself, writing its reason
        except subprocess.TimeoutExpired:
            self.active.end(grace_s=0)

    def _stop(self, reason: str, returncode: Optional[int]) -> int:
        """This rank stops with the job: publish the stop (the first one's reason is kept), end the spare, and on
        rank 0 keep the store up until every supervisor has seen it."""
        try:
            stop = self.membership.stop(self.rank, "supervisor", reason)
            self.membership.acknowledge_stop()
        except (RuntimeError, OSError) as err:  # the store went first (rank 0 ended): the stop is known anyway
            stop = {"rank": self.rank, "cause": "supervisor", "reason": f"{reason} (store unreachable: {err})"}
        logger.error("%s the job stopped (rank %s, %s): %s; not restarting it", self._prefix(),
                     stop["rank"], stop["cause"], stop["reason"])
        self.events.write("job_stopped", rank=self.rank, stopped_by=stop["rank"], cause=stop["cause"],
                          reason=stop["reason"], trainer_returncode=returncode)
        if self.spare is not None:
            self.spare.end(grace_s=5)
            self.spare = None
        if self.server is not None:
            # (Only rank 0's supervisor gets here: the store is its own, so these calls cannot fail.)
            deadline = time.monotonic() + STOP_LINGER_S
            while self.membership.stop_acknowledgements() < self.world_size and time.monotonic() < deadline:
                time.sleep(0.05)
        return STOPPED_EXIT_CODE

    def _fence(self, why: str) -> int:
        """This rank was recorded lost while this machine was cut off: end the trainer at once (it must not send
        anything to the job any more) and the spare, and end without touching the job."""
        for child in (self.active, self.spare):
            if child is not None:
                child.end(grace_s=0)
        logger.error("%s this machine was recorded lost by the job while it was cut off (%s): the job went on "
                     "without it, so its trainer is ended and it does not come back as a second copy of rank %d. "
                     "To use this machine again, start it as a replacement: %s", self._prefix(), why, self.rank,
                     self.join_command(self.rank))
        self.events.write("fenced", rank=self.rank, reason=why)
        return FENCED_EXIT_CODE

    # ------------------------------------------------------------------------------------------------------
    # The loop
    # ------------------------------------------------------------------------------------------------------

    def run(self) -> int:
        if not set_gloo_interface(os.environ, master_addr=self.master_addr, store_url=self.store_url, rank=self.rank,
                                  events=self.events, prefix=self._prefix()):
            return STOPPED_EXIT_CODE  # (no trainer could reach the other machines: the fix is logged)
        self.connect()
        if self.args.pid_dir:
            os.makedirs(self.args.pid_dir, exist_ok=True)
            with open(supervisor_pid_file(self.args.pid_dir, self.rank), "w") as f:
                f.write(str(os.getpid()))
            self.launcher.record("supervisor", os.getpid())
        if self.store_url:
            (check_job_exists if self.args.join else check_not_a_previous_run)(self.membership, self.store_url)
        incarnation = 0
        try:
            if self.args.join:
                # The spare warms up (imports, ops) while the leader decides: an admitted join activates it at once.
                self.spare = self.launcher.start(None) if self.keep_spare else None
                incarnation = join_job(self.membership, self.token, self.args.standby)  # (a replacement's)
                logger.warning("%s joined the job as a replacement (incarnation %d)", self._prefix(), incarnation)
            self.coordinator.renew()  # the rank's lease is this supervisor's from now on
            self._watch_signals()
            self.seen_fresh_start = self.membership.fresh_start_epoch()
            self.membership.record_trainer(self.rank, incarnation)
            self.active = self._activate(incarnation)
            self.stall = supervisor_stall_watch(self.args.lease_timeout, self.events, self.rank, self._prefix(),
                                                lambda: self.coordinator.leading)
            try:
                return self._supervise(incarnation)
            except Exception as err:  # noqa: BLE001 - a store failure anywhere in the loop means the same
                if isinstance(err, StoreLost) or not is_store_failure(err):
                    raise
                raise StoreLost(str(err)) from err
        except Terminated as why:
            for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
                signal.signal(sig, signal.SIG_IGN)  # a second signal must not interrupt the cleanup below
            logger.warning("%s told to end (%s): ending the trainer and the spare", self._prefix(), why)
            return 128 + signal.SIGTERM
        except StoreLost as err:
            if self._finished_before_the_store_closed():
                logger.info("%s the job's store closed after this rank's trainer finished: the job is complete",
                            self._prefix())
                return 0
            store = describe_store(self.store_url, self.master_addr, self.store_port)
            if self.store_url:
                why = (f"etcd did not answer for --store-timeout={self.args.store_timeout:g} s, which ends the job. "
                       f"Check the etcd cluster (a majority of its members must run)")
            else:
                why = "rank 0's supervisor or machine is gone, which ends the job (--store etcd://... survives it)"
            logger.error("%s lost %s (%s): %s. Ending this rank's trainer.", self._prefix(), store, err, why)
            self.events.write("store_lost", rank=self.rank, store=store, error=str(err)[:500])
            return STORE_LOST_EXIT_CODE
        finally:
            for child in (self.spare, self.active):
                if child is not None:
                    child.end(grace_s=STOP_GRACE_S)
            self.launcher.announce_spare(None)
            for watch in (getattr(self, "signals", None), getattr(self, "stall", None)):
                if watch is not None:
                    watch.close()

    def _finished_before_the_store_closed(self) -> bool:
        """Whether the active trainer had said it finished and then exits cleanly: rank 0's supervisor closes the
        store as soon as every trainer counts as finished, which may come before this supervisor sees the exit."""
        child = self.active
        if child is None:
            return False
        child.pipe.poll(time.monotonic())
        if not child.pipe.done:
            return False
        try:
            return child.popen.wait(timeout=3 * STOP_GRACE_S) == 0
        except subprocess.TimeoutExpired:
            return False

    def _supervise(self, incarnation: int) -> int:
        restarts = 0
        while True:
            self._announce(self.active, incarnation)
            with self.stall.watching():
                outcome = self._watch()
            if outcome == "fenced":
                lost = self._fenced()
                return self._fence(f"its lease was silent; recorded as {lost.get('cause')} for trainer incarnation "
                                   f"{lost.get('incarnation')}")
            if outcome == "stopped":
                return self._stop("another rank stopped the job", self.active.poll())
            if outcome == "drain":
                return self._drain(incarnation)
            if outcome == "fresh_start":
                incarnation += 1
                # The killed trainer's member entries stop counting before anything else happens.
                self.membership.record_trainer(self.rank, incarnation)
                old = self.active.pid
                self.active.end(grace_s=0)
                self.active = self._activate(incarnation)
                logger.warning("%s no step had completed when a rank was lost: trainer pid %d ended, pid %d starts "
                               "over from initialisation", self._prefix(), old, self.active.pid)
                self.events.write("fresh_start", rank=self.rank, ended_pid=old, replacement_pid=self.active.pid)
                continue
            rc = self.active.poll()
            self.active.pipe.close()
            if rc == 0:
                break  # (without asking the store, which rank 0's supervisor may already have closed)
            try:
                facts = self.membership.exit_facts(self.rank)
            except (RuntimeError, OSError) as err:
                raise StoreLost(str(err)) from err
            generation = facts.pop("generation")
            decision = policy.on_trainer_exit(rc, stopped_code=STOPPED_EXIT_CODE, restarts=restarts,
                                              max_restarts=self.args.max_restarts, fenced_code=FENCED_EXIT_CODE,
                                              left_code=LEFT_EXIT_CODE, **facts)
            if decision.action == policy.FINISH:
                break
            if decision.action == policy.FENCED:
                return self._fence(decision.reason)
            if decision.action == policy.LEFT:
                logger.warning("%s %s: start a replacement on a new machine (it takes the stage over exactly): %s",
                               self._prefix(), decision.reason, self.join_command(self.rank))
                return 0
            if decision.action == policy.STOP_JOB:
                return self._stop(f"rank {self.rank}'s trainer exited ({cause_of(rc)}): {decision.reason}", rc)
            # The dead member stops counting, its death is on record and its generation aborted (every rank's death
            # watch wakes), before anything else happens.
            self.membership.record_loss(self.rank, incarnation, TrainerDeath(time=time.time(), returncode=rc),
                                        generation)
            if decision.action == policy.FRESH_START:
                self.seen_fresh_start = self.membership.request_fresh_start()
            else:
                restarts += 1
            incarnation += 1
            self.active = self._activate(incarnation)
            logger.warning("%s trainer died (%s); replacement pid %d started: %s", self._prefix(), cause_of(rc),
                           self.active.pid, decision.reason)
            self.events.write("trainer_died", rank=self.rank, returncode=rc, incarnation=incarnation - 1,
                              replacement_pid=self.active.pid, action=decision.action)
        if self.server is not None:
            # Keep the store up until every trainer has finished with it (or the job stopped).
            deadline = time.monotonic() + 120
            with self.stall.watching():
                while (self.membership.finished() < self.world_size and self.membership.stopped() is None
                       and time.monotonic() < deadline):
                    self._store_tick(time.monotonic())
                    time.sleep(0.05)
        return 0


_CURRENT: List["Supervisor"] = []  # the supervisor of this process, for the signal handlers


def _terminate(signum, frame) -> None:
    raise Terminated(signal.Signals(signum).name)


def _notice(signum, frame) -> None:
    """SIGTERM or SIGINT: a preemption notice (a drain) once a trainer runs; before that, the end."""
    if _CURRENT and _CURRENT[0].active is not None:
        _CURRENT[0].note_drain(signal.Signals(signum).name)
    else:
        raise Terminated(signal.Signals(signum).name)


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    signal.signal(signal.SIGHUP, _terminate)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _notice)
    try:
        supervisor = Supervisor(args)
        _CURRENT.append(supervisor)
        return supervisor.run()
    except JoinRefused as err:
        logger.error("%s", err)
        return JOIN_REFUSED_EXIT_CODE
    except StandbyEnded as err:
        logger.warning("%s %s", identity(rank=args.rank), err)
        return 0
    except StoreError as err:  # before the loop (connecting, joining): the store named, nothing started yet
        logger.error("%s cannot use the job's store: %s", identity(rank=args.rank), err)
        return STORE_LOST_EXIT_CODE
    except Terminated:
        return 128 + signal.SIGTERM


def run_and_exit(argv: Optional[List[str]] = None) -> None:
    """``main``, then leave without the interpreter's shutdown: a store client's thread may still be blocked in a
    wait that the closing store ends, and such a thread aborts a shutting-down interpreter (see
    :meth:`.DeadlineStore.close`)."""
    code = main(argv)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run_and_exit()
