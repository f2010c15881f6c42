"""Repair of a Megatron ``torch_dist`` checkpoint (megatron.core ``dist_checkpointing``; PyTorch DCP files).

An iteration is ``.metadata`` (pickled DCP ``Metadata``), ``__{rank}_{k}.distcp`` files of serialized chunks, the
common state (args, iteration, scheduler: ``common.pt`` up to megatron.core 0.16, an item of global rank 0's file
from 0.19, :mod:`.common_state`) and ``metadata.json``. :mod:`.items` reads and writes the items, :mod:`.checkpoint`
finds and rebuilds a lost stage; megatron.core's unmodified loader then reads the checkpoint.
"""
from __future__ import annotations

from .checkpoint import MegatronDistCheckpoint
from .items import COMMON, METADATA, OPT_STATE, split_opt

__all__ = ["COMMON", "METADATA", "OPT_STATE", "MegatronDistCheckpoint", "split_opt"]
