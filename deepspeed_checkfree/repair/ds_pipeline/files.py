"""The files of a DeepSpeed pipeline checkpoint and what CheckFree adds to them: file names, the client state the
engine saves (each stage's gradient norm and layer range) and a layer's signature as far as its file tells.

Layout (DeepSpeed 0.19.8, `PipelineModule.save_state_dict`): ``save_dir/latest`` names the tag; ``tag/layer_XX-model_states.pt``
holds one layer's state dict (global layer index XX) and ``tag/mp_rank_SS_model_states.pt`` stage SS's engine state.
"""
from __future__ import annotations

import logging
import re
from typing import Any, Dict

import torch

from ...core.recovery import LayerSignature

logger = logging.getLogger(__name__)

LAYER_FILE = re.compile(r"layer_(\d+)-model_states\.pt$")
LAYER_TP_FILE = re.compile(r"layer_(\d+)-model_\d+-model_states\.pt$")
MP_FILE = re.compile(r"mp_rank_(\d+)_model_states\.pt$")
NORM_KEY = "checkfree_stage_grad_norm"
LAYERS_KEY = "checkfree_stage_layers"
NORMS_FILE = "checkfree_grad_norms.json"


def checkpoint_client_state(engine: Any) -> Dict[str, Any]:
    """Client state to pass to ``engine.save_checkpoint(dir, tag, client_state=...)`` so that ``checkfree repair`` can
    weight a rebuild by the recorded gradient norms and knows each stage's layers exactly. Every pipeline rank writes
    its own, in its own ``mp_rank`` file; no communication.
    """
    # PipelineModule.parts holds every stage's layer boundaries (it sets its own bounds from them).
    parts = engine.module.parts
    return {NORM_KEY: getattr(engine, "stage_grad_norm", None),
            LAYERS_KEY: [int(parts[engine.stage_id]), int(parts[engine.stage_id + 1])]}


def layer_file(idx: int) -> str:
    return f"layer_{idx:02d}-model_states.pt"


def mp_file(stage: int) -> str:
    return f"mp_rank_{stage:02d}_model_states.pt"


def layer_structure(state: Dict[str, Any]) -> str:
    """A layer's type, as far as files tell: the names of its tensors."""
    return "|".join(sorted(k for k, v in state.items() if isinstance(v, torch.Tensor)))


def layer_file_signature(idx: int, state: Dict[str, Any]) -> LayerSignature:
    """The signature of layer ``idx`` from its saved state dict (tensor names, shapes, dtypes)."""
    params = tuple((k, tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in state.items()
                   if isinstance(v, torch.Tensor))
    return LayerSignature(str(idx), layer_structure(state), params)
