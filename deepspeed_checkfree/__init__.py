"""deepspeed_checkfree: keep pipeline-parallel training alive when a stage is lost, without checkpoints.

``import deepspeed_checkfree`` registers the CheckFree engine with DeepSpeed: ``deepspeed.initialize`` then returns
a :class:`CheckFreeEngine` for a ``PipelineModule`` whose config has ``"checkfree": {"enabled": true}``, and the
stock ``PipelineEngine`` otherwise.

The root stays light: it does not import DeepSpeed itself, so ``checkfree repair``, ``checkfree --help`` and the
Megatron hook (:mod:`deepspeed_checkfree.megatron`) never load it. The registration happens as soon as DeepSpeed is
imported, before or after this package, and the public names below load their modules on first use.
"""
from __future__ import annotations

import importlib
import importlib.abc
import sys
from typing import Any

from . import _moved
from .errors import CheckFreeError, ConfigError, RecoveryError, StageFailure, UnsupportedSetupError

__all__ = [
    "CheckFreeConfig", "CheckFreeEngine", "CheckFreeError", "CheckFreePlusPipelineModule", "ConfigError",
    "RecoveryError", "ResilientTrainer", "StageFailure", "UnsupportedSetupError", "checkfree_plus_module",
    "initialize", "load_config", "register",
]
__version__ = "0.1.0"

# Public name -> the module that defines it (imported on first access, PEP 562).
_LAZY = {
    "CheckFreeConfig": "deepspeed_checkfree.core.config",
    "load_config": "deepspeed_checkfree.core.config",
    "CheckFreeEngine": "deepspeed_checkfree.pipe.engine",
    "CheckFreePlusPipelineModule": "deepspeed_checkfree.pipe.plus_module",
    "checkfree_plus_module": "deepspeed_checkfree.pipe.plus_module",
    "initialize": "deepspeed_checkfree.pipe.selector",
    "register": "deepspeed_checkfree.pipe.selector",
    "ResilientTrainer": "deepspeed_checkfree.resilience.trainer",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list:
    return sorted(set(globals()) | set(__all__))


def _register_with_deepspeed() -> None:
    importlib.import_module("deepspeed_checkfree.pipe.selector").register()


class _RegisterWhenDeepSpeedLoads(importlib.abc.MetaPathFinder):
    """Registers the engine selector right after ``import deepspeed`` finishes (a post-import hook), so that a
    script that imports this package first still gets the CheckFree engine from ``deepspeed.initialize``."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "deepspeed":
            return None
        sys.meta_path.remove(self)  # one shot; the other finders locate the real package (also an editable one)
        spec = next((s for f in sys.meta_path if hasattr(f, "find_spec")
                     and (s := f.find_spec(fullname, path, target)) is not None), None)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_deepspeed = spec.loader.exec_module

        def exec_module(module) -> None:
            exec_deepspeed(module)
            _register_with_deepspeed()

        spec.loader.exec_module = exec_module
        return spec


_moved.install()
if "deepspeed" in sys.modules:
    _register_with_deepspeed()
elif not any(isinstance(f, _RegisterWhenDeepSpeedLoads) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWhenDeepSpeedLoads())
