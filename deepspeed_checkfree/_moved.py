"""Import paths of version 0.1, kept working after the modules moved into layer packages.

``import deepspeed_checkfree.engine`` (and the others below) returns the module at its new path: the same module
object, so classes keep one identity. A :class:`DeprecationWarning` names the new path.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from typing import Optional

MOVED = {
    "deepspeed_checkfree.config": "deepspeed_checkfree.core.config",
    "deepspeed_checkfree.recovery": "deepspeed_checkfree.core.recovery",
    "deepspeed_checkfree.schedule": "deepspeed_checkfree.core.schedule",
    "deepspeed_checkfree.failures": "deepspeed_checkfree.core.failures",
    "deepspeed_checkfree.engine": "deepspeed_checkfree.pipe.engine",
    "deepspeed_checkfree.exchange": "deepspeed_checkfree.pipe.exchange",
    "deepspeed_checkfree.plus": "deepspeed_checkfree.pipe.plus_module",
    "deepspeed_checkfree.resilient": "deepspeed_checkfree.resilience.trainer",
    "deepspeed_checkfree.membership": "deepspeed_checkfree.resilience.membership",
    "deepspeed_checkfree.gpt": "deepspeed_checkfree.models.gpt",
    "deepspeed_checkfree.llama": "deepspeed_checkfree.models.llama",
    "deepspeed_checkfree.data": "deepspeed_checkfree.models.corpus",
    "deepspeed_checkfree.events_cli": "deepspeed_checkfree.events",
    "deepspeed_checkfree.repair_deepspeed": "deepspeed_checkfree.repair.ds_pipeline",
    "deepspeed_checkfree.repair_megatron": "deepspeed_checkfree.repair.megatron_legacy",
    "deepspeed_checkfree.repair_megatron_dist": "deepspeed_checkfree.repair.megatron_dist",
}


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec):
        # The module at its new path, not a second copy of it.
        return importlib.import_module(self.target)

    def exec_module(self, module) -> None:
        pass


class MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Finds the old module names of :data:`MOVED`."""

    def find_spec(self, fullname: str, path=None, target=None) -> Optional[importlib.machinery.ModuleSpec]:
        new = MOVED.get(fullname)
        if new is None:
            return None
        warnings.warn(f"{fullname} moved to {new}; the old path will be removed in a later version",
                      DeprecationWarning, stacklevel=2)
        return importlib.util.spec_from_loader(fullname, _AliasLoader(new))


def install() -> None:
    """Put the finder on ``sys.meta_path`` (idempotent)."""
    if not any(isinstance(f, MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder())
