"""The LR boost of a rebuilt stage, kept exact under DeepSpeed's LR schedulers: the scheduler keeps seeing (and
updating) the un-boosted LRs, and the optimizer trains with the boosted ones (paper: LR x1.1 after a rebuild)."""
from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional

from ..core.recovery import boosted_lrs


class LRBoost:
    """A stage's LR scale and the scheduler's un-boosted LRs (None until a boost applies)."""

    def __init__(self) -> None:
        self.scheduled_lrs: Optional[List[float]] = None
        self.lr_scale = 1.0

    def apply(self, param_groups: List[dict], lr_boost: float) -> None:
        """Train ``param_groups`` at ``lr_boost`` x the scheduled LR from now on (a second rebuild sets it again)."""
        if self.scheduled_lrs is None:
            self.scheduled_lrs = [g["lr"] for g in param_groups]
        self.lr_scale = lr_boost
        self._write(param_groups)

    @contextlib.contextmanager
    def around_scheduler_step(self, scheduler, param_groups: List[dict]) -> Iterator[None]:
        """While the body runs, ``scheduler.step`` sees the un-boosted LRs and the boost is re-applied after it.

        DeepSpeed steps the scheduler right after the optimizer (``_take_model_step``), so chainable and absolute
        schedulers both keep the boost exact.
        """
        if self.scheduled_lrs is None or scheduler is None:
            yield
            return
        real_step = scheduler.step

        def boosted_step(*args, **kwargs):
            for g, lr in zip(param_groups, self.scheduled_lrs):
                g["lr"] = lr
            real_step(*args, **kwargs)
            self.scheduled_lrs = [g["lr"] for g in param_groups]
            self._write(param_groups)

        scheduler.step = boosted_step
        try:
            yield
        finally:
            del scheduler.step

    def _write(self, param_groups: List[dict]) -> None:
        for g, lr in zip(param_groups, boosted_lrs(self.scheduled_lrs, self.lr_scale)):
            g["lr"] = lr
