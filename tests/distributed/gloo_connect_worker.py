"""Worker of tests/distributed/test_gloo_connect.py: two gloo ranks form groups under
``ds_internals.bound_gloo_connect`` with a 60 s group timeout.

- ``dead_peer``: rank 1 exits right after it published its address (as a replacement that dies in the rendezvous
  does), and rank 0 reports how long it took to learn: its ``init_process_group`` fails, or, where its connect
  reached rank 1 before the exit, the group's first all-reduce does. gloo would wait 5 x 60 s for the
  peer to connect in if rank 0 is the pair's passive side, 60 s if it is the active one.
- ``living``: both ranks form the world group and a subgroup and all-reduce on each, rank 1 arriving later than
  the pair timeout: the groups' own timeout applies to their collectives.
"""
from __future__ import annotations

import json
import os
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from deepspeed_checkfree.pipe import ds_internals
from deepspeed_checkfree.resilience.generation_store import GenerationStore

RANK, WORLD = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
GROUP_TIMEOUT = timedelta(seconds=60)
PAIR_TIMEOUT = timedelta(seconds=0.5)


def main(scenario: str) -> None:
    store = dist.TCPStore("127.0.0.1", int(os.environ["MASTER_PORT"]) + 1, WORLD, RANK == 0,
                          timeout=timedelta(seconds=60))
    ds_internals.bound_gloo_connect(PAIR_TIMEOUT)
    # The resilience's generation store (its waits keep the 60 s whatever gloo passes); its publish hook ends rank 1
    # right after its address is out, once rank 0 waits in the connect.
    exit_now = None
    if scenario == "dead_peer" and RANK == 1:
        store.wait(["rank0-forming"])

        def exit_now():
            sys.stdout.flush()
            os._exit(0)
    store = GenerationStore(store, lambda: None, 0, GROUP_TIMEOUT, prefix=scenario, on_published=exit_now)
    if scenario == "dead_peer":
        if RANK == 0:
            store.inner.set("rank0-forming", b"1")
        started = time.monotonic()
        failed_in = None
        try:
            dist.init_process_group("gloo", store=store, rank=RANK, world_size=WORLD, timeout=GROUP_TIMEOUT)
            # Rank 1 may still have been alive when this side's connect reached it (the kernel accepts into the
            # listener's backlog): then the group forms, and its first collective meets the closed socket.
            failed_in = "all_reduce"
            dist.all_reduce(torch.ones(1))
            error = None
        except RuntimeError as err:
            failed_in = failed_in or "init_process_group"
            error = str(err).splitlines()[0]
        print("RESULT " + json.dumps({"rank": RANK, "failed_after_s": time.monotonic() - started,
                                      "failed_in": failed_in, "error": error}), flush=True)
        return
    dist.init_process_group("gloo", store=store, rank=RANK, world_size=WORLD, timeout=GROUP_TIMEOUT)
    sub = dist.new_group(ranks=[0, 1])
    total = torch.ones(1)
    # Rank 1 comes late to each collective, by 4x the pair timeout: each group's own 60 s timeout applies.
    for group in (None, sub):
        if RANK == 1:
            time.sleep(4 * PAIR_TIMEOUT.total_seconds())
        dist.all_reduce(total, group=group)
    print("RESULT " + json.dumps({"rank": RANK, "sum": total.item()}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
