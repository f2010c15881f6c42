"""Registration with DeepSpeed: ``deepspeed.initialize`` builds pipeline engines through the module-global name
``deepspeed.PipelineEngine`` (DeepSpeed has no engine registry); replacing it with a selector makes it return the
CheckFree engine exactly when the config enables it, and the stock engine otherwise.

This module imports only what DeepSpeed itself has loaded: it runs from the post-import hook of ``deepspeed``, which
may fire while one of this package's modules is still importing DeepSpeed. The CheckFree engine is imported when the
first pipeline engine is built.
"""
from __future__ import annotations

from typing import Any

import deepspeed
from deepspeed.runtime.pipe.engine import PipelineEngine as StockPipelineEngine


def checkfree_enabled(kwargs: dict) -> bool:
    """Whether the ``config_class`` among ``PipelineEngine``'s keyword arguments enables CheckFree."""
    config_class = kwargs.get("config_class")
    ds_config = getattr(config_class, "_param_dict", None) or {}
    section = ds_config.get("checkfree")
    # A malformed section is reported by CheckFreeEngine's validation, not silently ignored.
    if section is None:
        return False
    if isinstance(section, dict):
        return bool(section.get("enabled", False))
    from ..core.config import CheckFreeConfig
    return CheckFreeConfig.from_ds_config(ds_config).enabled


class _SelectorMeta(type(StockPipelineEngine)):
    """Makes ``deepspeed.PipelineEngine(...)`` build the CheckFree engine only when the config enables it, while
    ``isinstance(engine, deepspeed.PipelineEngine)`` keeps meaning "is a pipeline engine"."""

    def __call__(cls, *args: Any, **kwargs: Any):
        if checkfree_enabled(kwargs):
            from .engine import CheckFreeEngine as engine_cls
        else:
            engine_cls = StockPipelineEngine
        return engine_cls(*args, **kwargs)

    def __instancecheck__(cls, instance: Any) -> bool:
        return isinstance(instance, StockPipelineEngine)

    def __subclasscheck__(cls, subclass: type) -> bool:
        return issubclass(subclass, StockPipelineEngine)


class PipelineEngineSelector(StockPipelineEngine, metaclass=_SelectorMeta):
    """Stands in for ``deepspeed.PipelineEngine``, the name ``deepspeed.initialize`` builds pipeline engines by."""


def register() -> None:
    """Install the engine selector in DeepSpeed (idempotent)."""
    if deepspeed.PipelineEngine is not PipelineEngineSelector:
        deepspeed.PipelineEngine = PipelineEngineSelector


def initialize(*args: Any, **kwargs: Any):
    """``deepspeed.initialize`` with the CheckFree engine registered: same arguments, same return value."""
    register()
    return deepspeed.initialize(*args, **kwargs)
