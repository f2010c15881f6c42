"""The supervisor's command line: ``python -m deepspeed_checkfree.supervisor [options] SCRIPT ARGS``."""
from __future__ import annotations

import argparse
import os
from typing import List, Optional

from ..errors import ConfigError
from .contract import (DRAIN_TIMEOUT_S, LEASE_TIMEOUT_S, PID_DIR_ENV, STORE_PORT_ENV, STORE_PORT_OFFSET, STORE_URL_ENV,
                       SUPERVISOR_EVENTS_ENV)
from .coordination import choose_store

DESCRIPTION = ("The per-rank supervisor: what the launcher starts instead of the training script; it keeps the rank's "
               "trainer alive across process and machine loss.")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m deepspeed_checkfree.supervisor", description=DESCRIPTION)
    p.add_argument("--join", action="store_true", help="this is a new machine taking over --rank of a running job")
    p.add_argument("--standby", action="store_true",
                   help="with --join: start before --rank needs a replacement, and take it over the moment it does "
                        "(its machine lost, or leaving on a preemption notice), the trainer warmed up meanwhile; "
                        "ends with the job if it never does")
    p.add_argument("--rank", type=int, default=None, help="global rank (default: $RANK, set by the launcher)")
    p.add_argument("--world-size", type=int, default=None, help="default: $WORLD_SIZE")
    p.add_argument("--local-rank", type=int, default=None, help="default: $LOCAL_RANK or 0")
    p.add_argument("--master-addr", default=None, help="default: $MASTER_ADDR")
    p.add_argument("--master-port", type=int, default=None, help="default: $MASTER_PORT")
    p.add_argument("--store-port", type=int, default=None,
                   help=f"the job's store port (default: ${STORE_PORT_ENV} or master port + {STORE_PORT_OFFSET})")
    p.add_argument("--store", default=os.environ.get(STORE_URL_ENV) or None, metavar="URL",
                   help=f"keep the job's coordination state in etcd: etcd://host:port[,host:port...] (etcds:// for "
                        f"TLS), the same on every machine (default: ${STORE_URL_ENV}; unset: the embedded store "
                        f"hosted by rank 0's supervisor, which does not survive the loss of rank 0's machine)")
    p.add_argument("--store-timeout", type=float, default=600.0, metavar="S",
                   help="the job's store may not answer a request for this long before this rank stops (exit code "
                        "80): also when the store's machine vanished without closing its connections")
    p.add_argument("--max-restarts", type=int, default=100, help="replacements to start before giving up")
    p.add_argument("--no-spare", action="store_true",
                   help="do not keep a warm spare trainer (saves its memory; a replacement then pays the start-up)")
    p.add_argument("--lease-timeout", type=float, default=LEASE_TIMEOUT_S, metavar="S",
                   help="a supervisor whose lease (renewed every second) has been silent this long is recorded lost "
                        "by the leader: its generation is aborted and a join for its rank is admitted")
    p.add_argument("--drain-timeout", type=float, default=DRAIN_TIMEOUT_S, metavar="S",
                   help="on SIGTERM or SIGINT (a preemption notice: systemd, Kubernetes, the launcher passing it "
                        "on) or `checkfree drain`, this rank's trainer finishes its step and hands its stage over "
                        "to the machine that replaces it, or parks it on a neighbour, within S seconds of the "
                        "signal; a second signal does not cut it short, SIGKILL does. Missed: a machine loss")
    p.add_argument("--pid-dir", default=os.environ.get(PID_DIR_ENV),
                   help=f"write pid files to this folder (default: ${PID_DIR_ENV}): rank<R>.pid holds the pid of rank "
                        f"R's active trainer (the process to kill -9 to try a recovery; a replacement takes it "
                        f"over), rank<R>.spare.pid its warm spare's, supervisor<R>.pid this supervisor's, and "
                        f"rank<R>.started one 'ROLE PID' line per process it started")
    p.add_argument("--events-file", default=os.environ.get(SUPERVISOR_EVENTS_ENV),
                   help="append supervisor events (trainer deaths, hangs, spares, joins, stops) here as JSON lines")
    p.add_argument("--local_rank", dest="launcher_local_rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("script", help="the training script")
    p.add_argument("script_args", nargs=argparse.REMAINDER, help="its arguments")
    args = p.parse_args(argv)
    if args.standby and not args.join:
        p.error("--standby stands by to join: it needs --join (and --rank, the rank to take over)")
    try:
        args.store = choose_store(args.store, args.script_args)  # (also checkfree.store of --deepspeed_config)
    except ConfigError as err:
        p.error(f"--store: {err}")
    return args
