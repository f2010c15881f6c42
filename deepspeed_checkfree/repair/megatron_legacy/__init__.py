"""Repair of the legacy Megatron checkpoint format (``--ckpt-format torch``:
``iter_XXXXXXX/mp_rank_TT_PPP/model_optim_rng.pt``): the reader in :mod:`.checkpoint`, the lost stage's state dict
in :mod:`.stage_state`. Version 0.1's ``deepspeed_checkfree.repair_megatron`` resolves here, so the layout and
sidecar names it held (defined in :mod:`deepspeed_checkfree.repair.megatron_common`) are exported too.
"""
from __future__ import annotations

from ..megatron_common import (LAYER_PREFIX, SIDECAR_DIR, SIDECAR_VERSION, TRACKER, MegatronIteration,
                               MegatronLayout, edge_tensors, is_layer_key, iteration_dir_name, layer_index_map,
                               norms_file, read_norms, read_replica, record_rebuilt, replica_file, replica_holder,
                               resolve_iteration_dir, stage_layer_counts, write_norms, write_replica, write_tracker)
from .checkpoint import MegatronLegacyCheckpoint
from .stage_state import (blend_layers, edge_parameters, fresh_optimizer_state, layer_signatures,
                          order_stage_state, split_layer_key)

__all__ = [
    "LAYER_PREFIX", "SIDECAR_DIR", "SIDECAR_VERSION", "TRACKER", "MegatronIteration", "MegatronLayout",
    "MegatronLegacyCheckpoint", "blend_layers", "edge_parameters", "edge_tensors", "fresh_optimizer_state",
    "is_layer_key", "iteration_dir_name", "layer_index_map", "layer_signatures", "norms_file", "order_stage_state",
    "read_norms", "read_replica", "record_rebuilt", "replica_file", "replica_holder", "resolve_iteration_dir",
    "split_layer_key", "stage_layer_counts", "write_norms", "write_replica", "write_tracker",
]
