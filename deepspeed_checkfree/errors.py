"""The exception hierarchy of deepspeed_checkfree: one base class, a few specific failures."""
from __future__ import annotations

from typing import Optional


class CheckFreeError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(CheckFreeError, ValueError):
    """The ``"checkfree"`` configuration is invalid; the message names the key, the value and the fix."""


class UnsupportedSetupError(CheckFreeError):
    """The model, topology or DeepSpeed setup cannot be protected by the configured mode."""


class RecoveryError(CheckFreeError):
    """A lost stage cannot be rebuilt (no usable neighbour, layers that cannot be matched, ...)."""


class StageFailure(CheckFreeError):
    """A pipeline stage was lost.

    Attributes:
        stage: the pipeline stage id that was lost.
        rank: the global rank that held it (None when unknown).
        step: the global step at which the loss was detected.
        cause: a short human-readable reason ("injected", "peer closed connection", ...).
    """

    def __init__(self, stage: int, step: int, cause: str, rank: Optional[int] = None) -> None:
        self.stage = stage
        self.rank = rank
        self.step = step
        self.cause = cause
        where = f"stage {stage}" + (f" (rank {rank})" if rank is not None else "")
        super().__init__(f"{where} lost at step {step}: {cause}")
