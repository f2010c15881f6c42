"""Byte-level tokens from the shipped public-domain corpus, and batches addressable by (step, micro-batch).

Addressable batches let a replayed step see exactly the data it saw before, and let every stage that reads data
(first and last, and under CheckFree+ their partners) agree without sharing an iterator.
"""
from __future__ import annotations

import lzma
import operator
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

#: Byte-level tokens: every byte value is a token.
VOCAB_SIZE = 256
#: The corpus shipped in the repository (see data/README.md), found relative to this file so it works from any
#: working directory of a clone or an editable install.
DEFAULT_CORPUS = Path(__file__).resolve().parent / "sotu.txt.xz"  # package data (setup.py package_data)


def load_corpus(path: str | os.PathLike[str] | None = None) -> np.ndarray:
    """Read a ``.txt`` or ``.txt.xz`` file as byte-level tokens.

    Args:
        path: The text file; ``.xz`` files are decompressed. None means the corpus shipped in the repository,
            ``deepspeed_checkfree/models/sotu.txt.xz``, shipped in the wheel (233 State of the Union addresses, about 10.8 M bytes).

    Returns:
        The bytes of the file as a writable 1-D ``uint8`` array (token ids below ``VOCAB_SIZE``).

    Raises:
        FileNotFoundError: The file does not exist; the message gives the path that was tried.
    """
    p = Path(path) if path is not None else DEFAULT_CORPUS
    if not p.is_file():
        what = "the shipped corpus" if path is None else "the corpus file"
        raise FileNotFoundError(f"{what} is not at {str(p)!r}; pass the path of a .txt or .txt.xz file "
                                f"(load_corpus(path) or --corpus), or run from a clone of the repository")
    raw = p.read_bytes()
    if p.suffix == ".xz":
        raw = lzma.decompress(raw)
    # frombuffer gives a read-only view of the bytes object; copy so callers own a normal array.
    return np.frombuffer(raw, dtype=np.uint8).copy()


