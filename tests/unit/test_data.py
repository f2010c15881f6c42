"""The shipped corpus, the interleaved split and the (step, micro-batch)-addressable batches."""
from __future__ import annotations

import lzma
from pathlib import Path

import numpy as np
import pytest
import torch

from deepspeed_checkfree.models import corpus as data
from deepspeed_checkfree.models.corpus import VOCAB_SIZE, StepBatches, load_corpus, split_corpus


@pytest.fixture(scope="module")
def corpus() -> np.ndarray:
    return load_corpus()


def _same(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> bool:
    return torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_shipped_corpus_is_english_text_of_the_expected_size(corpus):
    assert corpus.dtype == np.uint8 and corpus.ndim == 1 and VOCAB_SIZE == 256
    assert 10_000_000 < len(corpus) < 12_000_000, "233 speeches, about 10.8 MB (data/README.md)"
    assert (corpus < 128).mean() > 0.999, "almost all ASCII"
    text = bytes(corpus).decode("utf-8")
    assert text.startswith("=== 1790 George Washington ===\nFellow-Citizens of the Senate")
    headers = [line for line in text.splitlines() if line.startswith("=== ")]
    assert len(headers) == 233 and headers[-1] == "=== 2021 Joseph R Biden ==="
    years = [int(h.split()[1]) for h in headers]
    assert years == sorted(years), "chronological order"
    # 1953: Truman's last message came before Eisenhower's first.
    assert headers.index("=== 1953 Harry S Truman ===") < headers.index("=== 1953 Dwight D Eisenhower ===")
    lowered = text.lower()
    for marker in ("(applause", "[applause", "[laughter", "(laughter", "(laughs)"):
        assert marker not in lowered, f"audience marker {marker!r} left in the corpus"
    assert lowered.count(" the ") > 100_000, "English prose (about 150k)"


def test_plain_and_xz_files_load_the_same(tmp_path):
    (tmp_path / "a.txt").write_bytes("hello wörld".encode())
    (tmp_path / "a.txt.xz").write_bytes(lzma.compress("hello wörld".encode()))
    plain = load_corpus(tmp_path / "a.txt")
    assert plain.dtype == np.uint8 and bytes(plain) == "hello wörld".encode()
    assert np.array_equal(load_corpus(str(tmp_path / "a.txt.xz")), plain)
    plain[0] = 0  # the caller owns a writable array


def test_missing_corpus_says_where_it_looked(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="nope.txt.*pass the path"):
        load_corpus(tmp_path / "nope.txt")
    monkeypatch.setattr(data, "DEFAULT_CORPUS", tmp_path / "gone" / "sotu.txt.xz")
    with pytest.raises(FileNotFoundError, match="shipped corpus.*gone"):
        load_corpus()


def test_default_corpus_is_found_relative_to_the_repository():
    assert data.DEFAULT_CORPUS.parts[-2:] == ("models", "sotu.txt.xz")
    assert data.DEFAULT_CORPUS.parent.parent == Path(data.__file__).resolve().parents[1]


def test_split_is_deterministic_disjoint_and_complete(corpus):
    train, val = split_corpus(corpus)
    assert len(train) + len(val) == len(corpus)
    assert 0.045 < len(val) / len(corpus) < 0.055
    train2, val2 = split_corpus(corpus)
    assert np.array_equal(train, train2) and np.array_equal(val, val2)


def test_split_takes_every_nth_block_interleaved():
    tokens = np.arange(100, dtype=np.int64)  # distinct values, so disjointness is checkable
    train, val = split_corpus(tokens, val_fraction=0.25, block=5)  # every 4th block of 5 tokens
    assert val.tolist() == [*range(15, 20), *range(35, 40), *range(55, 60), *range(75, 80), *range(95, 100)]
    assert not set(train.tolist()) & set(val.tolist())
    assert sorted(train.tolist() + val.tolist()) == list(range(100))
    assert train.tolist() == sorted(train.tolist()), "train keeps corpus order"


def test_split_rejects_bad_arguments():
    tokens = np.zeros(1000, dtype=np.uint8)
    for bad in (0.0, -0.1, 0.6, 1.5):
        with pytest.raises(ValueError, match=r"val_fraction must be in \(0, 0.5\], got"):
            split_corpus(tokens, val_fraction=bad)
    with pytest.raises(ValueError, match="block must be >= 1, got 0"):
        split_corpus(tokens, block=0)
    with pytest.raises(ValueError, match="1-D integer array"):
        split_corpus(np.zeros((2, 3), dtype=np.uint8))


def test_get_is_deterministic_and_labels_are_shifted_inputs(corpus):
    b = StepBatches(corpus, seq_len=16, micro_batch_size=3, micro_batches=4, seed=1)
    x, y = b.get(5, 2)
    assert x.shape == y.shape == (3, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1]), "labels are the inputs shifted by one token"
    assert int(x.max()) < VOCAB_SIZE and int(x.min()) >= 0
    assert _same(b.get(5, 2), (x, y))
    again = StepBatches(corpus, seq_len=16, micro_batch_size=3, micro_batches=4, seed=1)
    assert _same(again.get(5, 2), (x, y)), "same address, new object: same batch"


