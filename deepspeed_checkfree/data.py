"""Byte-level tokens from the shipped public-domain corpus, and batches addressable by (step, micro-batch).

Addressable batches let a retried step see exactly the data it saw before, and let every stage that reads data
(first and last, and under CheckFree+ their partners) agree without sharing an iterator.
"""
from __future__ import annotations

import lzma
import os
from pathlib import Path
from typing import Iterator, Optional, Tuple, Union

import numpy as np
import torch

VOCAB_SIZE = 256
DEFAULT_CORPUS = Path(__file__).resolve().parents[1] / "data" / "sotu.txt.xz"


def load_corpus(path: Union[str, os.PathLike, None] = None) -> np.ndarray:
    """Read a ``.txt`` or ``.txt.xz`` file as byte tokens (uint8, vocabulary 256).

    Args:
        path: the text file; None means the corpus shipped in the repository (``data/sotu.txt.xz``).

    Raises:
        FileNotFoundError: the file does not exist (the message says where it looked).
    """
    p = Path(path) if path is not None else DEFAULT_CORPUS
    if not p.is_file():
        where = "the shipped corpus" if path is None else "the corpus"
        raise FileNotFoundError(f"{where} is not at {str(p)!r}; run from a clone of the repository or pass the "
                                f"path of a .txt or .txt.xz file")
    raw = lzma.decompress(p.read_bytes()) if p.suffix == ".xz" else p.read_bytes()
    return np.frombuffer(raw, dtype=np.uint8).copy()


def split_corpus(tokens: np.ndarray, val_fraction: float = 0.05, block: int = 65536
                 ) -> Tuple[np.ndarray, np.ndarray]:
    """Split into (train, validation) by interleaved blocks, so validation covers the whole corpus (all eras of
    the speeches) rather than its end.

    Args:
        tokens: the corpus.
        val_fraction: share of blocks held out (every round(1/val_fraction)-th block).
        block: block size in tokens.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    every = max(2, round(1.0 / val_fraction))
    n_blocks = -(-len(tokens) // block)
    is_val = np.zeros(len(tokens), dtype=bool)
    for b in range(every - 1, n_blocks, every):
        is_val[b * block:(b + 1) * block] = True
    return tokens[~is_val], tokens[is_val]


class StepBatches:
    """Deterministic (inputs, labels) batches addressed by (step, micro-batch id).

    Args:
        tokens: the token array to sample from.
        seq_len: tokens per sample.
        micro_batch_size: samples per micro-batch.
        micro_batches: micro-batches per step (gradient accumulation steps).
        seed: data-order seed.
        dp_rank, dp_size: this data-parallel replica and the number of replicas (each gets different samples).
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, micro_batch_size: int, micro_batches: int, seed: int = 0,
                 dp_rank: int = 0, dp_size: int = 1) -> None:
        if seq_len < 1 or micro_batch_size < 1 or micro_batches < 1:
            raise ValueError(f"seq_len, micro_batch_size and micro_batches must be positive, got {seq_len}, "
                             f"{micro_batch_size}, {micro_batches}")
        if len(tokens) < seq_len + 2:
            raise ValueError(f"the corpus has {len(tokens)} tokens, fewer than seq_len + 2 = {seq_len + 2}; use a "
                             f"longer corpus or a shorter seq_len")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank must be in [0, dp_size={dp_size}), got {dp_rank}")
        self.tokens = tokens
        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        self.micro_batches = micro_batches
        self.seed = seed
        self.dp_rank = dp_rank
        self.dp_size = dp_size

    def get(self, step: int, micro_batch_id: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """The batch of ``(step, micro_batch_id)``: inputs and next-token labels, each ``[micro_batch_size,
        seq_len]`` int64."""
        rng = np.random.default_rng([self.seed, step, self.dp_rank, micro_batch_id])
        starts = rng.integers(0, len(self.tokens) - self.seq_len - 1, size=self.micro_batch_size)
        window = np.stack([self.tokens[s:s + self.seq_len + 1] for s in starts]).astype(np.int64)
        window = torch.from_numpy(window)
        return window[:, :-1], window[:, 1:]

    def iterator(self, start_step: int = 0) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """Batches from ``start_step`` on, ``micro_batches`` per step, in order (what ``train_batch`` pulls)."""
        step = start_step
        while True:
            for mb in range(self.micro_batches):
                yield self.get(step, mb)
            step += 1
