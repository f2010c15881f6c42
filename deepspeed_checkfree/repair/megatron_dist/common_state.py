"""The non-sharded state of a ``torch_dist`` checkpoint (args, iteration, scheduler, optimizer step, content
metadata), in either of megatron.core's layouts, and the replica the CheckFree hook keeps of it.

* megatron.core <= 0.16: ``common.pt``, a file of its own that global rank 0 writes beside the ``.distcp`` files.
* megatron.core >= 0.19: a ShardedObject ``common_state`` (``[state_dict]``, torch-saved) that global rank 0 writes
  into its own ``__0_0.distcp``; there is no ``common.pt``. Losing global rank 0's files then loses the state every
  stage needs, so the hook copies the item's bytes into the sidecar (``checkfree/common_state_replica.bin``), written
  by the rank that also keeps stage 0's edge replica, and a rebuild of stage 0 writes them back.
"""
from __future__ import annotations

import io
import logging
import os
import pickle
from typing import Any, Optional

import torch

from ...errors import RecoveryError
from ..base import HOST, IOLedger, atomic_write_bytes
from ..megatron_common import SIDECAR_DIR
from .items import COMMON, METADATA

logger = logging.getLogger(__name__)

COMMON_STATE_KEY = "common_state"
COMMON_STATE_FQN = "common_state/shard_0_1"  # ShardedObject(key, data, global_shape=(1,), global_offset=(0,))
REPLICA = "common_state_replica.bin"


def replica_path(iter_dir: str) -> str:
    return os.path.join(iter_dir, SIDECAR_DIR, REPLICA)


def common_state_index(md: Any) -> Optional[Any]:
    """The storage index of the ``common_state`` item (megatron.core >= 0.19), or None (``common.pt`` layout)."""
    return next((i for i in md.storage_data if i.offset is None and i.fqn == COMMON_STATE_FQN), None)


def decode(data: bytes) -> Any:
    """The state dict inside the item's bytes (megatron.core stores ``[state_dict]``)."""
    obj = torch.load(io.BytesIO(data), map_location=HOST, weights_only=False)
    return obj[0] if isinstance(obj, list) and len(obj) == 1 else obj


def item_bytes(iter_dir: str, md: Any, index: Any) -> Optional[bytes]:
    """The item's bytes as its file holds them, or None when the file is missing or too short."""
    info = md.storage_data[index]
    path = os.path.join(iter_dir, info.relative_path)
    try:
        with open(path, "rb") as f:
            f.seek(info.offset)
            data = f.read(info.length)
    except OSError:
        return None
    return data if len(data) == info.length else None


def read_replica(iter_dir: str, ledger: IOLedger) -> Optional[bytes]:
    try:
        return ledger.read_bytes(replica_path(iter_dir))
    except OSError:
        return None


def write_replica(iter_dir: str) -> Optional[str]:
    """Copy the ``common_state`` item of a checkpoint just saved into its sidecar (called by the hook on the rank that
    keeps stage 0's replicas). Nothing to do in the ``common.pt`` layout.

    Returns:
        The replica's path, or None when there is nothing to copy. A checkpoint whose files are not complete yet
        (an asynchronous save) is skipped with a warning: losing global rank 0's files of that one stays fatal.
    """
    if not any(name.endswith(".distcp") for name in os.listdir(iter_dir)):
        return None  # not a torch_dist checkpoint
    try:
        with open(os.path.join(iter_dir, METADATA), "rb") as f:
            md = pickle.load(f)
    except (OSError, pickle.UnpicklingError, EOFError) as err:
        if os.path.exists(os.path.join(iter_dir, COMMON)):
            return None
        logger.warning("[checkfree] %s: no readable %s after the save (%s; an asynchronous save?): the common state "
                       "is not replicated, so losing global rank 0's files of this checkpoint cannot be repaired",
                       iter_dir, METADATA, err)
        return None
    index = common_state_index(md)
    if index is None:
        return None
    data = item_bytes(iter_dir, md, index)
    if data is None:
        logger.warning("[checkfree] %s: the common state in %s is not complete after the save: it is not replicated",
                       iter_dir, md.storage_data[index].relative_path)
        return None
    path = replica_path(iter_dir)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write_bytes(data, path)
    return path


def read_common_state(iter_dir: str, md: Any, ledger: IOLedger) -> Any:
    """The checkpoint's common state dict, from ``common.pt``, the ``common_state`` item, or (when global rank 0's
    file is lost) the hook's replica.

    Raises:
        RecoveryError: none of them is there.
    """
    legacy = os.path.join(iter_dir, COMMON)
    if os.path.exists(legacy):
        return ledger.load(legacy)
    index = common_state_index(md)
    if index is None:
        raise RecoveryError(f"{legacy} is missing; it holds the checkpoint's args and iteration (written once by "
                            f"global rank 0) and cannot be rebuilt from neighbours. Restore it from another copy.")
    data = item_bytes(iter_dir, md, index)
    if data is not None:
        ledger.add_read(len(data), os.path.join(iter_dir, md.storage_data[index].relative_path))
        try:
            return decode(data)
        except Exception:  # noqa: BLE001 - a damaged item: the replica may still be good
            pass
    data = read_replica(iter_dir, ledger)
    if data is None:
        raise RecoveryError(
            f"the common state of {iter_dir} (args, iteration, scheduler: the '{COMMON_STATE_KEY}' item of "
            f"{md.storage_data[index].relative_path}, global rank 0's file) is lost and no CheckFree replica "
            f"({replica_path(iter_dir)}) holds it. Save checkpoints with the checkfree hook "
            f"(deepspeed_checkfree.megatron.install()), which keeps one, or restore the file from another copy.")
    return decode(data)


__all__ = ["COMMON_STATE_FQN", "COMMON_STATE_KEY", "common_state_index", "decode", "item_bytes",
           "read_common_state", "read_replica", "replica_path", "write_replica"]
