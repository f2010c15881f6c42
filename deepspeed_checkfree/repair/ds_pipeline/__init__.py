"""Repair of a DeepSpeed pipeline checkpoint (``PipelineEngine.save_checkpoint``) that lost one stage: the file names
and CheckFree client state in :mod:`.files`, the reader and rebuilder in :mod:`.checkpoint`. Version 0.1's
``deepspeed_checkfree.repair_deepspeed`` resolves here. Never imports DeepSpeed.
"""
from __future__ import annotations

from .checkpoint import DeepSpeedCheckpoint
from .files import LAYERS_KEY, NORM_KEY, NORMS_FILE, checkpoint_client_state, layer_file, mp_file

__all__ = ["DeepSpeedCheckpoint", "LAYERS_KEY", "NORMS_FILE", "NORM_KEY", "checkpoint_client_state", "layer_file",
           "mp_file"]
