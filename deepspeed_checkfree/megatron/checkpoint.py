"""CheckFree around megatron.core checkpoints: each stage's own gradient norm, the sidecar saved with every checkpoint
(all stages' norms, replicas of the first/last stage's embedding and head on their neighbour), and the rebuild of a
lost stage's shard before Megatron's loader runs.

Works with any megatron.core training loop (the Megatron-LM hook in :mod:`.training_hook` calls these). Every function
that communicates is called on every rank; the process groups come from ``megatron.core.parallel_state``.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from ..errors import CheckFreeError, RecoveryError
from ..events import identity
from ..repair import repair_checkpoint
from ..repair.megatron_common import (TRACKER, edge_tensors, iteration_dir_name, read_rebuilt_stages, replica_holder,
                                      write_norms, write_replica)
from ..repair.megatron_dist.common_state import write_replica as write_common_state_replica
from ..repair.megatron_distopt import write_distopt_layouts
from .distopt import layout_of

logger = logging.getLogger(__name__)


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The model inside Megatron's DDP / Float16Module wrappers."""
    while hasattr(chunk, "module") and isinstance(chunk.module, torch.nn.Module):
        chunk = chunk.module
    return chunk


def _as_list(model: Any) -> List[torch.nn.Module]:
    return list(model) if isinstance(model, (list, tuple)) else [model]


