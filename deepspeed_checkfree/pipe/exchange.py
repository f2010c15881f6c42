"""Moving stage signatures, gradient norms and weights between ranks for a rebuild.

Every rank of the pipeline calls :func:`rebuild_stages` with the same plans. Sources (survivors) only send and
targets (rebuilt stages) only receive, each in plan order, so the wait graph has no cycle and blocking sends (gloo)
cannot deadlock. The same path serves injected wipes and real process loss.
"""
from __future__ import annotations

import math
import time
from datetime import timedelta
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from ..core.recovery import (ParamMapping, RecoveryPlan, StageSignature, blend, match_layers, reinitialize,
                       source_weights)


def _send(tensor: torch.Tensor, dst: int, timeout: Optional[timedelta]) -> None:
    if timeout is None:
        dist.send(tensor, dst)
    else:
        dist.isend(tensor, dst).wait(timeout)


def _recv(tensor: torch.Tensor, src: int, timeout: Optional[timedelta]) -> None:
    if timeout is None:
        dist.recv(tensor, src)
    else:
        dist.irecv(tensor, src).wait(timeout)


def gather_signatures(signature: StageSignature, stage_id: int, num_stages: int,
                      group: Optional[dist.ProcessGroup] = None) -> Dict[int, StageSignature]:
    """All stages' signatures, gathered over the pipeline group (one small collective, at start-up)."""
    gathered: List[Optional[Tuple[int, StageSignature]]] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, (stage_id, signature), group=group)
    out = {s: sig for s, sig in gathered}
    missing = sorted(set(range(num_stages)) - set(out))
    assert not missing, f"no signature gathered for stages {missing}"
    return out


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


# A survivor sends its own tensors as they are, and packs only small ones into buffers of at most this size, so
# that it never holds a second copy of its stage (a copy briefly doubles the weights' memory: an out-of-memory
# error on a full accelerator) while still sending few messages.
BUCKET_BYTES = 8 * 2**20

Spec = Tuple[Tuple[int, ...], torch.dtype]


def wire_messages(specs: Sequence[Spec], bucket_bytes: int = BUCKET_BYTES) -> List[List[int]]:
    """PURE: how tensors of ``specs`` travel, as the indices each message carries, in order. A tensor of at least
    ``bucket_bytes`` travels alone (no copy); smaller ones of one dtype share a message up to ``bucket_bytes``.
    Sender and receiver compute the same list from the same specs."""
    messages: List[List[int]] = []
    open_bucket: Dict[torch.dtype, Tuple[List[int], int]] = {}
    for i, (shape, dtype) in enumerate(specs):
        size = math.prod(shape) * dtype.itemsize
        if size >= bucket_bytes:
            messages.append([i])
            continue
        bucket, used = open_bucket.get(dtype, (None, 0))
        if bucket is None or used + size > bucket_bytes:
            bucket, used = [], 0
            messages.append(bucket)
        bucket.append(i)
        open_bucket[dtype] = (bucket, used + size)
    return messages


