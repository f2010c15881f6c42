"""A training script written the way a DeepSpeed user writes one, not the project's launch/train.py: its own tiny
LLaMA-style PipelineModule on synthetic data, ``deepspeed.init_distributed()``, ``deepspeed.initialize``, and a plain
loop of ``engine.train_batch``. The only CheckFree lines are ``import deepspeed_checkfree`` and the config section.

    deepspeed --num_gpus 4 --module deepspeed_checkfree.supervisor tests/e2e/user_script.py \
        --deepspeed_config ds.json --steps 20 --out OUT [--loop range|global_steps] [--data generator|dataloader]

Each rank writes OUT/rank<R>.json at the end: its final step count and the losses it saw (NaN while a replacement
catches up). Variants that a supervisor must refuse at start-up: ``--shape fixed_port`` (its own rendezvous) and
``--shape no_pipeline`` (a DeepSpeedEngine driven with backward/step).
"""
from __future__ import annotations

import argparse
import json
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

import deepspeed
import deepspeed_checkfree  # noqa: F401 (registers the CheckFree engine)
from deepspeed.pipe import LayerSpec, PipelineModule

VOCAB, SEQ, WIDTH, HEADS = 64, 16, 32, 2


class RMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * self.weight


class Embed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, WIDTH)

    def forward(self, tokens):
        return self.tok(tokens)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(WIDTH), RMSNorm(WIDTH)
        self.qkv, self.proj = nn.Linear(WIDTH, 3 * WIDTH, bias=False), nn.Linear(WIDTH, WIDTH, bias=False)
        self.gate, self.up = nn.Linear(WIDTH, 2 * WIDTH, bias=False), nn.Linear(WIDTH, 2 * WIDTH, bias=False)
        self.down = nn.Linear(2 * WIDTH, WIDTH, bias=False)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, HEADS, d // HEADS).unbind(2)
        att = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        h = self.norm2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm, self.out = RMSNorm(WIDTH), nn.Linear(WIDTH, VOCAB, bias=False)

    def forward(self, x):
        return self.out(self.norm(x))


def loss_fn(logits, labels):
    return F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1))


def batches(seed: int):
    """Synthetic next-token data, the same on every run: each item is (tokens, labels) of one micro-batch."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        tokens = torch.randint(0, VOCAB, (2, SEQ + 1), generator=gen)
        yield tokens[:, :-1], tokens[:, 1:]


class Synthetic(torch.utils.data.Dataset):
    def __len__(self):
        return 100_000

    def __getitem__(self, i):
        tokens = torch.randint(0, VOCAB, (SEQ + 1,), generator=torch.Generator().manual_seed(i))
        return tokens[:-1], tokens[1:]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--stages", type=int, default=4)
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--out", required=True)
    p.add_argument("--loop", choices=["range", "global_steps"], default="range")
    p.add_argument("--data", choices=["generator", "dataloader"], default="generator")
    p.add_argument("--shape", choices=["plain", "fixed_port", "no_pipeline"], default="plain")
    p.add_argument("--local_rank", type=int, default=0)
    deepspeed.add_config_arguments(p)
    args = p.parse_args()
    with open(args.deepspeed_config) as f:
        ds_config = json.load(f)
    torch.manual_seed(1234)
    if args.shape == "fixed_port":
        deepspeed.init_distributed(distributed_port=29777)
    else:
        deepspeed.init_distributed()
    plus = ds_config.get("checkfree", {}).get("mode") == "checkfree_plus"
    if args.shape == "no_pipeline":
        model = nn.Sequential(Embed(), Block(), Head())
    elif plus:
        model = deepspeed_checkfree.checkfree_plus_module(
            LayerSpec(Embed), [LayerSpec(Block) for _ in range(args.blocks)], LayerSpec(Head),
            num_stages=args.stages, loss_fn=loss_fn)
    else:
        model = PipelineModule(layers=[LayerSpec(Embed), *[LayerSpec(Block) for _ in range(args.blocks)],
                                       LayerSpec(Head)], num_stages=args.stages, loss_fn=loss_fn,
                               partition_method="type:Block")
    engine, _, _, _ = deepspeed.initialize(model=model, config=ds_config,
                                           model_parameters=[p for p in model.parameters() if p.requires_grad])
    if args.data == "dataloader":
        loader = torch.utils.data.DataLoader(Synthetic(), batch_size=engine.train_micro_batch_size_per_gpu(),
                                             shuffle=True, generator=torch.Generator().manual_seed(7))
        data = iter(deepspeed.utils.RepeatingLoader(loader))
    else:
        data = batches(seed=7)
    rank = int(os.environ.get("RANK", 0))
    losses = []

    def log(step: int, loss: float) -> None:
        losses.append(loss)
        if rank == 0:
            print(f"step {step} loss {loss:.4f}", flush=True)

    if args.loop == "range":
        for step in range(args.steps):
            log(step, float(engine.train_batch(data)))
    else:
        while engine.global_steps < args.steps:
            step = engine.global_steps
            log(step, float(engine.train_batch(data)))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump({"global_steps": engine.global_steps, "losses": [None if math.isnan(x) else x for x in losses],
                   "stage": engine.stage_id}, f)


if __name__ == "__main__":
    main()
