"""One rank of the DeepSpeed checkpoint-repair scenarios: train a real CheckFree DeepSpeed pipeline engine on CPU/gloo,
save it with ``engine.save_checkpoint``, lose one stage's files, repair offline (rank 0), load the repaired checkpoint
into a fresh engine with DeepSpeed's own ``load_checkpoint``, check the weights and train on.

Run by tests/megatron/test_deepspeed_checkpoint_repair.py; argument: a JSON spec {"out": DIR, "scenarios": [{"name",
"model": "plain"|"plus", "lost", "record": bool}]}.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys

import torch
import torch.distributed as dist
from deepspeed import ops as ds_ops

# The CPU-only shm all-reduce op would be JIT-compiled (~100 s) at init; training never uses it.
ds_ops.__compatible_ops__["deepspeed_shm_comm"] = False

import deepspeed  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import deepspeed_checkfree  # noqa: E402,F401  (registers the engine)
from deepspeed_checkfree.models import gpt  # noqa: E402
from deepspeed_checkfree.models.corpus import StepBatches, load_corpus  # noqa: E402
from deepspeed_checkfree.repair import repair_checkpoint  # noqa: E402
from deepspeed_checkfree.repair.ds_pipeline import checkpoint_client_state  # noqa: E402

MODEL = gpt.GPTConfig(vocab_size=256, seq_len=32, d_model=32, n_heads=4, n_layers=8)
STEPS = 3
EPS = 1e-4


def build(kind: str):
    torch.manual_seed(0)
    model = gpt.plus_pipeline_module(MODEL, 4) if kind == "plus" else gpt.pipeline_module(MODEL, 4)
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4, "steps_per_print": 10**9,
           "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.01, "torch_adam": True}},
           "checkfree": {"enabled": True, "mode": "checkfree_plus" if kind == "plus" else "checkfree"}}
    engine, *_ = deepspeed.initialize(model=model, config=cfg,
                                      model_parameters=[p for p in model.parameters() if p.requires_grad])
    return engine


def main() -> None:
    spec = json.loads(sys.argv[1])
    out = spec["out"]
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    tokens = load_corpus()
    for sc in spec["scenarios"]:
        engine = build(sc["model"])
        stage, lost = engine.stage_id, sc["lost"]
        batches = StepBatches(tokens, seq_len=MODEL.seq_len, micro_batch_size=2, micro_batches=engine.micro_batches)
        for step in range(STEPS):
            engine.train_batch(batches.iterator(step))
        ckpt = os.path.join(out, f"{sc['name']}-ckpt")
        client = checkpoint_client_state(engine) if sc["record"] else {}
        engine.save_checkpoint(ckpt, tag="t3", client_state=client)
        saved = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
        info = {"norm": engine.stage_grad_norm, "layers": [engine.module._local_start, engine.module._local_stop]}
        gathered = [None] * engine.num_stages
        dist.all_gather_object(gathered, (info, saved))
        repaired = ckpt + "-repaired"
        report = None
        if rank == 0:
            tag_dir = os.path.join(ckpt, "t3")
            start, stop = gathered[lost][0]["layers"]
            # The lost node's files: its mp_rank file and its layer files.
            os.remove(os.path.join(tag_dir, f"mp_rank_{lost:02d}_model_states.pt"))
            for i in range(start, stop):
                p = os.path.join(tag_dir, f"layer_{i:02d}-model_states.pt")
                if os.path.exists(p):
                    os.remove(p)
            report = repair_checkpoint(ckpt, output=repaired).to_json()
        dist.barrier()
        del engine
        fresh = build(sc["model"])
        fresh.load_checkpoint(repaired, tag="t3")
        now = {n: p.detach().clone() for n, p in fresh.module.named_parameters()}
        result = {"name": sc["name"], "stage": stage, "lost": lost, "norms": [g[0]["norm"] for g in gathered],
                  "global_steps": fresh.global_steps}
        if stage == lost:
            # Expected rebuild, computed here from the neighbours' pre-failure parameters: the k-th block of the lost
            # stage from the k-th block of each source (tied copies by name), weighted by the recorded norms.
            sources = [lost - 1, lost + 1] if 0 < lost < fresh.num_stages - 1 and sc["model"] == "plain" else \
                [1 if lost == 0 else fresh.num_stages - 2]
            norms = [gathered[s][0]["norm"] + EPS for s in sources]
            w = [n / sum(norms) for n in norms] if sc["record"] else [1.0 / len(sources)] * len(sources)
            expected = {}
            for name in now:
                if name.startswith("tied_modules."):
                    expected[name] = gathered[sources[0]][1][name]
                    continue
                idx, _, rest = name.partition(".")
                vals = []
                for s in sources:
                    src_params = gathered[s][1]
                    vals.append(src_params[f"{matching_block(src_params, now, int(idx), rest)}.{rest}"])
                acc = vals[0].float() * w[0]
                for v, x in zip(vals[1:], w[1:]):
                    acc = acc + v.float() * x
                expected[name] = acc
            result["weights"] = w
            result["max_diff_rebuilt"] = max(float((now[n] - expected[n]).abs().max()) for n in now)
            result["optimizer_state_entries"] = len(fresh.basic_optimizer.state_dict()["state"])
        else:
            result["max_diff_others"] = max(float((now[n] - saved[n]).abs().max()) for n in saved)
        losses = [float(fresh.train_batch(batches.iterator(STEPS + i))) for i in range(2)]
        result["losses_after"] = losses
        result["finite"] = all(math.isfinite(x) for x in losses)
        if report is not None:
            result["report"] = report
        with open(os.path.join(out, f"{sc['name']}-rank{rank}.json"), "w") as f:
            json.dump(result, f, default=str)
        del fresh
        dist.barrier()
        if rank == 0:
            shutil.rmtree(ckpt, ignore_errors=True)


def matching_block(src_params: dict, target_params: dict, target_idx: int, rest: str) -> int:
    """The source block at the same position among blocks holding ``rest`` as ``target_idx`` among the target's."""
    def blocks(params):
        return sorted({int(n.split(".", 1)[0]) for n in params
                       if not n.startswith("tied_") and n.split(".", 1)[1] == rest})
    tgt, src = blocks(target_params), blocks(src_params)
    return src[tgt.index(target_idx)]


if __name__ == "__main__":
    main()
