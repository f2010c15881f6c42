"""Recovery decisions and math, with no process group: which stages rebuild a lost stage, with which weights, and
how their parameters are matched and blended.

The rule (arXiv 2506.15461, CheckFree): W_i = (w_prev W_{i-1} + w_next W_{i+1}) / (w_prev + w_next)
with w = |g| + eps, |g| the neighbour's gradient norm at its last optimizer step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch

from ..errors import RecoveryError

# ---------------------------------------------------------------------------------------------------------------
# Which sources rebuild which stage
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecoveryPlan:
    """How one lost stage is rebuilt.

    Attributes:
        target: the lost stage.
        sources: surviving stages whose weights are blended (empty for ``random``).
        strategy: what is done: ``gradnorm_average``, ``uniform_average``, ``copy`` or ``random``.
        distances: each source's distance from the target (1 for a direct neighbour).
    """

    target: int
    sources: Tuple[int, ...]
    strategy: str
    distances: Tuple[int, ...] = ()


def _edge_partner(stage: int, num_stages: int) -> Optional[int]:
    """CheckFree+ trains S_0/S_1 and S_{P-2}/S_{P-1} to be interchangeable, so each rebuilds the other."""
    last = num_stages - 1
    return {0: 1, 1: 0, last - 1: last, last: last - 1}.get(stage)


def plan_recovery(lost: Iterable[int], num_stages: int, mode: str = "checkfree",
                  strategy: str = "gradnorm_average", on_adjacent_failure: str = "interpolate",
                  ) -> Tuple[RecoveryPlan, ...]:
    """Decide how every lost stage is rebuilt from the survivors.

    Args:
        lost: the stages lost together.
        num_stages: pipeline depth.
        mode: ``checkfree`` or ``checkfree_plus``.
        strategy: the configured strategy for middle stages.
        on_adjacent_failure: ``interpolate`` between the nearest survivors or ``stop``.

    Returns:
        One plan per lost stage, sorted by stage.

    Raises:
        RecoveryError: a lost stage cannot be rebuilt under the mode and policy.
    """
    lost_set = sorted(set(lost))
    for s in lost_set:
        if not 0 <= s < num_stages:
            raise RecoveryError(f"stage {s} does not exist in a {num_stages}-stage pipeline")
    if len(lost_set) == num_stages:
        raise RecoveryError(f"all {num_stages} stages were lost: nothing survives to rebuild from. Restart from "
                            f"a checkpoint.")
    alive = [s for s in range(num_stages) if s not in lost_set]
    plans: List[RecoveryPlan] = []
    for t in lost_set:
        if strategy == "random":
            plans.append(RecoveryPlan(t, (), "random"))
            continue
        partner = _edge_partner(t, num_stages) if mode == "checkfree_plus" else None
        if partner is not None:
            if partner in lost_set:
                pair = tuple(sorted((t, partner)))
                what = "embedding" if 0 in pair else "final norm and LM head"
                raise RecoveryError(
                    f"stages {pair[0]} and {pair[1]} were lost together; under CheckFree+ they hold the only two "
                    f"copies of the {what}, so neither can be rebuilt. Restart from a checkpoint.")
            plans.append(RecoveryPlan(t, (partner,), "copy", (abs(t - partner),)))
            continue
        if t in (0, num_stages - 1):
            raise RecoveryError(
                f"stage {t} is the {'first' if t == 0 else 'last'} stage of a {num_stages}-stage pipeline and "
                f"has only one neighbour; plain CheckFree rebuilds only stages 1..{num_stages - 2}. Set "
                f"checkfree.mode='checkfree_plus' to protect the first and last stages.")
        prev = max((s for s in alive if s < t), default=None)
        nxt = min((s for s in alive if s > t), default=None)
        if prev is None or nxt is None:
            side = "before" if prev is None else "after"
            raise RecoveryError(f"stage {t} was lost with every stage {side} it (lost: {lost_set}); there is no "
                                f"survivor on that side to rebuild from. Restart from a checkpoint.")
        if (prev != t - 1 or nxt != t + 1) and on_adjacent_failure == "stop":
            raise RecoveryError(
                f"adjacent stages {lost_set} were lost together, so stage {t} lacks a surviving direct "
                f"neighbour, and checkfree.on_adjacent_failure='stop'. Set it to 'interpolate' to rebuild from "
                f"the nearest survivors (stages {prev} and {nxt}), or restart from a checkpoint.")
        if strategy == "copy":
            plans.append(RecoveryPlan(t, (prev,), "copy", (t - prev,)))
        else:
            plans.append(RecoveryPlan(t, (prev, nxt), strategy, (t - prev, nxt - t)))
    return tuple(plans)


def source_weights(plan: RecoveryPlan, norms: Sequence[Optional[float]], eps: float = 1e-4,
                   norm: str = "plain") -> Tuple[Tuple[float, ...], Optional[str]]:
    """The (unnormalised) weight of each source of ``plan``.

    ``gradnorm_average`` gives ``|g| + eps`` (or ``|g|**2 + eps``); with two sources at unequal distances (a run of
    adjacent lost stages) each weight is also multiplied by the *other* source's distance, so the nearer survivor
    counts more and a single lost stage reduces exactly to the paper's rule. A missing, zero or non-finite norm
    makes the blend fall back to the uniform average (distance factors kept), and the reason is returned.

    Args:
        plan: the plan whose sources are weighted.
        norms: each source's last gradient norm, in ``plan.sources`` order (None if never measured).
        eps: added to each norm.
        norm: ``plain`` or ``squared``.

    Returns:
        (weights, fallback reason or None).
    """
    if len(norms) != len(plan.sources):
        raise ValueError(f"got {len(norms)} norms for {len(plan.sources)} sources {plan.sources}")
    if plan.strategy == "random" or not plan.sources:
        return (), None
    if plan.strategy == "copy" or len(plan.sources) == 1:
        return (1.0,), None
    d_prev, d_next = plan.distances
    distance_factor = (float(d_next), float(d_prev))
    fallback = None
    if plan.strategy == "gradnorm_average":
        bad = [(s, n) for s, n in zip(plan.sources, norms) if n is None or not math.isfinite(n) or n <= 0.0]
        if bad:
            fallback = ("gradient norm unusable for " +
                        ", ".join(f"stage {s} ({'not measured yet' if n is None else n})" for s, n in bad) +
                        "; fell back to uniform_average")
        else:
            mags = [float(n) ** 2 if norm == "squared" else float(n) for n in norms]
            return tuple((m + eps) * f for m, f in zip(mags, distance_factor)), None
    return distance_factor, fallback


# ---------------------------------------------------------------------------------------------------------------
# Matching a stage's parameters to a source stage's
# ---------------------------------------------------------------------------------------------------------------

ParamSig = Tuple[str, Tuple[int, ...], str]  # (name inside the layer, shape, dtype)


@dataclass(frozen=True)
class LayerSignature:
    """What recovery needs to know of one layer of a stage, without its values.

    Attributes:
        name: the layer's prefix in the stage's ``named_parameters`` ("3", or "tied_modules.embed").
        type_name: the layer's class name; layers are matched by type.
        params: (name inside the layer, shape, dtype) of each parameter.
        tied_key: the ``TiedLayerSpec`` key of a tied layer, matched by key rather than position.
    """

    name: str
    type_name: str
    params: Tuple[ParamSig, ...]
    tied_key: Optional[str] = None


StageSignature = Tuple[LayerSignature, ...]


def layer_signature(name: str, layer: torch.nn.Module, tied_key: Optional[str] = None) -> LayerSignature:
    """The signature of one layer (a module with parameters)."""
    params = tuple((n, tuple(p.shape), str(p.dtype).replace("torch.", "")) for n, p in layer.named_parameters())
    return LayerSignature(name, type(layer).__name__, params, tied_key)


@dataclass(frozen=True)
class ParamMapping:
    """Which source parameter rebuilds each target parameter, in a fixed order both sides agree on.

    Attributes:
        pairs: (target parameter name, source parameter name).
        note: set when layers were mapped by relative position because the layer counts differ.
    """

    pairs: Tuple[Tuple[str, str], ...]
    note: Optional[str] = None


def _relative_index(k: int, n_target: int, n_source: int) -> int:
    if n_target == n_source:
        return k
    if n_target == 1:
        return (n_source - 1) // 2
    return round(k * (n_source - 1) / (n_target - 1))


def match_layers(target: StageSignature, source: StageSignature, target_stage: int = -1,
                 source_stage: int = -1) -> ParamMapping:
    """Map every parameter of the target stage to a parameter of the source stage.

    Tied layers match by their ``TiedLayerSpec`` key. Other layers match by type: the k-th layer of a type in the
    target takes the k-th layer of that type in the source, or, when the counts differ, the layer at the same
    relative position (noted in the result).

    Raises:
        RecoveryError: a target layer has no counterpart, or parameter names or shapes differ (named in the
            message).
    """
    pairs: List[Tuple[str, str]] = []
    notes: List[str] = []
    src_tied = {l.tied_key: l for l in source if l.tied_key is not None}
    src_by_type: Dict[str, List[LayerSignature]] = {}
    for l in source:
        if l.tied_key is None:
            src_by_type.setdefault(l.type_name, []).append(l)
    tgt_by_type: Dict[str, List[LayerSignature]] = {}
    for l in target:
        if l.tied_key is None:
            tgt_by_type.setdefault(l.type_name, []).append(l)

    matched: Dict[str, LayerSignature] = {}
    for l in target:
        if l.tied_key is not None:
            if l.tied_key not in src_tied:
                raise RecoveryError(
                    f"stage {target_stage} holds the tied layer {l.tied_key!r} but source stage {source_stage} "
                    f"does not (its tied layers: {sorted(src_tied) or 'none'}); it cannot be rebuilt from there.")
            matched[l.name] = src_tied[l.tied_key]
    for type_name, tgt_layers in tgt_by_type.items():
        src_layers = src_by_type.get(type_name, [])
        if not src_layers:
            raise RecoveryError(
                f"stage {target_stage} has {len(tgt_layers)} layer(s) of type {type_name} "
                f"({', '.join(l.name for l in tgt_layers)}) but source stage {source_stage} has none (its layer "
                f"types: {sorted(src_by_type) or 'none'}). CheckFree needs neighbouring stages built from the same "
                f"layer types: partition with partition_method='type:{type_name}' or equal blocks per stage.")
        picked = [src_layers[_relative_index(k, len(tgt_layers), len(src_layers))] for k in range(len(tgt_layers))]
        if len(tgt_layers) != len(src_layers):
            notes.append(f"{type_name}: stage {target_stage} layers {[l.name for l in tgt_layers]} <- stage "
                         f"{source_stage} layers {[l.name for l in picked]} by relative position "
                         f"({len(tgt_layers)} vs {len(src_layers)} layers)")
        for t, s in zip(tgt_layers, picked):
            matched[t.name] = s

    for l in target:
        s = matched[l.name]
        if [p[0] for p in l.params] != [p[0] for p in s.params] or \
                [p[1] for p in l.params] != [p[1] for p in s.params]:
            raise RecoveryError(
                f"layer {l.name} ({l.type_name}) of stage {target_stage} cannot be rebuilt from layer {s.name} of "
                f"stage {source_stage}: parameters {[(n, list(sh)) for n, sh, _ in l.params]} vs "
                f"{[(n, list(sh)) for n, sh, _ in s.params]}. Neighbouring stages must hold layers of equal "
                f"shapes.")
        pairs.extend((f"{l.name}.{tp[0]}", f"{s.name}.{sp[0]}") for tp, sp in zip(l.params, s.params))
    return ParamMapping(tuple(pairs), "; ".join(notes) or None)


# ---------------------------------------------------------------------------------------------------------------
# Blending values
# ---------------------------------------------------------------------------------------------------------------


def blend(tensors: Sequence[torch.Tensor], weights: Sequence[float],
          dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``sum_i w_i * T_i / sum_i w_i``, computed in at least fp32 and returned in ``dtype``.

    Args:
        tensors: same-shaped tensors on one device.
        weights: one non-negative weight per tensor, not all zero.
        dtype: output dtype (default: the first tensor's).
    """
    if len(tensors) != len(weights) or not tensors:
        raise ValueError(f"blend needs one weight per tensor, got {len(tensors)} tensors and {len(weights)} weights")
    total = sum(weights)
    if not total > 0:
        raise ValueError(f"blend weights must sum to a positive number, got {list(weights)}")
    out_dtype = dtype or tensors[0].dtype
    compute = torch.promote_types(out_dtype, torch.float32)
    acc = tensors[0].to(compute) * weights[0]
    for t, w in zip(tensors[1:], weights[1:]):
        acc = acc + t.to(compute) * w
    return (acc / total).to(out_dtype)


