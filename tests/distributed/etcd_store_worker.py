"""One rank of the etcd store tests (started by tests/harness/ranks.run_ranks, which sets RANK and WORLD_SIZE):

    python tests/distributed/etcd_store_worker.py counter   URL TOKEN OUT_DIR ADDS
    python tests/distributed/etcd_store_worker.py allreduce URL TOKEN OUT_DIR BACKEND GROUP_PREFIX THROUGH

``counter``: every rank adds 1 to one key ADDS times and races the others with compare_set on another; it saves
what each call returned. ``allreduce``: a process group of BACKEND rendezvouses on the keys under GROUP_PREFIX of
``EtcdStore(URL, TOKEN)``, through a ``PrefixStore`` or the trainer's ``GenerationStore`` (THROUGH:
prefix_store/generation_store), and all-reduces each rank's rank + 1; it saves the sum.
"""
from __future__ import annotations

import json
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from deepspeed_checkfree.resilience.etcd_store import EtcdStore
from deepspeed_checkfree.resilience.generation_store import GenerationStore


def main() -> None:
    mode, url, token, out = sys.argv[1:5]
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = EtcdStore(url, token, timeout=timedelta(seconds=60))
    record = {"rank": rank}
    if mode == "counter":
        adds = int(sys.argv[5])
        # Start the race once every rank is connected, so the adds really run concurrently.
        store.set(f"ready/{rank}", "1")
        store.wait([f"ready/{r}" for r in range(world_size)])
        record["added"] = [store.add("counter", 1) for _ in range(adds)]
        record["compare_set"] = store.compare_set("winner", "", f"rank{rank}").decode()
    elif mode == "allreduce":
        backend, group_prefix, through = sys.argv[5:8]
        if through == "generation_store":
            group_store = GenerationStore(store, lambda: None, 0, timedelta(seconds=60), prefix=group_prefix)
        else:
            group_store = dist.PrefixStore(group_prefix, store)
        dist.init_process_group(backend, store=group_store, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=60))
        t = torch.tensor([float(rank + 1)])
        dist.all_reduce(t)
        dist.barrier()
        record["sum"] = t.item()
        dist.destroy_process_group()
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    Path(out, f"rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
