"""The reader and rebuilder of one iteration of a Megatron ``torch_dist`` checkpoint. Per-layer tensors are global,
stacked along a leading layer axis, so a lost stage is the set of chunks at its layer offsets (plus the embedding or
head for the first/last stage); the rebuild reads only the neighbours' chunks, rewrites the lost stage's files item
by item and updates the storage offsets in ``.metadata``.
"""
from __future__ import annotations

import logging
import os
import pickle
import re
from collections import defaultdict
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ...core.recovery import LayerSignature, RecoveryPlan, blend, match_layers
from ...errors import RecoveryError
from ..base import IOLedger, Inspection, check_rebuilt, directory_bytes, set_aside
from ..megatron_common import (LAYER_PREFIX, REPLICA_FIX, MegatronIteration, MegatronLayout, layer_index_map,
                               read_replica, replica_file, replica_note)
from ..megatron_distopt import require_layout
from . import common_state
from .distopt import DistOptItems, dp_group_of
from .items import (COMMON, METADATA, parse_sharded_object, read_item, read_metadata, sharded_object_fqn, split_opt,
                    write_items)

logger = logging.getLogger(__name__)

# Why the rebuilt stage's Adam step count is not reset in the file (see docs of megatron.checkpoint.reset_rebuilt_
# optimizer_state): megatron.core saves one "common_step" for all parameters of every stage, in the common state.
STEP_KEPT_NOTE = ("torch_dist keeps one Adam step count for every stage (the common state, 'common_step'), so the "
                  "rebuilt stage's moments are zero but its step is the shared one; the checkfree hook resets the "
                  "rebuilt stage's step after loading (a truly fresh Adam state, as legacy and DeepSpeed repairs give). "
                  "Without the hook its first update is about (1-beta1)/sqrt(1-beta2) times a fresh one's (3.2 with "
                  "betas 0.9, 0.999).")
# megatron.core >= 0.19: the rerun state machine's ShardedObject, one shard per global rank.
RERUN_STATE_KEY = "rerun_state_machine_state"
DISTOPT_PREFIX = "optimizer.distributed."
DISTOPT_PAD = 64  # megatron.core param_and_grad_buffer: parameter starts are padded to multiples of 64 elements
_DISTCP = re.compile(r"__(\d+)_(\d+)\.distcp")


