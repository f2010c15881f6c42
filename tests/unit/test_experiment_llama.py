"""The LLaMA-style layers: shapes, causality, rotary positions, and re-initialisation for the random ablation."""
from __future__ import annotations

import pytest
import torch

from deepspeed_checkfree.models.llama import LlamaBlock, LlamaConfig, LlamaEmbedding, LlamaHead, layer_specs, rotary_tables
from deepspeed_checkfree.core.recovery import reinitialize

CFG = LlamaConfig(vocab_size=256, seq_len=16, d_model=32, n_heads=4, n_layers=2)


def test_shapes_and_parameters():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (2, 16))
    h = LlamaEmbedding(CFG)(x)
    assert h.shape == (2, 16, 32)
    block = LlamaBlock(CFG)
    assert block(h).shape == h.shape
    assert LlamaHead(CFG)(h).shape == (2, 16, 256)
    names = {n for n, _ in block.named_parameters()}
    assert names == {"attn_norm.weight", "q.weight", "k.weight", "v.weight", "o.weight", "mlp_norm.weight",
                     "gate.weight", "up.weight", "down.weight"}  # RMSNorm, no biases, SwiGLU
    assert CFG.hidden == 96  # 8/3 * 32 rounded up to a multiple of 32
    assert [s.typename for s in layer_specs(CFG)] == [LlamaEmbedding, LlamaBlock, LlamaBlock, LlamaHead]


def test_attention_is_causal():
    torch.manual_seed(0)
    block = LlamaBlock(CFG)
    x = torch.randn(1, 16, 32)
    y = x.clone()
    y[:, 10:] += 1.0
    torch.testing.assert_close(block(x)[:, :10], block(y)[:, :10])


def test_rotary_scores_depend_only_on_relative_position():
    cos, sin = rotary_tables(16, 8)
    from deepspeed_checkfree.models.llama import _rotate
    q, k = torch.randn(8), torch.randn(8)

    def score(i, j):
        return (_rotate(q, cos[i], sin[i]) * _rotate(k, cos[j], sin[j])).sum()

    torch.testing.assert_close(score(3, 1), score(12, 10))
    assert not torch.allclose(score(3, 1), score(3, 2))


def test_reinitialize_reproduces_the_construction_initialisation():
    torch.manual_seed(7)
    a = LlamaBlock(CFG)
    b = LlamaBlock(CFG)
    with torch.no_grad():
        for p in b.parameters():
            p.fill_(float("nan"))
    reinitialize([b], seed=7)
    torch.manual_seed(7)
    c = LlamaBlock(CFG)
    for (n, p), q in zip(b.named_parameters(), c.parameters()):
        assert torch.isfinite(p).all(), n
        assert torch.equal(p, q), n
    del a


def test_bad_head_split_is_a_clear_error():
    with pytest.raises(ValueError, match="even size"):
        LlamaConfig(d_model=30, n_heads=4)
