"""A small GPT-style model as a DeepSpeed ``PipelineModule`` layer list: embedding | N blocks | final norm + head.

Used by the launch scripts, tests and benchmarks; small enough for CPU, built from the same parts a user's model
has, so the recovery code sees real layer types and shapes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch
import torch.nn.functional as F
from torch import nn

from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec

from ..pipe.plus_module import CheckFreePlusPipelineModule, checkfree_plus_module


@dataclass(frozen=True)
class GPTConfig:
    """Model size. The defaults train at ~100 ms/step on 4 CPU ranks."""

    vocab_size: int = 256
    seq_len: int = 64
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 8
    mlp_ratio: int = 4


class Embedding(nn.Module):
    """Token and learned position embeddings."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.seq_len, cfg.d_model)
        nn.init.normal_(self.tok.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        return self.tok(idx) + self.pos(pos)


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention and an MLP, each with a residual connection."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.fc = nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model)
        self.out = nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class Head(nn.Module):
    """Final layer norm and the LM head (de-embedding)."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(cfg.d_model)
        self.lm = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm(self.ln(x))


class TiedEmbedding(Embedding):
    """Embedding whose token matrix is also the LM head (tied input/output embeddings, as in GPT-2); it carries
    the final norm so that the head can run from the same module."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__(cfg)
        self.ln = nn.LayerNorm(cfg.d_model)


def tied_head(module: TiedEmbedding, x: torch.Tensor) -> torch.Tensor:
    """The head of a :class:`TiedEmbedding`: final norm, then the transposed token embedding."""
    return F.linear(module.ln(x), module.tok.weight)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))


def seed_layer(seed) -> None:
    """Seed layer construction (PipelineModule calls this with base_seed + layer index)."""
    torch.manual_seed(int(seed))


def layer_specs(cfg: GPTConfig) -> List[LayerSpec]:
    """The model as a flat layer list: ``[Embedding, Block x n_layers, Head]``."""
    return [LayerSpec(Embedding, cfg), *[LayerSpec(Block, cfg) for _ in range(cfg.n_layers)], LayerSpec(Head, cfg)]


def pipeline_module(cfg: GPTConfig, num_stages: int, **kwargs) -> PipelineModule:
    """The model as a ``PipelineModule`` with equal blocks per stage (what CheckFree's layer matching wants).

    ``seed_layers=True`` seeds each layer by its index, so a layer's initial weights do not depend on the
    partitioning (a single-process reference builds the same model).
    """
    kwargs.setdefault("partition_method", "type:Block")
    kwargs.setdefault("seed_layers", True)
    # DeepSpeed's default seeding passes a numpy integer to random.seed() under 'type:' partitioning.
    kwargs.setdefault("seed_fn", seed_layer)
    return PipelineModule(layers=layer_specs(cfg), num_stages=num_stages, loss_fn=lm_loss, **kwargs)


def plus_pipeline_module(cfg: GPTConfig, num_stages: int, tie_embeddings: bool = False,
                         **kwargs) -> CheckFreePlusPipelineModule:
    """The model for CheckFree+: the same layers, with the embedding replicated on stage 1 and the head on stage
    P-2 (see :func:`deepspeed_checkfree.checkfree_plus_module`). ``tie_embeddings`` makes the head reuse the token
    embedding (one tied module on stages 0, 1, P-2 and P-1)."""
    kwargs.setdefault("seed_layers", True)
    kwargs.setdefault("seed_fn", seed_layer)
    if tie_embeddings:
        embedding = TiedLayerSpec("embed", TiedEmbedding, cfg)
        head = TiedLayerSpec("embed", TiedEmbedding, cfg, forward_fn=tied_head)
    else:
        embedding, head = LayerSpec(Embedding, cfg), LayerSpec(Head, cfg)
    return checkfree_plus_module(embedding, [LayerSpec(Block, cfg) for _ in range(cfg.n_layers)], head, num_stages,
                                 loss_fn=lm_loss, **kwargs)
