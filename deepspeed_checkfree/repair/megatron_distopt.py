"""The distributed optimizer's state of a rebuilt Megatron stage, shared by the legacy and torch_dist rebuilds.

Megatron's distributed optimizer keeps the fp32 main parameters and the Adam moments flattened into gradient buckets.
A rebuilt stage's fresh optimizer state is its rebuilt weights laid out in those buckets, zero moments and step 0.
The layout (which parameter sits where in which bucket) is the one the stage had, as the CheckFree hook recorded it
(:mod:`deepspeed_checkfree.megatron.distopt`): each stage writes its own and its neighbours' layouts, so the lost
stage's survives it. Never imports Megatron.
"""
from __future__ import annotations

import copy
import json
import os
import re
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch

from ..errors import RecoveryError
from .base import IOLedger, atomic_write_bytes

SIDECAR_DIR = "checkfree"
_LAYOUT_FILE = re.compile(r"distopt_layout_stage_(\d{3})_tp_(\d{2})\.json$")
NO_LAYOUT_FIX = ("The bucket layout of the distributed optimizer is recorded by the checkfree hook "
                 "(deepspeed_checkfree.megatron.install()) with every checkpoint; for this one, resume with "
                 "--checkfree-repair off, load an older checkpoint saved with the hook (--ckpt-step N), or rebuild "
                 "only the weights and resume with --no-load-optim.")

# (legacy chunk key, parameter entry of the layout) -> the rebuilt tensor of that parameter
TensorOf = Callable[[int, Mapping[str, Any]], torch.Tensor]


def layout_file(iter_dir: str, stage: int, tp: int) -> str:
    return os.path.join(iter_dir, SIDECAR_DIR, f"distopt_layout_stage_{stage:03d}_tp_{tp:02d}.json")


def write_distopt_layouts(iter_dir: str, stage: int, tp: int, layouts: Mapping[int, Any]) -> str:
    """Write, as ``stage``'s record, the layouts of ``stage`` and its neighbours (stage -> layout); atomic."""
    path = layout_file(iter_dir, stage, tp)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write_bytes(json.dumps({"stage": stage, "tp": tp,
                                   "layouts": {str(s): v for s, v in layouts.items()}}).encode("utf-8"), path)
    return path


def read_distopt_layout(iter_dir: str, stage: int, tp: int, ledger: IOLedger) -> Optional[List[Dict[str, Any]]]:
    """``stage``'s layout at tensor-parallel rank ``tp`` from any surviving record that holds it, or None."""
    folder = os.path.join(iter_dir, SIDECAR_DIR)
    if not os.path.isdir(folder):
        return None
    for name in sorted(os.listdir(folder)):
        m = _LAYOUT_FILE.match(name)
        if m is None or int(m.group(2)) != tp:
            continue
        try:
            record = json.loads(ledger.read_bytes(os.path.join(folder, name)))
        except (OSError, ValueError):
            continue  # the lost stage's own record may be damaged too
        if str(stage) in record.get("layouts", {}):
            return record["layouts"][str(stage)]
    return None


def require_layout(iter_dir: str, stage: int, tp: int, ledger: IOLedger) -> List[Dict[str, Any]]:
    """Like :func:`read_distopt_layout`, for a rebuild that needs it.

    Raises:
        RecoveryError: no record of the lost stage's layout survives.
    """
    layout = read_distopt_layout(iter_dir, stage, tp, ledger)
    if not layout:
        raise RecoveryError(f"stage {stage} (tensor-parallel rank {tp}) was saved with the distributed optimizer, and "
                            f"no record of its bucket layout survives in {os.path.join(iter_dir, SIDECAR_DIR)}. "
                            f"{NO_LAYOUT_FIX}")
    return layout


def dtype_key(text: str) -> Tuple[torch.dtype, ...]:
    """``"(torch.float32, torch.float32)"`` -> the (param dtype, grad dtype) key Megatron's state uses."""
    return tuple(getattr(torch, part.strip().split(".")[-1]) for part in text.strip("()").split(","))


def bucket_tensors(opt_layout: Mapping[str, Any], tensor_of: TensorOf) -> Dict[Tuple[int, int], torch.Tensor]:
    """(gbuf, bucket) -> the fp32 main parameters of one optimizer's buckets (``numel_unpadded`` long, padding zero),
    each parameter's rebuilt values at its recorded place.

    Raises:
        RecoveryError: a rebuilt tensor does not fit its recorded place.
    """
    out = {}
    for buf in opt_layout["buffers"]:
        for b, bucket in enumerate(buf["buckets"]):
            flat = torch.zeros(bucket["numel_unpadded"], dtype=torch.float32)
            for entry in bucket["params"]:
                value = tensor_of(buf["chunk"], entry).detach().reshape(-1).float()
                if value.numel() != entry["end"] - entry["start"]:
                    raise RecoveryError(f"the rebuilt {entry['name']} has {value.numel()} elements; the recorded "
                                        f"distributed-optimizer layout expects {entry['end'] - entry['start']}.")
                flat[entry["start"]:entry["end"]] = value
            out[(buf["gbuf"], b)] = flat
    return out


def legacy_param_state(layout: List[Mapping[str, Any]], tensor_of: TensorOf) -> Any:
    """The content of a rebuilt stage's ``distrib_optim.pt`` (megatron.core ``get_parameter_state_dp_zero``): per
    gradient buffer, the buckets' unpadded parameters concatenated, zero moments. A list with several optimizers."""
    states = []
    for opt_layout in layout:
        buckets = bucket_tensors(opt_layout, tensor_of)
        state: Dict[Any, Any] = {"buckets_coalesced": True}
        for buf in opt_layout["buffers"]:
            world = torch.cat([buckets[(buf["gbuf"], b)] for b in range(len(buf["buckets"]))])
            state[buf["gbuf"]] = {dtype_key(buf["dtype"]): {"param": world, "exp_avg": torch.zeros_like(world),
                                                           "exp_avg_sq": torch.zeros_like(world),
                                                           "numel_unpadded": int(world.numel())}}
        states.append(state)
    return states[0] if len(states) == 1 else states


def per_bucket_numel(opt_layout: Mapping[str, Any], unpadded: bool) -> List[Dict[Tuple[torch.dtype, ...], List[int]]]:
    """megatron.core's ``per_bucket_numel[_unpadded]`` of one optimizer, from its recorded layout."""
    key = "numel_unpadded" if unpadded else "numel"
    return [{dtype_key(buf["dtype"]): [b[key] for b in buf["buckets"]]} for buf in opt_layout["buffers"]]


def fresh_steps(state: Any) -> Any:
    """A copy of a distributed optimizer's ``state_dict()`` (or of its param groups) with every parameter group's
    step count 0: with zero moments that is the state a fresh Adam starts from."""
    state = copy.deepcopy(state)

    def walk(obj: Any) -> None:
        if isinstance(obj, dict):
            for g in obj.get("param_groups", []) if isinstance(obj.get("param_groups"), list) else []:
                if isinstance(g, dict) and "step" in g:
                    g["step"] = type(g["step"])(0) if isinstance(g["step"], (int, float)) else 0
            for v in obj.values():
                walk(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v)

    walk(state)
    return state


__all__ = ["NO_LAYOUT_FIX", "bucket_tensors", "dtype_key", "fresh_steps", "layout_file", "legacy_param_state",
           "per_bucket_numel", "read_distopt_layout", "require_layout", "write_distopt_layouts"]