def stage_grad_norm(model: Any, tp_group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """L2 norm of this pipeline stage's whole gradient (Megatron reports only the global one).

    Call it after the backward pass and gradient finalisation (``finalize_model_grads``: data-parallel average and
    tied-embedding all-reduce done) and before ``optimizer.step()``, which clips. Reads ``param.main_grad`` (Megatron
    DDP) or ``param.grad``; parameters duplicated over tensor-parallel ranks count once, and the squares are summed
    over the tensor-parallel group, so every rank of a stage gets the same value.

    Args:
        model: the rank's model chunk(s), wrapped or not.
        tp_group: tensor-parallel group (default: megatron.core's).

    Returns:
        A 0-dim float32 tensor on the parameters' device.
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    sq: Optional[torch.Tensor] = None
    device = None
    for chunk in _as_list(model):
        for p in chunk.parameters():
            device = p.device
            grad = getattr(p, "main_grad", None)
            if grad is None:
                grad = p.grad
            if grad is None or not param_is_not_tensor_parallel_duplicate(p):
                continue
            s = grad.detach().float().pow(2).sum()
            sq = s if sq is None else sq + s
    if sq is None:
        sq = torch.zeros((), dtype=torch.float32, device=device)
    if tp_group is None and parallel_state.model_parallel_is_initialized():
        tp_group = parallel_state.get_tensor_model_parallel_group()
    if tp_group is not None and dist.get_world_size(tp_group) > 1:
        dist.all_reduce(sq, group=tp_group)
    return sq.sqrt()


@dataclass
class CheckFreeState:
    """What one rank remembers between steps: its stage's last gradient norm and the LR boost of a rebuilt stage."""

    grad_norm: Optional[float] = None
    lr_scale: float = 1.0
    rebuilt_stages: List[int] = field(default_factory=list)

    def reset(self) -> None:
        """Forget the previous run's (a new training run starts in this process)."""
        self.grad_norm, self.lr_scale, self.rebuilt_stages = None, 1.0, []


def _coords() -> Dict[str, Any]:
    from megatron.core import parallel_state as ps

    return {"stage": ps.get_pipeline_model_parallel_rank(), "num_stages": ps.get_pipeline_model_parallel_world_size(),
            "tp": ps.get_tensor_model_parallel_rank(), "dp": ps.get_data_parallel_rank(with_context_parallel=True),
            "pp_group": ps.get_pipeline_model_parallel_group()}


def save_checkfree_state(iter_dir: str, model: Any, state: CheckFreeState, iteration: Any,
                         replicas: bool = True, optimizer: Any = None) -> None:
    """Write the CheckFree sidecar of a checkpoint Megatron just saved into ``iter_dir``. Collective: every rank.

    Gathers every stage's gradient norm over the pipeline group; the (tensor-parallel 0, data-parallel 0) rank of each
    stage writes them (``checkfree/stage_PPP.json``), so any surviving stage has all of them. Stage 1 keeps a replica
    of stage 0's embedding and stage P-2 one of stage P-1's final norm and output layer
    (``checkfree/edge_replica_stage_PPP_tp_TT.pt``): the parameters a neighbour's copy cannot provide; in a
    ``torch_dist`` checkpoint of megatron.core >= 0.19 it also copies the common state (args, iteration, scheduler),
    which only global rank 0's file holds (``checkfree/common_state_replica.bin``). With Megatron's distributed
    optimizer (pass ``optimizer``), each stage also keeps its own and its neighbours' bucket
    layouts (:func:`.distopt.layout_of`), so a lost stage's optimizer shard can be rebuilt.
    """
    c = _coords()
    stage, num_stages = c["stage"], c["num_stages"]
    norms: List[Optional[float]] = [None] * num_stages
    dist.all_gather_object(norms, state.grad_norm, group=c["pp_group"])
    rebuilt: List[Any] = [None] * num_stages
    dist.all_gather_object(rebuilt, state.rebuilt_stages, group=c["pp_group"])
    rebuilt_all = sorted({s for r in rebuilt for s in (r or [])})
    layouts: List[Any] = [None] * num_stages
    if optimizer is not None:  # every rank of the pipeline group takes this branch (same call everywhere)
        dist.all_gather_object(layouts, layout_of(optimizer, [unwrap(m) for m in _as_list(model)]),
                               group=c["pp_group"])
    if c["dp"] == 0:
        if any(layouts):
            near = {s: layouts[s] for s in (stage - 1, stage, stage + 1) if 0 <= s < num_stages}
            write_distopt_layouts(iter_dir, stage, c["tp"], near)
        if c["tp"] == 0:
            write_norms(iter_dir, stage, num_stages, iteration, dict(enumerate(norms)), rebuilt_all)
        if replicas and num_stages > 1:
            _exchange_replicas(iter_dir, model, c)
            if c["tp"] == 0 and stage == replica_holder(0, num_stages):
                # torch_dist from megatron.core 0.19 keeps the common state in global rank 0's file only.
                write_common_state_replica(iter_dir)
    dist.barrier()


def _exchange_replicas(iter_dir: str, model: Any, c: Dict[str, Any]) -> None:
    """Send stage 0's and stage P-1's edge parameters to the neighbour that keeps them, one transfer after the
    other in the same order on every rank (a gloo send waits for its receive)."""
    stage, num_stages, group = c["stage"], c["num_stages"], c["pp_group"]
    ranks = dist.get_process_group_ranks(group)
    for owner in dict.fromkeys((0, num_stages - 1)):
        holder = replica_holder(owner, num_stages)
        if stage not in (owner, holder):
            continue
        if stage == owner:
            tensors: Dict[str, torch.Tensor] = {}
            for chunk in _as_list(model):
                tensors.update(edge_tensors(unwrap(chunk).state_dict_for_save_checkpoint()))
            device = next(iter(tensors.values())).device if tensors else None
            obj = [{k: v.detach() for k, v in tensors.items()}]
            dist.send_object_list(obj, dst=ranks[holder], device=_object_device(group, device))
        else:
            obj = [None]
            dist.recv_object_list(obj, src=ranks[owner], device=_object_device(group, None))
            write_replica(iter_dir, owner, c["tp"], obj[0])


def _object_device(group, device):
    # Object collectives need tensors on a device the backend supports: the host for gloo, the parameters' device
    # otherwise (None lets torch pick the current device).
    return None if dist.get_backend(group) == "gloo" else device


Target = Tuple[str, Optional[str]]

# How a user gets past a checkpoint the hook cannot repair (every hook error names these).
WAYS_ON = ("Options: resume with --checkfree-repair off (Megatron's own loader then runs as without the hook), load an "
           "older intact checkpoint (--ckpt-step N), or see the plan with `checkfree repair {dir} --iteration {it} "
           "--dry-run`.")


def checkpoint_dirs_to_check(load_dirs: Iterable[Optional[str]]) -> List[Target]:
    """(directory, None: its latest iteration) for each directory that has a tracker file."""
    return [(d, None) for d in dict.fromkeys(load_dirs) if d and os.path.exists(os.path.join(d, TRACKER))]


def _inspect_and_repair(targets: Sequence[Any], strategy: str, events_file: Optional[str],
                        check_values: bool) -> Dict[str, Any]:
    """Global rank 0's part of :func:`repair_before_load`; the outcome as a broadcastable dict."""
    reports = []
    for target in targets:
        directory, iteration = (target, None) if isinstance(target, str) else target
        try:
            report = repair_checkpoint(directory, in_place=True, strategy=strategy, events_file=events_file,
                                       tag=iteration, check_values=check_values)
        except CheckFreeError as err:
            it = iteration if iteration is not None else "N"
            ways = "" if "--checkfree-repair off" in str(err) else " " + WAYS_ON.format(dir=directory, it=it)
            return {"ok": False, "message": f"{type(err).__name__}: {err}{ways}"}
        except Exception as err:  # noqa: BLE001 - a fault of the inspection itself must not stop a resume
            # Nothing was found damaged (a damaged stage raises CheckFreeError): load as Megatron would; its loader
            # still stops on a checkpoint that really is broken.
            logger.warning("[checkfree] could not inspect %s (iteration %s): unexpected %s: %s. Loading it as Megatron "
                           "would, without CheckFree's repair.", directory, iteration or "latest",
                           type(err).__name__, err)
            continue
        if report.rebuilds:
            reports.append(report.to_json())
    return {"ok": True, "reports": reports}


def repair_before_load(targets: Sequence[Any], strategy: str = "gradnorm_average",
                       events_file: Optional[str] = None, check_values: bool = True) -> List[dict]:
    """Rebuild a lost or damaged stage of the checkpoint(s) Megatron is about to load, in place, before its loader
    runs. Collective: call on every rank.

    Global rank 0 inspects each target (a save directory, or ``(directory, iteration)`` with the iteration Megatron
    will load: ``None`` for the tracker's) for missing, unreadable and non-finite stage tensors; if one stage is
    damaged it rebuilds it from its neighbours (:func:`deepspeed_checkfree.repair.repair_checkpoint`). An intact
    checkpoint is left as it is whatever its settings; the outcome is broadcast so that every rank either continues or
    raises the same error.

    Returns:
        The repair reports (as dicts) of the targets that needed a rebuild.

    Raises:
        RecoveryError: on every rank, when a damaged checkpoint cannot be repaired (the message names the ways on).
    """
    outcome: List[Any] = [None]
    if dist.get_rank() == 0:
        outcome[0] = _inspect_and_repair(targets, strategy, events_file, check_values)
    dist.broadcast_object_list(outcome, src=0)
    result = outcome[0]
    if not result["ok"]:
        raise RecoveryError(f"cannot resume: the checkpoint has a damaged stage that CheckFree could not rebuild: "
                            f"{result['message']}")
    for report in result["reports"] if dist.get_rank() == 0 else ():
        for r in report["rebuilds"]:
            logger.warning("%s rebuilt lost stage %d of %s by %s from stages %s (weights %s) before loading",
                           identity(stage=r["stage"], rank=dist.get_rank()), r["stage"], report["source"],
                           r["strategy"], r["sources"], [round(w, 4) for w in r["weights"]])
    return result["reports"]


def _torch_optimizers(optimizer: Any) -> Iterable[torch.optim.Optimizer]:
    """The torch optimizers inside Megatron's wrappers (ChainedOptimizer, DistributedOptimizer, FP32Optimizer ...)."""
    if isinstance(optimizer, torch.optim.Optimizer):
        yield optimizer
    elif hasattr(optimizer, "chained_optimizers"):
        for inner in optimizer.chained_optimizers:
            yield from _torch_optimizers(inner)
    elif getattr(optimizer, "optimizer", None) is not None:
        yield from _torch_optimizers(optimizer.optimizer)


def reset_optimizer_state(optimizer: Any) -> int:
    """Give this rank's optimizer the state a fresh Adam starts with: moments zero and step count 0 together.

    This is CheckFree's "fresh optimizer state" in every format (the paper discards the rebuilt stage's state). The
    legacy and DeepSpeed repairs write it into the files already; a ``torch_dist`` checkpoint of the non-distributed
    optimizer holds one step count for every stage (``common_step`` in common.pt), so only the moments can be zeroed
    on disk, and the hook calls this after loading a rebuilt stage. Master parameters are kept.

    Returns:
        The number of parameter states reset.
    """
    n = 0
    for opt in _torch_optimizers(optimizer):
        for param_state in opt.state.values():
            for key, value in list(param_state.items()):
                if key == "step":
                    param_state[key] = torch.zeros_like(value) if isinstance(value, torch.Tensor) else 0
                elif isinstance(value, torch.Tensor) and key not in ("master_param", "param"):
                    value.zero_()
            n += 1
    return n


def state_after_load(load_dir: Optional[str], iteration: Any, reports: Sequence[dict], state: CheckFreeState,
                     lr_boost: float, optimizer: Any = None) -> None:
    """After Megatron loaded: a stage rebuilt just now restarts with a fresh optimizer state
    (:func:`reset_optimizer_state`), and a rank whose stage was rebuilt now or in an earlier recovery trains with the
    LR boost (the paper multiplies the rebuilt stage's LR by 1.1-1.2 for the rest of training; a repeat does not
    compound)."""
    from megatron.core import parallel_state as ps

    now = {r["stage"] for report in reports for r in report["rebuilds"]}
    rebuilt = set(now)
    if load_dir and iteration:
        iter_dir = os.path.join(load_dir, iteration_dir_name(iteration))
        rebuilt |= set(read_rebuilt_stages(iter_dir))
    state.rebuilt_stages = sorted(rebuilt)
    stage = ps.get_pipeline_model_parallel_rank()
    if stage in now and optimizer is not None:
        reset_optimizer_state(optimizer)
    state.lr_scale = 1.0
    if stage in rebuilt:
        state.lr_scale = lr_boost
        state.grad_norm = None  # the rebuilt stage has no measured gradient yet
        logger.warning("%s this stage was rebuilt by CheckFree: its learning rate is multiplied by %.3g from now on",
                       identity(stage=stage, rank=dist.get_rank()), lr_boost)


def boosted_step(optimizer: Any, step, state: CheckFreeState):
    """Run ``step()`` with every parameter group's LR multiplied by ``state.lr_scale`` (then restored, so Megatron's
    scheduler keeps owning the LR)."""
    if state.lr_scale == 1.0:
        return step()
    groups = optimizer.param_groups
    saved = [g["lr"] for g in groups]
    for g in groups:
        g["lr"] = g["lr"] * state.lr_scale
    try:
        return step()
    finally:
        for g, lr in zip(groups, saved):
            g["lr"] = lr


def record_norms_around_step(optimizer: Any, model: Any, state: CheckFreeState) -> None:
    """Wrap ``optimizer.step`` (once) so that each call first records this stage's gradient norm, then steps with the
    LR boost of a rebuilt stage."""
    if getattr(optimizer, "_checkfree_wrapped", False):
        return
    original = optimizer.step

    def step(*args, **kwargs):
        state.grad_norm = float(stage_grad_norm(model))
        return boosted_step(optimizer, lambda: original(*args, **kwargs), state)

    optimizer.step = step
    optimizer._checkfree_wrapped = True


__all__ = ["CheckFreeState", "boosted_step", "record_norms_around_step", "repair_before_load",
           "reset_optimizer_state", "save_checkfree_state", "stage_grad_norm", "state_after_load", "unwrap"]
