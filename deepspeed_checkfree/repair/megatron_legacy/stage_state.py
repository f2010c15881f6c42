"""The state dict of a lost Megatron legacy shard, assembled from its neighbours' shards: the blended transformer
layers, the first/last stage's embedding or head from its replica, and a fresh optimizer state with the parameter
groups Megatron expects.
"""
from __future__ import annotations

import copy
import logging
from collections import Counter
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from ...core.recovery import LayerSignature, blend, match_layers
from ...errors import RecoveryError, UnsupportedSetupError
from ..base import IOLedger, empty_optimizer_state
from ..megatron_common import (LAYER_PREFIX, REPLICA_FIX, MegatronLayout, is_layer_key, layer_index_map,
                               read_replica, replica_file, replica_note)

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------
# Transformer layers: match a lost stage's layers to a neighbour's and blend them
# ---------------------------------------------------------------------------------------------------------------


def split_layer_key(key: str) -> Tuple[int, str]:
    """``decoder.layers.3.mlp.linear_fc1.weight`` -> (3, ``mlp.linear_fc1.weight``)."""
    idx, _, rest = key[len(LAYER_PREFIX):].partition(".")
    return int(idx), rest


def layer_signatures(model_state: Mapping[str, Any]) -> Tuple[LayerSignature, ...]:
    """One signature per transformer layer of a legacy (local layer index) state dict."""
    layers: Dict[int, List[Tuple[str, Tuple[int, ...], str]]] = {}
    for key, value in model_state.items():
        if is_layer_key(key) and isinstance(value, torch.Tensor):
            k, rest = split_layer_key(key)
            layers.setdefault(k, []).append((rest, tuple(value.shape), str(value.dtype).replace("torch.", "")))
    return tuple(LayerSignature(str(k), "TransformerLayer", tuple(layers[k])) for k in sorted(layers))


def blend_layers(target: int, n_target: int, sources: Sequence[Tuple[int, Mapping[str, Any]]],
                 weights: Sequence[float], ledger: IOLedger) -> Tuple[Dict[str, Any], Optional[str]]:
    """The transformer layers of a lost stage: layer k is the weighted blend of each source's matching layer.

    The lost stage's own file is gone, so its layers are assumed to have the structure of the first source's layers
    (Megatron's transformer layers are homogeneous); ``match_layers`` then checks every source against it.

    Returns:
        (state dict entries ``decoder.layers.{k}.*``, note on relative-position matching or None).
    """
    sigs = [layer_signatures(state) for _, state in sources]
    if not sigs[0]:
        raise RecoveryError(f"source stage {sources[0][0]} holds no transformer layers to rebuild stage {target} from")
    template = sigs[0][0]
    target_sig = tuple(LayerSignature(str(k), template.type_name, template.params) for k in range(n_target))
    mappings = [match_layers(target_sig, sig, target, s) for (s, _), sig in zip(sources, sigs)]
    out: Dict[str, Any] = {}
    for i, (tgt, _) in enumerate(mappings[0].pairs):
        tensors = [ledger.tensor(state[LAYER_PREFIX + m.pairs[i][1]]) for (_, state), m in zip(sources, mappings)]
        out[LAYER_PREFIX + tgt] = blend(tensors, weights)
    # Non-tensor entries (``_extra_state``) come from the first source's matching layer.
    first_map = layer_index_map(mappings[0])
    extras: Dict[int, List[Tuple[str, Any]]] = {}
    for key, value in sources[0][1].items():
        if is_layer_key(key) and not isinstance(value, torch.Tensor):
            k, rest = split_layer_key(key)
            extras.setdefault(k, []).append((rest, value))
    for k in range(n_target):
        for rest, value in extras.get(first_map[k], ()):
            out[f"{LAYER_PREFIX}{k}.{rest}"] = copy.deepcopy(value)
    notes = [m.note for m in mappings if m.note]
    return out, "; ".join(notes) or None


# ---------------------------------------------------------------------------------------------------------------
# Optimizer: fresh state with the parameter groups Megatron expects
# ---------------------------------------------------------------------------------------------------------------


def weight_decay_group(name: str, shape: Sequence[int]) -> float:
    """The ``wd_mult`` of a parameter under Megatron's standard grouping
    (megatron.core.optimizer.get_standard_config_overrides): biases and 1-D parameters get no weight decay."""
    return 0.0 if name.endswith(".bias") or len(shape) == 1 else 1.0


def param_entries(model_state: Mapping[str, Any]) -> List[Tuple[str, Tuple[int, ...]]]:
    """(name, shape) of each tensor of a state dict, in order (the order of the optimizer's parameter indices)."""
    return [(k, tuple(v.shape)) for k, v in model_state.items() if isinstance(v, torch.Tensor)]


