"""Worker of tests/distributed/test_push_detection.py: three gloo ranks, each blocked on a peer that is alive, and
how long each takes to leave its wait when the generation fails (the group's timeout is 60 s).

- ``death_record``: rank 2 plays its supervisor and records its own trainer's loss, which aborts the generation
  (what a supervisor does when its trainer dies, and the leader when a machine goes silent). Ranks 0 and 1 wait on
  each other; only their death watches, blocked on the generation's abort record, can end the wait.
- ``cascade``: no death record. Rank 0 waits on rank 1, rank 1 on rank 2; rank 2 fails and cuts its connections,
  as a trainer's failure handler does. Rank 1 leaves its wait, cuts its own, and so rank 0 leaves its wait too.
"""
from __future__ import annotations

import json
import os
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from deepspeed_checkfree.resilience.connection_cut import GenerationConnections
from deepspeed_checkfree.resilience.contract import TrainerDeath
from deepspeed_checkfree.resilience.death_watch import DeathWatch
from deepspeed_checkfree.resilience.membership import Membership

RANK, WORLD = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
GROUP_TIMEOUT = timedelta(seconds=60)


def main(scenario: str) -> None:
    port = int(os.environ["MASTER_PORT"]) + 1
    store = dist.TCPStore("127.0.0.1", port, WORLD, RANK == 0, timeout=timedelta(seconds=60))
    membership = Membership(store, "push-token", RANK, WORLD, join_timeout_s=60)
    watcher = Membership(dist.TCPStore("127.0.0.1", port, WORLD, False, timeout=timedelta(seconds=60)),
                         "push-token", RANK, WORLD, join_timeout_s=60)
    membership.record_trainer(RANK, 0)
    connections = GenerationConnections(keep_ports={port})
    dist.init_process_group("gloo", store=dist.PrefixStore(scenario, store), rank=RANK, world_size=WORLD,
                            timeout=GROUP_TIMEOUT)
    watch = DeathWatch(watcher)
    watch.arm(0, connections.cut)
    dist.barrier()
    tensor, left_at = torch.zeros(4), None
    try:
        if scenario == "death_record":
            if RANK == 2:
                time.sleep(1.0)
                store.set("event_time", str(time.time()))
                membership.record_loss(2, 0, TrainerDeath(time.time(), -9), generation=0)  # its supervisor's record
            else:
                dist.recv(tensor, src=1 - RANK)
        elif RANK == 2:
            time.sleep(1.0)
            store.set("event_time", str(time.time()))
            connections.cut()  # rank 2 failed: its handler cuts the generation's connections
        else:
            dist.recv(tensor, src=RANK + 1)
    except RuntimeError as err:
        left_at = time.time()
        connections.cut()  # what the failure handler does next
        print("ERROR " + str(err).splitlines()[0][:200], flush=True)
    watch.close()
    # How long after the event (same machine, same clock) this rank left its wait; measured from the event, not
    # from the barrier, which the ranks leave at slightly different times.
    after = None if left_at is None else left_at - float(store.get("event_time"))
    print("RESULT " + json.dumps({"rank": RANK, "after_event_s": after}), flush=True)
    # Rank 0 hosts the store, so it leaves last: only once every other rank has read everything it needs. (Leaving
    # when all ranks are done raced the store's reply to a rank still waiting: "Connection reset by peer".)
    if RANK == 0:
        store.wait([f"left/{scenario}/{r}" for r in range(1, WORLD)])
    else:
        store.set(f"left/{scenario}/{RANK}", "1")
    os._exit(0)  # (the cut groups would only complain on destruction)


if __name__ == "__main__":
    main(sys.argv[1])
