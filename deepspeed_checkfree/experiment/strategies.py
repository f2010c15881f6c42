"""What each recovery strategy does on a failure, over executed iterations, for either backend.

The loop is the same for the simulated pipeline and the real engine (where every rank runs it with the same plan,
so the collectives line up). Failures are drawn per *executed* iteration: a failure strikes at a moment in time,
so the checkpointing strategy, which re-executes rolled-back iterations, meets the same failures at the same
iterations as everyone else while its training step falls behind.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Callable, List, Optional, Protocol, Sequence, Tuple

from ..errors import RecoveryError
from ..core.failures import FailurePlan
from ..core.recovery import plan_recovery
from .config import ExperimentConfig, StrategySpec

logger = logging.getLogger(__name__)


class Backend(Protocol):
    """A pipeline the strategies drive (:class:`.simulated.SimulatedPipeline` or the engine worker's adapter)."""

    def train_step(self, step: int) -> float: ...

    def evaluate(self) -> float: ...

    def lose_and_rebuild(self, lost: Sequence[int], step: int) -> object: ...

    def save_checkpoint(self, step: int) -> None: ...

    def rollback(self, lost: Sequence[int]) -> int: ...

    def update_replica(self) -> None: ...

    def restore_from_replica(self, lost: Sequence[int]) -> None: ...


@dataclass
class Record:
    """One executed iteration of one strategy.

    Attributes:
        iteration: executed iteration (the time axis).
        step: training step it trained (differs from ``iteration`` after a rollback).
        train_loss: mean micro-batch loss of the iteration.
        val_loss: validation loss after it, when evaluated.
        failures: stage losses so far (a lost stage counts once per failure).
        lost: stages lost before this iteration.
        checkpoint_saved: a checkpoint was written after it.
        weight_copies: source stages the replacement downloaded (CheckFree kinds), for the clock.
    """

    iteration: int
    step: int
    train_loss: float
    val_loss: Optional[float] = None
    failures: int = 0
    lost: Tuple[int, ...] = ()
    checkpoint_saved: bool = False
    weight_copies: int = 0


@dataclass
class StrategyResult:
    """A strategy's run: its records, and why it stopped early (None if it ran to the end)."""

    name: str
    records: List[Record] = field(default_factory=list)
    stopped: Optional[str] = None

    def as_dict(self) -> dict:
        return {"name": self.name, "stopped": self.stopped, "records": [asdict(r) for r in self.records]}

    @classmethod
    def from_dict(cls, data: dict) -> "StrategyResult":
        records = [Record(**{**r, "lost": tuple(r["lost"])}) for r in data["records"]]
        return cls(data["name"], records, data.get("stopped"))


def needs_mode(spec: StrategySpec) -> Tuple[str, str]:
    """(mode, strategy) the backend must be built with for ``spec``: CheckFree+ needs its swapped routes and
    replicas from the first step; every other strategy trains the plain pipeline."""
    if spec.kind == "checkfree":
        return spec.mode, spec.strategy
    return spec.pipeline_mode, "gradnorm_average"


def run_strategy(cfg: ExperimentConfig, spec: StrategySpec, backend: Backend, plan: FailurePlan,
                 progress: Optional[Callable[[int], None]] = None) -> StrategyResult:
    """Train ``cfg.training.iterations`` executed iterations of ``spec`` under ``plan``.

    Args:
        cfg: the experiment.
        spec: the strategy.
        backend: a freshly built pipeline (same initial weights for every strategy).
        plan: the failure plan, identical for every strategy (``no_failure`` ignores it).
        progress: called with the number of iterations done since the last call.

    Returns:
        The per-iteration records. A strategy that meets a failure it cannot recover from (e.g. both copies of
        the embedding lost together under CheckFree+) stops there, with the reason in ``stopped``.
    """
    t = cfg.training
    result = StrategyResult(spec.name)
    step, failures = 0, 0
    if spec.kind == "checkpoint":
        backend.save_checkpoint(0)  # the initial weights are the first checkpoint, at no cost
    if spec.kind == "redundant":
        backend.update_replica()
    for it in range(t.iterations):
        lost = () if spec.kind == "no_failure" else plan.failures_at(it)
        weight_copies = 0
        if lost:
            failures += len(lost)
            if spec.kind == "checkfree":
                try:
                    plans = plan_recovery(lost, cfg.model.num_stages, spec.mode, spec.strategy,
                                          t.on_adjacent_failure)
                except RecoveryError as err:
                    result.stopped = f"iteration {it}: {err}"
                    logger.warning("%s stops: %s", spec.name, result.stopped)
                    break
                weight_copies = max(len(p.sources) for p in plans)
                backend.lose_and_rebuild(lost, step)
            elif spec.kind == "checkpoint":
                step = backend.rollback(lost)
            elif spec.kind == "redundant":
                backend.restore_from_replica(lost)
        loss = backend.train_step(step)
        step += 1
        saved = spec.kind == "checkpoint" and step % spec.every == 0
        if saved:
            backend.save_checkpoint(step)
        if spec.kind == "redundant":
            backend.update_replica()
        val = backend.evaluate() if (it + 1) % t.eval_every == 0 or it == t.iterations - 1 else None
        result.records.append(Record(it, step - 1, loss, val, failures, tuple(lost), saved, weight_copies))
        if progress is not None:
            progress(1)
    return result
