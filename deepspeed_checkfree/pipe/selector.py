"""Registration with DeepSpeed: ``deepspeed.initialize`` builds pipeline engines through the module-global name
``deepspeed.PipelineEngine`` (DeepSpeed has no engine registry); replacing it with a selector makes it return the
CheckFree engine exactly when the config enables it, and the stock engine otherwise.

With ``CHECKFREE_DISABLE_SHM_COMM=1`` in the environment it also turns off DeepSpeed's shared-memory all-reduce op,
which DeepSpeed's CPU communication backend JIT-compiles at the first ``init_distributed`` (minutes, once per
machine) and which training never uses (:func:`disable_shm_comm_op`).

This module imports only what DeepSpeed itself has loaded: it runs from the post-import hook of ``deepspeed``, which
may fire while one of this package's modules is still importing DeepSpeed. The CheckFree engine is imported when the
first pipeline engine is built.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import deepspeed
from deepspeed.runtime.pipe.engine import PipelineEngine as StockPipelineEngine

logger = logging.getLogger(__name__)

# Opt-in switch (documented in the README): "1" turns DeepSpeed's shm all-reduce op off when DeepSpeed loads.
SHM_COMM_OFF_ENV = "CHECKFREE_DISABLE_SHM_COMM"
SHM_COMM_OP = "deepspeed_shm_comm"  # the op's name in deepspeed.ops.__compatible_ops__ (ShareMemCommBuilder.NAME)


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
    """Install the engine selector in DeepSpeed (idempotent), and honour ``CHECKFREE_DISABLE_SHM_COMM``."""
    if deepspeed.PipelineEngine is not PipelineEngineSelector:
        deepspeed.PipelineEngine = PipelineEngineSelector
    switch = os.environ.get(SHM_COMM_OFF_ENV, "")
    if switch == "1":
        disable_shm_comm_op()
    elif switch not in ("", "0"):
        logger.warning("%s=%r is ignored: set it to 1 to turn DeepSpeed's shm all-reduce op off, or 0 (or unset) "
                       "to leave DeepSpeed as it is", SHM_COMM_OFF_ENV, switch)


def disable_shm_comm_op() -> None:
    """Keep DeepSpeed's communication backend from loading its shared-memory all-reduce op in this process.

    On the CPU accelerator, the first ``deepspeed.init_distributed`` (also the one inside ``deepspeed.initialize``)
    loads the op, JIT-compiling it the first time on a machine (100-170 s, cached in torch's extensions folder),
    and, when every rank is local (``$LOCAL_SIZE``, set by the ``deepspeed`` launcher, equals the world size),
    creates a 66 MiB buffer per rank in ``/dev/shm`` that is never removed.
    Only ``inference_all_reduce`` (DeepSpeed inference, AutoTP) uses it; training's collectives go through
    torch.distributed. Call it before the first ``init_distributed``; GPU accelerators have no such op.
    """
    if not deepspeed.ops.__compatible_ops__.get(SHM_COMM_OP, False):
        return
    deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False
    logger.info("DeepSpeed's shm all-reduce op (%s) is off in this process", SHM_COMM_OP)


def initialize(*args: Any, **kwargs: Any):
    """``deepspeed.initialize`` with the CheckFree engine registered: same arguments, same return value."""
    register()
    return deepspeed.initialize(*args, **kwargs)
