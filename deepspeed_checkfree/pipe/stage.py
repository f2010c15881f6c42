"""This rank's stage as CheckFree sees it: its layers with parameters, in layer order, and their signature (layer
types, parameter names and shapes), by which a lost stage's layers are matched to its neighbours'."""
from __future__ import annotations

from typing import List

from deepspeed.runtime.pipe.module import PipelineModule, TiedLayerSpec

from ..core.recovery import StageSignature, layer_signature
from . import ds_internals


def stage_layers(module: PipelineModule) -> List[tuple]:
    """(name prefix, module, tied key) of each local layer that has parameters, in layer order."""
    out, seen = [], set()
    for idx in ds_internals.local_layer_range(module):
        spec = ds_internals.layer_spec(module, idx)
        if isinstance(spec, TiedLayerSpec):
            if spec.key in seen:
                continue
            seen.add(spec.key)
            out.append((f"tied_modules.{spec.key}", module.tied_modules[spec.key], spec.key))
        elif (layer := ds_internals.local_layer(module, idx)) is not None:
            out.append((str(idx), layer, None))
    return [entry for entry in out if any(True for _ in entry[1].parameters())]


def stage_signature(module: PipelineModule) -> StageSignature:
    """The signature (layer types, parameter names and shapes) of this rank's stage."""
    return tuple(layer_signature(name, layer, key) for name, layer, key in stage_layers(module))
