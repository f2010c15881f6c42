"""What every checkpoint format's repair shares: the I/O ledger, the cheap file check, the inspection record, how a
lost stage's plan and source weights are chosen, the output copy and the fresh optimizer state of a rebuilt stage.

Imports only torch and the pure recovery rules; the format subpackages build on it, never the other way round.
"""
from __future__ import annotations

import copy
import logging
import os
import shutil
import zipfile
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch

from ..core.recovery import RecoveryPlan, plan_recovery, source_weights
from ..errors import ConfigError, RecoveryError, UnsupportedSetupError

logger = logging.getLogger(__name__)

# Offline repair works on files: tensors are memory-mapped from disk and written back as they are, so they live in
# host memory whatever device trained them (Megatron's own loader also maps checkpoints there).
HOST = torch.device("cpu")
STRATEGIES = ("gradnorm_average", "uniform_average", "copy")
TMP_SUFFIX = ".checkfree-tmp"


# ---------------------------------------------------------------------------------------------------------------
# Reading and writing files
# ---------------------------------------------------------------------------------------------------------------


def atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save`` to a temporary file, then rename: a crash never leaves half a checkpoint file behind."""
    tmp = path + TMP_SUFFIX
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write_bytes(data: bytes, path: str) -> None:
    """Write ``data`` to a temporary file, then rename (see :func:`atomic_torch_save`)."""
    tmp = path + TMP_SUFFIX
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


class IOLedger:
    """Counts the bytes a repair reads, writes and copies (the benchmark's figures).

    Files are memory-mapped, so only the tensors actually used are read: :meth:`tensor` adds a tensor's storage once,
    :meth:`add_read` adds records read explicitly (pickles, zip directories, ``.distcp`` items).
    """

    def __init__(self) -> None:
        self.bytes_read = 0
        self.bytes_written = 0
        self.bytes_copied = 0
        self.bytes_checked = 0
        self.files_read: List[str] = []
        self._storages: set = set()

    def add_read(self, nbytes: int, path: Optional[str] = None) -> None:
        self.bytes_read += int(nbytes)
        if path is not None and path not in self.files_read:
            self.files_read.append(path)

    def read_bytes(self, path: str) -> bytes:
        """The whole of a small file (a JSON record, a pickled index), counted as read."""
        with open(path, "rb") as f:
            data = f.read()
        self.add_read(len(data), path)
        return data

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

    def check_values(self, obj: Any, where: str) -> Optional[str]:
        """Scan every floating-point tensor inside ``obj`` for NaN/inf (:func:`nonfinite_problem`), counting the bytes
        scanned apart from the rebuild's reads. Returns the problem, or None."""
        problem, nbytes = nonfinite_problem(obj)
        self.bytes_checked += nbytes
        return None if problem is None else " ".join(filter(None, (where, problem)))

    def save(self, obj: Any, path: str) -> None:
        """``torch.save`` atomically (temporary file, then rename)."""
        atomic_torch_save(obj, path)
        self.bytes_written += os.path.getsize(path)

    def write_bytes(self, data: bytes, path: str) -> None:
        atomic_write_bytes(data, path)
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


def _tensors(obj: Any, prefix: str = "") -> Iterable[Tuple[str, torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}.{i}" if prefix else str(i))


def nonfinite_problem(obj: Any, most: int = 3) -> Tuple[Optional[str], int]:
    """Every floating-point tensor inside ``obj`` (nested dicts and lists, as checkpoints hold them) checked for NaN and
    infinity: damage that leaves a file loadable (overwritten bytes inside a tensor record) shows up only here.

    Returns:
        (``"has non-finite values in fc.weight (4096 of 16384 elements), ..."`` or None, bytes scanned).
    """
    bad, nbytes = [], 0
    for name, t in _tensors(obj):
        if not (t.is_floating_point() or t.is_complex()) or t.numel() == 0:
            continue
        nbytes += t.numel() * t.element_size()
        finite = torch.isfinite(t)
        if not bool(finite.all()):
            bad.append(f"{name} ({int((~finite).sum())} of {t.numel()} elements)")
    if not bad:
        return None, nbytes
    more = f" and {len(bad) - most} more tensors" if len(bad) > most else ""
    return f"has non-finite values in {', '.join(bad[:most])}{more}", nbytes


def damage_of(path: str, ledger: "IOLedger", check_values: bool = True) -> Optional[str]:
    """Why a ``torch.save`` file of a stage cannot be used: missing, unreadable, or (when ``check_values``) holding
    NaN/inf in a floating-point tensor; None when it is sound."""
    why = file_problem(path)
    if why is not None or not check_values:
        return why
    try:
        return ledger.check_values(ledger.load(path), "")
    except RecoveryError as err:
        return f"unreadable: {err}"


def directory_bytes(path: str, recursive: bool = True) -> int:
    """Size on disk of the files below ``path`` (only its own files when not ``recursive``)."""
    if not recursive:
        return sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path)
                   if os.path.isfile(os.path.join(path, n)))
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


