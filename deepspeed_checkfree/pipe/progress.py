"""A stage's progress apart from its weights and optimizer state, as one typed record.

A survivor of a lost process carries it across the re-formed process group, a rank restored from its data-parallel
replica receives the replica's, and a replacement that rebuilds its stage takes the schedule part of a survivor's.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional


@dataclass
class StageProgress:
    """Everything but weights and optimizer state that makes a stage continue exactly where it was.

    Attributes:
        global_steps: optimizer steps this stage has applied.
        global_samples: samples it has trained on.
        skipped_steps: steps DeepSpeed skipped (overflow).
        lr_scheduler: the LR scheduler's ``state_dict()`` (None without a scheduler).
        lrs: the learning rate of each optimizer parameter group now (boost included).
        scheduled_lrs: the scheduler's un-boosted LRs, once a rebuild boosted this stage (else None).
        lr_scale: the stage's LR boost (1.0 unless rebuilt).
        stage_grad_norm: the stage's gradient norm at its last step (None before the first step).
        tied_authority: tied key -> the stage whose (de)embedding copy the other copies follow after an edge rebuild.
        replayed_steps: steps this rank has already applied and replays without applying again.
    """

    global_steps: int
    global_samples: int
    lrs: List[float]
    skipped_steps: int = 0
    lr_scheduler: Optional[dict] = None
    scheduled_lrs: Optional[List[float]] = None
    lr_scale: float = 1.0
    stage_grad_norm: Optional[float] = None
    tied_authority: Dict[str, int] = field(default_factory=dict)
    replayed_steps: int = 0

    def schedule_for_replacement(self, step: int) -> "StageProgress":
        """The part a replacement rank takes from a survivor that has not applied ``step``: the step and sample
        counters and the un-boosted LR schedule. Its own boost, norm and tied authorities start fresh; the rebuild
        sets them."""
        return StageProgress(global_steps=step, global_samples=self.global_samples,
                             lrs=list(self.scheduled_lrs if self.scheduled_lrs is not None else self.lrs),
                             lr_scheduler=self.lr_scheduler)
