"""The reader and rebuilder of one tag of a DeepSpeed pipeline checkpoint (``PipelineEngine.save_checkpoint``).

A lost stage is its mp_rank file and its layer files. Which layers a stage held is not in DeepSpeed's files: it comes
from the ``checkfree_stage_layers`` client state when the engine saved it (see :func:`.files.checkpoint_client_state`),
else it is inferred from the number of parameters each surviving stage's optimizer holds.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ...core.recovery import LayerSignature, ParamMapping, RecoveryPlan, blend, match_layers, plan_recovery
from ...errors import RecoveryError, UnsupportedSetupError
from ..base import (IOLedger, Inspection, copy_to_output, damage_of, directory_bytes, empty_optimizer_state,
                    write_rebuilt_file)
from .files import (LAYER_FILE, LAYER_TP_FILE, LAYERS_KEY, MP_FILE, NORM_KEY, NORMS_FILE, layer_file,
                    layer_file_signature, mp_file)

logger = logging.getLogger(__name__)

_RECORD_LAYERS = ("Save with client_state=deepspeed_checkfree.repair.ds_pipeline.checkpoint_client_state(engine) "
                  "to record each stage's layers")


class DeepSpeedCheckpoint:
    """One tag of a DeepSpeed pipeline checkpoint."""

    def __init__(self, path: str, tag: Optional[str], ledger: IOLedger, check_values: bool = True) -> None:
        path = os.path.abspath(path)
        latest = os.path.join(path, "latest")
        if tag is None and os.path.exists(latest):
            with open(latest, encoding="utf-8") as f:
                tag = f.read().strip()
        if tag is not None and os.path.isdir(os.path.join(path, tag)):
            self.root, self.iter_dir = path, os.path.join(path, tag)
        elif tag is not None:
            raise RecoveryError(f"tag {tag!r} of {path} does not exist ({os.path.join(path, tag)}); pass --tag with a "
                                f"tag that exists.")
        else:
            self.root, self.iter_dir = os.path.dirname(path), path
        self.iteration = os.path.basename(self.iter_dir)
        self.ledger = ledger
        self.check_values = check_values
        self.unsupported: List[Tuple[str, Any]] = []
        self.num_stages = 0
        self.mode = "checkfree"
        self.mp: Dict[int, Dict[str, Any]] = {}
        self.layer_stage: Dict[int, int] = {}
        self.stage_layers: Dict[int, List[int]] = {}
        self._layers: Dict[int, Dict[str, Any]] = {}

    # -- reading ----------------------------------------------------------------------------------------------

    def layer(self, idx: int) -> Dict[str, Any]:
        if idx not in self._layers:
            self._layers[idx] = self.ledger.load(os.path.join(self.iter_dir, layer_file(idx)))
        return self._layers[idx]

    def stage_signature(self, stage: int) -> Tuple[LayerSignature, ...]:
        """The signatures of the layers a (surviving) stage holds, from their files."""
        return tuple(layer_file_signature(i, self.layer(i)) for i in self.stage_layers[stage])

    def _problem(self, name: str) -> Optional[str]:
        return damage_of(os.path.join(self.iter_dir, name), self.ledger, self.check_values)

    def _scan(self) -> Tuple[Dict[int, Optional[str]], Dict[int, Optional[str]]]:
        layers, mps = {}, {}
        for name in sorted(os.listdir(self.iter_dir)):
            # Settings whose files repair does not rebuild: they matter only if a stage is damaged.
            if name.startswith(("zero_pp_rank_", "bf16_zero_pp_rank_")):
                self._note_unsupported("zero_optimization", "partitioned optimizer files (zero_pp_rank_*)")
            if LAYER_TP_FILE.match(name):
                self._note_unsupported("tensor_parallel", "tensor-parallel layer files (layer_XX-model_YY-*)")
            m = LAYER_FILE.match(name)
            if m:
                layers[int(m.group(1))] = self._problem(name)
            m = MP_FILE.match(name)
            if m:
                mps[int(m.group(1))] = self._problem(name)
        return layers, mps

    def _note_unsupported(self, name: str, value: str) -> None:
        if (name, value) not in self.unsupported:
            self.unsupported.append((name, value))

    def inspect(self) -> Inspection:
        layers, mps = self._scan()
        good_mp = sorted(s for s, why in mps.items() if why is None)
        if not good_mp:
            raise RecoveryError(f"{self.iter_dir} holds no readable mp_rank_XX_model_states.pt; nothing survives to "
                                f"rebuild from (or this is not a DeepSpeed pipeline checkpoint).")
        for s in good_mp:
            self.mp[s] = self.ledger.load(os.path.join(self.iter_dir, mp_file(s)))
        first = self.mp[good_mp[0]]
        dims = first.get("checkpoint_parallel_dimensions") or {}
        self.num_stages = int(dims.get("pp_degree") or first.get("mp_world_size") or 0)
        if int(dims.get("tp_degree", 1) or 1) > 1:
            self._note_unsupported("tp_degree", dims["tp_degree"])
        if first.get("module") is not None:
            raise RecoveryError(f"{mp_file(good_mp[0])} holds a whole module: this is not a pipeline checkpoint "
                                f"(PipelineModule saves per-layer files).")
        if self.num_stages < 2:
            raise RecoveryError(f"the checkpoint has {self.num_stages} pipeline stage(s); CheckFree needs a pipeline "
                                f"of >= 2 stages to rebuild one from its neighbour.")
        strays = [s for s in mps if s >= self.num_stages]
        if strays:
            raise RecoveryError(f"mp_rank files {strays} lie outside the recorded {self.num_stages}-stage pipeline; "
                                f"the checkpoint is inconsistent.")
        self.mode = ((first.get("ds_config") or {}).get("checkfree") or {}).get("mode", "checkfree")
        damaged: Dict[int, str] = {}
        for s in range(self.num_stages):
            if mps.get(s, "missing") is not None:
                damaged[s] = f"{mp_file(s)} {mps.get(s, 'missing')}"
        self._assign_layers(layers, damaged)
        stage_files = {s: [mp_file(s)] + [layer_file(i) for i in self.stage_layers.get(s, [])]
                       for s in range(self.num_stages)}
        return Inspection(self.num_stages, damaged, stage_files, [], directory_bytes(self.iter_dir, recursive=False),
                          tuple(self.unsupported))

    def _assign_layers(self, layers: Dict[int, Optional[str]], damaged: Dict[int, str]) -> None:
        """Which layer files each stage holds: recorded, or inferred from the surviving stages' parameter counts."""
        top = max(layers, default=-1)
        bad = sorted({i for i in range(top + 1) if layers.get(i, "missing") is not None})
        recorded = {s: st.get(LAYERS_KEY) for s, st in self.mp.items() if st.get(LAYERS_KEY)}
        if len(recorded) == len(self.mp):
            for s, (start, stop) in recorded.items():
                self.stage_layers[s] = list(range(start, stop))
            for d in damaged:
                prev = recorded.get(d - 1)
                nxt = recorded.get(d + 1)
                start = prev[1] if prev else 0
                stop = nxt[0] if nxt else None
                self.stage_layers[d] = list(range(start, stop)) if stop is not None else []
        else:
            self._infer_layers(layers, damaged, top)
        for s, idxs in self.stage_layers.items():
            if s in damaged:
                continue
            lost = [i for i in idxs if i in bad]
            if lost:
                damaged[s] = "; ".join(f"{layer_file(i)} {layers.get(i, 'missing')}" for i in lost)
        claimed = {i for idxs in self.stage_layers.values() for i in idxs}
        orphans = [i for i in bad if i not in claimed]
        if orphans:
            raise RecoveryError(f"layer files {[layer_file(i) for i in orphans]} are missing or unreadable but belong "
                                f"to no stage of the recorded layout; the checkpoint is inconsistent.")
        for s, idxs in self.stage_layers.items():
            for i in idxs:
                self.layer_stage[i] = s

    def _param_count(self, s: int) -> int:
        return sum(len(g["params"]) for g in self.mp[s]["optimizer"]["param_groups"])

    def _infer_layers(self, layers: Dict[int, Optional[str]], damaged: Dict[int, str], top: int) -> None:
        def count(i: int) -> int:
            return sum(1 for v in self.layer(i).values() if isinstance(v, torch.Tensor))

        def take(order: Sequence[int], stage: int) -> List[int]:
            need, got, acc = self._param_count(stage), [], 0
            for i in order:
                if layers.get(i, "missing") is not None:
                    break
                got.append(i)
                acc += count(i)
                if acc >= need:
                    break
            if acc != need:
                raise RecoveryError(
                    f"cannot tell which layer files belong to stage {stage}: its optimizer holds {need} parameters, "
                    f"the layer files next to it add up to {acc}. {_RECORD_LAYERS}.")
            return got

        lost = sorted(damaged)
        if len(lost) > 1:
            raise RecoveryError(
                f"stages {lost} are damaged and the checkpoint does not record which layers each stage held; with more "
                f"than one damaged stage the layers cannot be inferred. {_RECORD_LAYERS}, or restore all but one "
                f"stage.")
        d = lost[0] if lost else None
        pos = 0
        for s in range(0, d if d is not None else self.num_stages):
            got = take(range(pos, top + 1), s)
            self.stage_layers[s] = got
            pos = got[-1] + 1
        if d is None:
            return
        end = top
        for s in range(self.num_stages - 1, d, -1):
            got = take(range(end, pos - 1, -1), s)
            self.stage_layers[s] = sorted(got)
            end = min(got) - 1
        self.stage_layers[d] = list(range(pos, end + 1))

    def plan(self, stage: int, strategy: str) -> RecoveryPlan:
        # The checkpoint's own mode decides: under CheckFree+ stages 0/1 and P-2/P-1 are trained to be
        # interchangeable and hold each other's (de)embedding replica, so each pair rebuilds by copy.
        try:
            (plan,) = plan_recovery([stage], self.num_stages, mode=self.mode, strategy=strategy)
            return plan
        except RecoveryError as err:
            raise RecoveryError(f"{err} (the checkpoint's ds_config has checkfree.mode={self.mode!r}: under plain "
                                f"CheckFree only stage 0 holds the embedding and stage {self.num_stages - 1} the head, "
                                f"so no neighbour can provide them)") from err

    def grad_norms(self) -> Dict[int, float]:
        norms = {s: float(st[NORM_KEY]) for s, st in self.mp.items() if st.get(NORM_KEY) is not None}
        path = os.path.join(self.iter_dir, NORMS_FILE)
        if os.path.exists(path):
            for s, n in json.loads(self.ledger.read_bytes(path)).items():
                if n is not None:
                    norms.setdefault(int(s), float(n))
        return norms

    def prepare_output(self, output: str, found: Inspection, damaged: set) -> str:
        skip = [f for s in damaged for f in found.stage_files[s]]
        out_iter = copy_to_output(self.iter_dir, output, skip, self.ledger)
        with open(os.path.join(output, "latest"), "w", encoding="utf-8") as f:
            f.write(os.path.basename(self.iter_dir))
        return out_iter

    # -- rebuilding ---------------------------------------------------------------------------------------------

    def _target_layers(self, plan: RecoveryPlan) -> Tuple[List[int], Tuple[LayerSignature, ...]]:
        """The lost stage's layer indices and their assumed structure (its own files are gone)."""
        t = plan.target
        src_sigs = {s: self.stage_signature(s) for s in plan.sources}
        idxs = list(self.stage_layers.get(t) or [])
        if plan.strategy == "copy" or len(plan.sources) == 1:
            ref = src_sigs[plan.sources[0]]
            if not idxs:  # the last stage with every file gone: as many layers as the stage it mirrors
                start = max(self.stage_layers[t - 1]) + 1 if t > 0 else 0
                idxs = list(range(start, start + len(ref)))
            if len(idxs) != len(ref):
                raise RecoveryError(
                    f"stage {t} held {len(idxs)} layers but stage {plan.sources[0]}, which it copies, holds "
                    f"{len(ref)}; a copy needs the same layers (CheckFree+ modules mirror the edge stages).")
            return idxs, tuple(LayerSignature(str(i), r.type_name, r.params) for i, r in zip(idxs, ref))
        shared = set.intersection(*({l.type_name for l in sig} for sig in src_sigs.values()))
        if len(shared) != 1:
            raise RecoveryError(
                f"cannot tell the structure of stage {t}'s lost layers {idxs}: its neighbours {list(plan.sources)} "
                f"share {len(shared)} layer types ({sorted(shared) or 'none'}); exactly one (the repeated block) is "
                f"needed. Neighbouring stages must hold the same kind of blocks.")
        (body,) = shared
        ref = next(l for l in src_sigs[plan.sources[0]] if l.type_name == body)
        return idxs, tuple(LayerSignature(str(i), body, ref.params) for i in idxs)

    def rebuild(self, plan: RecoveryPlan, weights: Sequence[float], out_iter_dir: str, in_place: bool) -> dict:
        t = plan.target
        idxs, tgt_sig = self._target_layers(plan)
        mappings: List[ParamMapping] = [match_layers(tgt_sig, self.stage_signature(s), t, s) for s in plan.sources]
        files, params = [], {}
        for i in idxs:
            params[i] = {}
        for k, (tgt, _) in enumerate(mappings[0].pairs):
            layer, _, name = tgt.partition(".")
            tensors = []
            for s, m in zip(plan.sources, mappings):
                src_layer, _, src_name = m.pairs[k][1].partition(".")
                tensors.append(self.ledger.tensor(self.layer(int(src_layer))[src_name]))
            params[int(layer)][name] = blend(tensors, weights)
        for i in idxs:
            files.append(write_rebuilt_file(params[i], os.path.join(out_iter_dir, layer_file(i)), in_place,
                                            self.ledger, t))
        state = {k: v for k, v in self.mp[plan.sources[0]].items() if k != "optimizer"}
        state["optimizer"] = self._fresh_optimizer(plan, tgt_sig)
        state[NORM_KEY] = None  # not measured on the rebuilt stage yet
        if LAYERS_KEY in state:
            state[LAYERS_KEY] = [idxs[0], idxs[-1] + 1]
        files.append(write_rebuilt_file(state, os.path.join(out_iter_dir, mp_file(t)), in_place, self.ledger, t))
        notes = [m.note for m in mappings if m.note]
        return {"files": files, "note": "; ".join(notes) or None}

    def _fresh_optimizer(self, plan: RecoveryPlan, tgt_sig: Tuple[LayerSignature, ...]) -> Dict[str, Any]:
        """Empty optimizer state (the paper resets the rebuilt stage's Adam moments) with the stage's group sizes."""
        tgt_structure = [(l.type_name, l.params) for l in tgt_sig]
        for s in plan.sources:
            src_opt = self.mp[s]["optimizer"]
            if not isinstance(src_opt, dict) or "param_groups" not in src_opt:
                raise UnsupportedSetupError(f"stage {s}'s optimizer state is not a torch optimizer state dict "
                                            f"({type(src_opt).__name__}); only torch optimizers are supported.")
            if [(l.type_name, l.params) for l in self.stage_signature(s)] == tgt_structure:
                sizes = [len(g["params"]) for g in src_opt["param_groups"]]
                break
        else:
            groups = self.mp[plan.sources[0]]["optimizer"]["param_groups"]
            if len(groups) != 1:
                raise RecoveryError(
                    f"stage {plan.target}'s optimizer had {len(groups)} parameter groups and no neighbour has the same "
                    f"layers to copy their sizes from; resume with engine.load_checkpoint(..., "
                    f"load_optimizer_states=False).")
            sizes = [sum(len(l.params) for l in tgt_sig)]
        return empty_optimizer_state(self.mp[plan.sources[0]]["optimizer"]["param_groups"], sizes)
