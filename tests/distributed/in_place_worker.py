"""Worker of tests/distributed/test_in_place.py: one rank of a job whose world is re-formed in place.

Each scenario trains once uninterrupted (the reference), then again through re-formed worlds: a transient failure
(every rank survives and re-binds), and optionally the replacement of one rank (its engine dropped, rebuilt in the
solo world, re-bound, then its stage rebuilt from the neighbours or restored from its data-parallel replica).
"""
from __future__ import annotations

import dataclasses
import gc
import json
import os
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

import deepspeed_checkfree  # noqa: F401 - registers the CheckFree engine
from deepspeed_checkfree.models import gpt
from deepspeed_checkfree.models.corpus import StepBatches, load_corpus
from deepspeed_checkfree.pipe import ds_internals

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.harness.scenarios import MICRO_BATCH, MODEL, ds_config  # noqa: E402

RANK, WORLD = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


class Job:
    def __init__(self, store: dist.Store, sc: dict, tokens) -> None:
        self.store, self.sc, self.tokens, self.gen = store, sc, tokens, 0

    def form(self) -> None:
        dist.init_process_group("gloo", store=dist.PrefixStore(f"{self.sc['name']}/g{self.gen}", self.store),
                                rank=RANK, world_size=WORLD)
        deepspeed.init_distributed(dist_backend="gloo")
        self.gen += 1

    def build(self):
        torch.manual_seed(0)
        cfg = dataclasses.replace(MODEL, n_layers=self.sc.get("n_layers", MODEL.n_layers))
        model = gpt.pipeline_module(cfg, num_stages=self.sc["num_stages"])
        engine, *_ = deepspeed.initialize(model=model, config=ds_config(self.sc),
                                          model_parameters=[p for p in model.parameters()])
        return engine

    def train(self, engine, steps) -> list:
        batches = StepBatches(self.tokens, seq_len=MODEL.seq_len, micro_batch_size=MICRO_BATCH,
                              micro_batches=engine.micro_batches, dp_rank=engine.grid.data_parallel_id,
                              dp_size=engine.dp_world_size)
        return [float(engine.train_batch(batches.iterator(s))) for s in steps]


def tensor_ptrs(engine) -> list:
    """Where every stage tensor of the engine lives: parameters, optimizer state, fp32 masters."""
    ptrs = [p.data_ptr() for p in engine.module.parameters()]
    for state in engine.basic_optimizer.state.values():
        ptrs += [t.data_ptr() for t in state.values() if torch.is_tensor(t) and t.dim() > 0]
    return ptrs + [t.data_ptr() for t in engine.fp32_master_partitions()]


def params(engine) -> dict:
    return {n: p.detach().clone() for n, p in engine.module.named_parameters()}


def reform(engine) -> None:
    """A failure everybody survived: the failed world goes, a new one forms, the engine re-binds."""
    engine.release_process_groups()
    gc.collect()
    dist.destroy_process_group()


def run(store, sc: dict, tokens, out: Path) -> None:
    job = Job(store, sc, tokens)
    steps, cut, replace_at = sc["steps"], sc["transient_at"], sc.get("replace_at")
    job.form()
    engine = job.build()
    record = {"reference_losses": job.train(engine, range(steps)), "reference_params": params(engine)}
    dist.destroy_process_group()
    del engine
    gc.collect()

    job.form()
    engine = job.build()
    losses = job.train(engine, range(cut))
    before = tensor_ptrs(engine)
    reform(engine)
    job.form()
    engine.rebind()
    record["stale_after_rebind"] = ds_internals.stale_group_references(engine)
    record["tensors_kept"] = tensor_ptrs(engine) == before
    end = replace_at if replace_at is not None else steps
    losses += job.train(engine, range(cut, end))
    if replace_at is not None:
        victim = sc["victim"]
        reform(engine)
        if RANK == victim:
            del engine
            gc.collect()
            ds_internals.form_solo_world(RANK, WORLD)
            deepspeed.init_distributed(dist_backend="gloo")
            engine = job.build()
            dist.destroy_process_group()
        kept = tensor_ptrs(engine)
        job.form()
        engine.rebind()
        stage = ds_internals.stage_of_rank(engine.grid, victim)
        replicas = engine.grid.get_data_parallel_group_ranks()
        payload = [engine.progress().schedule_for_replacement(replace_at) if RANK == 0 else None]
        dist.broadcast_object_list(payload, src=0)
        if RANK == victim:
            engine.load_progress(payload[0])
        if sc.get("restore") == "replica":
            if victim in replicas:
                engine.restore_from_replica(min(r for r in replicas if r != victim), [victim], cause="test")
        else:
            engine.lose_and_rebuild([stage], cause="test")
        record["survivor_tensors_kept"] = RANK == victim or tensor_ptrs(engine) == kept
        losses += job.train(engine, range(replace_at, steps))
        record["recoveries"] = engine.recoveries
    record["losses"], record["final_params"] = losses, params(engine)
    record["stage"] = engine.stage_id
    dist.destroy_process_group()
    torch.save(record, out / f"{sc['name']}-rank{RANK}.pt")


def main() -> None:
    out, scenarios = Path(sys.argv[1]), json.loads(sys.argv[2])
    torch.set_num_threads(1)
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), WORLD, is_master=RANK == 0)
    tokens = load_corpus()
    for sc in scenarios:
        run(store, sc, tokens, out)


if __name__ == "__main__":
    main()
