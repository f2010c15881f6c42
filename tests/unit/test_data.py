"""The shipped corpus and the (step, micro-batch)-addressable batches."""
from __future__ import annotations

import lzma

import numpy as np
import pytest
import torch

from deepspeed_checkfree.data import VOCAB_SIZE, StepBatches, load_corpus, split_corpus


@pytest.fixture(scope="module")
def corpus():
    return load_corpus()


def test_shipped_corpus_is_english_text(corpus):
    assert corpus.dtype == np.uint8 and VOCAB_SIZE == 256
    assert 10_000_000 < len(corpus) < 12_000_000
    text = bytes(corpus[:2000]).decode("utf-8")
    assert text.startswith("=== 1790 George Washington ===") and "Fellow-Citizens" in text
    assert (corpus < 128).mean() > 0.999


def test_plain_and_xz_files_load_the_same(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"hello world")
    (tmp_path / "a.txt.xz").write_bytes(lzma.compress(b"hello world"))
    assert bytes(load_corpus(tmp_path / "a.txt")) == bytes(load_corpus(tmp_path / "a.txt.xz")) == b"hello world"


def test_missing_corpus_says_where_it_looked(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_corpus(tmp_path / "nope.txt")


def test_split_is_deterministic_disjoint_and_complete(corpus):
    train, val = split_corpus(corpus)
    assert len(train) + len(val) == len(corpus)
    assert 0.04 < len(val) / len(corpus) < 0.06
    train2, val2 = split_corpus(corpus)
    assert np.array_equal(train, train2) and np.array_equal(val, val2)
    with pytest.raises(ValueError, match="val_fraction"):
        split_corpus(corpus, val_fraction=1.5)


def test_batches_are_addressable_and_deterministic(corpus):
    b = StepBatches(corpus, seq_len=16, micro_batch_size=3, micro_batches=4, seed=1)
    x, y = b.get(5, 2)
    assert x.shape == y.shape == (3, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1]), "labels are the inputs shifted by one token"
    assert torch.equal(b.get(5, 2)[0], x)
    assert not torch.equal(b.get(6, 2)[0], x) and not torch.equal(b.get(5, 3)[0], x)
    other_dp = StepBatches(corpus, seq_len=16, micro_batch_size=3, micro_batches=4, seed=1, dp_rank=1, dp_size=2)
    assert not torch.equal(other_dp.get(5, 2)[0], x)


def test_iterator_walks_steps_and_micro_batches_in_order(corpus):
    b = StepBatches(corpus, seq_len=8, micro_batch_size=2, micro_batches=3)
    it = b.iterator(start_step=7)
    expected = [b.get(7, 0), b.get(7, 1), b.get(7, 2), b.get(8, 0)]
    for want in expected:
        got = next(it)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_bad_arguments_are_explained():
    with pytest.raises(ValueError, match="fewer than seq_len"):
        StepBatches(np.zeros(10, dtype=np.uint8), seq_len=16, micro_batch_size=1, micro_batches=1)
    with pytest.raises(ValueError, match="dp_rank"):
        StepBatches(np.zeros(100, dtype=np.uint8), seq_len=8, micro_batch_size=1, micro_batches=1, dp_rank=2,
                    dp_size=2)
    with pytest.raises(ValueError, match="positive"):
        StepBatches(np.zeros(100, dtype=np.uint8), seq_len=0, micro_batch_size=1, micro_batches=1)