def test_get_differs_across_steps_micro_batches_ranks_and_seeds(corpus):
    kw = dict(seq_len=16, micro_batch_size=3, micro_batches=4)
    b = StepBatches(corpus, seed=1, **kw)
    x = b.get(5, 2)[0]
    assert not torch.equal(b.get(6, 2)[0], x)
    assert not torch.equal(b.get(5, 3)[0], x)
    assert not torch.equal(StepBatches(corpus, seed=1, dp_rank=1, dp_size=2, **kw).get(5, 2)[0], x)
    assert not torch.equal(StepBatches(corpus, seed=2, **kw).get(5, 2)[0], x)


def test_windows_cover_the_whole_corpus_including_the_last_token():
    # seq_len + 1 tokens admit exactly one window, and it must end on the last token.
    tokens = np.arange(9, dtype=np.uint8)
    x, y = StepBatches(tokens, seq_len=8, micro_batch_size=2, micro_batches=1).get(0, 0)
    assert x.tolist() == [list(range(8))] * 2 and y.tolist() == [list(range(1, 9))] * 2
    # With a little room, starts reach both ends of [0, len - seq_len - 1].
    b = StepBatches(np.arange(12, dtype=np.uint8), seq_len=8, micro_batch_size=64, micro_batches=1)
    starts = {int(s) for step in range(5) for s in b.get(step, 0)[0][:, 0]}
    assert starts == {0, 1, 2, 3}


def test_iterator_walks_steps_and_micro_batches_in_order(corpus):
    b = StepBatches(corpus, seq_len=8, micro_batch_size=2, micro_batches=3)
    it = b.iterator(start_step=7)
    expected = [b.get(7, 0), b.get(7, 1), b.get(7, 2), b.get(8, 0), b.get(8, 1), b.get(8, 2), b.get(9, 0)]
    for i, want in enumerate(expected):
        assert _same(next(it), want), f"item {i}"
    assert _same(next(b.iterator()), b.get(0, 0)), "start_step defaults to 0"


def test_bad_arguments_are_explained(corpus):
    small = np.zeros(100, dtype=np.uint8)
    with pytest.raises(ValueError, match=r"has 10 tokens, fewer than seq_len \+ 1 = 17; use a longer corpus"):
        StepBatches(np.zeros(10, dtype=np.uint8), seq_len=16, micro_batch_size=1, micro_batches=1)
    with pytest.raises(ValueError, match=r"dp_rank must be in \[0, dp_size\), got dp_rank=2 with dp_size=2"):
        StepBatches(small, seq_len=8, micro_batch_size=1, micro_batches=1, dp_rank=2, dp_size=2)
    for name in ("seq_len", "micro_batch_size", "micro_batches", "dp_size"):
        args = dict(seq_len=8, micro_batch_size=1, micro_batches=1)
        args[name] = 0
        with pytest.raises(ValueError, match=f"{name} must be >= 1, got 0; pass a value of at least 1"):
            StepBatches(small, **args)
    with pytest.raises(ValueError, match="seed must be >= 0, got -1"):
        StepBatches(small, seq_len=8, micro_batch_size=1, micro_batches=1, seed=-1)
    with pytest.raises(ValueError, match=r"seq_len must be an integer >= 1, got 8.0 \(float\)"):
        StepBatches(small, seq_len=8.0, micro_batch_size=1, micro_batches=1)
    with pytest.raises(ValueError, match="1-D integer array"):
        StepBatches(small.astype(np.float32), seq_len=8, micro_batch_size=1, micro_batches=1)
    b = StepBatches(small, seq_len=8, micro_batch_size=1, micro_batches=2)
    assert b.get(np.int64(3), 1)[0].shape == (1, 8), "numpy integers are accepted"
    with pytest.raises(ValueError, match=r"micro_batch_id must be in \[0, micro_batches=2\), got 2"):
        b.get(0, 2)
    with pytest.raises(ValueError, match="step must be >= 0, got -1"):
        b.get(-1, 0)
    with pytest.raises(ValueError, match="start_step must be >= 0"):
        b.iterator(-1)
