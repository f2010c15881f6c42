"""The reader and rebuilder of one iteration of a legacy Megatron checkpoint (``--ckpt-format torch``):
``iter_XXXXXXX/mp_rank_TT_PPP/model_optim_rng.pt`` per (tensor, pipeline) rank. A lost stage is every
``mp_rank_*_PPP`` file of its pipeline rank. Files are read with ``torch.load``, never by importing Megatron (a
shard's pickled ``args`` may make the unpickler import ``megatron.core`` classes while it is read).
"""
from __future__ import annotations

import logging
import os
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ...core.recovery import RecoveryPlan
from ...errors import RecoveryError, UnsupportedSetupError
from ..base import IOLedger, Inspection, directory_bytes, file_problem, write_rebuilt_file
from ..megatron_common import MegatronIteration, MegatronLayout, read_norms
from .stage_state import blend_layers, edge_parameters, fresh_optimizer_state, order_stage_state

logger = logging.getLogger(__name__)

_SHARD_DIR = re.compile(r"mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?$")


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
        return Inspection(lay.num_stages, damaged, stage_files, [], directory_bytes(self.iter_dir))

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
            files.append(write_rebuilt_file(state, out, in_place, self.ledger))
            if note:
                notes.append(note)
        return self.finish_rebuild(out_iter_dir, plan.target, files, notes)