def _message(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """One message's payload: a lone tensor itself (flattened, no copy), several flattened together."""
    flat = [t.detach().reshape(-1) for t in parts]
    return flat[0] if len(flat) == 1 else torch.cat(flat)


def _pack(tensors: Sequence[torch.Tensor], bucket_bytes: int = BUCKET_BYTES) -> Iterator[torch.Tensor]:
    """The messages that carry ``tensors`` (:func:`wire_messages`), one at a time: a sender holds at most one
    bucket beyond its own tensors."""
    specs = [(tuple(t.shape), t.dtype) for t in tensors]
    for message in wire_messages(specs, bucket_bytes):
        yield _message([tensors[i] for i in message])


def _empty_messages(specs: Sequence[Spec], device: torch.device, bucket_bytes: int = BUCKET_BYTES
                    ) -> List[torch.Tensor]:
    """Receive buffers for the messages that carry ``specs``."""
    return [torch.empty(sum(math.prod(specs[i][0]) for i in message), dtype=specs[message[0]][1], device=device)
            for message in wire_messages(specs, bucket_bytes)]


def _unpack(buffers: Sequence[torch.Tensor], specs: Sequence[Spec], bucket_bytes: int = BUCKET_BYTES
            ) -> List[torch.Tensor]:
    out: List[Optional[torch.Tensor]] = [None] * len(specs)
    for buf, message in zip(buffers, wire_messages(specs, bucket_bytes)):
        offset = 0
        for i in message:
            n = math.prod(specs[i][0])
            out[i] = buf[offset:offset + n].view(specs[i][0])
            offset += n
    return out


def broadcast_tensors(tensors: Sequence[torch.Tensor], src: int, group: Optional[dist.ProcessGroup],
                      receive: bool, device: Optional[torch.device] = None) -> int:
    """Broadcast ``tensors`` from global rank ``src`` over ``group`` (large tensors as they are, small ones in
    buckets: :func:`wire_messages`), one message at a time, so no rank holds more than one bucket beyond its own
    tensors.

    Only a rank with ``receive`` set overwrites its tensors with what arrived (a large one directly); the others
    take part without touching theirs (theirs may be ``meta`` tensors that only give the shapes: each message is
    then received into a buffer on ``device``). Returns the bytes moved.
    """
    specs = [(tuple(t.shape), t.dtype) for t in tensors]
    sending = dist.get_rank() == src
    moved = 0
    for message in wire_messages(specs):
        parts = [tensors[i] for i in message]
        direct = (receive and not sending and len(parts) == 1 and parts[0].is_contiguous()
                  and (device is None or parts[0].device == device))
        if sending:
            buf = _message(parts)
            if device is not None and buf.device != device:
                buf = buf.to(device)  # (a GPU stage parked in host memory over gloo: one message at a time)
        elif direct:
            buf = parts[0].detach().view(-1)  # straight into the tensor
        else:
            buf = torch.empty(sum(t.numel() for t in parts), dtype=parts[0].dtype, device=device or parts[0].device)
        dist.broadcast(buf, src=src, group=group)
        moved += buf.numel() * buf.element_size()
        if receive and not sending and not direct:
            with torch.no_grad():
                offset = 0
                for t in parts:
                    t.copy_(buf[offset:offset + t.numel()].view(t.shape))
                    offset += t.numel()
    return moved


@dataclass(frozen=True)
class TensorSlot:
    """Where a tensor sent on the wire goes back into a state dict (:func:`split_state`)."""
    index: int


def _map_leaves(value: object, leaf: Callable[[object], object]) -> object:
    """``value`` (nested dicts, lists and tuples) with every other value replaced by ``leaf(value)``."""
    if isinstance(value, dict):
        return {k: _map_leaves(v, leaf) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_map_leaves(v, leaf) for v in value)
    return leaf(value)


def split_state(obj: object, device: torch.device) -> Tuple[object, List[torch.Tensor]]:
    """PURE: a nested state dict (an optimizer's) as a small skeleton and the tensors to broadcast: every tensor on
    ``device`` is replaced by a :class:`TensorSlot` and listed (itself, not a copy); any other tensor (Adam's step
    counters live on the CPU) stays in the skeleton, moved to the CPU."""
    tensors: List[torch.Tensor] = []

    def leaf(value):
        if not isinstance(value, torch.Tensor):
            return value
        if value.device != device:
            return value.detach().cpu()
        tensors.append(value.detach())
        return TensorSlot(len(tensors) - 1)

    return _map_leaves(obj, leaf), tensors


def fill_state(skeleton: object, tensors: Sequence[torch.Tensor]) -> object:
    """PURE: the state dict of ``skeleton`` with each slot replaced by its tensor (the inverse of
    :func:`split_state`)."""
    return _map_leaves(skeleton, lambda v: tensors[v.index] if isinstance(v, TensorSlot) else v)


def broadcast_state(state: Optional[object], src: int, group: Optional[dist.ProcessGroup], receive: bool,
                    device: torch.device) -> Tuple[Optional[object], int]:
    """Broadcast a state dict (``state``, given on ``src`` only) over ``group``: its skeleton as an object, its
    tensors with :func:`broadcast_tensors`. The source sends its own tensors (no host copy, no pickled tensor data);
    a receiving rank allocates each tensor once and receives straight into it; other ranks take part holding at
    most one bucket. Returns (the state on a receiving rank, else None; bytes moved)."""
    sending = dist.get_rank() == src
    skeleton, tensors = split_state(state, device) if sending else (None, [])
    carrier = [(skeleton, [(tuple(t.shape), t.dtype) for t in tensors])]  # the slots' shapes, in slot order
    dist.broadcast_object_list(carrier, src=src, group=group)
    skeleton, specs = carrier[0]
    if not sending:
        where = device if receive else torch.device("meta")
        tensors = [torch.empty(shape, dtype=dtype, device=where) for shape, dtype in specs]
    moved = broadcast_tensors(tensors, src, group, receive=receive and not sending, device=device)
    return (fill_state(skeleton, tensors) if receive and not sending else None), moved


def _wire_specs(mapping: ParamMapping, source_sig: StageSignature) -> List[Tuple[Tuple[int, ...], torch.dtype]]:
    params = {f"{l.name}.{n}": (shape, _dtype(dt)) for l in source_sig for n, shape, dt in l.params}
    return [params[src] for _, src in mapping.pairs]


@dataclass
class RebuildResult:
    """What a rebuilt stage did, for its event record."""

    plan: RecoveryPlan
    source_norms: Tuple[Optional[float], ...] = ()
    weights: Tuple[float, ...] = ()
    fallback: Optional[str] = None
    layer_note: Optional[str] = None
    bytes_received: int = 0
    timings_s: Dict[str, float] = field(default_factory=dict)

    @property
    def normalized_weights(self) -> Tuple[float, ...]:
        total = sum(self.weights)
        return tuple(w / total for w in self.weights) if total else ()


def rebuild_stages(plans: Sequence[RecoveryPlan], stage_id: int, named_params: Mapping[str, torch.nn.Parameter],
                   signatures: Mapping[int, StageSignature], stage_to_rank: Callable[[int], int],
                   grad_norm: Optional[float], *, eps: float, norm: str, layers: Sequence[torch.nn.Module] = (),
                   random_seed: int = 0, on_received: Optional[Callable[[int], None]] = None,
                   timeout: Optional[timedelta] = None) -> Optional[RebuildResult]:
    """Run this rank's part of rebuilding the ``plans``' targets (a collective over the ranks named by the plans).

    Args:
        plans: the rebuild plans, identical on every rank (from :func:`recovery.plan_recovery`).
        stage_id: this rank's stage.
        named_params: this rank's stage parameters by name.
        signatures: every stage's signature.
        stage_to_rank: global rank of a stage in this rank's data-parallel column.
        grad_norm: this stage's last gradient norm (None if never measured); sent to the targets.
        eps, norm: the gradient-norm weighting (see :func:`recovery.source_weights`).
        layers: this stage's layer modules (re-initialised by the ``random`` strategy).
        random_seed: seed of the ``random`` strategy.
        on_received: called on a target with each source stage once its weights have arrived (fault injection).
        timeout: give up on a peer after this long (default: the process group's timeout).

    Returns:
        For a rebuilt stage, what was done; None on other ranks.
    """
    result: Optional[RebuildResult] = None
    for plan in sorted(plans, key=lambda p: p.target):
        if stage_id in plan.sources:
            mapping = match_layers(signatures[plan.target], signatures[stage_id], plan.target, stage_id)
            device = next(iter(named_params.values())).device
            dst = stage_to_rank(plan.target)
            norm_t = torch.tensor([math.nan if grad_norm is None else grad_norm], dtype=torch.float64,
                                  device=device)
            _send(norm_t, dst, timeout)
            for buf in _pack([named_params[src] for _, src in mapping.pairs]):
                _send(buf, dst, timeout)
        elif stage_id == plan.target:
            result = _receive_and_blend(plan, stage_id, named_params, signatures, stage_to_rank, eps, norm, layers,
                                        random_seed, on_received, timeout)
    return result


def _receive_and_blend(plan: RecoveryPlan, stage_id: int, named_params: Mapping[str, torch.nn.Parameter],
                       signatures: Mapping[int, StageSignature], stage_to_rank: Callable[[int], int], eps: float,
                       norm: str, layers: Sequence[torch.nn.Module], random_seed: int,
                       on_received: Optional[Callable[[int], None]], timeout: Optional[timedelta]) -> RebuildResult:
    result = RebuildResult(plan)
    t0 = time.perf_counter()
    if plan.strategy == "random":
        reinitialize(layers, random_seed)
        result.timings_s["rebuild"] = time.perf_counter() - t0
        return result

    device = next(iter(named_params.values())).device
    received: List[List[torch.Tensor]] = []
    mappings: List[ParamMapping] = []
    norms: List[Optional[float]] = []
    for src in plan.sources:
        mapping = match_layers(signatures[stage_id], signatures[src], stage_id, src)
        specs = _wire_specs(mapping, signatures[src])
        rank = stage_to_rank(src)
        norm_t = torch.empty(1, dtype=torch.float64, device=device)
        _recv(norm_t, rank, timeout)
        value = norm_t.item()
        norms.append(None if math.isnan(value) else value)
        buffers = _empty_messages(specs, device)
        for buf in buffers:
            _recv(buf, rank, timeout)
            result.bytes_received += buf.numel() * buf.element_size()
        received.append(_unpack(buffers, specs))
        mappings.append(mapping)
        if on_received is not None:
            on_received(src)
    result.timings_s["transfer"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    result.source_norms = tuple(norms)
    result.weights, result.fallback = source_weights(plan, norms, eps=eps, norm=norm)
    result.layer_note = "; ".join(m.note for m in mappings if m.note) or None
    with torch.no_grad():
        for i, (target_name, _) in enumerate(mappings[0].pairs):
            param = named_params[target_name]
            param.copy_(blend([r[i] for r in received], result.weights, dtype=param.dtype))
    result.timings_s["blend"] = time.perf_counter() - t1
    return result
