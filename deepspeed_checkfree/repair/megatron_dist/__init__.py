"""Repair of a Megatron ``torch_dist`` checkpoint (megatron.core ``dist_checkpointing``; PyTorch DCP files).

An iteration is ``.metadata`` (pickled DCP ``Metadata``), ``__{rank}_{k}.distcp`` files of serialized chunks,
``common.pt`` (args, iteration, scheduler) and ``metadata.json``. :mod:`.items` reads and writes the items,
:mod:`.checkpoint` finds and rebuilds a lost stage; megatron.core's unmodified loader then reads the checkpoint.
"""
from __future__ import annotations

from .checkpoint import MegatronDistCheckpoint
from .items import COMMON, METADATA, OPT_STATE, split_opt

__all__ = ["COMMON", "METADATA", "OPT_STATE", "MegatronDistCheckpoint", "split_opt"]
