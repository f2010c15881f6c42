"""The per-rank supervisor: what the launcher starts instead of the training script.

    deepspeed --num_gpus 4 -m deepspeed_checkfree.supervisor launch/train.py --deepspeed_config cfg.json ...
    torchrun --nproc_per_node 4 -m deepspeed_checkfree.supervisor launch/train.py ...

It starts the training script as a child and, when the child dies, starts a replacement that rebuilds its stage
from the neighbours, so the launcher never sees a failure. Rank 0's supervisor also hosts the job's persistent
store (bound to the master address only) and admits machines that join with the job token. A new machine that
replaces a lost one runs the same command with ``--join``:

    CHECKFREE_JOB_TOKEN=... python -m deepspeed_checkfree.supervisor --join --rank 2 --world-size 4 \
        --master-addr HOST --master-port PORT launch/train.py --deepspeed_config cfg.json ...
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from typing import List, Optional

from ..events import EventLog, identity
from .contract import (JOIN_REFUSED_EXIT_CODE, PID_DIR_ENV, STOPPED_EXIT_CODE, STORE_PORT_ENV, STORE_PORT_OFFSET,
                       SUPERVISOR_EVENTS_ENV, TrainerDeath, activation_line, pid_file, trainer_env)
from .membership import (JoinRefused, Membership, connect_store, host_store, job_token, request_join,
                         review_join_requests)

logger = logging.getLogger("deepspeed_checkfree.supervisor")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m deepspeed_checkfree.supervisor", description=__doc__.split("\n")[0])
    p.add_argument("--join", action="store_true", help="this is a new machine taking over --rank of a running job")
    p.add_argument("--rank", type=int, default=None, help="global rank (default: $RANK, set by the launcher)")
    p.add_argument("--world-size", type=int, default=None, help="default: $WORLD_SIZE")
    p.add_argument("--local-rank", type=int, default=None, help="default: $LOCAL_RANK or 0")
    p.add_argument("--master-addr", default=None, help="default: $MASTER_ADDR")
    p.add_argument("--master-port", type=int, default=None, help="default: $MASTER_PORT")
    p.add_argument("--store-port", type=int, default=None,
                   help=f"the job's store port (default: ${STORE_PORT_ENV} or master port + {STORE_PORT_OFFSET})")
    p.add_argument("--max-restarts", type=int, default=100, help="replacements to start before giving up")
    p.add_argument("--no-spare", action="store_true",
                   help="do not keep a warm spare trainer (saves its memory; a replacement then pays the start-up)")
    p.add_argument("--pid-dir", default=os.environ.get(PID_DIR_ENV),
                   help="write the active trainer's pid to PID_DIR/rank<R>.pid (for demos and tests that kill it)")
    p.add_argument("--events-file", default=os.environ.get(SUPERVISOR_EVENTS_ENV),
                   help="append supervisor events (trainer deaths, joins) here as JSON lines")
    p.add_argument("--local_rank", dest="launcher_local_rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("script", help="the training script")
    p.add_argument("script_args", nargs=argparse.REMAINDER, help="its arguments")
    return p.parse_args(argv)


class Supervisor:
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
        self.events = EventLog(args.events_file)
        self.server = None
        self.reviewed = 0

    def _prefix(self) -> str:
        return identity(rank=self.rank)

    def connect(self) -> None:
        if self.rank == 0 and not self.args.join:
            # Rank 0's supervisor outlives its trainers, so the store (and every survivor's rendezvous) does too.
            self.store, self.server = host_store(self.master_addr, self.store_port, timeout_s=600)
        else:
            self.store = connect_store(self.master_addr, self.store_port, timeout_s=600)
        self.membership = Membership(self.store, self.token, self.rank, self.world_size, join_timeout_s=600)

    def _review_joins(self) -> None:
        if self.server is None:
            return
        self.reviewed, decided = review_join_requests(self.store, self.token, self.world_size, self.reviewed)
        for req, admitted, reason in decided:
            if admitted:
                logger.warning("%s admitted a new machine (%s, pid %s) for rank %s", self._prefix(),
                               req.get("host"), req.get("pid"), req.get("rank"))
                self.events.write("join_admitted", rank=req.get("rank"), host=req.get("host"))
            else:
                logger.error("%s refused a join for rank %s from %s: %s", self._prefix(), req.get("rank"),
                             req.get("host"), reason)
                self.events.write("join_refused", rank=req.get("rank"), host=req.get("host"), reason=reason)

    def _start(self, incarnation: Optional[int]) -> subprocess.Popen:
        """Start the trainer script: active with ``incarnation``, or as a warm spare (``None``)."""
        cmd = [sys.executable, "-u", self.args.script, *self.args.script_args]
        spare = incarnation is None
        env = dict(os.environ, **trainer_env(
            rank=self.rank, world_size=self.world_size, local_rank=self.local_rank, master_addr=self.master_addr,
            master_port=self.master_port, store_port=self.store_port, incarnation=0 if spare else incarnation,
            spare=spare))
        if spare:
            return subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, text=True)
        return subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL)

    def _activate(self, incarnation: int, spare: Optional[subprocess.Popen]) -> subprocess.Popen:
        if spare is not None and spare.poll() is None:
            spare.stdin.write(activation_line(incarnation))
            spare.stdin.flush()
            spare.stdin.close()
            return spare
        return self._start(incarnation)

    def _announce(self, child: subprocess.Popen, incarnation: int) -> None:
        self.membership.record_trainer(self.rank, incarnation, child.pid)
        if self.args.pid_dir:
            os.makedirs(self.args.pid_dir, exist_ok=True)
            path = pid_file(self.args.pid_dir, self.rank)
            with open(path + ".tmp", "w") as f:
                f.write(str(child.pid))
            os.replace(path + ".tmp", path)

    def run(self) -> int:
        self.connect()
        incarnation = 0
        if self.args.join:
            request_join(self.store, self.token, self.rank, timeout_s=60)
            # The new machine's trainer is a replacement: it continues the rank's incarnations.
            incarnation = (self.membership.incarnation(self.rank) or 0) + 1
            logger.warning("%s joined the job as a replacement (incarnation %d)", self._prefix(), incarnation)
        child = self._start(incarnation)
        spare = None if self.args.no_spare else self._start(None)
        restarts = 0
        try:
            while True:
                self._announce(child, incarnation)
                while child.poll() is None:
                    self._review_joins()
                    if spare is not None and spare.poll() is not None:
                        spare = self._start(None)  # the spare itself died: keep one ready
                    time.sleep(0.02)
                rc = child.returncode
                if rc == 0:
                    break
                if rc == STOPPED_EXIT_CODE:
                    logger.error("%s trainer stopped the job on purpose (see its log); not restarting it",
                                 self._prefix())
                    self.events.write("job_stopped", rank=self.rank, incarnation=incarnation)
                    return rc
                self.membership.record_death(self.rank, incarnation, TrainerDeath(time=time.time(), returncode=rc))
                restarts += 1
                if restarts > self.args.max_restarts:
                    logger.error("%s trainer died (returncode %d); giving up after %d restarts", self._prefix(), rc,
                                 restarts - 1)
                    return rc if rc > 0 else 1
                incarnation += 1
                child = self._activate(incarnation, spare)
                spare = None if self.args.no_spare else self._start(None)
                cause = f"signal {-rc} ({signal.Signals(-rc).name})" if rc < 0 else f"exit code {rc}"
                logger.warning("%s trainer died (%s); replacement pid %d started", self._prefix(), cause, child.pid)
                self.events.write("trainer_died", rank=self.rank, returncode=rc, incarnation=incarnation - 1,
                                  replacement_pid=child.pid)
        finally:
            if spare is not None and spare.poll() is None:
                spare.stdin.close()  # an unneeded spare exits when its stdin closes
                try:
                    spare.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    spare.kill()
        if self.server is not None:
            # Keep the store up until every trainer has finished with it.
            deadline = time.monotonic() + 120
            while self.membership.finished() < self.world_size and time.monotonic() < deadline:
                self._review_joins()
                time.sleep(0.05)
        return 0


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    try:
        return Supervisor(args).run()
    except JoinRefused as err:
        logger.error("%s", err)
        return JOIN_REFUSED_EXIT_CODE


if __name__ == "__main__":
    sys.exit(main())
