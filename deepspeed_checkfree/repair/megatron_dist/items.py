"""The storage items of a Megatron ``torch_dist`` checkpoint (PyTorch DCP): the global ``.metadata`` index, how an
item's key names its parameter and shard, and reading and writing items in DCP's own serialization.
"""
from __future__ import annotations

import io
import logging
import os
import pickle
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ...errors import RecoveryError, UnsupportedSetupError
from ..base import HOST, TMP_SUFFIX, IOLedger

logger = logging.getLogger(__name__)

METADATA = ".metadata"
COMMON = "common.pt"
OPT_STATE = "optimizer.state."
_SHARD_SUFFIX = re.compile(r"^(?P<key>.+)/shard_(?P<offsets>[\d.]+)_(?P<shape>[\d.]+)$")


def split_opt(fqn: str) -> Tuple[Optional[str], str]:
    """``optimizer.state.exp_avg.decoder.x`` -> (``exp_avg``, ``decoder.x``); a model key -> (None, key)."""
    if fqn.startswith(OPT_STATE):
        state_name, _, param = fqn[len(OPT_STATE):].partition(".")
        return state_name, param
    return None, fqn


def parse_sharded_object(fqn: str) -> Optional[Tuple[str, List[int], str]]:
    """A ShardedObject's key ``<key>/shard_<offsets>_<global shape>`` -> (key, offsets, shape), or None."""
    m = _SHARD_SUFFIX.match(fqn)
    if m is None:
        return None
    return m.group("key"), [int(x) for x in m.group("offsets").split(".")], m.group("shape")


def sharded_object_fqn(key: str, offsets: Sequence[int], shape: str) -> str:
    """The inverse of :func:`parse_sharded_object`."""
    return f"{key}/shard_{'.'.join(map(str, offsets))}_{shape}"


def read_metadata(iter_dir: str, ledger: IOLedger) -> Any:
    """The DCP ``Metadata`` of an iteration (global shapes, chunks, and where each chunk is stored).

    Raises:
        RecoveryError: the index is missing or unreadable (it is written once, not by one stage).
        UnsupportedSetupError: the items use DCP storage transforms.
    """
    path = os.path.join(iter_dir, METADATA)
    try:
        md = pickle.loads(ledger.read_bytes(path))
    except FileNotFoundError as err:
        raise RecoveryError(f"{path} is missing. It is the global index of a torch_dist checkpoint (written once, "
                            f"not by one stage), so it cannot be rebuilt from neighbours; restore it from another "
                            f"copy.") from err
    except Exception as err:  # noqa: BLE001 - any unpickling failure means the index is unusable
        raise RecoveryError(f"{path} is unreadable ({type(err).__name__}: {err}); it is the global index of the "
                            f"checkpoint and cannot be rebuilt from neighbours.") from err
    for info in md.storage_data.values():
        if getattr(info, "transform_descriptors", None):
            raise UnsupportedSetupError(f"{info.relative_path} uses DCP storage transforms "
                                        f"{info.transform_descriptors}; not supported by this version.")
    return md


def read_item(iter_dir: str, md: Any, index: Any, ledger: IOLedger, count: bool = True) -> Any:
    """One storage item: the raw bytes of a ShardedObject, or the tensor of a chunk (counted as read by the rebuild
    unless ``count`` is false: the damage scan counts its own bytes).

    Raises:
        RecoveryError: its file is shorter than the index says.
    """
    info = md.storage_data[index]
    path = os.path.join(iter_dir, info.relative_path)
    with open(path, "rb") as f:
        f.seek(info.offset)
        data = f.read(info.length)
    if len(data) != info.length:
        raise RecoveryError(f"{path} is truncated: item {index.fqn} needs bytes "
                            f"{info.offset}..{info.offset + info.length}")
    if count:
        ledger.add_read(len(data), path)
    if index.offset is None:
        return data
    return torch.load(io.BytesIO(data), map_location=HOST, weights_only=True)


def write_items(out: str, rel: str, indices: Sequence[Any], values: Dict[Any, Any], md: Any) -> None:
    """Write the items ``indices`` (in that order) to ``out`` and point their entries of ``md.storage_data`` at the
    new offsets; ``values`` holds each item's bytes (a ShardedObject) or tensor, and is emptied of them as they go."""
    tmp = out + TMP_SUFFIX
    with open(tmp, "wb") as f:  # items written straight to the file, in DCP's own serialization
        for index in indices:
            start = f.tell()
            value = values.pop(index)
            if isinstance(value, (bytes, bytearray)):
                f.write(value)
            else:
                torch.save(value, f)
            old = md.storage_data[index]
            md.storage_data[index] = type(old)(rel, start, f.tell() - start)
    os.replace(tmp, out)
