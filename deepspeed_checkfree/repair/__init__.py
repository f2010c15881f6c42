"""Offline repair of a pipeline checkpoint that lost one stage's shard: ``checkfree repair CKPT``.

Finds the missing or corrupt stage, rebuilds it from its neighbours with the rule of :mod:`recovery` (gradient-norm
weighted average for a middle stage, copy of the neighbour plus the replicated embedding/head for the first or last
stage), and writes it back in the framework's own format so the framework's own loader resumes. Formats: DeepSpeed
pipeline (``engine.save_checkpoint``), Megatron legacy (``--ckpt-format torch``) and Megatron ``torch_dist``; each
lives in its own module (``repair_deepspeed``, ``repair_megatron``, ``repair_megatron_dist``), imported on demand,
so this module never imports DeepSpeed or Megatron.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import time
import zipfile
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch

from ..errors import CheckFreeError, ConfigError, RecoveryError
from ..events import EventLog, identity
from ..core.recovery import RecoveryPlan, plan_recovery, source_weights

logger = logging.getLogger(__name__)

# Offline repair works on files: tensors are memory-mapped from disk and written back as they are, so they live in
# host memory whatever device trained them (Megatron's own loader also maps checkpoints there).
HOST = torch.device("cpu")
STRATEGIES = ("gradnorm_average", "uniform_average", "copy")
FORMATS = ("deepspeed", "megatron_legacy", "megatron_torch_dist")


# ---------------------------------------------------------------------------------------------------------------
# Bookkeeping shared by the formats
# ---------------------------------------------------------------------------------------------------------------


class IOLedger:
    """Counts the bytes a repair reads, writes and copies (the benchmark's figures).

    Files are memory-mapped, so only the tensors actually used are read: :meth:`tensor` adds a tensor's storage once,
    :meth:`add_read` adds records read explicitly (pickles, zip directories, ``.distcp`` items).
    """

    def __init__(self) -> None:
        self.bytes_read = 0
        self.bytes_written = 0
        self.bytes_copied = 0
        self.files_read: List[str] = []
        self._storages: set = set()

    def add_read(self, nbytes: int, path: Optional[str] = None) -> None:
        self.bytes_read += int(nbytes)
        if path is not None and path not in self.files_read:
            self.files_read.append(path)

    def tensor(self, t: torch.Tensor) -> torch.Tensor:
        """Record that ``t``'s values are used (its whole storage counts once) and return it."""
        storage = t.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key not in self._storages:
            self._storages.add(key)
            self.bytes_read += storage.nbytes()
        return t

    def load(self, path: str) -> Any:
        """``torch.load`` a file lazily (memory-mapped); counts its pickle, not its tensors.

        Checkpoints hold pickled objects (Megatron's ``args``, DeepSpeed's engine state), so this unpickles with
        ``weights_only=False``, as the frameworks' own loaders do: repair only checkpoints you trust.

        Raises:
            RecoveryError: the file is not a readable PyTorch checkpoint.
        """
        self.add_read(check_torch_file(path), path)
        try:
            return torch.load(path, map_location=HOST, mmap=True, weights_only=False)
        except Exception as err:  # noqa: BLE001 - any unpickling failure means the file is unreadable
            raise RecoveryError(f"cannot read {path}: {type(err).__name__}: {err}. The file is corrupt or not a "
                                f"PyTorch checkpoint; name its stage with --stage to rebuild it.") from err

    def save(self, obj: Any, path: str) -> None:
        """``torch.save`` atomically (temporary file, then rename)."""
        tmp = path + ".checkfree-tmp"
        torch.save(obj, tmp)
        os.replace(tmp, path)
        self.bytes_written += os.path.getsize(path)

    def write_bytes(self, data: bytes, path: str) -> None:
        tmp = path + ".checkfree-tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        self.bytes_written += len(data)


def check_torch_file(path: str) -> int:
    """Cheap integrity check of a ``torch.save`` file: its zip directory is readable and every record lies inside
    the file (a truncated or overwritten file fails). Returns the size of its pickle record.

    Raises:
        RecoveryError: the file is missing, truncated or not a zip-format checkpoint.
    """
    try:
        size = os.path.getsize(path)
        with zipfile.ZipFile(path) as zf:
            pickle_bytes = 0
            for info in zf.infolist():
                if info.header_offset + info.compress_size > size:
                    raise RecoveryError(f"{path} is truncated: record {info.filename} ends at byte "
                                        f"{info.header_offset + info.compress_size} of a {size}-byte file")
                if info.filename.endswith("data.pkl"):
                    pickle_bytes = info.file_size
            return pickle_bytes
    except FileNotFoundError as err:
        raise RecoveryError(f"{path} is missing") from err
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        raise RecoveryError(f"{path} is not a readable PyTorch checkpoint ({err})") from err


def file_problem(path: str) -> Optional[str]:
    """Why ``path`` cannot be used (``"missing"``, ``"unreadable: ..."``), or None if it passes the cheap check."""
    if not os.path.exists(path):
        return "missing"
    try:
        check_torch_file(path)
    except RecoveryError as err:
        return f"unreadable: {err}"
    return None


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

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Inspection:
    """What a format handler found in one checkpoint iteration.

    Attributes:
        num_stages: pipeline depth recorded in the checkpoint.
        damaged: stage -> why it cannot be loaded (missing / unreadable file named).
        stage_files: stage -> the files that hold it (relative to the iteration directory).
        shared_files: files that belong to no single stage (copied as they are).
        checkpoint_bytes: size of the whole iteration on disk.
    """

    num_stages: int
    damaged: Dict[int, str]
    stage_files: Dict[int, List[str]]
    shared_files: List[str]
    checkpoint_bytes: int


# ---------------------------------------------------------------------------------------------------------------
# Plans and weights
# ---------------------------------------------------------------------------------------------------------------


def check_damage_is_repairable(damaged: Mapping[int, str], num_stages: int) -> None:
    """Each damaged stage needs intact neighbours.

    Raises:
        RecoveryError: two adjacent stages are damaged, or every stage is.
    """
    lost = sorted(damaged)
    for a, b in zip(lost, lost[1:]):
        if b == a + 1:
            raise RecoveryError(
                f"stages {a} and {b} are both damaged ({a}: {damaged[a]}; {b}: {damaged[b]}). CheckFree rebuilds a "
                f"stage from its intact neighbours, so two adjacent lost stages cannot be rebuilt from this "
                f"checkpoint. Restore one of them from another copy (an older iteration or a replica), then run "
                f"repair again.")
    if len(lost) >= num_stages:
        raise RecoveryError(f"all {num_stages} stages are damaged; nothing survives to rebuild from.")


def plan_stage(target: int, num_stages: int, strategy: str = "gradnorm_average",
               mode: str = "checkfree_plus") -> RecoveryPlan:
    """How one lost stage is rebuilt from a checkpoint.

    Middle stages use ``strategy`` (the paper's gradient-norm average by default); under ``checkfree_plus`` the first
    and last stage are copies of their neighbour (CheckFree+), which is the only option in a 2-stage pipeline.
    ``mode='checkfree'`` refuses the first and last stage (their neighbour does not hold their embedding/head).
    """
    if num_stages < 2:
        raise RecoveryError(f"a {num_stages}-stage checkpoint has no pipeline neighbours to rebuild a stage from; "
                            f"CheckFree needs num_stages >= 2 (>= 3 to average a middle stage).")
    edge = target in (0, num_stages - 1)
    (plan,) = plan_recovery([target], num_stages, mode=mode if edge else "checkfree", strategy=strategy)
    return plan


def plan_weights(plan: RecoveryPlan, norms: Mapping[int, float], strategy: str, warnings: List[str],
                 ) -> Tuple[Tuple[float, ...], Tuple[Optional[float], ...], Optional[str]]:
    """Normalised source weights of ``plan`` from the recorded norms (uniform, with a warning, when none)."""
    src_norms = tuple(norms.get(s) for s in plan.sources)
    raw, fallback = source_weights(plan, list(src_norms))
    if fallback and strategy == "gradnorm_average":
        if all(n is None for n in src_norms):
            fallback = (f"no gradient norms were recorded for stages {list(plan.sources)} in this checkpoint (save it "
                        f"with the checkfree hook to record them); using the uniform average")
        warnings.append(f"stage {plan.target}: {fallback}")
    total = sum(raw)
    return tuple(w / total for w in raw), src_norms, fallback


# ---------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------


def detect_format(path: str) -> str:
    """The checkpoint format of ``path`` (a save directory or one iteration/tag directory).

    Raises:
        RecoveryError: ``path`` is not a checkpoint of a supported format.
    """
    if not os.path.isdir(path):
        raise RecoveryError(f"{path!r} is not a directory. Pass a checkpoint directory: a DeepSpeed save_dir (with "
                            f"'latest'), a Megatron --save directory (with latest_checkpointed_iteration.txt), or one "
                            f"iteration directory of either.")
    names = set(os.listdir(path))
    if "latest_checkpointed_iteration.txt" in names:
        from .megatron_legacy import resolve_iteration_dir
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


def open_checkpoint(fmt: str, path: str, tag: Optional[str], ledger: IOLedger):
    """The format handler for one iteration of a checkpoint (``inspect``, ``plan``, ``grad_norms``, ``rebuild``)."""
    if fmt == "deepspeed":
        from .deepspeed_format import DeepSpeedCheckpoint
        return DeepSpeedCheckpoint(path, tag, ledger)
    if fmt == "megatron_legacy":
        from .megatron_legacy import MegatronLegacyCheckpoint
        return MegatronLegacyCheckpoint(path, tag, ledger)
    if fmt == "megatron_torch_dist":
        from .megatron_dist import MegatronDistCheckpoint
        return MegatronDistCheckpoint(path, tag, ledger)
    raise ConfigError(f"unknown checkpoint format {fmt!r}; choose one of {', '.join(FORMATS)}")


def repair_checkpoint(path: str, output: Optional[str] = None, in_place: bool = False,
                      stages: Optional[Sequence[int]] = None, strategy: str = "gradnorm_average",
                      fmt: Optional[str] = None, tag: Optional[str] = None, events_file: Optional[str] = None,
                      dry_run: bool = False) -> RepairReport:
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

    Returns:
        The report (also logged, and recorded as events).

    Raises:
        ConfigError: contradictory arguments (no output, output and in-place, unknown strategy).
        RecoveryError: the checkpoint cannot be repaired (the message says why and what to do).
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
    fmt = fmt or detect_format(path)
    handler = open_checkpoint(fmt, path, tag, ledger)
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
                          found.num_stages, damaged, [], checkpoint_bytes=found.checkpoint_bytes)
    if not damaged:
        report.duration_s = round(time.perf_counter() - start, 4)
        return report
    check_damage_is_repairable(damaged, found.num_stages)
    plans = [handler.plan(s, strategy) for s in sorted(damaged)]
    norms = handler.grad_norms()
    weights = {p.target: plan_weights(p, norms, strategy, report.warnings) for p in plans}
    if dry_run:
        report.dry_run = True
        for p in plans:
            w, n, fb = weights[p.target]
            report.rebuilds.append(StageRebuild(p.target, p.strategy, p.sources, w, n, damaged[p.target], fb))
        report.duration_s = round(time.perf_counter() - start, 4)
        return report

    out_iter_dir = handler.iter_dir if in_place else handler.prepare_output(output, found, set(damaged))
    for p in plans:
        w, n, fb = weights[p.target]
        t0 = time.perf_counter()
        result = handler.rebuild(p, w, out_iter_dir, in_place=in_place)
        rebuild = StageRebuild(p.target, p.strategy, p.sources, w, n, damaged[p.target], fb, result.get("note"),
                               result.get("files", []))
        report.rebuilds.append(rebuild)
        report.warnings.extend(result.get("warnings", []))
        logger.warning("%s rebuilt stage %d by %s from stage(s) %s with weights %s%s -> %s",
                       identity(stage=p.target), p.target, p.strategy, list(p.sources),
                       [round(x, 4) for x in w], f" ({fb})" if fb else "", out_iter_dir)
        events.write("recovery", source="repair", format=fmt, checkpoint=out_iter_dir, step=step,
                     stage=p.target, strategy=p.strategy, sources=list(p.sources), weights=list(w),
                     norms=list(n), fallback=fb, note=result.get("note"),
                     duration_s=round(time.perf_counter() - t0, 4))
    report.bytes_read, report.bytes_written = ledger.bytes_read, ledger.bytes_written
    report.bytes_copied = ledger.bytes_copied
    report.duration_s = round(time.perf_counter() - start, 4)
    return report


