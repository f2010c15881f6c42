"""``checkfree drain --rank N``: a planned removal. Rank N's supervisor drains as on a preemption notice: its trainer
finishes its step and hands its stage over to the machine that replaces it (or parks it on a neighbour), then the
rank's processes end. Run it anywhere that reaches the job's store, with the job's token."""
from __future__ import annotations

import argparse
import json
import time

from .contract import STORE_PORT_OFFSET, STORE_URL_ENV, TOKEN_ENV, lost_fact


def add_subcommand(sub) -> None:
    p = sub.add_parser("drain", help="take a rank's machine out of a running job, handing its stage over exactly",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--rank", type=int, required=True, help="the rank to take out")
    p.add_argument("--store", default=None, metavar="URL",
                   help=f"the job's etcd store (etcd://host:port,...; default: ${STORE_URL_ENV}); without it, the "
                        f"embedded store at --master-addr/--master-port")
    p.add_argument("--master-addr", default=None, help="rank 0's host (the embedded store's)")
    p.add_argument("--master-port", type=int, default=None, help="the job's master port")
    p.add_argument("--store-port", type=int, default=None,
                   help=f"the embedded store's port (default: master port + {STORE_PORT_OFFSET})")
    p.add_argument("--wait", type=float, default=0.0, metavar="S",
                   help="wait up to S seconds for the rank to have left, and say what became of its stage")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import os

    from .coordination import open_store
    from .membership import Membership, job_token

    url = args.store or os.environ.get(STORE_URL_ENV)
    if not url and (args.master_addr is None or args.master_port is None):
        raise SystemExit("checkfree drain: give the job's store: --store etcd://... (or $CHECKFREE_STORE), or "
                         "--master-addr and --master-port of the job (its embedded store)")
    port = args.store_port or ((args.master_port or 0) + STORE_PORT_OFFSET)
    store, _ = open_store(store_url=url, token=job_token(), master_addr=args.master_addr or "", store_port=port,
                          timeout_s=30.0)
    membership = Membership(store, job_token(), args.rank, args.rank + 1, join_timeout_s=30.0)
    if not membership.leases([args.rank])[args.rank].renewals:
        raise SystemExit(f"checkfree drain: no supervisor of rank {args.rank} runs in this job (is {TOKEN_ENV} the "
                         f"job's token, and the store the job's?)")
    index = membership.post_signal("drain", rank=args.rank)
    print(f"asked rank {args.rank}'s supervisor to drain (signal {index}): its trainer hands its stage over at its "
          f"next step boundary; start a replacement with --join --rank {args.rank}", flush=True)
    deadline = time.monotonic() + args.wait
    while time.monotonic() < deadline:
        lost = membership.fact(lost_fact(args.rank))
        if lost and lost.get("cause") == "preemption notice":
            print(f"rank {args.rank} left: {json.dumps(lost)}", flush=True)
            return 0
        time.sleep(0.5)
    return 0
