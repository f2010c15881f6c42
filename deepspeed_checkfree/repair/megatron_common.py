"""What Megatron's two checkpoint formats and the Megatron hook share: where an iteration lives, the stage layout read
from a checkpoint's ``args``, the CheckFree sidecar files saved next to each checkpoint (per-stage gradient norms,
replicas of the first/last stage's embedding and head) and the iteration handler both format readers extend.

Never imports Megatron: checkpoints are read with ``torch.load``.
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch

from ..core.recovery import ParamMapping, RecoveryPlan
from ..errors import RecoveryError
from .base import IOLedger, Inspection, atomic_torch_save, atomic_write_bytes, copy_to_output, file_problem, \
    plan_stage, plan_weights

logger = logging.getLogger(__name__)

TRACKER = "latest_checkpointed_iteration.txt"
LAYER_PREFIX = "decoder.layers."
SIDECAR_DIR = "checkfree"
SIDECAR_VERSION = 1
# What to do when a lost edge stage's embedding or head exists nowhere else.
REPLICA_FIX = ("Save checkpoints with the checkfree hook (deepspeed_checkfree.megatron.install()) so the neighbouring "
               "stage keeps a replica, or restore the shard from another copy.")
TWO_STAGE_NOTE = ("2-stage pipeline: CheckFree's average needs a neighbour on both sides (>= 3 stages), so the stage "
                  "is a copy of the other one (CheckFree+ style)")


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
    if tag is not None and str(tag) != "release" and not str(tag).isdigit():
        raise RecoveryError(f"iteration {tag!r} is not an iteration number or 'release'.")
    if tag is not None and os.path.isdir(os.path.join(path, iteration_dir_name(tag))):
        # A named iteration (Megatron's --ckpt-step) is loaded whatever the tracker says, even without one.
        return os.path.join(path, iteration_dir_name(tag)), path, str(int(tag) if str(tag).isdigit() else tag)
    if os.path.exists(tracker):
        if tag is None:
            with open(tracker, encoding="utf-8") as f:
                tag = f.read().strip()
            if tag != "release" and not tag.isdigit():
                raise RecoveryError(f"{tracker} holds {tag!r}, not an iteration number or 'release'; Megatron "
                                    f"itself would refuse it. Pass --iteration N.")
        iter_dir = os.path.join(path, iteration_dir_name(tag))
        if not os.path.isdir(iter_dir):
            raise RecoveryError(f"iteration {tag} of {path} ({iter_dir}) does not exist; every stage of it is gone. "
                                f"Pass --iteration with an iteration that exists.")
        return iter_dir, path, str(tag)
    name = os.path.basename(path)
    m = re.fullmatch(r"iter_(\d{7})", name)
    if m is None and name != "release":
        where = f" and has no {iteration_dir_name(tag)}" if tag is not None else ""
        raise RecoveryError(f"{path} has no {TRACKER}{where} and is not an iteration directory (iter_NNNNNNN); point "
                            f"at the Megatron --save directory or one of its iteration directories.")
    found = str(int(m.group(1))) if m else "release"
    if tag is not None and str(int(tag) if str(tag).isdigit() else tag) != found:
        raise RecoveryError(f"{path} is iteration {found}, not the iteration {tag} asked for; point at the save "
                            f"directory to choose an iteration.")
    return path, os.path.dirname(path), found


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


# The settings whose shard layout repair does not handle yet. An intact checkpoint saved with them loads as usual;
# only a damaged one is refused (see repair.base.unsupported_damage_error).
UNSUPPORTED_SETTINGS = ("pipeline_model_parallel_layout", "account_for_embedding_in_pipeline_split",
                        "account_for_loss_in_pipeline_split")


@dataclass(frozen=True)
class MegatronLayout:
    """The parallel layout of a Megatron checkpoint, from its saved ``args``.

    ``layer_counts`` has one entry per *virtual* stage in virtual pipeline order (``vpp_size`` chunks per pipeline
    rank: virtual stage ``v`` is chunk ``v // num_stages`` of rank ``v % num_stages``, as Megatron interleaves them);
    it is empty when the layout is one this version cannot compute (then ``unsupported`` says why).
    """

    num_stages: int
    tp_size: int
    num_layers: int
    layer_counts: Tuple[int, ...]
    tied_embeddings: bool
    position_embedding_type: str
    vpp_size: int = 1
    distributed_optimizer: bool = False
    unsupported: Tuple[Tuple[str, Any], ...] = ()

    @property
    def num_virtual(self) -> int:
        return self.num_stages * self.vpp_size

    @property
    def offsets(self) -> Tuple[int, ...]:
        out, acc = [], 0
        for c in self.layer_counts:
            out.append(acc)
            acc += c
        return tuple(out)

    def virtual_stage(self, stage: int, chunk: int) -> int:
        return chunk * self.num_stages + stage

    def virtual_of_layer(self, layer: int) -> int:
        for v, (off, n) in enumerate(zip(self.offsets, self.layer_counts)):
            if off <= layer < off + n:
                return v
        raise RecoveryError(f"global layer {layer} is outside the {self.num_layers} layers of the checkpoint")

    def stage_of_layer(self, layer: int) -> int:
        return self.virtual_of_layer(layer) % self.num_stages

    @classmethod
    def from_args(cls, args: Any, source: str) -> "MegatronLayout":
        """Read the layout from Megatron's saved argparse namespace. Never refuses a setting: the ones repair cannot
        handle are listed in ``unsupported`` (they matter only when a stage is damaged).

        Raises:
            RecoveryError: no args, or layers that do not split over the stages (Megatron refuses those too).
        """
        if args is None:
            raise RecoveryError(f"{source} holds no 'args'; the pipeline layout cannot be known. Is this a checkpoint "
                                f"written by Megatron-LM's save_checkpoint?")
        get = lambda name, default=None: getattr(args, name, default)  # noqa: E731
        unsupported = [(name, get(name)) for name in UNSUPPORTED_SETTINGS if get(name)]
        if (get("expert_model_parallel_size", 1) or 1) > 1:
            unsupported.append(("expert_model_parallel_size", get("expert_model_parallel_size")))
        num_stages = int(get("pipeline_model_parallel_size", 1) or 1)
        vpp = int(get("virtual_pipeline_model_parallel_size", None) or 1)
        num_layers = int(get("num_layers"))
        counts: Tuple[int, ...] = ()
        if not any(name == "pipeline_model_parallel_layout" for name, _ in unsupported):
            counts = tuple(virtual_layer_counts(num_layers, num_stages, vpp, get("decoder_first_pipeline_num_layers"),
                                                get("decoder_last_pipeline_num_layers")))
        return cls(num_stages, int(get("tensor_model_parallel_size", 1) or 1), num_layers, counts,
                   not get("untie_embeddings_and_output_weights", False),
                   str(get("position_embedding_type", "learned_absolute")), vpp,
                   bool(get("use_distributed_optimizer", False)), tuple(unsupported))


def virtual_layer_counts(num_layers: int, num_stages: int, vpp: int, first: Optional[int] = None,
                         last: Optional[int] = None) -> List[int]:
    """Layers per virtual stage in virtual pipeline order, by megatron.core's rule
    (``get_transformer_layer_offset`` / ``get_num_layers_to_build``): without virtual stages, see
    :func:`stage_layer_counts`; with them the first/last *pipeline rank*'s layers (``--decoder-first/last-pipeline-
    num-layers``) and the middle ranks' are each split evenly over that rank's ``vpp`` chunks.

    Raises:
        RecoveryError: the layers do not split evenly.
    """
    per_rank = stage_layer_counts(num_layers, num_stages, first, last)
    if vpp == 1:
        return per_rank
    bad = [(s, n) for s, n in enumerate(per_rank) if n % vpp]
    if bad:
        raise RecoveryError(f"pipeline ranks {[s for s, _ in bad]} hold {[n for _, n in bad]} layers, which do not "
                            f"split over {vpp} virtual stages; the checkpoint's args are inconsistent.")
    return [per_rank[v % num_stages] // vpp for v in range(num_stages * vpp)]


def is_layer_key(key: str) -> bool:
    return key.startswith(LAYER_PREFIX)


def layer_index_map(mapping: ParamMapping) -> Dict[int, int]:
    """Target layer -> source layer, from a parameter mapping of layer signatures."""
    out: Dict[int, int] = {}
    for tgt, src in mapping.pairs:
        out.setdefault(int(tgt.split(".", 1)[0]), int(src.split(".", 1)[0]))
    return out


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


def replica_note(stage: int, num_stages: int) -> str:
    """The rebuild note of an edge stage whose embedding or head came from its replica."""
    return f"edge parameters of stage {stage} from the replica kept by stage {replica_holder(stage, num_stages)}"


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
    atomic_write_bytes(json.dumps(record).encode("utf-8"), path)
    return path


def sidecar_records(iter_dir: str) -> Iterator[Tuple[str, str, Any]]:
    """(path, text, parsed record) of every readable sidecar JSON of an iteration, in stage order. A damaged one
    (the lost stage's) is skipped: every stage's copy holds the same norms."""
    folder = os.path.join(iter_dir, SIDECAR_DIR)
    if not os.path.isdir(folder):
        return
    for name in sorted(os.listdir(folder)):
        if not (name.startswith("stage_") and name.endswith(".json")):
            continue
        path = os.path.join(folder, name)
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
            record = json.loads(text)
        except (OSError, ValueError):
            continue
        yield path, text, record


def read_norms(iter_dir: str, ledger: Optional[IOLedger] = None) -> Tuple[Dict[int, float], Optional[int]]:
    """Every stage's recorded gradient norm (from the first readable sidecar JSON) and the recorded stage count."""
    for path, text, record in sidecar_records(iter_dir):
        try:
            norms = {int(s): float(n) for s, n in record["grad_norms"].items() if n is not None}
        except (ValueError, KeyError, TypeError):
            continue
        if ledger is not None:
            ledger.add_read(len(text), path)
        return norms, record.get("num_stages")
    return {}, None


def read_rebuilt_stages(iter_dir: str) -> List[int]:
    """The stages rebuilt by CheckFree in this or an earlier recovery, as the sidecar records them."""
    for _path, _text, record in sidecar_records(iter_dir):
        return list(record.get("rebuilt_stages", []))
    return []


def record_rebuilt(iter_dir: str, stages: Sequence[int]) -> None:
    """Add rebuilt stages to the sidecar JSONs (creating the rebuilt stage's own from a survivor's), so a resumed
    job keeps the rebuilt stage's LR boost even if it stops before its next checkpoint."""
    records = {os.path.basename(path): record for path, _text, record in sidecar_records(iter_dir)}
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
    atomic_torch_save({"stage": stage, "tp_rank": tp_rank, "tensors": {k: v.detach() for k, v in tensors.items()}},
                      path)
    return path


def read_replica(iter_dir: str, stage: int, tp_rank: int, ledger: IOLedger) -> Optional[Dict[str, torch.Tensor]]:
    path = replica_file(iter_dir, stage, tp_rank)
    if file_problem(path) is not None:
        return None
    data = ledger.load(path)
    return {k: ledger.tensor(v) for k, v in data["tensors"].items()}


# ---------------------------------------------------------------------------------------------------------------
# The iteration handler both Megatron formats extend
# ---------------------------------------------------------------------------------------------------------------


class MegatronIteration:
    """What the legacy and torch_dist readers share: one iteration directory, its layout, norms and output copy."""

    # What a format's rebuild handles beyond one block of layers per rank and the non-distributed optimizer.
    SUPPORTS_VIRTUAL_PIPELINE = False
    SUPPORTS_DISTRIBUTED_OPTIMIZER = False

    def __init__(self, path: str, tag: Optional[str], ledger: IOLedger, check_values: bool = True) -> None:
        self.iter_dir, self.root, self.iteration = resolve_iteration_dir(path, tag)
        self.ledger = ledger
        self.check_values = check_values
        self.strategy = "gradnorm_average"
        self.layout: Optional[MegatronLayout] = None

    def unsupported_settings(self) -> Tuple[Tuple[str, Any], ...]:
        """The checkpoint's settings this format's rebuild does not handle (they matter only for a damaged one)."""
        lay = self.layout
        out = list(lay.unsupported)
        if lay.vpp_size > 1 and not self.SUPPORTS_VIRTUAL_PIPELINE:
            out.append(("virtual_pipeline_model_parallel_size", lay.vpp_size))
        if lay.distributed_optimizer and not self.SUPPORTS_DISTRIBUTED_OPTIMIZER:
            out.append(("use_distributed_optimizer", True))
        return tuple(out)

    def plan(self, stage: int, strategy: str) -> RecoveryPlan:
        self.strategy = strategy
        return plan_stage(stage, self.layout.num_stages, strategy)

    def chunk_plans(self, plan: RecoveryPlan, weights: Sequence[float]) -> List[dict]:
        """How each model chunk of the lost rank is rebuilt. Chunk c of rank s is virtual stage v = c * P + s
        (Megatron's interleaving), rebuilt from its neighbours in *virtual* pipeline order (copies at either end of
        the virtual pipeline), weighted by the gradient norms of the ranks that hold them (norms are per rank).
        Without virtual stages: one chunk, ``plan`` itself.

        Returns:
            ``{"chunk", "virtual_stage", "plan" (over virtual stages), "weights", "sources": [(rank, chunk)]}`` each.
        """
        lay = self.layout
        if lay.vpp_size == 1:
            return [{"chunk": 0, "virtual_stage": plan.target, "plan": plan, "weights": tuple(weights),
                     "sources": [(s, 0) for s in plan.sources]}]
        norms = self.grad_norms()
        out = []
        for c in range(lay.vpp_size):
            v = lay.virtual_stage(plan.target, c)
            vplan = plan_stage(v, lay.num_virtual, self.strategy)
            w, _, _ = plan_weights(vplan, {u: norms[u % lay.num_stages] for u in vplan.sources
                                           if u % lay.num_stages in norms}, self.strategy, [])
            out.append({"chunk": c, "virtual_stage": v, "plan": vplan, "weights": w,
                        "sources": [(u % lay.num_stages, u // lay.num_stages) for u in vplan.sources]})
        return out

    def describe_chunks(self, plan: RecoveryPlan, weights: Sequence[float]) -> List[dict]:
        """The per-chunk plans of :meth:`chunk_plans` for the report; empty without virtual pipeline stages."""
        if self.layout.vpp_size == 1:
            return []
        return [{"chunk": cp["chunk"], "virtual_stage": cp["virtual_stage"], "strategy": cp["plan"].strategy,
                 "sources": [list(x) for x in cp["sources"]], "weights": list(cp["weights"])}
                for cp in self.chunk_plans(plan, weights)]

    def grad_norms(self) -> Dict[int, float]:
        return read_norms(self.iter_dir, self.ledger)[0]

    def rewritten_files(self, found: Inspection, damaged: set) -> List[str]:
        """Files the rebuild writes anew, so the output copy leaves them out."""
        return [f for s in damaged for f in found.stage_files.get(s, [])]

    def prepare_output(self, output: str, found: Inspection, damaged: set) -> str:
        out_iter = copy_to_output(self.iter_dir, output, self.rewritten_files(found, damaged), self.ledger)
        write_tracker(output, self.iteration)
        return out_iter

    def finish_rebuild(self, out_iter_dir: str, target: int, files: List[str], notes: Sequence[Optional[str]]) -> dict:
        """Record the rebuilt stage in the sidecar (its LR boost survives a resume) and the handler's result."""
        record_rebuilt(out_iter_dir, [target])
        notes = list(notes)
        if self.layout.num_stages == 2 and self.layout.vpp_size == 1:
            notes.append(TWO_STAGE_NOTE)
        return {"files": files, "note": "; ".join(dict.fromkeys(n for n in notes if n)) or None}
