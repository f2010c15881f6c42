"""CheckFree for Megatron: the only part of the package that imports Megatron, and only when called.

* :func:`install` hooks Megatron-LM's training loop (``megatron.training``): per-stage gradient norms, a CheckFree
  sidecar with every checkpoint, and the rebuild of a lost stage's shard before the checkpoint is loaded.
* :func:`extra_args_provider` / :func:`add_args` add the ``--checkfree-*`` options, composable with other providers.
* :mod:`.checkpoint` has the same pieces for any megatron.core training loop (``stage_grad_norm``,
  ``save_checkfree_state``, ``repair_before_load``).
* ``python -m deepspeed_checkfree.megatron.run pretrain_gpt.py ARGS`` runs an unmodified pretraining script with the
  hook installed.
"""
from __future__ import annotations

from typing import Any

__all__ = ["add_args", "extra_args_provider", "install"]


def install() -> Any:
    """Hook Megatron-LM's ``pretrain()`` (see :func:`.training_hook.install`)."""
    from .training_hook import install as _install
    return _install()


def add_args(parser):
    """Add the ``--checkfree-*`` options to an argparse parser; returns it."""
    from .training_hook import add_args as _add_args
    return _add_args(parser)


def extra_args_provider(other=None):
    """A ``pretrain(extra_args_provider=...)`` value adding the CheckFree options after ``other``'s."""
    from .training_hook import extra_args_provider as _provider
    return _provider(other)