@dataclass
class Inspection:
    """What a format handler found in one checkpoint iteration.

    Attributes:
        num_stages: pipeline depth recorded in the checkpoint.
        damaged: stage -> why it cannot be loaded (missing / unreadable file named).
        stage_files: stage -> the files that hold it (relative to the iteration directory).
        shared_files: files that belong to no single stage (copied as they are).
        checkpoint_bytes: size of the whole iteration on disk.
        unsupported: settings of the checkpoint CheckFree cannot rebuild under (``(name, value)``); they matter only
            when a stage is damaged.
    """

    num_stages: int
    damaged: Dict[int, str]
    stage_files: Dict[int, List[str]]
    shared_files: List[str]
    checkpoint_bytes: int
    unsupported: Tuple[Tuple[str, Any], ...] = ()


def unsupported_damage_error(damaged: Mapping[int, str], settings: Sequence[Tuple[str, Any]], source: str,
                             iteration: str) -> "UnsupportedSetupError":
    """The error for a damaged checkpoint saved under settings CheckFree cannot rebuild (an intact one loads anyway):
    names the settings, the damage and the ways on."""
    what = ", ".join(f"{k}={v}" for k, v in settings)
    lost = "; ".join(f"stage {s}: {why}" for s, why in sorted(damaged.items()))
    return UnsupportedSetupError(
        f"{source} (iteration {iteration}) is damaged ({lost}) and was saved with {what}, under which CheckFree "
        f"cannot rebuild a stage in this version. Options: resume without the hook's repair (--checkfree-repair off: "
        f"the framework's own loader then reports the damage), load an older intact checkpoint (Megatron "
        f"--ckpt-step N, or checkfree repair --iteration N), or inspect the plan with `checkfree repair {source} "
        f"--dry-run`.")


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


def empty_optimizer_state(param_groups: Sequence[Mapping[str, Any]], sizes: Sequence[int]) -> Dict[str, Any]:
    """A torch optimizer state dict with no per-parameter state (the paper resets the rebuilt stage's Adam moments)
    and ``param_groups``' hyperparameters, group ``k`` holding the next ``sizes[k]`` parameter indices."""
    groups = copy.deepcopy(list(param_groups))
    index = 0
    for g, n in zip(groups, sizes):
        g["params"] = list(range(index, index + n))
        index += n
    return {"state": {}, "param_groups": groups}


# ---------------------------------------------------------------------------------------------------------------
# Where the repaired checkpoint goes
# ---------------------------------------------------------------------------------------------------------------


def copy_iteration(src_dir: str, dst_dir: str, skip: Iterable[str], ledger: IOLedger) -> None:
    """Copy every file of ``src_dir`` (recursively) to ``dst_dir`` except the relative paths in ``skip``."""
    skip = set(skip)
    for dirpath, _dirnames, filenames in os.walk(src_dir):
        rel_dir = os.path.relpath(dirpath, src_dir)
        for name in filenames:
            rel = os.path.normpath(os.path.join(rel_dir, name))
            if rel in skip or name.endswith(TMP_SUFFIX):
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


def copy_to_output(iter_dir: str, output: str, skip: Iterable[str], ledger: IOLedger) -> str:
    """Create ``output`` and copy the iteration ``iter_dir`` into it under the same name, leaving out ``skip`` (the
    files the rebuild writes anew). Returns the output iteration directory."""
    prepare_output_dir(output)
    out_iter = os.path.join(output, os.path.basename(iter_dir))
    copy_iteration(iter_dir, out_iter, skip, ledger)
    return out_iter


def set_aside(path: str) -> None:
    """Keep a damaged file as ``<path>.corrupt`` before its stage is rewritten in place."""
    if os.path.exists(path):
        os.replace(path, path + ".corrupt")


def check_rebuilt(obj: Any, stage: int, what: str, ledger: IOLedger) -> None:
    """A rebuilt stage is checked like a loaded one before it is written.

    Raises:
        RecoveryError: the rebuild produced NaN or infinity (a source stage holds them too).
    """
    problem = ledger.check_values(obj, what)
    if problem is not None:
        raise RecoveryError(f"the rebuilt stage {stage} would be damaged too: {problem}. A source stage holds "
                            f"non-finite values; name it with --stage to see the plan, or restore an older "
                            f"checkpoint. Stage {stage}'s files were not written.")


def write_rebuilt_file(obj: Any, path: str, in_place: bool, ledger: IOLedger, stage: int) -> str:
    """``torch.save`` one file of ``stage``'s rebuild (atomically) after checking it holds only finite values; in
    place, the damaged file is set aside first. Returns ``path``."""
    check_rebuilt(obj, stage, os.path.basename(path), ledger)
    if in_place:
        set_aside(path)
    ledger.save(obj, path)
    return path
