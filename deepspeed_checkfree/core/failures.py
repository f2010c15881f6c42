"""Seeded failure plans: which stages are lost at which step, identical on every rank without communication.

The probabilistic plan follows the paper's failure generator: each stage fails independently with probability p
per iteration, applied before the iteration's first micro-batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np

from .config import CheckFreeConfig


def recoverable_stages(num_stages: int, mode: str) -> Tuple[int, ...]:
    """Stages the mode can rebuild: the middle ones for CheckFree, every stage for CheckFree+."""
    if mode == "checkfree_plus":
        return tuple(range(num_stages))
    return tuple(range(1, num_stages - 1))


@dataclass(frozen=True)
class FailurePlan:
    """Which stages fail at which step.

    Args:
        num_stages: pipeline depth.
        explicit: planned (stage, step) failures.
        probability: per-stage, per-iteration failure probability.
        stages: the stages the probability applies to.
        seed: seed of the probabilistic draws; the draw of step s depends only on (seed, s).
    """

    num_stages: int
    explicit: Tuple[Tuple[int, int], ...] = ()
    probability: float = 0.0
    stages: Tuple[int, ...] = ()
    seed: int = 0
    _by_step: Dict[int, Tuple[int, ...]] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_step: Dict[int, set] = {}
        for stage, step in self.explicit:
            by_step.setdefault(step, set()).add(stage)
        self._by_step.update({s: tuple(sorted(v)) for s, v in by_step.items()})

    @classmethod
    def from_config(cls, config: CheckFreeConfig, num_stages: int) -> "FailurePlan":
        """Build the plan of a validated config (``config.validate_for(num_stages)`` has run)."""
        inj = config.failure_injection
        stages = tuple(inj.stages) if inj.stages is not None else recoverable_stages(num_stages, config.mode)
        return cls(num_stages=num_stages, explicit=tuple((f.stage, f.step) for f in inj.at),
                   probability=inj.probability, stages=stages, seed=inj.seed)

    def failures_at(self, step: int) -> Tuple[int, ...]:
        """The sorted stages lost before the forward pass of ``step`` (empty when none)."""
        lost = set(self._by_step.get(step, ()))
        if self.probability > 0.0 and self.stages:
            # One draw per stage of the whole pipeline, so a stage's fate does not depend on which others are
            # eligible; seeded by (seed, step) so any rank can evaluate any step in any order.
            draws = np.random.default_rng([self.seed, step]).random(self.num_stages)
            lost.update(s for s in self.stages if draws[s] < self.probability)
        return tuple(sorted(lost))

    def schedule(self, steps: Iterable[int]) -> List[Tuple[int, Tuple[int, ...]]]:
        """(step, lost stages) for every step of ``steps`` that has a failure."""
        return [(s, lost) for s in steps if (lost := self.failures_at(s))]


def hourly_rate_to_probability(rate_per_hour: float, iteration_time_s: float) -> float:
    """Per-iteration failure probability of a stage that fails ``rate_per_hour`` of the time each hour.

    A stage that fails with probability ``r`` within an hour, independently per iteration, fails per iteration
    with ``p = 1 - (1 - r) ** (iteration_time_s / 3600)``. (The paper's configs set p by hand; e.g. 10%/h at
    ~20 s iterations gives 0.0006, as in its 124M config.)
    """
    if not 0.0 <= rate_per_hour < 1.0:
        raise ValueError(f"an hourly failure rate is a probability in [0, 1), got {rate_per_hour}; "
                         f"write 10%/h as 0.1")
    if iteration_time_s <= 0:
        raise ValueError(f"iteration_time_s must be positive, got {iteration_time_s}")
    return 1.0 - (1.0 - rate_per_hour) ** (iteration_time_s / 3600.0)



def replacement_death_phase(config: CheckFreeConfig, rank: int, incarnation: int) -> Optional[str]:
    """The phase of its re-join in which the trainer of ``rank`` and ``incarnation`` kills itself under
    ``failure_injection.kill_replacements`` (None: it lives). The first trainer (incarnation 0) always lives."""
    kills = config.failure_injection.kill_replacements
    if kills is None or kills.rank != rank or not 1 <= incarnation <= len(kills.phases):
        return None
    return kills.phases[incarnation - 1]