class MegatronDistCheckpoint(MegatronIteration):
    """One iteration of a Megatron ``torch_dist`` checkpoint."""

    SUPPORTS_DISTRIBUTED_OPTIMIZER = True
    SUPPORTS_VIRTUAL_PIPELINE = True

    def unsupported_settings(self):
        out = super().unsupported_settings()
        if self.layout.distributed_optimizer and self.sharding_type not in (None, "dp_reshardable"):
            out += (("distrib_optim_sharding_type", self.sharding_type),)
        return out

    def __init__(self, path: str, tag: Optional[str], ledger: IOLedger, check_values: bool = True) -> None:
        super().__init__(path, tag, ledger, check_values)
        self.md = None
        self.args = None
        self.sharding_type: Optional[str] = None
        self._item_stage: Dict[Any, Optional[int]] = {}

    # -- reading --------------------------------------------------------------------------------------------

    def _read_args(self) -> Any:
        common = common_state.read_common_state(self.iter_dir, self.md, self.ledger)
        if not isinstance(common, dict):
            return None
        self.sharding_type = (common.get("content_metadata") or {}).get("distrib_optim_sharding_type")
        return common.get("args")

    def _read_item(self, index, count: bool = True) -> Any:
        return read_item(self.iter_dir, self.md, index, self.ledger, count)

    # -- which stage owns an item -----------------------------------------------------------------------------

    def stage_of(self, index) -> Optional[int]:
        """The pipeline stage whose shard holds a storage item, or None if no rule places it."""
        lay = self.layout
        fqn = index.fqn
        if index.offset is None:  # a ShardedObject: "<key>/shard_<offsets>_<global shape>"
            parsed = parse_sharded_object(fqn)
            if parsed is None:
                return None
            key, offsets, _shape = parsed
            if key.startswith(LAYER_PREFIX):
                return lay.stage_of_layer(offsets[0])
            if key == "rng_state":
                return offsets[0]
            if key == common_state.COMMON_STATE_KEY:  # written by global rank 0, a rank of stage 0
                return 0
            if key == RERUN_STATE_KEY:  # offset: the global rank that wrote it
                return self._rank_stage(offsets[0])
            if dp_group_of(key) is not None:
                return self.group_stage(dp_group_of(key)[0])
            return None
        if dp_group_of(fqn) is not None:
            return self.group_stage(dp_group_of(fqn)[0])
        _, param = split_opt(fqn)
        if param.startswith(LAYER_PREFIX):
            return lay.stage_of_layer(int(index.offset[0]))
        if param.startswith("embedding."):
            return 0
        if param.startswith(("decoder.final_layernorm.", "output_layer.")):
            return lay.num_stages - 1
        return None

    def group_stage(self, group: int) -> int:
        """The pipeline stage of the distributed optimizer's data-parallel group ``group``: megatron.core numbers
        them by model-parallel rank, tp + TP * pp under the default rank order."""
        return group // self.layout.tp_size

    # -- the handler interface used by repair_checkpoint -----------------------------------------------------

    def _placed(self, index) -> Optional[int]:
        try:
            return self.stage_of(index)
        except RecoveryError:  # a layer outside a layout this version cannot compute (custom pipeline layout)
            return None

    def _ranks_per_stage(self) -> Optional[int]:
        world = int(getattr(self.args, "world_size", 0) or 0)
        if world <= 0 or world % self.layout.num_stages:
            return None
        return world // self.layout.num_stages

    def _rank_stage(self, rank: int) -> Optional[int]:
        """The pipeline rank of global rank ``rank`` under Megatron's default rank order (tp-cp-ep-dp-pp: the
        pipeline rank is the slowest-varying)."""
        per_stage = self._ranks_per_stage()
        return None if per_stage is None else int(rank) // per_stage

    def _file_stage(self, rel: str) -> Optional[int]:
        """The pipeline rank that wrote ``__{rank}_{k}.distcp``; used where the items do not tell."""
        m = _DISTCP.fullmatch(rel)
        return None if m is None else self._rank_stage(int(m.group(1)))

    def _value_problem(self, rel: str, indices: List[Any]) -> Optional[str]:
        bad = []
        for index in indices:
            if index.offset is None:
                continue
            if index.fqn.startswith(DISTOPT_PREFIX) and self._chunk_size(index)[0] < DISTOPT_PAD:
                # The distributed optimizer's dp_reshardable buckets save their alignment padding (< 64 elements,
                # torch.empty: any bytes) as chunks of their own; skipped, with the few parameters as small.
                continue
            value = self._read_item(index, count=False)
            problem = self.ledger.check_values({index.fqn: value}, "")
            if problem is not None:
                bad.append(problem.replace("has non-finite values in ", ""))
        return f"has non-finite values in {', '.join(bad[:3])}" if bad else None

    def inspect(self) -> Inspection:
        self.md = read_metadata(self.iter_dir, self.ledger)
        self.args = self._read_args()
        self.layout = MegatronLayout.from_args(self.args, f"the common state of {self.iter_dir}")
        lay = self.layout
        for required in ("metadata.json",):
            if not os.path.exists(os.path.join(self.iter_dir, required)):
                raise RecoveryError(f"{os.path.join(self.iter_dir, required)} is missing (written once, not by one "
                                    f"stage); restore it from another copy.")
        by_file: Dict[str, List[Any]] = defaultdict(list)
        for index, info in self.md.storage_data.items():
            by_file[info.relative_path].append(index)
            self._item_stage[index] = self._placed(index)
        damaged: Dict[int, str] = {}
        stage_files: Dict[int, List[str]] = defaultdict(list)
        for rel, indices in sorted(by_file.items()):
            stages = {self._item_stage[i] for i in indices}
            owners = sorted(s for s in stages if s is not None)
            unplaced = sorted(i.fqn for i in indices if self._item_stage[i] is None)
            if (unplaced or not owners) and self._file_stage(rel) is not None:
                owners = sorted(set(owners) | {self._file_stage(rel)})
            path = os.path.join(self.iter_dir, rel)
            end = max(self.md.storage_data[i].offset + self.md.storage_data[i].length for i in indices)
            why = None
            if not os.path.exists(path):
                why = "missing"
            elif os.path.getsize(path) < end:
                why = f"truncated ({os.path.getsize(path)} bytes, its items end at byte {end})"
            elif self.check_values:
                why = self._value_problem(rel, indices)
            for s in owners:
                stage_files[s].append(rel)
            if why is None:
                continue
            if len(owners) != 1:
                raise RecoveryError(
                    f"{path} is {why} and holds items that cannot be matched to one pipeline stage (stages "
                    f"{owners}; unmatched items {unplaced[:5]}{' ...' if len(unplaced) > 5 else ''}). Only the "
                    f"files of a single stage can be rebuilt from its neighbours.")
            damaged[owners[0]] = "; ".join(filter(None, [damaged.get(owners[0]), f"{rel} {why}"]))
        shared = [f for f in (METADATA, COMMON, "metadata.json") if os.path.exists(os.path.join(self.iter_dir, f))]
        return Inspection(lay.num_stages, damaged, dict(stage_files), shared, directory_bytes(self.iter_dir),
                          self.unsupported_settings())

    def rewritten_files(self, found: Inspection, damaged: set) -> List[str]:
        # The rebuild rewrites the storage offsets of the lost stage's items in the global index too.
        return super().rewritten_files(found, damaged) + [METADATA]

    def _layer_signatures(self, stage: int) -> Tuple[LayerSignature, ...]:
        """Signatures of a (virtual) stage's layers from the metadata alone (it survives the stage's files)."""
        lay = self.layout
        off, n = lay.offsets[stage], lay.layer_counts[stage]
        params: Dict[int, List[Tuple[str, Tuple[int, ...], str]]] = {k: [] for k in range(n)}
        for index in self.md.storage_data:
            if index.offset is None or not index.fqn.startswith(LAYER_PREFIX):
                continue
            layer = int(index.offset[0])
            if off <= layer < off + n:
                size = self._chunk_size(index)
                name = f"{index.fqn}@{tuple(index.offset[1:])}"
                params[layer - off].append((name, tuple(size[1:]), ""))
        return tuple(LayerSignature(str(k), "TransformerLayer", tuple(sorted(params[k]))) for k in range(n))

    def _common_state_bytes(self, index) -> bytes:
        """The ``common_state`` item of a rebuilt stage 0: as its file still holds it, else the hook's replica."""
        data = common_state.item_bytes(self.iter_dir, self.md, index)
        if data is not None:
            try:
                common_state.decode(data)
                return data
            except Exception:  # noqa: BLE001 - damaged: take the replica
                pass
        data = common_state.read_replica(self.iter_dir, self.ledger)
        if data is None:
            raise RecoveryError(f"the common state (args, iteration, scheduler) was in the lost file "
                                f"{self.md.storage_data[index].relative_path} of global rank 0 and no CheckFree "
                                f"replica ({common_state.replica_path(self.iter_dir)}) holds it. {REPLICA_FIX}")
        return data

    def _chunk_size(self, index) -> Tuple[int, ...]:
        for chunk in self.md.state_dict_metadata[index.fqn].chunks:
            if tuple(chunk.offsets) == tuple(index.offset):
                return tuple(chunk.sizes)
        raise RecoveryError(f"{METADATA} lists no chunk of {index.fqn} at offset {tuple(index.offset)}; the index is "
                            f"inconsistent.")

    # -- rebuilding -------------------------------------------------------------------------------------------

    def _edge_value(self, target: int, index, size, replicas: Dict[int, Optional[Dict[str, torch.Tensor]]],
                    notes: List[str]) -> torch.Tensor:
        """A chunk of a lost edge stage's embedding or head, from the replica its neighbour saved."""
        tp = 0
        for o, n in zip(index.offset, size):
            if o:
                tp = int(o) // int(n)
        if tp not in replicas:
            replicas[tp] = read_replica(self.iter_dir, target, tp, self.ledger)
            if replicas[tp] is not None:
                notes.append(replica_note(target, self.layout.num_stages))
        replica = replicas[tp]
        if replica is None or index.fqn not in replica:
            raise RecoveryError(
                f"{index.fqn} of stage {target} exists only in the lost shard: no CheckFree replica "
                f"({replica_file(self.iter_dir, target, tp)}) holds it (torch_dist does not store the tied "
                f"output-layer copy). {REPLICA_FIX}")
        value = replica[index.fqn]
        if value.numel() != torch.Size(size).numel():
            raise RecoveryError(f"the replica of {index.fqn} has shape {tuple(value.shape)}, the checkpoint "
                                f"expects a chunk of {tuple(size)}; the replica is from another model.")
        return value.reshape(size).clone()

    def _distopt_values(self, plan: RecoveryPlan, indices: List[Any], values: Dict[Any, Any]) -> None:
        """The lost stage's distributed-optimizer items (:class:`.distopt.DistOptItems`), once its model items are in
        ``values``: its weights in its recorded bucket layout, zero moments, step 0."""
        lay, target = self.layout, plan.target
        layouts = {o["dp_group_idx"]: o for tp in range(lay.tp_size)
                   for o in require_layout(self.iter_dir, target, tp, self.ledger)}
        model = {(i.fqn, tuple(int(x) for x in i.offset)): v for i, v in values.items() if i.offset is not None}
        objects = {parse_sharded_object(i.fqn)[0]: i for i in self.md.storage_data if i.offset is None}
        replicas: Dict[int, Optional[Dict[str, torch.Tensor]]] = {}

        def tensor_of(group: int, chunk: int, entry) -> torch.Tensor:
            from torch.distributed.checkpoint.metadata import MetadataIndex

            if entry["key"] is not None:
                where = (entry["key"], tuple(entry["offset"]))
                if where in model:
                    return model[where]
                index = MetadataIndex(entry["key"], where[1])
                if index in self.md.storage_data and self._item_stage.get(index) != target:
                    return self._read_item(index)  # the tied output layer is saved once, as stage 0's embedding
            tp = group % lay.tp_size  # else the replica a neighbour keeps of the stage's embedding or head
            if tp not in replicas:
                replicas[tp] = read_replica(self.iter_dir, target, tp, self.ledger) or {}
            if entry["name"] not in replicas[tp]:
                raise RecoveryError(f"{entry['name']} of stage {target} is in its distributed-optimizer buckets but "
                                    f"in no model item nor CheckFree replica. {REPLICA_FIX}")
            return replicas[tp][entry["name"]]

        items = DistOptItems(layouts, {g: g + (plan.sources[0] - target) * lay.tp_size for g in layouts}, tensor_of,
                             lambda key: self._read_item(objects[key]))
        for index in indices:
            if index.offset is None:
                values[index] = items.object_bytes(parse_sharded_object(index.fqn)[0])
            else:
                values[index] = items.tensor(index.fqn, index.offset, self._chunk_size(index),
                                             self.md.state_dict_metadata[index.fqn].properties.dtype)

    def rebuild(self, plan: RecoveryPlan, weights: Sequence[float], out_iter_dir: str, in_place: bool) -> dict:
        from torch.distributed.checkpoint.metadata import MetadataIndex

        lay = self.layout
        target = plan.target
        # Per virtual stage of the lost rank (one without virtual pipeline stages): its plan over virtual stages,
        # weights, and which source layer stands for each of its layers. Layer signatures, offsets and counts are
        # indexed by virtual stage.
        chunks, notes = {}, []
        for cp in self.chunk_plans(plan, weights):
            v, vplan = cp["virtual_stage"], cp["plan"]
            maps = []
            for u in vplan.sources:
                mapping = match_layers(self._layer_signatures(v), self._layer_signatures(u), v, u)
                maps.append(layer_index_map(mapping))
                if mapping.note:
                    notes.append(mapping.note)
            chunks[v] = (vplan, cp["weights"], maps)
        replicas: Dict[int, Optional[Dict[str, torch.Tensor]]] = {}

        def layer_plan(global_layer: int):
            """(source layers, weights) of one of the lost rank's layers."""
            v = lay.virtual_of_layer(global_layer)
            vplan, w, maps = chunks[v]
            k = global_layer - lay.offsets[v]
            return [lay.offsets[u] + m[k] for u, m in zip(vplan.sources, maps)], w

        lost = [i for i, s in self._item_stage.items() if s == target]
        files: Dict[str, List[Any]] = defaultdict(list)
        for index in lost:
            files[self.md.storage_data[index].relative_path].append(index)
        # Rewriting a file drops whatever it held besides the stage's items: refuse rather than write a checkpoint
        # whose index points into the void.
        others = sorted(i.fqn for i, info in self.md.storage_data.items()
                        if info.relative_path in files and self._item_stage.get(i) != target)
        if others:
            raise RecoveryError(f"the files of stage {target} ({sorted(files)}) also hold items this version cannot "
                                f"place or rebuild ({others[:5]}{' ...' if len(others) > 5 else ''}); they are not "
                                f"rewritten. Restore the files from another copy.")
        values: Dict[Any, Any] = {}
        distopt = [i for i in lost if dp_group_of(parse_sharded_object(i.fqn)[0] if i.offset is None else i.fqn)]
        skip = set(distopt)
        for index in lost:
            if index in skip:
                continue
            if index.offset is None:
                key, offsets, shape = parse_sharded_object(index.fqn)
                if key == common_state.COMMON_STATE_KEY:
                    values[index] = self._common_state_bytes(index)
                    continue
                if key.startswith(LAYER_PREFIX):
                    offsets[0] = layer_plan(offsets[0])[0][0]
                elif key == RERUN_STATE_KEY:  # the same rank's of the first source stage
                    offsets[0] += (plan.sources[0] - target) * self._ranks_per_stage()
                else:  # rng_state: the first source's generator states
                    offsets[0] = plan.sources[0]
                values[index] = self._read_item(MetadataIndex(sharded_object_fqn(key, offsets, shape)))
                continue
            size = self._chunk_size(index)
            dtype = self.md.state_dict_metadata[index.fqn].properties.dtype
            state_name, param = split_opt(index.fqn)
            if state_name is not None and state_name != "fp32_param":
                # Fresh optimizer state for the rebuilt stage (the paper resets its Adam moments).
                values[index] = torch.zeros(size, dtype=dtype)
                continue
            if param.startswith(LAYER_PREFIX):
                src_layers, w = layer_plan(int(index.offset[0]))
                tensors = [self._read_item(MetadataIndex(index.fqn, torch.Size([src, *index.offset[1:]])))
                           for src in src_layers]
                values[index] = blend(tensors, w).reshape(size).to(dtype).contiguous()
            else:
                edge_index = MetadataIndex(param, index.offset)
                values[index] = self._edge_value(target, edge_index, size, replicas, notes).to(dtype)
        if distopt:
            self._distopt_values(plan, distopt, values)
        check_rebuilt({i.fqn: v for i, v in values.items() if isinstance(v, torch.Tensor)}, target,
                      f"{self.iter_dir} items", self.ledger)
        warnings = []
        if any(split_opt(i.fqn)[0] is not None for i in lost):
            warnings.append(STEP_KEPT_NOTE)
        written = []
        for rel, indices in files.items():
            indices.sort(key=lambda i: self.md.storage_data[i].offset)
            out = os.path.join(out_iter_dir, rel)
            if in_place:
                set_aside(out)
            write_items(out, rel, indices, values, self.md)
            self.ledger.bytes_written += os.path.getsize(out)
            written.append(out)
        md_path = os.path.join(out_iter_dir, METADATA)
        self.ledger.write_bytes(pickle.dumps(self.md), md_path)
        written.append(md_path)
        return {**self.finish_rebuild(out_iter_dir, target, written, notes), "warnings": warnings,
                "chunks": self.describe_chunks(plan, weights)}
