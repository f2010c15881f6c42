"""Which format a checkpoint is in, its format handler, and :func:`repair_checkpoint`: detect the damaged stage(s),
plan and weight each rebuild, let the handler write it, and report (log, events, :class:`RepairReport`).

Depends on the format subpackages; none of them depends on this module.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

from ..errors import ConfigError, RecoveryError
from ..events import EventLog, identity
from .base import STRATEGIES, IOLedger, check_damage_is_repairable, plan_weights, unsupported_damage_error
from .ds_pipeline import DeepSpeedCheckpoint
from .megatron_common import TRACKER, iteration_dir_name, resolve_iteration_dir
from .megatron_dist import MegatronDistCheckpoint
from .megatron_legacy import MegatronLegacyCheckpoint

logger = logging.getLogger(__name__)

FORMATS = ("deepspeed", "megatron_legacy", "megatron_torch_dist")
Handler = Union[DeepSpeedCheckpoint, MegatronLegacyCheckpoint, MegatronDistCheckpoint]


@dataclass
class StageRebuild:
    """What was done to one stage."""

    stage: int
    strategy: str
    sources: Tuple[int, ...]
    weights: Tuple[float, ...]
    norms: Tuple[Optional[float], ...]
    reason: str
    fallback: Optional[str] = None
    note: Optional[str] = None
    files: List[str] = field(default_factory=list)
    chunks: List[dict] = field(default_factory=list)


@dataclass
class RepairReport:
    """The outcome of :func:`repair_checkpoint`; ``to_json()`` is what ``--json`` prints."""

    format: str
    source: str
    output: str
    iteration: str
    num_stages: int
    damaged: Dict[int, str]
    rebuilds: List[StageRebuild]
    bytes_read: int = 0
    bytes_written: int = 0
    bytes_copied: int = 0
    checkpoint_bytes: int = 0
    duration_s: float = 0.0
    warnings: List[str] = field(default_factory=list)
    dry_run: bool = False
    bytes_checked: int = 0  # scanned for NaN/inf (the whole checkpoint once), apart from the rebuild's reads

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def detect_format(path: str, tag: Optional[str] = None) -> str:
    """The checkpoint format of ``path`` (a save directory or one iteration/tag directory), looking at iteration or
    tag ``tag`` of a save directory when given.

    Raises:
        RecoveryError: ``path`` is not a checkpoint of a supported format.
    """
    if not os.path.isdir(path):
        raise RecoveryError(f"{path!r} is not a directory. Pass a checkpoint directory: a DeepSpeed save_dir (with "
                            f"'latest'), a Megatron --save directory (with latest_checkpointed_iteration.txt), or one "
                            f"iteration directory of either.")
    names = set(os.listdir(path))
    if tag is not None:
        for sub in (str(tag), iteration_dir_name(tag) if str(tag).isdigit() or tag == "release" else None):
            if sub and os.path.isdir(os.path.join(path, sub)):
                return detect_format(os.path.join(path, sub))
    if TRACKER in names:
        return _megatron_kind(resolve_iteration_dir(path)[0])
    if any(n.startswith("mp_rank_") and os.path.isdir(os.path.join(path, n)) for n in names) or \
            {".metadata", "metadata.json"} & names:
        return _megatron_kind(path)
    if "latest" in names:
        with open(os.path.join(path, "latest"), encoding="utf-8") as f:
            tag = f.read().strip()
        path = os.path.join(path, tag)
        names = set(os.listdir(path)) if os.path.isdir(path) else set()
    if any(n.startswith("layer_") and n.endswith("-model_states.pt") for n in names) or \
            any(n.startswith("mp_rank_") and n.endswith("_model_states.pt") for n in names):
        return "deepspeed"
    raise RecoveryError(
        f"{path!r} is not a checkpoint this tool knows: expected DeepSpeed pipeline files (layer_XX-model_states.pt, "
        f"mp_rank_XX_model_states.pt), Megatron legacy shards (mp_rank_XX_YYY/model_optim_rng.pt) or a Megatron "
        f"torch_dist directory (.metadata, metadata.json). Point at the save directory or one iteration directory.")


def _megatron_kind(iter_dir: str) -> str:
    names = set(os.listdir(iter_dir)) if os.path.isdir(iter_dir) else set()
    if "metadata.json" in names or ".metadata" in names or any(n.endswith(".distcp") for n in names):
        return "megatron_torch_dist"
    return "megatron_legacy"


def open_checkpoint(fmt: str, path: str, tag: Optional[str], ledger: IOLedger, check_values: bool = True) -> Handler:
    """The format handler for one iteration of a checkpoint (``inspect``, ``plan``, ``grad_norms``, ``rebuild``).

    Raises:
        ConfigError: ``fmt`` is not one of :data:`FORMATS`.
    """
    handlers = {"deepspeed": DeepSpeedCheckpoint, "megatron_legacy": MegatronLegacyCheckpoint,
                "megatron_torch_dist": MegatronDistCheckpoint}
    if fmt not in handlers:
        raise ConfigError(f"unknown checkpoint format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return handlers[fmt](path, tag, ledger, check_values)


def repair_checkpoint(path: str, output: Optional[str] = None, in_place: bool = False,
                      stages: Optional[Sequence[int]] = None, strategy: str = "gradnorm_average",
                      fmt: Optional[str] = None, tag: Optional[str] = None, events_file: Optional[str] = None,
                      dry_run: bool = False, check_values: bool = True) -> RepairReport:
    """Detect and rebuild the damaged stage(s) of a pipeline checkpoint.

    Args:
        path: the checkpoint (save directory or one iteration/tag directory).
        output: directory to write the repaired checkpoint to (created; must not hold a checkpoint already).
        in_place: rewrite the damaged stage's files inside ``path`` instead (a corrupt file is kept as
            ``<name>.corrupt``).
        stages: stages to rebuild even if they look intact (told that they are corrupt); detected ones are added.
        strategy: ``gradnorm_average`` (the paper), ``uniform_average`` or ``copy`` for middle stages.
        fmt: force the format instead of detecting it.
        tag: the DeepSpeed tag or Megatron iteration to repair (default: the latest one).
        events_file: JSON-lines file to append detection and recovery records to.
        dry_run: detect and plan only; write nothing.
        check_values: also scan every stage tensor for NaN/inf (damage that leaves a file loadable); reads the
            whole checkpoint once.

    Returns:
        The report (also logged, and recorded as events).

    Raises:
        ConfigError: contradictory arguments (no output, output and in-place, unknown strategy).
        RecoveryError: the checkpoint cannot be repaired (the message says why and what to do).
        UnsupportedSetupError: a stage is damaged and the checkpoint was saved with settings repair does not handle
            (an intact checkpoint with them is reported intact).
    """
    start = time.perf_counter()
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if not dry_run and (output is None) == (not in_place):
        raise ConfigError("say where the repaired checkpoint goes: --output DIR (a new directory) or --in-place "
                          "(rewrite the damaged stage inside the checkpoint), not both and not neither.")
    if output is not None and os.path.abspath(output) == os.path.abspath(path):
        raise ConfigError(f"--output {output!r} is the checkpoint itself; use --in-place to rewrite it there.")
    ledger = IOLedger()
    fmt = fmt or detect_format(path, tag)
    handler = open_checkpoint(fmt, path, tag, ledger, check_values)
    events = EventLog(events_file)
    step = int(handler.iteration) if str(handler.iteration).isdigit() else handler.iteration
    found = handler.inspect()
    damaged = dict(found.damaged)
    for s in stages or ():
        if not 0 <= s < found.num_stages:
            raise ConfigError(f"--stage {s} does not exist: the checkpoint has {found.num_stages} pipeline stages "
                              f"(0..{found.num_stages - 1}).")
        damaged.setdefault(s, "named with --stage")
    for s, why in sorted(damaged.items()):
        logger.warning("%s detected damaged stage in %s: %s", identity(stage=s), handler.iter_dir, why)
        events.write("detection", source="repair", format=fmt, checkpoint=handler.iter_dir, step=step,
                     stage=s, cause=why)
    report = RepairReport(fmt, handler.iter_dir, output or (handler.root if in_place else ""), str(handler.iteration),
                          found.num_stages, damaged, [], checkpoint_bytes=found.checkpoint_bytes,
                          bytes_checked=ledger.bytes_checked)
    if not damaged:
        report.duration_s = round(time.perf_counter() - start, 4)
        return report
    if found.unsupported:
        raise unsupported_damage_error(damaged, found.unsupported, handler.iter_dir, str(handler.iteration))
    check_damage_is_repairable(damaged, found.num_stages)
    plans = [handler.plan(s, strategy) for s in sorted(damaged)]
    norms = handler.grad_norms()
    weights = {p.target: plan_weights(p, norms, strategy, report.warnings) for p in plans}
    if dry_run:
        report.dry_run = True
        for p in plans:
            w, n, fb = weights[p.target]
            chunks = handler.describe_chunks(p, w) if hasattr(handler, "describe_chunks") else []
            report.rebuilds.append(StageRebuild(p.target, p.strategy, p.sources, w, n, damaged[p.target], fb,
                                                chunks=chunks))
        report.duration_s = round(time.perf_counter() - start, 4)
        return report

    out_iter_dir = handler.iter_dir if in_place else handler.prepare_output(output, found, set(damaged))
    for p in plans:
        w, n, fb = weights[p.target]
        t0 = time.perf_counter()
        result = handler.rebuild(p, w, out_iter_dir, in_place=in_place)
        rebuild = StageRebuild(p.target, p.strategy, p.sources, w, n, damaged[p.target], fb, result.get("note"),
                               result.get("files", []), result.get("chunks", []))
        report.rebuilds.append(rebuild)
        report.warnings.extend(result.get("warnings", []))
        logger.warning("%s rebuilt stage %d by %s from stage(s) %s with weights %s%s -> %s",
                       identity(stage=p.target), p.target, p.strategy, list(p.sources),
                       [round(x, 4) for x in w], f" ({fb})" if fb else "", out_iter_dir)
        for ch in rebuild.chunks:
            logger.warning("%s   model chunk %d (virtual stage %d) by %s from (stage, chunk) %s with weights %s",
                           identity(stage=p.target), ch["chunk"], ch["virtual_stage"], ch["strategy"],
                           [tuple(x) for x in ch["sources"]], [round(x, 4) for x in ch["weights"]])
        events.write("recovery", source="repair", format=fmt, checkpoint=out_iter_dir, step=step,
                     stage=p.target, strategy=p.strategy, sources=list(p.sources), weights=list(w),
                     norms=list(n), fallback=fb, note=result.get("note"), chunks=rebuild.chunks or None,
                     duration_s=round(time.perf_counter() - t0, 4))
    report.bytes_read, report.bytes_written = ledger.bytes_read, ledger.bytes_written
    report.bytes_copied, report.bytes_checked = ledger.bytes_copied, ledger.bytes_checked
    report.duration_s = round(time.perf_counter() - start, 4)
    return report