def blend_state(sources: Sequence[Mapping[str, torch.Tensor]], mappings: Sequence[ParamMapping],
                weights: Sequence[float]) -> Dict[str, torch.Tensor]:
    """Blend the sources' parameters into the target's, parameter by parameter, following each mapping."""
    targets = [t for t, _ in mappings[0].pairs]
    for m in mappings[1:]:
        assert [t for t, _ in m.pairs] == targets, "mappings must list the same target parameters in order"
    out = {}
    for i, name in enumerate(targets):
        out[name] = blend([src[m.pairs[i][1]] for src, m in zip(sources, mappings)], weights)
    return out


def reinitialize(modules: Iterable[torch.nn.Module], seed: int) -> None:
    """Re-initialise every submodule that has ``reset_parameters`` (the ``random`` ablation), seeded and without
    disturbing the global RNG."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for module in modules:
            for m in module.modules():
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()


# ---------------------------------------------------------------------------------------------------------------
# Rules of training around a rebuild (shared by the engine and the experiment's simulated pipeline)
# ---------------------------------------------------------------------------------------------------------------


def clip_coefficient(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """The factor (at most 1) that scales a stage's gradient of L2 norm ``norm`` to at most ``max_norm``.

    ``per_stage_clip``: the reference code clips every stage's gradient to norm 1.0 before its optimizer step and
    records the clipped norm, which is what the next rebuild weighs by.
    """
    return torch.clamp(max_norm / (norm + 1e-6), max=1.0)


def random_rebuild_seed(seed: int, step: int, stage: int) -> int:
    """The seed of the ``random`` strategy's fresh initialisation of ``stage`` at ``step``: the same on every rank
    (no communication), different for every step and stage."""
    return seed + 7919 * step + stage


def boosted_lrs(scheduled_lrs: Sequence[float], lr_scale: float) -> List[float]:
    """The learning rates a stage trains with: the scheduler's, times the stage's scale.

    A rebuilt stage's scale is ``lr_boost`` for the rest of training (paper: 1.1 for 124M/1.5B, 1.2 for 500M); a
    second rebuild sets it again rather than compounding it, and every other stage's scale is 1.
    """
    return [lr * lr_scale for lr in scheduled_lrs]


def clip_stage_grads_(grads: Sequence[torch.Tensor], norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Scale a stage's gradients in place by :func:`clip_coefficient` and return the clipped norm.

    ``per_stage_clip`` as the reference code does it: the norm recorded for the next rebuild's weights is the norm
    after clipping, ``norm * coefficient``, not the measured one.

    Args:
        grads: the tensors holding the stage's gradient (modified in place).
        norm: their L2 norm, as measured (a 0-dim tensor).
        max_norm: the ``per_stage_clip`` value.

    Returns:
        The gradient's norm after clipping (``norm`` itself when there are no gradients).
    """
    if not grads:
        return norm
    coef = clip_coefficient(norm, max_norm)
    torch._foreach_mul_(list(grads), coef.to(grads[0].dtype))
    return norm * coef


def tied_authorities(plans: Iterable[RecoveryPlan], signatures: Mapping[int, StageSignature]) -> Dict[str, int]:
    """Which copy of a replicated layer the other copies follow after ``plans`` ran: tied key -> source stage.

    Under CheckFree+ an edge stage is rebuilt as a copy of its partner, and with it its (de)embedding replica. The
    rebuilt copy then has a fresh optimizer state and a boosted LR while the surviving copy has neither, so from
    then on the copy it was rebuilt from is authoritative: after every optimizer step the other copies take its
    values, which keeps the replicas bit-identical as DeepSpeed's tied layers are.

    Args:
        plans: the rebuild plans (from :func:`plan_recovery`).
        signatures: every stage's signature (a layer's ``tied_key`` marks a replica).

    Returns:
        The tied keys whose authority changes, each with the stage its copies follow.
    """
    authority: Dict[str, int] = {}
    for plan in plans:
        if plan.strategy == "copy":
            for layer in signatures[plan.target]:
                if layer.tied_key is not None:
                    authority[layer.tied_key] = plan.sources[0]
    return authority
