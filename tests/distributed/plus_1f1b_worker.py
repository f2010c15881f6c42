"""One rank of the CheckFree+ 1F1B scenarios: real DeepSpeed engines (one per scenario, sharing the process group)
with several micro-batch counts, an additional loss, DeepSpeed's activation checkpointing and the first pair's
recomputation; records losses, weights, what the schedule held and how often each block ran its forward.

Run by tests/distributed/test_plus_1f1b.py through tests/harness/ranks.run_scenarios; arguments: OUT_DIR
SCENARIOS_JSON.
"""
from __future__ import annotations

import gc
import json
import os
import sys
from collections import OrderedDict
from pathlib import Path

import torch
from deepspeed import ops as ds_ops

# The CPU-only shm all-reduce op would be JIT-compiled (~100 s) at init; training never uses it.
ds_ops.__compatible_ops__["deepspeed_shm_comm"] = False

import deepspeed  # noqa: E402
from deepspeed.pipe import LayerSpec  # noqa: E402
from deepspeed.runtime.pipe import schedule as ds_schedule  # noqa: E402

import deepspeed_checkfree  # noqa: E402,F401  (registers the engine)
from deepspeed_checkfree.models import gpt  # noqa: E402
from deepspeed_checkfree.models.corpus import StepBatches, load_corpus  # noqa: E402
from deepspeed_checkfree.pipe.engine import CheckFreeEngine  # noqa: E402

from tests.harness.scenarios import MICRO_BATCH, MODEL, ds_config  # noqa: E402

AUX = {}  # the last micro-batch's additional loss on this rank (the head runs where the stage is last)


class AuxHead(gpt.Head):
    """The head, also reporting the mean squared logit of each micro-batch as an additional loss."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = super().forward(x)
        AUX["logit_sq"] = logits.detach().float().pow(2).mean()
        return logits


# Activations held by this rank (forwards run minus backwards run), through the engine's own dispatch table.
HELD = {"now": 0, "peak": 0}
_forward = CheckFreeEngine._INSTRUCTION_MAP[ds_schedule.ForwardPass]
_backward = CheckFreeEngine._INSTRUCTION_MAP[ds_schedule.BackwardPass]


def _counted_forward(self, buffer_id):
    _forward(self, buffer_id)
    HELD["now"] += 1
    HELD["peak"] = max(HELD["peak"], HELD["now"])


def _counted_backward(self, buffer_id):
    _backward(self, buffer_id)
    HELD["now"] -= 1


CheckFreeEngine._INSTRUCTION_MAP[ds_schedule.ForwardPass] = _counted_forward
CheckFreeEngine._INSTRUCTION_MAP[ds_schedule.BackwardPass] = _counted_backward


class BlockForwards:
    """Counts the forwards of this stage's transformer blocks (a recomputation runs them again)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.blocks = [m for m in module.modules() if isinstance(m, gpt.Block)]
        self.calls = 0
        for block in self.blocks:
            block.register_forward_hook(self._count)

    def _count(self, *_) -> None:
        self.calls += 1

    def per_block(self) -> float:
        return self.calls / len(self.blocks)


def build_model(sc: dict):
    stages = sc["num_stages"]
    # DeepSpeed's activation checkpointing, as a user turns it on: every ac_interval layers are one segment.
    kwargs = {"activation_checkpoint_interval": sc["ac_interval"]} if sc.get("ac_interval") else {}
    if not sc.get("aux"):
        return gpt.plus_pipeline_module(MODEL, num_stages=stages, **kwargs)
    model = deepspeed_checkfree.checkfree_plus_module(
        LayerSpec(gpt.Embedding, MODEL), [LayerSpec(gpt.Block, MODEL) for _ in range(MODEL.n_layers)],
        LayerSpec(AuxHead, MODEL), stages, loss_fn=gpt.lm_loss, seed_layers=True, seed_fn=gpt.seed_layer,
        **kwargs)
    rank = int(os.environ["RANK"])

    def additional_losses():
        if sc["aux"] == "mismatch" and rank == 0:
            return None  # a model whose stages disagree on the additional losses
        return OrderedDict(logit_sq=AUX.get("logit_sq", torch.zeros(())))

    model.get_additional_losses = additional_losses
    return model


def run(sc: dict, tokens, out: Path, rank: int) -> None:
    torch.manual_seed(0)
    model = build_model(sc)
    # Constant LR and no clipping, so the single-process reference is plain AdamW.
    config = ds_config({**sc, "clip": 0.0, "constant_lr": True})
    if sc.get("use_reentrant") is not None:
        config["pipeline"] = {"use_reentrant": sc["use_reentrant"]}
    engine, _, _, _ = deepspeed.initialize(model=model, config=config,
                                           model_parameters=[p for p in model.parameters() if p.requires_grad])
    record = {"stage": engine.stage_id, "losses": [], "additional": [], "held_peak": [], "block_forwards": [],
              "recomputed": sorted(engine.recomputed_micro_batches()),
              "checkpoint_func": engine.module.activation_checkpoint_func.__name__,
              "initial_params": {n: p.detach().clone() for n, p in engine.module.named_parameters()}}
    forwards = BlockForwards(engine.module)
    batches = StepBatches(tokens, seq_len=MODEL.seq_len, micro_batch_size=MICRO_BATCH,
                          micro_batches=engine.micro_batches)
    for step in range(sc["steps"]):
        HELD["peak"] = 0
        forwards.calls = 0
        try:
            loss = engine.train_batch(batches.iterator(step))
        except Exception as err:  # the mismatch scenario expects a clear error on every rank
            if "expect_error" not in sc:
                raise
            record.update(error=type(err).__name__, message=str(err))
            break
        record["losses"].append(float(loss))
        record["held_peak"].append(HELD["peak"])
        record["block_forwards"].append(forwards.per_block())
        extra = engine.agg_additional_losses
        record["additional"].append(None if extra is None else {k: float(v) for k, v in extra.items()})
    record["buffers"] = len(engine.pipe_buffers["outputs"])
    record["final_params"] = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    torch.save(record, out / f"{sc['name']}-rank{rank}.pt")
    del engine, model
    gc.collect()


def main() -> None:
    out, scenarios = Path(sys.argv[1]), json.loads(sys.argv[2])
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    rank = int(os.environ["RANK"])
    tokens = load_corpus()
    for sc in scenarios:
        run(sc, tokens, out, rank)


if __name__ == "__main__":
    main()