def copy_iteration(src_dir: str, dst_dir: str, skip: Iterable[str], ledger: IOLedger) -> None:
    """Copy every file of ``src_dir`` (recursively) to ``dst_dir`` except the relative paths in ``skip``."""
    skip = set(skip)
    for dirpath, _dirnames, filenames in os.walk(src_dir):
        rel_dir = os.path.relpath(dirpath, src_dir)
        for name in filenames:
            rel = os.path.normpath(os.path.join(rel_dir, name))
            if rel in skip or name.endswith(".checkfree-tmp"):
                continue
            dst = os.path.join(dst_dir, rel)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copy2(os.path.join(dirpath, name), dst)
            ledger.bytes_copied += os.path.getsize(dst)


def prepare_output_dir(output: str) -> None:
    """Create ``output``; refuse one that already holds files (never overwrite a checkpoint by accident)."""
    if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)):
        raise ConfigError(f"--output {output!r} exists and is not an empty directory; choose a new directory so no "
                          f"checkpoint is overwritten.")
    os.makedirs(output, exist_ok=True)


def set_aside(path: str) -> None:
    """Keep a damaged file as ``<path>.corrupt`` before its stage is rewritten in place."""
    if os.path.exists(path):
        os.replace(path, path + ".corrupt")


# ---------------------------------------------------------------------------------------------------------------
# Console command
# ---------------------------------------------------------------------------------------------------------------


