"""Worker of tests/distributed/test_state_broadcast.py: rank 0 holds a trained Adam state and sends it with
``exchange.broadcast_state``; rank 1 receives it; rank 2 takes part with its own (different) state untouched."""
from __future__ import annotations

import json
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from deepspeed_checkfree.pipe.exchange import broadcast_state

RANK, WORLD = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def trained(seed: int) -> torch.optim.Optimizer:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(1024, 2048), torch.nn.Linear(2048, 8))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(2):
        model(torch.randn(4, 1024)).sum().backward()
        opt.step()
    return opt


def main() -> None:
    dist.init_process_group("gloo", rank=RANK, world_size=WORLD, timeout=timedelta(seconds=60))
    mine = trained(seed=RANK)
    before = {k: v.clone() for k, v in mine.state_dict()["state"][0].items()}
    state, moved = broadcast_state(mine.state_dict() if RANK == 0 else None, 0, None, receive=RANK == 1,
                                   device=torch.device("cpu"))
    out = {"rank": RANK, "moved": moved, "state": None if state is None else "received"}
    source = trained(seed=0).state_dict()  # what rank 0 holds (same seed, same steps)
    if RANK == 1:
        out["equal_to_source"] = all(torch.equal(state["state"][i][k], source["state"][i][k])
                                     for i in source["state"] for k in source["state"][i])
        out["steps_equal"] = all(float(state["state"][i]["step"]) == 2.0 for i in state["state"])
    if RANK == 2:
        now = mine.state_dict()["state"][0]
        out["unchanged"] = all(torch.equal(now[k], before[k]) for k in before)
    print("RESULT " + json.dumps(out), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
