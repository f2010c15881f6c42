"""The Megatron-LM hook: wraps ``megatron.training.training.{train_step, save_checkpoint, load_checkpoint}`` (the
names ``pretrain()`` calls them by) so that an unmodified training loop records per-stage gradient norms, saves the
CheckFree sidecar with every checkpoint, and rebuilds a lost stage's shard before resuming.

Tested with Megatron-LM tag ``core_v0.16.1`` (megatron-core 0.16.1, Python 3.11) and with the ``megatron.training``
of the megatron-core 0.19.2 wheel (tag ``core_v0.19.0``, Python >= 3.12); the wrappers only add work before/after the
original functions and pass every argument through. The two differ in where the arguments are parsed
(:func:`parses_own_arguments`).
"""
from __future__ import annotations

import argparse
import functools
import inspect
import logging
import os
from typing import Any, Callable, List, Optional, Tuple

from ..repair.base import STRATEGIES
from ..repair.megatron_common import TRACKER, iteration_dir_name
from .checkpoint import (CheckFreeState, record_norms_around_step, repair_before_load, save_checkfree_state,
                         state_after_load)

logger = logging.getLogger(__name__)

_NON_PERSISTENT_SUBDIR = "non_persistent"  # megatron/training/checkpointing.py _NON_PERSISTENT_CKPT_SUBDIR


