"""Building a ``PipelineModule`` for CheckFree+: the (de)embedding replicas and role-gated edge layers.

Stage 1 keeps a copy of the embedding and stage P-2 a copy of the final norm + head, as ``TiedLayerSpec``s so that
DeepSpeed sums their gradients every step and the copies stay identical. Each copy runs only on the micro-batches
where its stage is first (embedding) or last (head) on the CheckFree+ route, and passes activations through
otherwise. Users describe their model as ``embedding | blocks | head`` and call :func:`checkfree_plus_module`.
A micro-batch the engine marks for recomputation (``checkfree.plus_recompute_edges``) runs the whole stage inside one
checkpoint: only its stage input is kept until the backward runs the stage's forward again.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Union

import torch
from torch import nn
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from deepspeed.runtime import utils as ds_utils
from deepspeed.runtime.activation_checkpointing.checkpointing import checkpoint, non_reentrant_checkpoint

from . import ds_internals

EMBED_KEY = "checkfree_embed"
HEAD_KEY = "checkfree_head"


@dataclass
class RoleState:
    """Whether this rank's stage is first and/or last on the micro-batch being executed, and whether its forward
    is recomputed in its backward.

    The engine sets it before each instruction; outside a CheckFree+ schedule (evaluation, inference) it holds the
    topological role and no recomputation.
    """

    first: bool = False
    last: bool = False
    recompute: bool = False


class EdgeReplica(nn.Module):
    """An embedding or head layer that runs only when its stage plays that role on the current micro-batch.

    Args:
        typename: the wrapped layer's class.
        args, kwargs: its constructor arguments.
        when: ``"first"`` (embedding) or ``"last"`` (head).
        role: the rank's shared :class:`RoleState`.
        forward_fn: optional ``forward_fn(layer, x)``, as ``TiedLayerSpec`` takes (e.g. a head that reuses the
            embedding matrix).
    """

    def __init__(self, typename: type, args: tuple, kwargs: dict, when: str, role: RoleState,
                 forward_fn: Optional[Callable] = None) -> None:
        super().__init__()
        self.layer = typename(*args, **kwargs)
        self.when = when
        self.role = role
        self.forward_fn = forward_fn

    def forward(self, x: Any) -> Any:
        active = self.role.first if self.when == "first" else self.role.last
        if not active:
            return x
        return self.forward_fn(self.layer, x) if self.forward_fn is not None else self.layer(x)


def _param_names(spec: LayerSpec) -> List[str]:
    # Built on the meta device: only the names are needed, not gigabytes of embedding weights.
    with torch.device("meta"):
        return [n for n, _ in spec.typename(*spec.module_args, **spec.module_kwargs).named_parameters()]


def _edge_spec(spec: Union[LayerSpec, TiedLayerSpec], default_key: str, when: str, role: RoleState
               ) -> TiedLayerSpec:
    key = spec.key if isinstance(spec, TiedLayerSpec) else default_key
    forward_fn = spec.forward_fn if isinstance(spec, TiedLayerSpec) else None
    # Every parameter of the layer is replicated (token and position embeddings, final norm, head).
    attrs = [f"layer.{n}" for n in _param_names(spec)]
    return TiedLayerSpec(key, EdgeReplica, spec.typename, spec.module_args, spec.module_kwargs, when, role,
                         forward_fn, tied_weight_attr=attrs)


class CheckFreePlusPipelineModule(PipelineModule):
    """A ``PipelineModule`` whose stage boundaries are given explicitly (so the replicas land on stages 1 and P-2)
    and which carries the rank's :class:`RoleState` as ``checkfree_role``. Build it with
    :func:`checkfree_plus_module`."""

    def __init__(self, layers: Sequence[Any], num_stages: int, parts: Sequence[int], role: RoleState,
                 **kwargs: Any) -> None:
        self._checkfree_parts = [int(p) for p in parts]
        self.checkfree_role = role
        super().__init__(layers=layers, num_stages=num_stages, partition_method="checkfree_plus", **kwargs)

    def _partition_layers(self, method: str = "uniform") -> None:
        if method != "checkfree_plus":
            return super()._partition_layers(method)
        self.parts = list(self._checkfree_parts)
        stage_id = ds_internals.module_stage_id(self)
        self.checkfree_role.first = stage_id == 0
        self.checkfree_role.last = stage_id == self.num_stages - 1
        self._set_bounds(start=self.parts[stage_id], stop=self.parts[stage_id + 1])

    def _is_checkpointable(self, funcs):
        # DeepSpeed's reentrant checkpoint cuts a segment off autograd when none of its inputs requires grad, as
        # the tokens do where the embedding copy runs (stage 0, and stage 1 on swapped micro-batches). DeepSpeed
        # excludes the embedding of its own GPT pipelines for the same reason; the non-reentrant one needs no care.
        if self.activation_checkpoint_func is not non_reentrant_checkpoint and any(
                isinstance(f, EdgeReplica) and f.when == "first" for f in funcs):
            return False
        return super()._is_checkpointable(funcs)

    def forward(self, forward_input):
        if not (self.checkfree_role.recompute and self.training and torch.is_grad_enabled()):
            return super().forward(forward_input)
        # DeepSpeed's reentrant checkpoint around the whole stage: the first run keeps no graph (so no activation,
        # nor a segment input of activation checkpointing), only the stage input; the backward runs the stage again,
        # with its activation-checkpointing segments if any, and back-propagates through it. A tensor that requires
        # grad goes along: where the stage embeds the tokens no input requires grad, and the checkpoint would
        # otherwise be cut off autograd.
        anchor = torch.ones(1, device=_device_of(forward_input), requires_grad=True)
        return checkpoint(self._stage_forward_once(), *_as_args(forward_input), anchor)

    def _stage_forward_once(self) -> Callable:
        """The stage's forward, for a checkpoint that runs it twice (forward, then again in the backward): both runs
        see the layer seeds of the first (``micro_offset``, which DeepSpeed advances once per forward)."""
        offset = self.micro_offset
        runs = []

        def run(*args):
            args = args[:-1]  # the anchor
            current = self.micro_offset
            self.micro_offset = offset
            try:
                return PipelineModule.forward(self, args[0] if len(args) == 1 else args)
            finally:
                if runs:  # the recomputation leaves the counter where the later forwards left it
                    self.micro_offset = current
                runs.append(True)

        return run


def _as_args(forward_input: Any) -> tuple:
    # DeepSpeed passes one tensor or a tuple of tensors; the checkpoint takes (and detaches) positional tensors.
    return forward_input if isinstance(forward_input, tuple) else (forward_input,)


def _device_of(forward_input: Any) -> torch.device:
    return _as_args(forward_input)[0].device


def checkfree_plus_module(embedding: Union[LayerSpec, TiedLayerSpec], blocks: Sequence[LayerSpec],
                          head: Union[LayerSpec, TiedLayerSpec], num_stages: int,
                          **pipeline_kwargs: Any) -> CheckFreePlusPipelineModule:
    """The model ``embedding | blocks | head`` as a CheckFree+ pipeline.

    Stage s holds an equal share of ``blocks``; stages 0 and 1 also hold the embedding (original and replica),
    stages P-2 and P-1 the head. Pass a ``TiedLayerSpec`` with the same key for ``embedding`` and ``head`` to keep
    tied input/output embeddings (all four copies then share one tied group).

    Args:
        embedding: the embedding layer (tokens in, activations out).
        blocks: the repeated body layers.
        head: the final norm + LM head (activations in, logits out).
        num_stages: pipeline depth (>= 4).
        **pipeline_kwargs: passed to ``PipelineModule`` (``loss_fn``, ``topology``, ``seed_layers``, ...).

    Raises:
        ValueError: fewer than 4 stages, or fewer blocks than stages.
    """
    if num_stages < 4:
        raise ValueError(f"CheckFree+ swaps the first two and the last two stages, so it needs num_stages >= 4; "
                         f"got num_stages={num_stages}. Use mode='checkfree' for shallower pipelines.")
    if len(blocks) < num_stages:
        raise ValueError(f"every stage needs at least one block: got {len(blocks)} blocks for {num_stages} "
                         f"stages. Use more blocks or fewer stages.")
    role = RoleState()
    block_parts = ds_utils.partition_uniform(num_items=len(blocks), num_parts=num_stages)
    layers: List[Any] = []
    parts = [0]
    for s in range(num_stages):
        if s in (0, 1):
            layers.append(_edge_spec(embedding, EMBED_KEY, "first", role))
        layers.extend(blocks[block_parts[s]:block_parts[s + 1]])
        if s in (num_stages - 2, num_stages - 1):
            layers.append(_edge_spec(head, HEAD_KEY, "last", role))
        parts.append(len(layers))
    return CheckFreePlusPipelineModule(layers, num_stages, parts, role, **pipeline_kwargs)
