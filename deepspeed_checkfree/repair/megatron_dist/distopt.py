"""The distributed optimizer's items in a ``torch_dist`` checkpoint (megatron.core ``dp_reshardable`` sharding, the
Megatron-LM default): per data-parallel group ``G`` (one per tensor x pipeline rank), the parameter groups and bucket
sizes as objects, and each bucket's fp32 parameters and Adam moments as chunks
(``optimizer.distributed.dp_group_idx_G.gbuf_idx_g.dtype_D.bucket_idx_b.{param,exp_avg,exp_avg_sq}``).
A rebuilt stage's items: its rebuilt weights in its recorded bucket layout, zero moments, step 0.
"""
from __future__ import annotations

import io
import re
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import torch

from ...errors import RecoveryError
from ..megatron_distopt import bucket_tensors, fresh_steps, per_bucket_numel

PREFIX = "optimizer.distributed."
_GROUP = re.compile(r"^optimizer\.distributed\.dp_group_idx_(\d+)\.(.+)$")
_BUCKET = re.compile(r"^gbuf_idx_(\d+)\.dtype_.+\.bucket_idx_(\d+)\.(\w+)$")


def dp_group_of(key: str) -> Optional[Tuple[int, str]]:
    """``optimizer.distributed.dp_group_idx_3.per_bucket_numel`` -> (3, ``per_bucket_numel``), else None."""
    m = _GROUP.match(key)
    return (int(m.group(1)), m.group(2)) if m else None


def _decode(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)


def _encode(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


class DistOptItems:
    """The values of one lost stage's distributed-optimizer items.

    Args:
        layouts: data-parallel group -> that group's recorded optimizer layout (an entry of the stage's layout).
        source_group: data-parallel group -> the group of the same tensor-parallel rank on the first source stage
            (whose parameter-group object lends the hyperparameters).
        tensor_of: (data-parallel group, model chunk, layout entry) -> the rebuilt parameter.
        read_object: object key (without the shard suffix) -> its stored bytes.
    """

    def __init__(self, layouts: Mapping[int, Mapping[str, Any]], source_group: Mapping[int, int],
                 tensor_of: Callable[[int, int, Mapping[str, Any]], torch.Tensor], read_object: Callable[[str], bytes]):
        self.layouts, self.source_group = layouts, source_group
        self.tensor_of, self.read_object = tensor_of, read_object
        self._flat: Dict[int, Dict[Tuple[int, int], torch.Tensor]] = {}

    def _layout(self, group: int) -> Mapping[str, Any]:
        if group not in self.layouts:
            raise RecoveryError(f"no recorded distributed-optimizer layout has data-parallel group {group}; the "
                                f"layout records do not match the checkpoint.")
        return self.layouts[group]

    def tensor(self, fqn: str, offset: Sequence[int], size: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        group, rest = dp_group_of(fqn)
        m = _BUCKET.match(rest)
        if m is None:
            raise RecoveryError(f"{fqn}: not a distributed-optimizer bucket this version knows")
        gbuf, bucket, kind = int(m.group(1)), int(m.group(2)), m.group(3)
        if kind != "param":  # Adam moments (and any other per-element state) restart at zero
            return torch.zeros(tuple(size), dtype=dtype)
        if group not in self._flat:
            self._flat[group] = bucket_tensors(self._layout(group), lambda c, e: self.tensor_of(group, c, e))
        flat = self._flat[group][(gbuf, bucket)]
        start = int(offset[0])
        return flat[start:start + int(size[0])].to(dtype).clone()

    def object_bytes(self, key: str) -> bytes:
        group, rest = dp_group_of(key)
        source = self._decode_source(group, rest)
        wrap = (lambda v: [v]) if isinstance(source, list) and len(source) == 1 else (lambda v: v)
        if rest in ("per_bucket_numel", "per_bucket_numel_unpadded"):
            return _encode(wrap(per_bucket_numel(self._layout(group), rest.endswith("unpadded"))))
        if rest == "optimizer":
            return _encode(fresh_steps(source))
        return self.read_object(f"{PREFIX}dp_group_idx_{self.source_group[group]}.{rest}")  # e.g. grad_scaler

    def _decode_source(self, group: int, rest: str) -> Any:
        return _decode(self.read_object(f"{PREFIX}dp_group_idx_{self.source_group[group]}.{rest}"))


__all__ = ["DistOptItems", "PREFIX", "dp_group_of"]