def add_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``--checkfree-*`` options to Megatron's parser (idempotent); returns the parser, as Megatron's
    ``extra_args_provider`` contract requires."""
    if "--checkfree-strategy" in parser._option_string_actions:  # noqa: SLF001 - argparse has no public lookup
        return parser
    g = parser.add_argument_group("checkfree", "rebuild a lost pipeline stage from its neighbours (CheckFree)")
    g.add_argument("--checkfree-repair", choices=("auto", "off"), default="auto",
                   help="auto: on resume, rebuild a pipeline stage whose checkpoint shard is missing, unreadable or "
                        "holds NaN/inf from its neighbours before loading (an intact checkpoint is loaded as it is); "
                        "off: load as Megatron would")
    g.add_argument("--checkfree-strategy", choices=STRATEGIES, default="gradnorm_average",
                   help="how a middle stage is rebuilt (default: the paper's gradient-norm weighted average)")
    g.add_argument("--checkfree-lr-boost", type=float, default=1.1,
                   help="a rebuilt stage trains with this multiple of the scheduled learning rate (paper: 1.1-1.2)")
    g.add_argument("--checkfree-events-file", default=None,
                   help="append JSON-lines detection/recovery records to this file")
    g.add_argument("--checkfree-no-value-check", action="store_true",
                   help="on resume, do not scan every stage tensor for NaN/inf (the scan reads the whole checkpoint "
                        "once on global rank 0); missing, truncated and unreadable shards are still found")
    g.add_argument("--checkfree-no-replicas", action="store_true",
                   help="do not keep replicas of the first/last stage's embedding and head on their neighbour "
                        "(then a lost first stage needs tied embeddings and legacy format, and a lost last stage "
                        "cannot be rebuilt)")
    return parser


def extra_args_provider(other: Optional[Callable] = None) -> Callable:
    """An ``extra_args_provider`` for ``pretrain()`` that adds the CheckFree options after ``other``'s."""

    def provider(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        if other is not None:
            parser = other(parser) or parser
        return add_args(parser)

    return provider


def _option(args: Any, name: str, default: Any) -> Any:
    value = getattr(args, name, None)
    return default if value is None else value


def _non_persistent_dir(args: Any, base_dir: str) -> str:
    # Megatron's own rule: --non-persistent-global-ckpt-dir, else a subdirectory of the save/load directory.
    return getattr(args, "non_persistent_global_ckpt_dir", None) or os.path.join(base_dir, _NON_PERSISTENT_SUBDIR)


def _tracker_iteration(directory: Optional[str]) -> Optional[str]:
    """The tracker file's iteration (a number or ``release``), or None when there is no readable one."""
    if not directory:
        return None
    try:
        with open(os.path.join(directory, TRACKER), encoding="utf-8") as f:
            text = f.read().strip()
    except OSError:
        return None
    return text if text == "release" or text.isdigit() else None


def load_targets(args: Any, load_arg: str = "load") -> List[Tuple[str, Optional[str]]]:
    """The (directory, iteration) Megatron's ``load_checkpoint`` will read, by its own rules
    (megatron/training/checkpointing.py ``load_checkpoint`` / ``_load_base_checkpoint`` at core_v0.16.1):

    * ``--pretrained-checkpoint`` replaces a ``--load`` directory that has no tracker file;
    * the iteration is the tracker's, or ``--ckpt-step`` when given (then even without a tracker);
    * a global non-persistent checkpoint (``--non-persistent-ckpt-type global``) wins if it is not older.

    Returns at most one target; none when Megatron would start from scratch.
    """
    load_dir = getattr(args, load_arg, None)
    pretrained = getattr(args, "pretrained_checkpoint", None)
    if pretrained and _tracker_iteration(load_dir) is None:
        load_dir = pretrained
    iteration: Optional[str] = _tracker_iteration(load_dir)
    if getattr(args, "ckpt_step", None):
        iteration = str(int(args.ckpt_step))
    if load_dir and getattr(args, "non_persistent_ckpt_type", None) == "global":
        np_dir = _non_persistent_dir(args, load_dir)
        np_iter = _tracker_iteration(np_dir)
        current = -1 if iteration is None else (0 if iteration == "release" else int(iteration))
        if np_iter is not None and np_iter != "release" and int(np_iter) >= current:
            return [(np_dir, np_iter)]
    if not load_dir or iteration is None:
        return []
    return [(load_dir, iteration)]


def _saved_iteration_dir(args: Any, iteration: Any, non_persistent: bool) -> Optional[str]:
    if non_persistent:
        kind = getattr(args, "non_persistent_ckpt_type", None)
        if kind != "global":
            logger.warning("[checkfree] %s non-persistent checkpoints are not protected (no sidecar written)", kind)
            return None
        save_dir = _non_persistent_dir(args, args.save)
    else:
        save_dir = args.save
    # No filesystem test here: every rank must take the same branch (the sidecar write is collective).
    return os.path.join(save_dir, iteration_dir_name(iteration))


def parses_own_arguments(pretrain: Callable) -> bool:
    """Whether ``pretrain()`` parses Megatron's arguments itself (Megatron-LM up to core_v0.16: ``pretrain(
    train_valid_test_dataset_provider, model_provider, ..., extra_args_provider=None, args_defaults={})``), or takes
    a config container built from arguments the script parsed before (core_v0.19: ``pretrain(cfg_container, ...)``
    after ``parse_and_validate_args``)."""
    return "extra_args_provider" in inspect.signature(pretrain).parameters


def _add_options_in_pretrain(T: Any, MT: Any, state: CheckFreeState) -> None:
    """core_v0.16: ``pretrain()`` parses the arguments, with the ``extra_args_provider`` it is given."""
    T.pretrain = MT.pretrain = _with_checkfree_options(T.pretrain, state)


def _add_options_in_parse_args(state: CheckFreeState) -> None:
    """core_v0.19: the script calls ``parse_and_validate_args(extra_args_provider=...)``, which builds the parser in
    ``megatron.training.arguments.parse_args`` (looked up at call time, so a script that imported
    ``parse_and_validate_args`` before :func:`install` gets the options too)."""
    import megatron.training.arguments as A

    A.parse_args = _with_checkfree_options(A.parse_args, state)


def _with_checkfree_options(parses: Callable, state: CheckFreeState) -> Callable:
    """``parses`` (a Megatron function that parses the arguments, taking ``extra_args_provider``) with the
    ``--checkfree-*`` options added to the user's provider, and the hook's state reset for the new run."""
    signature = inspect.signature(parses)

    @functools.wraps(parses)
    def wrapped(*args, **kwargs):
        bound = signature.bind_partial(*args, **kwargs)
        bound.arguments["extra_args_provider"] = extra_args_provider(bound.arguments.get("extra_args_provider"))
        state.reset()
        return parses(*bound.args, **bound.kwargs)

    return wrapped


def install() -> CheckFreeState:
    """Install the hook into ``megatron.training`` (idempotent). Call before ``pretrain()``, or with Megatron-LM
    core_v0.19, before the script parses its arguments.

    Also adds the ``--checkfree-*`` options to Megatron's arguments where this version parses them (see
    :func:`parses_own_arguments`): in ``pretrain()``'s ``extra_args_provider`` (core_v0.16) or in the parser
    ``parse_and_validate_args`` builds (core_v0.19), so an unmodified script gets them.

    Returns:
        The rank's :class:`CheckFreeState` (last gradient norm, LR boost).
    """
    import megatron.training as MT
    import megatron.training.training as T
    from megatron.training import get_args

    if getattr(T, "_checkfree_state", None) is not None:
        return T._checkfree_state
    state = CheckFreeState()
    orig_train_step, orig_save, orig_load, orig_pretrain = T.train_step, T.save_checkpoint, T.load_checkpoint, \
        T.pretrain

    @functools.wraps(orig_train_step)
    def train_step(forward_step_func, data_iterator, model, optimizer, *args, **kwargs):
        if optimizer is not None:
            record_norms_around_step(optimizer, model, state)
        return orig_train_step(forward_step_func, data_iterator, model, optimizer, *args, **kwargs)

    @functools.wraps(orig_save)
    def save_checkpoint(iteration, model, optimizer, opt_param_scheduler, num_floating_point_operations_so_far,
                        *args, **kwargs):
        result = orig_save(iteration, model, optimizer, opt_param_scheduler, num_floating_point_operations_so_far,
                           *args, **kwargs)
        margs = get_args()
        non_persistent = bool(kwargs.get("non_persistent_ckpt", False))
        tag = "release" if kwargs.get("release", False) else iteration  # core_v0.19's save_checkpoint(release=True)
        iter_dir = _saved_iteration_dir(margs, tag, non_persistent) if margs.save else None
        # Every rank takes the same branch (same args, same directory on a shared filesystem).
        if iter_dir is not None:
            save_checkfree_state(iter_dir, model, state, iteration,
                                 replicas=not _option(margs, "checkfree_no_replicas", False),
                                 optimizer=optimizer if getattr(margs, "use_distributed_optimizer", False) else None)
        return result

    @functools.wraps(orig_load)
    def load_checkpoint(ddp_model, optimizer, opt_param_scheduler, load_arg="load", *args, **kwargs):
        margs = get_args()
        reports = []
        if _option(margs, "checkfree_repair", "auto") == "auto":
            reports = repair_before_load(load_targets(margs, load_arg),
                                         strategy=_option(margs, "checkfree_strategy", "gradnorm_average"),
                                         events_file=_option(margs, "checkfree_events_file", None),
                                         check_values=not _option(margs, "checkfree_no_value_check", False))
        result = orig_load(ddp_model, optimizer, opt_param_scheduler, load_arg, *args, **kwargs)
        iteration = result[0] if isinstance(result, tuple) else result
        targets = load_targets(margs, load_arg)
        state_after_load(targets[0][0] if targets else None, iteration, reports, state,
                         float(_option(margs, "checkfree_lr_boost", 1.1)), optimizer)
        return result

    T.train_step, T.save_checkpoint, T.load_checkpoint = train_step, save_checkpoint, load_checkpoint
    if parses_own_arguments(orig_pretrain):
        _add_options_in_pretrain(T, MT, state)
    else:
        _add_options_in_parse_args(state)
    T._checkfree_state = state
    return state