def add_subcommand(subparsers) -> None:
    p = subparsers.add_parser(
        "repair", help="rebuild a pipeline stage lost from a checkpoint, from its neighbours",
        description="Rebuild the missing or corrupt pipeline stage of a DeepSpeed pipeline, Megatron legacy or "
                    "Megatron torch_dist checkpoint from its neighbouring stages (gradient-norm weighted average for "
                    "a middle stage, copy plus the replicated embedding/head for the first or last stage), and "
                    "write it in the framework's own format so the framework's own loader resumes.")
    p.add_argument("checkpoint", help="save directory (DeepSpeed save_dir or Megatron --save) or one iteration "
                                      "directory of it")
    where = p.add_mutually_exclusive_group()
    where.add_argument("-o", "--output", help="write the repaired checkpoint to this new directory")
    where.add_argument("--in-place", action="store_true", help="rewrite the damaged stage inside CHECKPOINT")
    p.add_argument("--stage", type=int, action="append", default=None, metavar="N",
                   help="rebuild stage N even if it looks intact (e.g. silently corrupted); repeatable")
    p.add_argument("--strategy", choices=STRATEGIES, default="gradnorm_average",
                   help="how a middle stage is rebuilt (default: the paper's gradient-norm weighted average)")
    p.add_argument("--format", dest="fmt", choices=FORMATS, help="skip format detection")
    p.add_argument("--tag", help="DeepSpeed tag or Megatron iteration number to repair (default: the latest)")
    p.add_argument("--events-file", help="append JSON-lines detection/recovery records to this file")
    p.add_argument("--dry-run", action="store_true", help="detect and plan only, write nothing")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def _print_report(report: RepairReport) -> None:
    print(f"checkpoint {report.source} ({report.format}, iteration {report.iteration}, {report.num_stages} stages)")
    if not report.damaged:
        print("no damaged stage found: every stage's files are present and readable. Nothing to do.")
        return
    for s, why in sorted(report.damaged.items()):
        print(f"  stage {s}: {why}")
    for r in report.rebuilds:
        norms = ", ".join(f"{s}: {'-' if n is None else f'{n:.4g}'}" for s, n in zip(r.sources, r.norms))
        weights = ", ".join(f"{s}: {w:.4f}" for s, w in zip(r.sources, r.weights))
        verb = "would rebuild" if report.dry_run else "rebuilt"
        print(f"{verb} stage {r.stage} by {r.strategy} from stage(s) {list(r.sources)}; weights {{{weights}}}; "
              f"grad norms {{{norms}}}")
        if r.note:
            print(f"  note: {r.note}")
    for w in report.warnings:
        print(f"warning: {w}")
    if report.output:
        mib = 2 ** 20
        print(f"wrote {report.output}: read {report.bytes_read / mib:.1f} MiB of a {report.checkpoint_bytes / mib:.1f} "
              f"MiB checkpoint, wrote {report.bytes_written / mib:.1f} MiB, copied {report.bytes_copied / mib:.1f} MiB "
              f"in {report.duration_s:.2f} s")


def run(args: argparse.Namespace) -> int:
    try:
        report = repair_checkpoint(args.checkpoint, output=args.output, in_place=args.in_place, stages=args.stage,
                                   strategy=args.strategy, fmt=args.fmt, tag=args.tag, events_file=args.events_file,
                                   dry_run=args.dry_run)
    except CheckFreeError as err:
        print(f"checkfree repair: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        _print_report(report)
    return 0
