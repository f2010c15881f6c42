"""Offline repair of a pipeline checkpoint that lost one stage's shard: ``checkfree repair CKPT``.

Finds the missing or corrupt stage, rebuilds it from its neighbours with the rule of :mod:`..core.recovery`, and
writes it back in the framework's own format so the framework's own loader resumes. One subpackage per format
(:mod:`.ds_pipeline`, :mod:`.megatron_legacy`, :mod:`.megatron_dist`) on top of :mod:`.base` and
:mod:`.megatron_common`; :mod:`.dispatch` and :mod:`.command` sit above them. Never imports DeepSpeed or Megatron.
"""
from __future__ import annotations

from .base import (HOST, STRATEGIES, IOLedger, Inspection, check_damage_is_repairable, check_torch_file,
                   copy_iteration, file_problem, plan_stage, plan_weights, prepare_output_dir, set_aside)
from .command import add_subcommand, run
from .dispatch import FORMATS, RepairReport, StageRebuild, detect_format, open_checkpoint, repair_checkpoint

__all__ = [
    "FORMATS", "HOST", "STRATEGIES", "IOLedger", "Inspection", "RepairReport", "StageRebuild", "add_subcommand",
    "check_damage_is_repairable", "check_torch_file", "copy_iteration", "detect_format", "file_problem",
    "open_checkpoint", "plan_stage", "plan_weights", "prepare_output_dir", "repair_checkpoint", "run", "set_aside",
]
