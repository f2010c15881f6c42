"""Which micro-batches the CheckFree+ first pair recomputes (``checkfree.plus_recompute_edges``; pure).

Under the route-aware 1F1B (:mod:`.schedule`) stages 0 and 1 hold up to P + 2 micro-batches of activations where
DeepSpeed's 1F1B holds P on its first stage. A recomputed micro-batch keeps only its stage input from its forward to
its backward, where the stage's forward runs again: it costs one input instead of a stage's activations while
held, and one extra forward. ``True`` recomputes the fewest micro-batches that keep the pair at stock 1F1B's
level; ``"all"`` recomputes every micro-batch of stages 0 and 1. Under activation checkpointing a held micro-batch
is the inputs of its segments instead of its activations; the count is the same.
"""
from __future__ import annotations

import functools
from typing import FrozenSet, List, Set, Tuple, Union

from deepspeed.runtime.pipe.schedule import BackwardPass, ForwardPass

from .schedule import stage_program

Policy = Union[bool, str]  # False (off), True (down to stock 1F1B's level), "all"
EDGE_PAIR = (0, 1)


def _passes(stage_id: int, num_stages: int, micro_batches: int) -> List[Tuple[type, int]]:
    """The stage's forwards and backwards in the order it runs them: ``(ForwardPass|BackwardPass, micro_batch_id)``."""
    program = stage_program(stage_id, micro_batches, num_stages)[0]
    return [(cls, mb) for cmds in program for cls, _, mb in cmds if cls in (ForwardPass, BackwardPass)]


def stock_first_stage_held(num_stages: int, micro_batches: int) -> int:
    """Micro-batches of activations DeepSpeed's 1F1B holds on its first stage (its most-loaded stage)."""
    return min(micro_batches, num_stages)


@functools.lru_cache(maxsize=64)
def recomputed_micro_batches(stage_id: int, num_stages: int, micro_batches: int, policy: Policy) -> FrozenSet[int]:
    """The micro-batches whose forward ``stage_id`` runs again in their backward under ``policy``.

    ``True``: few enough that the stage's full activations, a recomputed micro-batch's counted while its backward
    rebuilds them, never exceed :func:`stock_first_stage_held` micro-batches at any point of its instruction
    stream. Chosen greedily in that order: whenever the count would exceed the budget, the held micro-batch whose
    backward comes last is recomputed instead (its forward is then checkpointed; the plan is static, so the choice
    can reach back to a forward already passed). No smaller set does it where ``tests/unit/test_recompute.py``
    tries every smaller one. Only stages 0 and 1 recompute: every other stage holds fewer than stock 1F1B's first
    stage already (:func:`~.schedule.max_in_flight`).
    """
    if policy not in (False, True, "all"):
        raise ValueError(f"plus_recompute_edges must be false, true or 'all'; got {policy!r}")
    if not policy or stage_id not in EDGE_PAIR:
        return frozenset()
    if policy == "all":
        return frozenset(range(micro_batches))
    budget = stock_first_stage_held(num_stages, micro_batches)
    passes = _passes(stage_id, num_stages, micro_batches)
    backward_at = {mb: i for i, (cls, mb) in enumerate(passes) if cls is BackwardPass}
    full: Set[int] = set()
    recomputed: Set[int] = set()
    for cls, mb in passes:
        if cls is ForwardPass:
            full.add(mb)
        rebuilt = 1 if (cls is BackwardPass and mb in recomputed) else 0
        while len(full) + rebuilt > budget:
            latest = max(full, key=backward_at.__getitem__)
            full.discard(latest)
            recomputed.add(latest)
        if cls is BackwardPass:
            full.discard(mb)
    return frozenset(recomputed)


def held_peaks(stage_id: int, num_stages: int, micro_batches: int, recomputed: FrozenSet[int]) -> Tuple[int, int]:
    """``(full, inputs)``: the most micro-batches whose full activations the stage holds at once (a recomputed
    one's while its backward rebuilds them included), and the most it holds as stage inputs only."""
    full: Set[int] = set()
    inputs: Set[int] = set()
    peak_full = peak_inputs = 0
    for cls, mb in _passes(stage_id, num_stages, micro_batches):
        if cls is ForwardPass:
            (inputs if mb in recomputed else full).add(mb)
            peak_full = max(peak_full, len(full))
        else:
            peak_full = max(peak_full, len(full) + (1 if mb in inputs else 0))
            full.discard(mb)
            inputs.discard(mb)
        peak_inputs = max(peak_inputs, len(inputs))
    return peak_full, peak_inputs
