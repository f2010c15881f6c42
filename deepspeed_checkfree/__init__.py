"""deepspeed_checkfree: keep pipeline-parallel training alive when a stage is lost, without checkpoints.

``import deepspeed_checkfree`` registers the CheckFree engine with DeepSpeed: ``deepspeed.initialize`` then returns
a :class:`CheckFreeEngine` for a ``PipelineModule`` whose config has ``"checkfree": {"enabled": true}``, and the
stock ``PipelineEngine`` otherwise.
"""
from __future__ import annotations

from typing import Any

import deepspeed
from deepspeed.runtime.pipe.engine import PipelineEngine as _StockPipelineEngine

from .config import CheckFreeConfig, load_config
from .engine import CheckFreeEngine
from .errors import CheckFreeError, ConfigError, RecoveryError, StageFailure, UnsupportedSetupError
from .plus import CheckFreePlusPipelineModule, checkfree_plus_module

__all__ = [
    "CheckFreeConfig", "CheckFreeEngine", "CheckFreeError", "CheckFreePlusPipelineModule", "ConfigError",
    "RecoveryError", "StageFailure", "UnsupportedSetupError", "checkfree_plus_module", "initialize", "load_config",
    "register",
]
__version__ = "0.1.0"


def _checkfree_enabled(kwargs: dict) -> bool:
    config_class = kwargs.get("config_class")
    ds_config = getattr(config_class, "_param_dict", None) or {}
    section = ds_config.get("checkfree")
    # A malformed section is reported by CheckFreeEngine's validation, not silently ignored.
    if section is None:
        return False
    if isinstance(section, dict):
        return bool(section.get("enabled", False))
    return CheckFreeConfig.from_ds_config(ds_config).enabled


class _SelectorMeta(type(_StockPipelineEngine)):
    """Makes ``deepspeed.PipelineEngine(...)`` build the CheckFree engine only when the config enables it, while
    ``isinstance(engine, deepspeed.PipelineEngine)`` keeps meaning "is a pipeline engine"."""

    def __call__(cls, *args: Any, **kwargs: Any):
        engine_cls = CheckFreeEngine if _checkfree_enabled(kwargs) else _StockPipelineEngine
        return engine_cls(*args, **kwargs)

    def __instancecheck__(cls, instance: Any) -> bool:
        return isinstance(instance, _StockPipelineEngine)

    def __subclasscheck__(cls, subclass: type) -> bool:
        return issubclass(subclass, _StockPipelineEngine)


class PipelineEngineSelector(_StockPipelineEngine, metaclass=_SelectorMeta):
    """Stands in for ``deepspeed.PipelineEngine``, the name ``deepspeed.initialize`` builds pipeline engines by."""


def register() -> None:
    """Install the engine selector in DeepSpeed (idempotent; done on import)."""
    if deepspeed.PipelineEngine is not PipelineEngineSelector:
        deepspeed.PipelineEngine = PipelineEngineSelector


def initialize(*args: Any, **kwargs: Any):
    """``deepspeed.initialize`` with the CheckFree engine registered: same arguments, same return value."""
    register()
    return deepspeed.initialize(*args, **kwargs)


register()
