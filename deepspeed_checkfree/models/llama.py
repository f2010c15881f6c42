"""A LLaMA-style decoder (RMSNorm, rotary positions, SwiGLU) as three layer types: embedding | blocks | head.

The paper's experiments train LLaMA models (arXiv 2506.15461). The same classes are
used in one process (the experiment's simulated pipeline) and as DeepSpeed ``LayerSpec``s (:func:`pipeline_module`,
:func:`plus_pipeline_module`), so both paths train the same layers. Every parameter is created by a torch module
whose ``reset_parameters`` reproduces its construction-time initialisation, which keeps the ``random`` ablation a
true fresh start.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from deepspeed.pipe import LayerSpec, PipelineModule

from .gpt import lm_loss, seed_layer
from ..pipe.plus_module import CheckFreePlusPipelineModule, checkfree_plus_module

__all__ = ["LlamaConfig", "LlamaEmbedding", "LlamaBlock", "LlamaHead", "lm_loss", "layer_specs", "pipeline_module",
           "plus_pipeline_module", "rotary_tables"]


@dataclass(frozen=True)
class LlamaConfig:
    """Model size.

    Attributes:
        vocab_size: tokens in the vocabulary (256 for the shipped byte-level corpus).
        seq_len: longest sequence (the rotary tables are built for it).
        d_model: width of the residual stream.
        n_heads: attention heads (``d_model`` must divide by it; the head size must be even for rotary).
        n_layers: transformer blocks.
        ffn_hidden: SwiGLU hidden width; None gives LLaMA's ``8/3 * d_model`` rounded up to a multiple of 32.
        rope_theta: rotary base.
        norm_eps: RMSNorm epsilon.
    """

    vocab_size: int = 256
    seq_len: int = 64
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 8
    ffn_hidden: Optional[int] = None
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(f"d_model={self.d_model} must divide into n_heads={self.n_heads} heads of even size "
                             f"(rotary embeddings rotate pairs of dimensions); pick e.g. d_model="
                             f"{self.n_heads * max(2, 2 * round(self.d_model / self.n_heads / 2))}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def hidden(self) -> int:
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        return -(-int(8 * self.d_model / 3) // 32) * 32


def rotary_tables(seq_len: int, head_dim: int, theta: float = 10000.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables ``[seq_len, head_dim]`` of rotary position embeddings (rotate-half layout)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class LlamaEmbedding(nn.Module):
    """Token embedding only: positions enter through the rotary attention of every block."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.tok(idx)


class LlamaBlock(nn.Module):
    """Pre-norm block: RMSNorm, causal self-attention with rotary positions, residual; RMSNorm, SwiGLU, residual."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        d, h = cfg.d_model, cfg.hidden
        self.attn_norm = nn.RMSNorm(d, eps=cfg.norm_eps)
        self.q = nn.Linear(d, d, bias=False)
        self.k = nn.Linear(d, d, bias=False)
        self.v = nn.Linear(d, d, bias=False)
        self.o = nn.Linear(d, d, bias=False)
        self.mlp_norm = nn.RMSNorm(d, eps=cfg.norm_eps)
        self.gate = nn.Linear(d, h, bias=False)
        self.up = nn.Linear(d, h, bias=False)
        self.down = nn.Linear(h, d, bias=False)
        cos, sin = rotary_tables(cfg.seq_len, cfg.head_dim, cfg.rope_theta)
        # Not saved with the weights and not a parameter: recovery blends parameters only.
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        hd = d // self.n_heads
        y = self.attn_norm(x)
        q, k, v = (proj(y).view(b, t, self.n_heads, hd).transpose(1, 2) for proj in (self.q, self.k, self.v))
        cos, sin = self.cos[:t].to(q.dtype), self.sin[:t].to(q.dtype)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(att.transpose(1, 2).reshape(b, t, d))
        y = self.mlp_norm(x)
        return x + self.down(F.silu(self.gate(y)) * self.up(y))


class LlamaHead(nn.Module):
    """Final RMSNorm and the LM head (de-embedding)."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm(self.norm(x))


def layer_specs(cfg: LlamaConfig) -> List[LayerSpec]:
    """The model as a flat layer list: ``[LlamaEmbedding, LlamaBlock x n_layers, LlamaHead]``."""
    return [LayerSpec(LlamaEmbedding, cfg), *[LayerSpec(LlamaBlock, cfg) for _ in range(cfg.n_layers)],
            LayerSpec(LlamaHead, cfg)]


def pipeline_module(cfg: LlamaConfig, num_stages: int, **kwargs) -> PipelineModule:
    """The model as a ``PipelineModule`` with equal blocks per stage (what CheckFree's layer matching wants)."""
    kwargs.setdefault("partition_method", "type:LlamaBlock")
    kwargs.setdefault("seed_layers", True)
    kwargs.setdefault("seed_fn", seed_layer)
    return PipelineModule(layers=layer_specs(cfg), num_stages=num_stages, loss_fn=lm_loss, **kwargs)


def plus_pipeline_module(cfg: LlamaConfig, num_stages: int, **kwargs) -> CheckFreePlusPipelineModule:
    """The model for CheckFree+: the embedding replicated on stage 1, the head on stage P-2."""
    kwargs.setdefault("seed_layers", True)
    kwargs.setdefault("seed_fn", seed_layer)
    return checkfree_plus_module(LayerSpec(LlamaEmbedding, cfg),
                                 [LayerSpec(LlamaBlock, cfg) for _ in range(cfg.n_layers)],
                                 LayerSpec(LlamaHead, cfg), num_stages, loss_fn=lm_loss, **kwargs)
