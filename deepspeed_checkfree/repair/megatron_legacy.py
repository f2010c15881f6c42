"""Megatron checkpoints: the stage layout read from a checkpoint's ``args``, the CheckFree sidecar files saved next to
each checkpoint (per-stage gradient norms, replicas of the first/last stage's embedding and head), and repair of the
legacy format (``--ckpt-format torch``: ``iter_XXXXXXX/mp_rank_TT_PPP/model_optim_rng.pt``).

Never imports Megatron: checkpoints are read with ``torch.load`` (a legacy file's pickled ``args`` may import
``megatron.core`` classes while it is read).
"""
from __future__ import annotations

import copy
import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from ..errors import RecoveryError, UnsupportedSetupError
from ..core.recovery import LayerSignature, ParamMapping, RecoveryPlan, blend, match_layers
from . import (IOLedger, Inspection, copy_iteration, file_problem, plan_stage,
                     prepare_output_dir, set_aside)

TRACKER = "latest_checkpointed_iteration.txt"
LAYER_PREFIX = "decoder.layers."
SIDECAR_DIR = "checkfree"
SIDECAR_VERSION = 1
_SHARD_DIR = re.compile(r"mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?$")


# ---------------------------------------------------------------------------------------------------------------
# Where an iteration lives
# ---------------------------------------------------------------------------------------------------------------


def iteration_dir_name(iteration: Any) -> str:
    return "release" if str(iteration) == "release" else f"iter_{int(iteration):07d}"


def resolve_iteration_dir(path: str, tag: Optional[str] = None) -> Tuple[str, str, str]:
    """(iteration directory, save directory, iteration) for a Megatron save directory or one iteration directory.

    Raises:
        RecoveryError: no tracker file and ``path`` is not an iteration directory, or the iteration is absent.
    """
    path = os.path.abspath(path)
    tracker = os.path.join(path, TRACKER)
    if os.path.exists(tracker):
        if tag is None:
            with open(tracker, encoding="utf-8") as f:
                tag = f.read().strip()
            if tag != "release" and not tag.isdigit():
                raise RecoveryError(f"{tracker} holds {tag!r}, not an iteration number or 'release'; Megatron "
                                    f"itself would refuse it. Pass --tag ITERATION.")
        iter_dir = os.path.join(path, iteration_dir_name(tag))
        if not os.path.isdir(iter_dir):
            raise RecoveryError(f"iteration {tag} of {path} ({iter_dir}) does not exist; every stage of it is gone. "
                                f"Pass --tag with an iteration that exists.")
        return iter_dir, path, str(tag)
    name = os.path.basename(path)
    m = re.fullmatch(r"iter_(\d{7})", name)
    if m is None and name != "release":
        raise RecoveryError(f"{path} has no {TRACKER} and is not an iteration directory (iter_NNNNNNN); point at "
                            f"the Megatron --save directory or one of its iteration directories.")
    return path, os.path.dirname(path), (str(int(m.group(1))) if m else "release")


def write_tracker(save_dir: str, iteration: str) -> None:
    with open(os.path.join(save_dir, TRACKER), "w", encoding="utf-8") as f:
        f.write(str(iteration))


# ---------------------------------------------------------------------------------------------------------------
# Layout: which transformer layers each pipeline stage holds
# ---------------------------------------------------------------------------------------------------------------


def stage_layer_counts(num_layers: int, num_stages: int, first: Optional[int] = None,
                       last: Optional[int] = None) -> List[int]:
    """Transformer layers per pipeline stage, by Megatron's rule (``get_transformer_layer_offset`` without virtual
    stages): the first/last stage take ``--decoder-first/last-pipeline-num-layers`` if given, the rest split evenly.

    Raises:
        RecoveryError: the layers do not split evenly (Megatron refuses such a configuration too).
    """
    if num_stages == 1:
        return [num_layers]
    counts: List[Optional[int]] = [None] * num_stages
    if first is not None:
        counts[0] = first
    if last is not None:
        counts[-1] = last
    rest = num_layers - sum(c for c in counts if c is not None)
    n_middle = sum(1 for c in counts if c is None)
    if n_middle:
        if rest < 0 or rest % n_middle:
            raise RecoveryError(f"{num_layers} layers do not split evenly over {n_middle} pipeline stages (first="
                                f"{first}, last={last}); the checkpoint's args are inconsistent.")
        counts = [rest // n_middle if c is None else c for c in counts]
    return [int(c) for c in counts]


@dataclass(frozen=True)
class MegatronLayout:
    """The parallel layout of a Megatron checkpoint, from its saved ``args``."""

    num_stages: int
    tp_size: int
    num_layers: int
    layer_counts: Tuple[int, ...]
    tied_embeddings: bool
    position_embedding_type: str

    @property
    def offsets(self) -> Tuple[int, ...]:
        out, acc = [], 0
        for c in self.layer_counts:
            out.append(acc)
            acc += c
        return tuple(out)

    def stage_of_layer(self, layer: int) -> int:
        for s, (off, n) in enumerate(zip(self.offsets, self.layer_counts)):
            if off <= layer < off + n:
                return s
        raise RecoveryError(f"global layer {layer} is outside the {self.num_layers} layers of the checkpoint")

    @classmethod
    def from_args(cls, args: Any, source: str) -> "MegatronLayout":
        """Read the layout from Megatron's saved argparse namespace.

        Raises:
            UnsupportedSetupError: virtual pipeline stages, a custom pipeline layout, expert parallelism or the
                distributed optimizer (their shard layouts are not handled by this version).
        """
        if args is None:
            raise RecoveryError(f"{source} holds no 'args'; the pipeline layout cannot be known. Is this a checkpoint "
                                f"written by Megatron-LM's save_checkpoint?")
        get = lambda name, default=None: getattr(args, name, default)  # noqa: E731
        unsupported = [(name, get(name)) for name in ("virtual_pipeline_model_parallel_size",
                                                      "pipeline_model_parallel_layout") if get(name)]
        unsupported += [(name, get(name)) for name in ("account_for_embedding_in_pipeline_split",
                                                       "account_for_loss_in_pipeline_split") if get(name)]
        if (get("expert_model_parallel_size", 1) or 1) > 1:
            unsupported.append(("expert_model_parallel_size", get("expert_model_parallel_size")))
        if get("use_distributed_optimizer"):
            unsupported.append(("use_distributed_optimizer", True))
        if unsupported:
            raise UnsupportedSetupError(
                f"the checkpoint was written with {', '.join(f'{k}={v}' for k, v in unsupported)}; CheckFree repair "
                f"supports one contiguous block of layers per pipeline stage, no expert parallelism and the "
                f"non-distributed optimizer in this version. Convert the checkpoint or resume without those options.")
        num_stages = int(get("pipeline_model_parallel_size", 1) or 1)
        num_layers = int(get("num_layers"))
        counts = stage_layer_counts(num_layers, num_stages, get("decoder_first_pipeline_num_layers"),
                                    get("decoder_last_pipeline_num_layers"))
        return cls(num_stages, int(get("tensor_model_parallel_size", 1) or 1), num_layers, tuple(counts),
                   not get("untie_embeddings_and_output_weights", False),
                   str(get("position_embedding_type", "learned_absolute")))


# ---------------------------------------------------------------------------------------------------------------
# Sidecar files: what the checkfree hook saves next to every checkpoint
# ---------------------------------------------------------------------------------------------------------------


def norms_file(iter_dir: str, stage: int) -> str:
    """Written by stage ``stage``; holds every stage's gradient norm (gathered over the pipeline)."""
    return os.path.join(iter_dir, SIDECAR_DIR, f"stage_{stage:03d}.json")


def replica_file(iter_dir: str, stage: int, tp_rank: int) -> str:
    """Stage ``stage``'s embedding or head (the parameters outside its transformer layers), written by the
    neighbour that rebuilds it (:func:`replica_holder`), so losing ``stage`` does not lose them."""
    return os.path.join(iter_dir, SIDECAR_DIR, f"edge_replica_stage_{stage:03d}_tp_{tp_rank:02d}.pt")


def replica_holder(stage: int, num_stages: int) -> int:
    """The stage that keeps a replica of ``stage``'s edge parameters (its CheckFree+ copy partner)."""
    return 1 if stage == 0 else num_stages - 2


def is_layer_key(key: str) -> bool:
    return key.startswith(LAYER_PREFIX)


def edge_tensors(model_state: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
    """The tensors of a stage's state dict that are not in a transformer layer: embedding (first stage), final norm
    and output layer (last stage). These are what a neighbour cannot provide by copying its layers."""
    return {k: v for k, v in model_state.items() if not is_layer_key(k) and isinstance(v, torch.Tensor)}


def write_norms(iter_dir: str, stage: int, num_stages: int, iteration: Any, norms: Mapping[int, Optional[float]],
                rebuilt: Sequence[int] = ()) -> str:
    """Write ``stage``'s sidecar JSON (all stages' norms); atomic."""
    path = norms_file(iter_dir, stage)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    record = {"format": "checkfree-megatron-sidecar", "version": SIDECAR_VERSION, "iteration": iteration,
              "num_stages": num_stages, "stage": stage,
              "grad_norms": {str(s): (None if n is None else float(n)) for s, n in sorted(norms.items())},
              "rebuilt_stages": sorted(int(s) for s in rebuilt)}
    tmp = path + ".checkfree-tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f)
    os.replace(tmp, path)
    return path


def read_norms(iter_dir: str, ledger: Optional[IOLedger] = None) -> Tuple[Dict[int, float], Optional[int]]:
    """Every stage's recorded gradient norm (from the first readable sidecar JSON) and the recorded stage count."""
    folder = os.path.join(iter_dir, SIDECAR_DIR)
    if not os.path.isdir(folder):
        return {}, None
    for name in sorted(os.listdir(folder)):
        if not (name.startswith("stage_") and name.endswith(".json")):
            continue
        path = os.path.join(folder, name)
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
            record = json.loads(text)
            norms = {int(s): float(n) for s, n in record["grad_norms"].items() if n is not None}
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a damaged sidecar of the lost stage; another stage's copy has the same norms
        if ledger is not None:
            ledger.add_read(len(text), path)
        return norms, record.get("num_stages")
    return {}, None


def record_rebuilt(iter_dir: str, stages: Sequence[int]) -> None:
    """Add rebuilt stages to the sidecar JSONs (creating the rebuilt stage's own from a survivor's), so a resumed
    job keeps the rebuilt stage's LR boost even if it stops before its next checkpoint."""
    folder = os.path.join(iter_dir, SIDECAR_DIR)
    if not os.path.isdir(folder):
        return
    records = {}
    for name in sorted(os.listdir(folder)):
        if name.startswith("stage_") and name.endswith(".json"):
            try:
                with open(os.path.join(folder, name), encoding="utf-8") as f:
                    records[name] = json.load(f)
            except (OSError, ValueError):
                continue
    if not records:
        return
    template = next(iter(records.values()))
    for s in stages:
        records.setdefault(os.path.basename(norms_file(iter_dir, s)), {**template, "stage": s})
    for name, record in records.items():
        norms = {int(k): v for k, v in record.get("grad_norms", {}).items()}
        rebuilt = set(record.get("rebuilt_stages", [])) | set(stages)
        write_norms(iter_dir, int(record["stage"]), int(record["num_stages"]), record.get("iteration"), norms, rebuilt)


def write_replica(iter_dir: str, stage: int, tp_rank: int, tensors: Mapping[str, torch.Tensor]) -> str:
    path = replica_file(iter_dir, stage, tp_rank)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".checkfree-tmp"
    torch.save({"stage": stage, "tp_rank": tp_rank, "tensors": {k: v.detach() for k, v in tensors.items()}}, tmp)
    os.replace(tmp, path)
    return path


def read_replica(iter_dir: str, stage: int, tp_rank: int, ledger: IOLedger) -> Optional[Dict[str, torch.Tensor]]:
    path = replica_file(iter_dir, stage, tp_rank)
    if file_problem(path) is not None:
        return None
    data = ledger.load(path)
    return {k: ledger.tensor(v) for k, v in data["tensors"].items()}


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


def layer_index_map(mapping: ParamMapping) -> Dict[int, int]:
    """Target layer -> source layer, from a parameter mapping of layer signatures."""
    out: Dict[int, int] = {}
    for tgt, src in mapping.pairs:
        out.setdefault(int(tgt.split(".", 1)[0]), int(src.split(".", 1)[0]))
    return out


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


def _wd_group(name: str, shape: Sequence[int]) -> float:
    # Megatron's standard grouping (megatron.core.optimizer.get_standard_config_overrides): biases and 1-D
    # parameters get no weight decay.
    return 0.0 if name.endswith(".bias") or len(shape) == 1 else 1.0


def _param_entries(model_state: Mapping[str, Any]) -> List[Tuple[str, Tuple[int, ...]]]:
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
    groups = copy.deepcopy(src_opts[0][1]["param_groups"])
    target_entries = _param_entries(target_model)
    sizes: Optional[List[int]] = None
    for (s, opt), (_, state) in zip(src_opts, sources):
        if _param_entries(state["model"]) == target_entries:
            sizes = [len(g["params"]) for g in opt["param_groups"]]
            break
    if sizes is None:
        wd_of_group = [g.get("wd_mult", 1.0) for g in groups]
        for (s, opt), (_, state) in zip(src_opts, sources):
            expected = Counter(_wd_group(n, sh) for n, sh in _param_entries(state["model"]))
            actual = Counter()
            for g in opt["param_groups"]:
                actual[g.get("wd_mult", 1.0)] += len(g["params"])
            if len(set(wd_of_group)) != len(wd_of_group) or +expected != +actual:
                raise RecoveryError(
                    f"cannot rebuild stage {target}'s optimizer parameter groups: stage {s}'s groups "
                    f"{[(g.get('wd_mult'), g.get('lr_mult'), len(g['params'])) for g in opt['param_groups']]} do not "
                    f"follow Megatron's standard rule (no weight decay for biases and 1-D parameters: expected "
                    f"{dict(expected)}). Resume with --no-load-optim (fresh optimizer state for every stage).")
        counts = Counter(_wd_group(n, sh) for n, sh in target_entries)
        sizes = [counts.get(wd, 0) for wd in wd_of_group]
    index = 0
    for g, n in zip(groups, sizes):
        g["params"] = list(range(index, index + n))
        index += n
    return {"state": {}, "param_groups": groups}


# ---------------------------------------------------------------------------------------------------------------
# Edge parameters of the first and last stage
# ---------------------------------------------------------------------------------------------------------------


def edge_parameters(iter_dir: str, layout: MegatronLayout, target: int, tp_rank: int, ledger: IOLedger,
                    load_stage_model) -> Tuple[Dict[str, torch.Tensor], Optional[str]]:
    """The embedding (first stage) or final norm + output layer (last stage) of a lost edge stage: from the replica
    its neighbour saved, else, for the tied word embedding, from the last stage's ``output_layer.weight``.

    Returns:
        (tensors, note on where they came from).

    Raises:
        RecoveryError: a parameter of the lost stage exists nowhere else.
    """
    replica = read_replica(iter_dir, target, tp_rank, ledger)
    if replica is not None:
        return dict(replica), f"edge parameters of stage {target} from the replica kept by stage " \
                              f"{replica_holder(target, layout.num_stages)}"
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
        f"Save checkpoints with the checkfree hook (deepspeed_checkfree.megatron.install()) so the neighbouring "
        f"stage keeps a replica, or restore the shard from another copy.")


def order_stage_state(target: int, layers: Mapping[str, Any], edge: Mapping[str, Any]) -> Dict[str, Any]:
    """Megatron's module order: embedding, transformer layers, final norm and output layer."""
    out: Dict[str, Any] = {}
    if target == 0:
        out.update({k: v for k, v in edge.items() if k.startswith("embedding.")})
    out.update(layers)
    out.update({k: v for k, v in edge.items() if k not in out})
    return out


# ---------------------------------------------------------------------------------------------------------------
# Legacy format
# ---------------------------------------------------------------------------------------------------------------


class MegatronIteration:
    """What the legacy and torch_dist readers share: one iteration directory, its layout, norms and output copy."""

    def __init__(self, path: str, tag: Optional[str], ledger: IOLedger) -> None:
        self.iter_dir, self.root, self.iteration = resolve_iteration_dir(path, tag)
        self.ledger = ledger
        self.layout: Optional[MegatronLayout] = None

    def plan(self, stage: int, strategy: str) -> RecoveryPlan:
        return plan_stage(stage, self.layout.num_stages, strategy)

    def grad_norms(self) -> Dict[int, float]:
        return read_norms(self.iter_dir, self.ledger)[0]

    def _rewritten_files(self, found: Inspection, damaged: set) -> List[str]:
        """Files the rebuild writes anew, so the output copy leaves them out."""
        return [f for s in damaged for f in found.stage_files.get(s, [])]

    def prepare_output(self, output: str, found: Inspection, damaged: set) -> str:
        prepare_output_dir(output)
        out_iter = os.path.join(output, os.path.basename(self.iter_dir))
        copy_iteration(self.iter_dir, out_iter, self._rewritten_files(found, damaged), self.ledger)
        write_tracker(output, self.iteration)
        return out_iter


class MegatronLegacyCheckpoint(MegatronIteration):
    """One iteration of a legacy Megatron checkpoint: ``mp_rank_TT_PPP/model_optim_rng.pt`` per (tensor, pipeline)
    rank; a lost stage is every ``mp_rank_*_PPP`` file of that pipeline rank."""

    def __init__(self, path: str, tag: Optional[str], ledger: IOLedger) -> None:
        super().__init__(path, tag, ledger)
        self._loaded: Dict[Tuple[int, int], Dict[str, Any]] = {}

    def shard_rel(self, tp: int, pp: int) -> str:
        name = f"mp_rank_{tp:02d}_{pp:03d}" if self.layout.num_stages > 1 else f"mp_rank_{tp:02d}"
        return os.path.join(name, "model_optim_rng.pt")

    def load(self, tp: int, pp: int) -> Dict[str, Any]:
        if (tp, pp) not in self._loaded:
            self._loaded[(tp, pp)] = self.ledger.load(os.path.join(self.iter_dir, self.shard_rel(tp, pp)))
        return self._loaded[(tp, pp)]

    def _present(self) -> Dict[Tuple[int, int], str]:
        out = {}
        for name in os.listdir(self.iter_dir):
            m = _SHARD_DIR.fullmatch(name)
            if m is None or not os.path.isdir(os.path.join(self.iter_dir, name)):
                continue
            if m.group(3) is not None:
                raise UnsupportedSetupError(f"{name}: expert-parallel shards are not supported by this version")
            if os.path.exists(os.path.join(self.iter_dir, name, "distrib_optim.pt")):
                raise UnsupportedSetupError(
                    f"{name}/distrib_optim.pt: checkpoints of Megatron's distributed optimizer are not supported by "
                    f"this version (their optimizer state is sharded over data-parallel ranks).")
            out[(int(m.group(1)), int(m.group(2) or 0))] = os.path.join(name, "model_optim_rng.pt")
        return out

    def inspect(self) -> Inspection:
        present = self._present()
        if not present:
            raise RecoveryError(f"{self.iter_dir} holds no mp_rank_* shard directory: not a Megatron legacy checkpoint "
                                f"iteration, or every stage is gone.")
        readable = sorted(k for k, rel in present.items() if file_problem(os.path.join(self.iter_dir, rel)) is None)
        if not readable:
            raise RecoveryError(f"no shard of {self.iter_dir} is readable; nothing survives to rebuild from.")
        _, recorded_stages = read_norms(self.iter_dir, self.ledger)
        pps = sorted({pp for _, pp in present})
        guess = max(recorded_stages or 0, pps[-1] + 1)
        gaps = [s for s in range(guess) if all((tp, s) not in readable for tp, _ in readable)]
        # Read args from a shard that will serve as a source anyway: a neighbour of the first gap, else the
        # highest stage (the source if the last stage is the lost one).
        wanted = [n for g in gaps[:1] for n in (g - 1, g + 1)] + [pps[-1]]
        tp0, pp0 = next((k for n in wanted for k in readable if k[1] == n), readable[0])
        self._loaded[(tp0, pp0)] = self.ledger.load(os.path.join(self.iter_dir, present[(tp0, pp0)]))
        args = self._loaded[(tp0, pp0)].get("args")
        self.layout = MegatronLayout.from_args(args, os.path.join(self.iter_dir, present[(tp0, pp0)]))
        lay = self.layout
        strays = [present[k] for k in present if k[0] >= lay.tp_size or k[1] >= lay.num_stages]
        if strays:
            raise RecoveryError(f"{self.iter_dir} holds shards {strays} outside the recorded layout (tensor parallel "
                                f"{lay.tp_size} x pipeline {lay.num_stages}); the checkpoint is inconsistent.")
        damaged: Dict[int, str] = {}
        stage_files: Dict[int, List[str]] = {}
        for pp in range(lay.num_stages):
            problems = []
            for tp in range(lay.tp_size):
                rel = self.shard_rel(tp, pp)
                stage_files.setdefault(pp, []).append(rel)
                why = file_problem(os.path.join(self.iter_dir, rel))
                if why is not None:
                    problems.append(f"{rel} {why}")
            if problems:
                damaged[pp] = "; ".join(problems)
        total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(self.iter_dir) for f in fs)
        return Inspection(lay.num_stages, damaged, stage_files, [], total)

    def rebuild(self, plan: RecoveryPlan, weights: Sequence[float], out_iter_dir: str, in_place: bool) -> dict:
        lay = self.layout
        files, notes = [], []
        for tp in range(lay.tp_size):
            sources = [(s, self.load(tp, s)) for s in plan.sources]
            for s, state in sources:
                if "model" not in state:
                    raise UnsupportedSetupError(
                        f"stage {s}'s shard holds {sorted(k for k in state if k.startswith('model'))} instead of one "
                        f"'model': virtual pipeline stages (several model chunks per rank) are not supported.")
            layers, note = blend_layers(plan.target, lay.layer_counts[plan.target],
                                        [(s, st["model"]) for s, st in sources], weights, self.ledger)
            edge: Dict[str, torch.Tensor] = {}
            if plan.target in (0, lay.num_stages - 1):
                edge, edge_note = edge_parameters(self.iter_dir, lay, plan.target, tp, self.ledger,
                                                  lambda s, t: self.load(t, s)["model"])
                notes.append(edge_note)
            model = order_stage_state(plan.target, layers, {k: v.clone() for k, v in edge.items()})
            state = {k: v for k, v in sources[0][1].items() if k != "model"}
            state["model"] = model
            if "optimizer" in state:
                state["optimizer"] = fresh_optimizer_state(model, [(s, st) for s, st in sources], plan.target)
            out = os.path.join(out_iter_dir, self.shard_rel(tp, plan.target))
            os.makedirs(os.path.dirname(out), exist_ok=True)
            if in_place:
                set_aside(out)
            self.ledger.save(state, out)
            files.append(out)
            if note:
                notes.append(note)
        record_rebuilt(out_iter_dir, [plan.target])
        if lay.num_stages == 2:
            notes.append("2-stage pipeline: CheckFree's average needs a neighbour on both sides (>= 3 stages), so the "
                         "stage is a copy of the other one (CheckFree+ style)")
        return {"files": files, "note": "; ".join(dict.fromkeys(n for n in notes if n)) or None}