def fresh_optimizer_state(target_model: Mapping[str, Any], sources: Sequence[Tuple[int, Mapping[str, Any]]],
                          target: int) -> Dict[str, Any]:
    """An empty optimizer state (fresh Adam moments, as the paper resets the rebuilt stage) whose parameter groups
    have the sizes the stage's Megatron optimizer will have, so ``optimizer.load_state_dict`` accepts it.

    Group membership follows Megatron's standard rule (no weight decay for biases and 1-D parameters), checked
    against each source's actual groups; a source with the very same parameters lends its groups directly.

    Raises:
        RecoveryError: the groups follow another rule (custom ``config_overrides``); resume with ``--no-load-optim``.
    """
    src_opts = [(s, state["optimizer"]) for s, state in sources]
    for s, opt in src_opts:
        if not isinstance(opt, dict) or "param_groups" not in opt:
            raise UnsupportedSetupError(
                f"stage {s}'s optimizer state is a {type(opt).__name__} of several optimizers (expert or chained "
                f"optimizers); only a single Megatron optimizer is supported. Resume with --no-load-optim.")
    groups = src_opts[0][1]["param_groups"]
    target_entries = param_entries(target_model)
    sizes: Optional[List[int]] = None
    for (s, opt), (_, state) in zip(src_opts, sources):
        if param_entries(state["model"]) == target_entries:
            sizes = [len(g["params"]) for g in opt["param_groups"]]
            break
    if sizes is None:
        wd_of_group = [g.get("wd_mult", 1.0) for g in groups]
        for (s, opt), (_, state) in zip(src_opts, sources):
            expected = Counter(weight_decay_group(n, sh) for n, sh in param_entries(state["model"]))
            actual = Counter()
            for g in opt["param_groups"]:
                actual[g.get("wd_mult", 1.0)] += len(g["params"])
            if len(set(wd_of_group)) != len(wd_of_group) or +expected != +actual:
                raise RecoveryError(
                    f"cannot rebuild stage {target}'s optimizer parameter groups: stage {s}'s groups "
                    f"{[(g.get('wd_mult'), g.get('lr_mult'), len(g['params'])) for g in opt['param_groups']]} do not "
                    f"follow Megatron's standard rule (no weight decay for biases and 1-D parameters: expected "
                    f"{dict(expected)}). Resume with --no-load-optim (fresh optimizer state for every stage).")
        counts = Counter(weight_decay_group(n, sh) for n, sh in target_entries)
        sizes = [counts.get(wd, 0) for wd in wd_of_group]
    return empty_optimizer_state(groups, sizes)


# ---------------------------------------------------------------------------------------------------------------
# Edge parameters of the first and last stage
# ---------------------------------------------------------------------------------------------------------------


def edge_parameters(iter_dir: str, layout: MegatronLayout, target: int, tp_rank: int, ledger: IOLedger,
                    load_stage_model: Callable[[int, int], Mapping[str, Any]],
                    ) -> Tuple[Dict[str, torch.Tensor], Optional[str]]:
    """The embedding (first stage) or final norm + output layer (last stage) of a lost edge stage: from the replica
    its neighbour saved, else, for the tied word embedding, from the last stage's ``output_layer.weight``.

    Args:
        load_stage_model: (stage, tensor-parallel rank) -> that shard's model state dict.

    Returns:
        (tensors, note on where they came from).

    Raises:
        RecoveryError: a parameter of the lost stage exists nowhere else.
    """
    replica = read_replica(iter_dir, target, tp_rank, ledger)
    if replica is not None:
        return dict(replica), replica_note(target, layout.num_stages)
    missing = replica_file(iter_dir, target, tp_rank)
    if target == 0 and layout.tied_embeddings and layout.position_embedding_type != "learned_absolute":
        last_model = load_stage_model(layout.num_stages - 1, tp_rank)
        if "output_layer.weight" in last_model:
            return ({"embedding.word_embeddings.weight": ledger.tensor(last_model["output_layer.weight"])},
                    f"word embedding of stage 0 from its tied copy (output_layer.weight of stage "
                    f"{layout.num_stages - 1})")
    what = ("embedding" + (" (learned position embeddings are stored nowhere else)"
                           if layout.position_embedding_type == "learned_absolute" else "")
            if target == 0 else "final layer norm and output layer")
    raise RecoveryError(
        f"stage {target}'s {what} cannot be rebuilt: no CheckFree replica ({missing}) was saved with this checkpoint, "
        f"and {'no tied copy exists' if target == 0 else 'the final layer norm exists only in the lost shard'}. "
        f"{REPLICA_FIX}")


def order_stage_state(target: int, layers: Mapping[str, Any], edge: Mapping[str, Any]) -> Dict[str, Any]:
    """Megatron's module order: embedding, transformer layers, final norm and output layer."""
    out: Dict[str, Any] = {}
    if target == 0:
        out.update({k: v for k, v in edge.items() if k.startswith("embedding.")})
    out.update(layers)
    out.update({k: v for k, v in edge.items() if k not in out})
    return out