def split_corpus(tokens: np.ndarray, val_fraction: float = 0.05, block: int = 65536
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Split tokens into (train, validation) by interleaved fixed-size blocks.

    Every ``round(1 / val_fraction)``-th block (the last of each group; with the defaults, every 20th block of
    64 KiB) goes to validation. The corpus is in chronological order, so holding out its tail instead would
    make validation a different era of English, a distribution shift.

    Args:
        tokens: The 1-D token array.
        val_fraction: Share of blocks held out, in (0, 0.5]. The share of tokens is close to it on a corpus of
            many blocks; a corpus shorter than ``round(1 / val_fraction)`` blocks gets no validation tokens.
        block: Block size in tokens.

    Returns:
        ``(train, val)``: new arrays, each in corpus order; together they hold every token exactly once.

    Raises:
        ValueError: An argument is out of range.
    """
    tokens = _as_token_array(tokens)
    block = _check_int("block", block, minimum=1)
    # Above 0.5 "every k-th block" cannot express the fraction (k would be 1: everything is validation).
    if not 0.0 < val_fraction <= 0.5:
        raise ValueError(f"val_fraction must be in (0, 0.5], got {val_fraction}; pass e.g. 0.05 for every "
                         f"20th block")
    every = round(1.0 / val_fraction)
    n_blocks = -(-len(tokens) // block)
    is_val = np.zeros(len(tokens), dtype=bool)
    for b in range(every - 1, n_blocks, every):
        is_val[b * block:(b + 1) * block] = True
    return tokens[~is_val], tokens[is_val]


class StepBatches:
    """Deterministic (inputs, labels) micro-batches addressed by (step, micro-batch id).

    A micro-batch depends only on ``(seed, step, dp_rank, micro_batch_id)``, never on what was drawn before, so
    a step replayed after a failure, or a rebuilt stage, gets exactly the same data.

    Args:
        tokens: The 1-D integer token array to sample windows from.
        seq_len: Tokens per sample.
        micro_batch_size: Samples per micro-batch.
        micro_batches: Micro-batches per step (gradient accumulation steps), as ``iterator`` yields them.
        seed: Data-order seed, at least 0.
        dp_rank: This data-parallel replica, in ``[0, dp_size)``; replicas draw different samples.
        dp_size: The number of data-parallel replicas.

    Raises:
        ValueError: An argument is out of range, or the corpus is shorter than ``seq_len + 1`` tokens.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, micro_batch_size: int, micro_batches: int, seed: int = 0,
                 dp_rank: int = 0, dp_size: int = 1) -> None:
        self.tokens = _as_token_array(tokens)
        self.seq_len = _check_int("seq_len", seq_len, minimum=1)
        self.micro_batch_size = _check_int("micro_batch_size", micro_batch_size, minimum=1)
        self.micro_batches = _check_int("micro_batches", micro_batches, minimum=1)
        # numpy seed sequences take only non-negative integers.
        self.seed = _check_int("seed", seed, minimum=0)
        self.dp_size = _check_int("dp_size", dp_size, minimum=1)
        self.dp_rank = _check_int("dp_rank", dp_rank, minimum=0)
        if self.dp_rank >= self.dp_size:
            raise ValueError(f"dp_rank must be in [0, dp_size), got dp_rank={dp_rank} with dp_size={dp_size}; "
                             f"pass the replica's data-parallel index (engine.grid.data_parallel_id)")
        # A sample is seq_len inputs plus one more token for the last label.
        if len(self.tokens) < self.seq_len + 1:
            raise ValueError(f"the corpus has {len(self.tokens)} tokens, fewer than seq_len + 1 = {self.seq_len + 1}; "
                             f"use a longer corpus or a shorter seq_len")

    def get(self, step: int, micro_batch_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the micro-batch of ``(step, micro_batch_id)``.

        Args:
            step: The optimizer step, at least 0.
            micro_batch_id: The micro-batch within the step, in ``[0, micro_batches)``.

        Returns:
            ``(inputs, labels)``, each a contiguous int64 tensor ``[micro_batch_size, seq_len]``; ``labels`` are
            ``inputs`` shifted left by one token (the next token at each position).

        Raises:
            ValueError: ``step`` or ``micro_batch_id`` is out of range.
        """
        step = _check_int("step", step, minimum=0)
        micro_batch_id = _check_int("micro_batch_id", micro_batch_id, minimum=0)
        if micro_batch_id >= self.micro_batches:
            raise ValueError(f"micro_batch_id must be in [0, micro_batches={self.micro_batches}), got "
                             f"{micro_batch_id}; construct StepBatches with the engine's micro_batches")
        # A fresh generator per address (not one advanced stream): the draw needs no history.
        rng = np.random.default_rng([self.seed, step, self.dp_rank, micro_batch_id])
        # Start offsets uniform in [0, len - seq_len - 1], so the last window ends on the last token.
        starts = rng.integers(0, len(self.tokens) - self.seq_len - 1, size=self.micro_batch_size, endpoint=True)
        window = self.tokens[starts[:, None] + np.arange(self.seq_len + 1)].astype(np.int64)
        window = torch.from_numpy(window)
        return window[:, :-1].contiguous(), window[:, 1:].contiguous()

    def iterator(self, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield micro-batches from ``start_step`` on, forever.

        This is what ``PipelineEngine.train_batch(data_iter)`` consumes: it pulls ``micro_batches`` items per
        step. Passing ``iterator(step)`` for each step keeps the data tied to the step number even when a step
        is replayed.

        Args:
            start_step: The first step, at least 0.

        Yields:
            ``get(start_step, 0)``, ..., ``get(start_step, micro_batches - 1)``, ``get(start_step + 1, 0)``, ...
        """
        step = _check_int("start_step", start_step, minimum=0)
        return self._walk(step)

    def _walk(self, step: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # A separate generator so that iterator() validates its argument when called, not at the first next().
        while True:
            for mb in range(self.micro_batches):
                yield self.get(step, mb)
            step += 1


def _as_token_array(tokens: np.ndarray) -> np.ndarray:
    arr = np.asarray(tokens)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"tokens must be a 1-D integer array, got shape {arr.shape} dtype {arr.dtype}; pass "
                         f"load_corpus() output or another flat array of token ids")
    return arr


def _check_int(name: str, value: int, minimum: int) -> int:
    # operator.index accepts Python and numpy integers but not floats (bool is rejected separately: it is an int).
    try:
        if isinstance(value, bool):
            raise TypeError
        number = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r} ({type(value).__name__}); "
                         f"pass an int") from None
    if number < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {number}; pass a value of at least {minimum}")
    return number
