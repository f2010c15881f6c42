"""The reader and rebuilder of one iteration of a legacy Megatron checkpoint (``--ckpt-format torch``):
``iter_XXXXXXX/mp_rank_TT_PPP/model_optim_rng.pt`` per (tensor, pipeline) rank. A lost stage is every
``mp_rank_*_PPP`` file of its pipeline rank. Files are read with ``torch.load``, never by importing Megatron (a
shard's pickled ``args`` may make the unpickler import ``megatron.core`` classes while it is read).
"""
from __future__ import annotations

import logging
import os
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from ...core.recovery import RecoveryPlan
from ...errors import RecoveryError
from ..base import IOLedger, Inspection, damage_of, directory_bytes, file_problem, write_rebuilt_file
from ..megatron_common import MegatronIteration, MegatronLayout
from ..megatron_distopt import fresh_steps, legacy_param_state, require_layout
from .stage_state import blend_layers, edge_parameters, fresh_optimizer_state, order_stage_state

logger = logging.getLogger(__name__)

SHARD_FILE = "model_optim_rng.pt"
OPTIM_FILE = "distrib_optim.pt"  # megatron/training/checkpointing.py get_distributed_optimizer_checkpoint_name
_SHARD_DIR = re.compile(r"mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?$")


class MegatronLegacyCheckpoint(MegatronIteration):
    """One iteration of a legacy Megatron checkpoint: ``mp_rank_TT_PPP/model_optim_rng.pt`` per (tensor, pipeline)
    rank; a lost stage is every ``mp_rank_*_PPP`` file of that pipeline rank. With virtual pipeline stages a shard
    holds ``model0``, ``model1``, ...: one state dict per model chunk."""

    SUPPORTS_VIRTUAL_PIPELINE = True
    SUPPORTS_DISTRIBUTED_OPTIMIZER = True

    def __init__(self, path: str, tag: Optional[str], ledger: IOLedger, check_values: bool = True) -> None:
        super().__init__(path, tag, ledger, check_values)
        self._loaded: Dict[Tuple[int, int], Dict[str, Any]] = {}

    def shard_rel(self, tp: int, pp: int, ep: Optional[int] = None, name: str = SHARD_FILE) -> str:
        """Megatron's ``get_checkpoint_name``: ``mp_rank_TT[_PPP][_EEE]/<name>``."""
        shard = f"mp_rank_{tp:02d}_{pp:03d}" if self.layout.num_stages > 1 else f"mp_rank_{tp:02d}"
        if ep is not None:
            shard += f"_{ep:03d}"
        return os.path.join(shard, name)

    def load(self, tp: int, pp: int) -> Dict[str, Any]:
        if (tp, pp) not in self._loaded:
            self._loaded[(tp, pp)] = self.ledger.load(os.path.join(self.iter_dir, self.shard_rel(tp, pp)))
        return self._loaded[(tp, pp)]

    def _present(self) -> Dict[Tuple[int, int, int], str]:
        """(tp, pp, ep) -> shard directory, for every ``mp_rank_*`` directory of the iteration."""
        out = {}
        for name in os.listdir(self.iter_dir):
            m = _SHARD_DIR.fullmatch(name)
            if m is None or not os.path.isdir(os.path.join(self.iter_dir, name)):
                continue
            out[(int(m.group(1)), int(m.group(2) or 0), int(m.group(3) or 0))] = name
        return out

    def _args(self, present: Dict[Tuple[int, int, int], str]) -> Tuple[Any, str]:
        """The saved args, from the first shard that loads (a damaged one is skipped: every shard holds them)."""
        for key in sorted(present, key=lambda k: (k[1] == 0, -k[1], k)):  # a later stage is a likely source anyway
            rel = os.path.join(present[key], SHARD_FILE)
            if file_problem(os.path.join(self.iter_dir, rel)) is not None:
                continue
            try:
                state = self.ledger.load(os.path.join(self.iter_dir, rel))
            except RecoveryError:
                continue
            if key[2] == 0:
                self._loaded[key[:2]] = state
            return state.get("args"), rel
        raise RecoveryError(f"no shard of {self.iter_dir} is readable; nothing survives to rebuild from.")

    def inspect(self) -> Inspection:
        present = self._present()
        if not present:
            raise RecoveryError(f"{self.iter_dir} holds no mp_rank_* shard directory: not a Megatron legacy checkpoint "
                                f"iteration, or every stage is gone.")
        args, rel = self._args(present)
        self.layout = MegatronLayout.from_args(args, os.path.join(self.iter_dir, rel))
        lay = self.layout
        ep_size = max(int(getattr(args, "expert_model_parallel_size", 1) or 1), 1 + max(k[2] for k in present))
        strays = [present[k] for k in present if k[0] >= lay.tp_size or k[1] >= lay.num_stages]
        if strays:
            raise RecoveryError(f"{self.iter_dir} holds shards {strays} outside the recorded layout (tensor parallel "
                                f"{lay.tp_size} x pipeline {lay.num_stages}); the checkpoint is inconsistent.")
        # distrib_optim.pt (the distributed optimizer's state, written next to each shard) is expected everywhere
        # once any shard has one.
        optim_files = any(os.path.exists(os.path.join(self.iter_dir, d, OPTIM_FILE)) for d in present.values())
        damaged: Dict[int, str] = {}
        stage_files: Dict[int, List[str]] = {}
        for pp in range(lay.num_stages):
            problems = []
            for tp in range(lay.tp_size):
                for ep in range(ep_size):
                    shard_dir = os.path.dirname(self.shard_rel(tp, pp, ep if ep_size > 1 else None))
                    for name in (SHARD_FILE,) + ((OPTIM_FILE,) if optim_files else ()):
                        rel = os.path.join(shard_dir, name)
                        stage_files.setdefault(pp, []).append(rel)
                        why = damage_of(os.path.join(self.iter_dir, rel), self.ledger, self.check_values)
                        if why is not None:
                            problems.append(f"{rel} {why}".replace("  ", " "))
            if problems:
                damaged[pp] = "; ".join(problems)
        return Inspection(lay.num_stages, damaged, stage_files, [], directory_bytes(self.iter_dir),
                          self.unsupported_settings())

    def _chunk_key(self, c: int) -> str:
        return f"model{c}" if self.layout.vpp_size > 1 else "model"

    def _merged_model(self, state: Dict[str, Any]) -> Dict[str, Any]:
        """All model chunks of a shard as one ordered dict (chunk-prefixed keys: the optimizer's parameter order)."""
        if self.layout.vpp_size == 1:
            return state["model"]
        return {f"{c}/{k}": v for c in range(self.layout.vpp_size) for k, v in state[self._chunk_key(c)].items()}

    def rebuild(self, plan: RecoveryPlan, weights: Sequence[float], out_iter_dir: str, in_place: bool) -> dict:
        lay = self.layout
        files, notes = [], []
        chunk_plans = self.chunk_plans(plan, weights)
        for tp in range(lay.tp_size):
            state: Dict[str, Any] = {}
            for cp in chunk_plans:
                c, v = cp["chunk"], cp["virtual_stage"]
                sources = [(s, self.load(tp, s)[self._chunk_key(sc)]) for s, sc in cp["sources"]]
                layers, note = blend_layers(plan.target, lay.layer_counts[v], sources, cp["weights"], self.ledger)
                edge: Dict[str, torch.Tensor] = {}
                if v in (0, lay.num_virtual - 1):
                    edge, edge_note = edge_parameters(self.iter_dir, lay, plan.target, tp, self.ledger,
                                                      lambda s, t: self._merged_model(self.load(t, s)))
                    notes.append(edge_note)
                state[self._chunk_key(c)] = order_stage_state(v, layers, {k: x.clone() for k, x in edge.items()})
                if note:
                    notes.append(note)
            whole = [(s, self.load(tp, s)) for s in plan.sources]
            state = {**{k: x for k, x in whole[0][1].items() if not k.startswith("model")}, **state}
            if lay.distributed_optimizer and "optimizer" in state:
                # The optimizer's parameter groups (with step 0) stay here; its bucketed state goes next door.
                state["optimizer"] = fresh_steps(state["optimizer"])
                src_optim = os.path.join(self.iter_dir, self.shard_rel(tp, plan.sources[0], name=OPTIM_FILE))
                if os.path.exists(src_optim):
                    files.append(self._write_distrib_optim(plan.target, tp, state, out_iter_dir, in_place))
            elif "optimizer" in state:
                merged = self._merged_model(state)
                state["optimizer"] = fresh_optimizer_state(
                    merged, [(s, {"model": self._merged_model(st), "optimizer": st["optimizer"]}) for s, st in whole],
                    plan.target)
            out = os.path.join(out_iter_dir, self.shard_rel(tp, plan.target))
            os.makedirs(os.path.dirname(out), exist_ok=True)
            files.append(write_rebuilt_file(state, out, in_place, self.ledger, plan.target))
        return {**self.finish_rebuild(out_iter_dir, plan.target, files, notes),
                "chunks": self.describe_chunks(plan, weights)}

    def _write_distrib_optim(self, target: int, tp: int, state: Dict[str, Any], out_iter_dir: str,
                             in_place: bool) -> str:
        """The rebuilt stage's ``distrib_optim.pt``: its rebuilt weights in its recorded bucket layout, zero moments."""
        layout = require_layout(self.iter_dir, target, tp, self.ledger)

        def tensor_of(chunk: int, entry: Mapping[str, Any]) -> torch.Tensor:
            model = state[self._chunk_key(chunk)]
            if entry["name"] not in model:
                raise RecoveryError(f"the distributed-optimizer layout of stage {target} names {entry['name']}, which "
                                    f"the rebuilt {self._chunk_key(chunk)} does not hold; the layout record is from "
                                    f"another model.")
            return model[entry["name"]]

        out = os.path.join(out_iter_dir, self.shard_rel(tp, target, name=OPTIM_FILE))
        os.makedirs(os.path.dirname(out), exist_ok=True)
        return write_rebuilt_file(legacy_param_state(layout, tensor_of), out, in_place, self.ledger, target)
