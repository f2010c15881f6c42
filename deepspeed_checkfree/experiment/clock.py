"""The wall-clock model: turns each strategy's executed iterations, checkpoints and recoveries into seconds.

Pure (no torch). The paper compares recovery methods by the time to reach a validation loss, with a cost model of
its own (activations over ~0.1 GiB/s, gradients over ~0.2 GiB/s, checkpoints to storage at link speed). This
module is that model, every term a documented parameter (``wall_clock:`` section):

- failure-free iteration: ``iteration_time_s`` given, or measured (:func:`pipelined_iteration`);
- redundant computation (Bamboo): every stage also runs its successor's forward, ``+ redundant_extra_compute x
  compute`` per iteration; CheckFree+ iterations are multiplied by ``plus_slowdown``;
- checkpointing: every K steps the whole model (weights and optimizer state) goes to storage over one link, as
  the paper describes it (``checkpoint_parallel: true``: every stage writes its own shard over its own link),
  blocking training; on a failure the replacement downloads its stage's checkpoint and every stage rolls back
  (the lost work is re-executed, so it shows up as extra iterations, not as a term here);
- CheckFree: the replacement downloads the weights of its sources (2 for an average, 1 for a copy, 0 for random);
- redundant: the replacement downloads its stage's weights and optimizer state from the neighbour holding them;
- every failure of every strategy also pays ``restart_s`` (detection and a node joining).

The paper's own clock (Table 2) states an iteration time per method and a flat ~30 s CheckFree recovery; the
``iteration_by_kind``, ``checkfree_recovery_s`` and ``redundant_recovery_s`` fields replace the modelled terms
with such stated values.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence

GIB = 1024 ** 3


@dataclass(frozen=True)
class ClockModel:
    """Resolved parameters (seconds and bytes).

    Attributes:
        iteration_s: failure-free pipeline iteration.
        compute_s: the compute part of it (what redundant computation adds a share of).
        stage_bytes: one stage's weights.
        optimizer_state_factor: optimizer state bytes per weight byte.
        transfer_bytes_s: link a replacement downloads a neighbour's weights over.
        checkpoint_bytes_s: link to checkpoint storage.
        checkpoint_blocking: whether writing a checkpoint stalls training.
        checkpoint_stages: stage states that go over the storage link per checkpoint (the whole model: P).
        restart_s: charged per failure event to every strategy.
        redundant_extra_compute: extra compute share of redundant computation.
        plus_slowdown: iteration-time factor of CheckFree+.
        source: how iteration_s was obtained ("given" or "measured: ...").
        iteration_by_kind: stated iteration times per strategy kind (``checkfree_plus``: CheckFree+'s schedule,
            with or without failures) that replace the modelled ones.
        checkfree_recovery_s: if set, the whole cost of one CheckFree failure event.
        redundant_recovery_s: if set, the whole cost of one failure event under redundant computation.
    """

    iteration_s: float
    compute_s: float
    stage_bytes: float
    optimizer_state_factor: float = 2.0
    transfer_bytes_s: float = 0.1 * GIB
    checkpoint_bytes_s: float = 0.1 * GIB
    checkpoint_blocking: bool = True
    checkpoint_stages: int = 1
    restart_s: float = 0.0
    redundant_extra_compute: float = 1.0 / 3.0
    plus_slowdown: float = 1.0
    source: str = "given"
    iteration_by_kind: Dict[str, float] = field(default_factory=dict)
    checkfree_recovery_s: Optional[float] = None
    redundant_recovery_s: Optional[float] = None

    @property
    def stage_state_bytes(self) -> float:
        """Weights plus optimizer state of one stage (what a checkpoint or a replica holds)."""
        return self.stage_bytes * (1.0 + self.optimizer_state_factor)

    def iteration_seconds(self, kind: str, mode: str = "checkfree") -> float:
        """One failure-free iteration of a strategy (``mode``: the pipeline it trains)."""
        plus = mode == "checkfree_plus" and kind in ("checkfree", "no_failure")
        key = "checkfree_plus" if plus else kind
        if key in self.iteration_by_kind:
            return self.iteration_by_kind[key]
        if kind == "redundant":
            return self.iteration_s + self.redundant_extra_compute * self.compute_s
        if plus:
            return self.iteration_s * self.plus_slowdown
        return self.iteration_s

    def checkpoint_write_seconds(self) -> float:
        """Writing one checkpoint to storage, whether or not training waits for it."""
        return self.checkpoint_stages * self.stage_state_bytes / self.checkpoint_bytes_s

    def checkpoint_seconds(self) -> float:
        """What writing one checkpoint costs training (0 when it does not block training)."""
        if not self.checkpoint_blocking:
            return 0.0
        return self.checkpoint_write_seconds()

    def recovery_seconds(self, kind: str, weight_copies: int = 0) -> float:
        """One failure event.

        Args:
            kind: the strategy kind.
            weight_copies: for CheckFree, the most source stages any rebuilt stage downloads (2 average, 1 copy,
                0 random).
        """
        if kind == "checkpoint":
            return self.restart_s + self.stage_state_bytes / self.checkpoint_bytes_s
        if kind == "redundant":
            if self.redundant_recovery_s is not None:
                return self.redundant_recovery_s
            return self.restart_s + self.stage_state_bytes / self.transfer_bytes_s
        if kind == "checkfree":
            if self.checkfree_recovery_s is not None:
                return self.checkfree_recovery_s
            return self.restart_s + weight_copies * self.stage_bytes / self.transfer_bytes_s
        return 0.0

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


def pipelined_iteration(sequential_step_s: float, num_stages: int, micro_batches: int, activation_bytes: float,
                        stage_bytes: float, activation_bytes_s: float, gradient_bytes_s: float,
                        data_parallel: int = 1) -> Dict[str, float]:
    """A pipeline iteration from a one-process measurement.

    ``sequential_step_s`` is one training step with every stage run in turn on one device (what the simulated
    pipeline measures), so a stage spends ``t = sequential_step_s / (P * M)`` per micro-batch. With a GPipe-style
    schedule (fill and drain) the compute takes ``(M + P - 1) t``; each direction moves ``M + P - 2`` activation
    tensors along the critical path; data-parallel replicas all-reduce a stage's gradient (ring: ``2 (d-1)/d``).

    Returns:
        ``compute_s``, ``activation_s``, ``gradient_s`` and their sum ``iteration_s``.
    """
    p, m = num_stages, micro_batches
    t = sequential_step_s / (p * m)
    compute = (m + p - 1) * t
    activation = 2 * (m + p - 2) * activation_bytes / activation_bytes_s
    gradient = 2 * (data_parallel - 1) / data_parallel * stage_bytes / gradient_bytes_s
    return {"compute_s": compute, "activation_s": activation, "gradient_s": gradient,
            "iteration_s": compute + activation + gradient}


def timeline(records: Sequence[Dict[str, Any]], kind: str, mode: str, clock: ClockModel) -> List[float]:
    """Modelled wall-clock seconds at the end of each executed iteration of one strategy.

    Each record needs ``lost`` (stages lost before it), ``checkpoint_saved`` (a checkpoint was written after it)
    and ``weight_copies`` (see :meth:`ClockModel.recovery_seconds`).
    """
    out, now = [], 0.0
    per_iteration = clock.iteration_seconds(kind, mode)
    for r in records:
        if r.get("lost"):
            now += clock.recovery_seconds(kind, r.get("weight_copies", 0))
        now += per_iteration
        if r.get("checkpoint_saved"):
            now += clock.checkpoint_seconds()
        out.append(now)
    return out
