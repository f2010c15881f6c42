"""The bucket layout of Megatron's distributed optimizer, recorded with every checkpoint so that a lost stage's
optimizer shard can be rebuilt.

The distributed optimizer stores its fp32 main parameters and Adam moments flattened into gradient buckets
(``distrib_optim.pt`` in the legacy format, ``optimizer.distributed.dp_group_idx_G.*.bucket_idx_B.*`` chunks in
``torch_dist``). Where each parameter sits depends on bucket sizes, 64-element alignment padding and the separate
bucket of a shared embedding (megatron.core ``param_and_grad_buffer``); rather than re-deriving those rules offline,
each rank writes down the layout it has, and its pipeline neighbours keep a copy (``checkfree/distopt_layout_*``).
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Sequence, Tuple

import torch


def distributed_optimizers(optimizer: Any) -> List[Any]:
    """The megatron.core DistributedOptimizer instances inside ``optimizer`` (a ChainedOptimizer or one)."""
    inner = list(getattr(optimizer, "chained_optimizers", None) or [optimizer])
    return [o for o in inner if hasattr(o, "gbuf_idx_to_model_idx_map") and hasattr(o, "buffers")]


def _sharded_tensors(tree: Any) -> Iterable[Any]:
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _sharded_tensors(v)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            yield from _sharded_tensors(v)
    elif hasattr(tree, "global_offset") and isinstance(getattr(tree, "data", None), torch.Tensor):
        yield tree


def layout_of(optimizer: Any, chunks: Sequence[torch.nn.Module]) -> List[Dict[str, Any]]:
    """This rank's distributed-optimizer layout: for each DistributedOptimizer, its data-parallel group index and,
    per gradient buffer and bucket, where each parameter's values lie (bucket-relative ``[start, end)``), under its
    legacy state-dict name and its ``torch_dist`` key and global offset. Empty without a distributed optimizer.

    Args:
        optimizer: the rank's Megatron optimizer.
        chunks: the rank's model chunks, unwrapped from DDP (as the optimizer's ``model_chunks`` are ordered).
    """
    opts = distributed_optimizers(optimizer)
    if not opts:
        return []
    dist_keys: Dict[Tuple[int, int, Tuple[int, ...]], Tuple[str, List[int]]] = {}
    for c, chunk in enumerate(chunks):
        for st in _sharded_tensors(chunk.sharded_state_dict()):
            dist_keys[(c, st.data.data_ptr(), tuple(st.data.shape))] = (st.key, [int(x) for x in st.global_offset])
    out = []
    for o in opts:
        buffers = []
        for g, buf in enumerate(o.buffers):
            c = int(o.gbuf_idx_to_model_idx_map[g])
            names = {p: n for n, p in chunks[c].named_parameters()}
            buckets = []
            for bucket in buf.buckets:
                params = []
                for p in bucket.params_list:
                    start, end, _ = buf.param_index_map[p]
                    key, offset = dist_keys.get((c, p.data_ptr(), tuple(p.shape)), (None, None))
                    params.append({"name": names[p], "start": int(start - bucket.offset),
                                   "end": int(end - bucket.offset), "shape": list(p.shape), "key": key,
                                   "offset": offset})
                buckets.append({"numel": int(bucket.grad_data.numel()), "numel_unpadded": int(bucket.numel_unpadded),
                                "params": sorted(params, key=lambda e: e["start"])})
            buffers.append({"gbuf": g, "chunk": c, "dtype": str((buf.param_dtype, buf.grad_dtype)),
                            "buckets": buckets})
        out.append({"dp_group_idx": int(o.data_parallel_group_idx), "buffers": buffers})
    return out


__all__ = ["distributed_optimizers", "layout_of"]
