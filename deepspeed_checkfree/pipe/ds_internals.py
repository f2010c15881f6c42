"""Every private DeepSpeed and torch.distributed (c10d) name this package relies on, in one place.

DeepSpeed 0.19.8 offers no hooks for what CheckFree changes (per-stage gradient norms, routed micro-batches, rebuilt
stages, re-formed process groups), so the engine reaches into internals. Nothing else in the package touches a
private DeepSpeed or c10d name: it calls the functions here. ``tests/unit/test_deepspeed_contract.py`` names each
entry and fails loudly if DeepSpeed or torch changes it; re-check that test before moving the DeepSpeed pin.
"""
from __future__ import annotations

import functools
import logging
from datetime import timedelta
from types import MethodType
from typing import Any, Callable, Dict, Iterable, List, Optional

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
from torch.utils import cpp_extension
from deepspeed.runtime.pipe import p2p
from deepspeed.runtime.pipe.engine import PipelineEngine
from deepspeed.runtime.pipe.module import PipelineModule

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------------------
# PipelineEngine: the private methods CheckFreeEngine overrides or calls, with the parameters it relies on.
# --------------------------------------------------------------------------------------------------------------

ENGINE_METHODS: Dict[str, tuple] = {
    "_exec_schedule": ("self", "pipe_schedule"),          # overridden: runs the CheckFree+ schedule with routes
    "_train_schedule": ("self",),                          # overridden: picks the CheckFree+ schedule
    "_exec_optimizer_step": ("self", "lr_kwargs"),         # overridden: records the stage's gradient norm
    "_exec_reduce_tied_grads": ("self",),                  # overridden: zero-fills unused tied gradients (CheckFree+)
    "_take_model_step": ("self", "lr_kwargs"),             # overridden: the LR boost around the scheduler step
    "_aggregate_total_loss": ("self",),                    # overridden: the loss lives on two ranks (CheckFree+)
    "_reserve_pipe_buffers": ("self", "num_buffers"),      # called
    "_scale_loss_by_gas": ("self", "prescaled_loss", "eval_micro_batches"),  # called
}
# PipelineEngine attributes the CheckFree+ routing reads and writes between instructions (the route's neighbours the
# base handlers send to, the activation metadata and receive buffer per peer, the buffer slots, the losses of the two
# loss ranks) and the dispatch table.
ENGINE_ATTRIBUTES = ("prev_stage", "next_stage", "first_output_send", "pipe_recv_buf", "_INSTRUCTION_MAP",
                     "pipe_buffers", "fwd_outputs", "loss", "total_loss", "dp_group_loss", "total_additional_losses",
                     "agg_additional_losses")
# PipelineModule: CheckFreePlusPipelineModule overrides/calls these (its layout, which segments activation
# checkpointing may cut, its forward run twice for a recomputed micro-batch); stage_layers reads the layout.
MODULE_METHODS: Dict[str, tuple] = {"_partition_layers": ("self", "method"), "_set_bounds": ("self", "start", "stop"),
                                    "_is_checkpointable": ("self", "funcs"), "forward": ("self", "forward_input")}
MODULE_ATTRIBUTES = ("_local_start", "_local_stop", "_layer_specs", "_modules", "_topo", "micro_offset",
                     "activation_checkpoint_interval", "activation_checkpoint_func")


def instruction_map(overrides: Dict[type, Callable]) -> Dict[type, Callable]:
    """DeepSpeed's instruction -> handler map with ``overrides``. ``_exec_schedule`` dispatches through this class
    attribute, which holds the *base class's* functions: a subclass's ``_exec_*`` override is called only if mapped."""
    return {**PipelineEngine._INSTRUCTION_MAP, **overrides}


def run_instruction(engine: PipelineEngine, cmd: Any) -> None:
    """Execute one schedule instruction on ``engine`` exactly as ``PipelineEngine._exec_schedule`` does."""
    MethodType(type(engine)._INSTRUCTION_MAP[type(cmd)], engine)(**cmd.kwargs)


def reserve_pipe_buffers(engine: PipelineEngine, num_buffers: int) -> None:
    engine._reserve_pipe_buffers(num_buffers)


def drop_outputs(engine: PipelineEngine, buffer_id: int) -> None:
    """Free the forward outputs (and with them the autograd graph) held in slot ``buffer_id``."""
    engine.pipe_buffers["outputs"][buffer_id] = None


def scale_loss_by_gas(engine: PipelineEngine, loss: torch.Tensor) -> torch.Tensor:
    return engine._scale_loss_by_gas(loss)


def set_meta_pending(engine: PipelineEngine, pending: bool) -> None:
    """Whether the next ``SendActivation`` also sends the tensor metadata (DeepSpeed sends it once per engine; with
    two routes a rank has two receivers, each needing it once)."""
    engine.first_output_send = pending


def recv_buffer(engine: PipelineEngine) -> Any:
    """The activation receive buffer DeepSpeed allocated from the sender's metadata."""
    return engine.pipe_recv_buf


def set_recv_buffer(engine: PipelineEngine, buffer: Any) -> None:
    engine.pipe_recv_buf = buffer


# --------------------------------------------------------------------------------------------------------------
# PipelineModule layout and the topology
# --------------------------------------------------------------------------------------------------------------


def local_layer_range(module: PipelineModule) -> range:
    """Indices of the layers this rank's stage holds."""
    return range(module._local_start, module._local_stop)


def layer_spec(module: PipelineModule, idx: int) -> Any:
    return module._layer_specs[idx]


def local_layer(module: PipelineModule, idx: int) -> Optional[torch.nn.Module]:
    """The built (non-tied) layer ``idx`` of this stage, or None if it is not a module of its own."""
    return module._modules.get(str(idx))


def tied_weight(module: PipelineModule, tied_module: torch.nn.Module, attr: str) -> torch.Tensor:
    """The weight ``attr`` (dotted) of a tied module, as DeepSpeed resolves it for its tied groups."""
    return PipelineModule._recursive_getattr(tied_module, attr)


def stage_of_rank(grid: Any, rank: int) -> int:
    """The pipeline stage of global ``rank`` in the engine's grid."""
    return grid._topo.get_coord(rank).pipe


def module_stage_id(module: PipelineModule) -> int:
    """This rank's stage, as a PipelineModule knows it while it partitions its layers."""
    return module._topo.get_coord(module.global_rank).pipe


def config_dict(config_class: Any) -> dict:
    """The raw DeepSpeed config dict behind a ``DeepSpeedConfig`` (it keeps extra sections such as "checkfree")."""
    return getattr(config_class, "_param_dict", None) or {}


# --------------------------------------------------------------------------------------------------------------
# Pipeline point-to-point (deepspeed.runtime.pipe.p2p)
# --------------------------------------------------------------------------------------------------------------


def allow_extra_hops(extra_hops: Callable[[int], Iterable[tuple]]) -> None:
    """DeepSpeed's p2p helpers assert that only adjacent stages talk. Also allow ``(src, dst)`` stage pairs in
    ``extra_hops(num_stages)`` (idempotent; the transport is a plain send on the world group either way)."""
    original = p2p._is_valid_send_recv
    if getattr(original, "checkfree_extra_hops", False):
        return

    def is_valid_send_recv(src_stage, dest_stage):
        if (src_stage, dest_stage) in extra_hops(p2p._grid.pipe_parallel_size):
            return
        original(src_stage, dest_stage)

    is_valid_send_recv.checkfree_extra_hops = True
    p2p._is_valid_send_recv = is_valid_send_recv


def install_timed_p2p(timeout: timedelta) -> None:
    """Make DeepSpeed's pipeline sends and receives give up after ``timeout`` (they otherwise wait for the group's
    creation-time timeout). The transport is unchanged: a point-to-point op on the world group."""

    def send(tensor, dest_stage, async_op=False):
        p2p._is_valid_send_recv(p2p._grid.get_stage_id(), dest_stage)
        work = dist.isend(tensor, p2p._grid.stage_to_global(stage_id=dest_stage))
        return work if async_op else work.wait(timeout)

    def recv(tensor, src_stage, async_op=False):
        p2p._is_valid_send_recv(src_stage, p2p._grid.get_stage_id())
        work = dist.irecv(tensor, p2p._grid.stage_to_global(stage_id=src_stage))
        return work if async_op else work.wait(timeout)

    p2p.send, p2p.recv = send, recv


# --------------------------------------------------------------------------------------------------------------
# Process-group timeouts (torch.distributed.distributed_c10d)
# --------------------------------------------------------------------------------------------------------------


def set_default_group_timeout(timeout: timedelta) -> None:
    """The timeout of groups created without one: DeepSpeed creates its pipeline, data-parallel and tied groups so."""
    c10d.default_pg_timeout = timeout
    c10d.default_pg_nccl_timeout = timeout


_GLOO_PAIR_TIMEOUT: List[Optional[timedelta]] = [None]


def keeps_own_wait_timeout(store: Any) -> bool:
    """``store`` (or a store a ``PrefixStore`` chain wraps) waits at least its own timeout whatever timeout its
    caller passes (it says so with ``KEEPS_OWN_WAIT_TIMEOUT``, as the resilience's generation store does)."""
    while store is not None:
        if getattr(store, "KEEPS_OWN_WAIT_TIMEOUT", False):
            return True
        store = getattr(store, "underlying_store", None)
    return False


def bound_gloo_connect(pair_timeout: timedelta) -> None:
    """From now on every gloo group over a store that keeps its own wait timeout (a generation's groups, the world
    group included) connects its pairs with ``pair_timeout``, then carries the timeout it was created with for its
    collectives (see ``fault_policy.gloo_pair_timeout_s``).

    A pair keeps the timeout of its creation for its connect, while a group's later timeout changes reach only its
    operations, so the group is created with ``pair_timeout`` and given its own timeout back at once. gloo also
    passes that timeout to its store waits for the peers' addresses: a plain store would honour it and give up on a
    peer that is still starting, so only stores that keep their own wait timeout are bounded. Other backends are
    left alone (NCCL connects lazily, under its watchdog). A second call changes the bound.
    """
    first = _GLOO_PAIR_TIMEOUT[0] is None
    _GLOO_PAIR_TIMEOUT[0] = pair_timeout
    if not first:
        return
    create = c10d._new_process_group_helper

    def create_bounded(*args, **kwargs):
        backend, timeout = (args[3] if len(args) > 3 else kwargs.get("backend")), kwargs.get("timeout")
        store = args[4] if len(args) > 4 else kwargs.get("store")
        if str(backend).lower() != "gloo" or timeout is None or not keeps_own_wait_timeout(store):
            return create(*args, **kwargs)
        pg, store = create(*args, **dict(kwargs, timeout=min(timeout, _GLOO_PAIR_TIMEOUT[0])))
        if pg is not None and pg is not c10d.GroupMember.NON_GROUP_MEMBER:
            c10d._set_pg_timeout(timeout, pg)
        return pg, store

    c10d._new_process_group_helper = create_bounded


def retry_jit_load_on(error: type, baton: type) -> None:
    """torch's JIT extension load (``cpp_extension._jit_compile``, through which DeepSpeed's op builders build and
    load their ops) takes its build lock with ``baton``, and a load whose wait for the lock raises ``error`` loads
    again, building the op itself. Idempotent."""
    cpp_extension.FileBaton = baton
    if getattr(cpp_extension._jit_compile, "retried_on", None) is error:
        return
    jit_compile = cpp_extension._jit_compile

    @functools.wraps(jit_compile)
    def load(name, *args, **kwargs):
        try:
            return jit_compile(name, *args, **kwargs)
        except error:
            # (torch builds only when the op's sources or flags changed since this process's last load of it)
            cpp_extension.JIT_EXTENSION_VERSIONER.entries.pop(name, None)
            return jit_compile(name, *args, **kwargs)

    load.retried_on = error
    cpp_extension._jit_compile = load


def set_every_group_timeout(timeout: timedelta) -> None:
    """Shorten (or lengthen) the timeout of every existing process group, the world group included."""
    for group in list(c10d._world.pg_map):
        c10d._set_pg_timeout(timeout, group)


# --------------------------------------------------------------------------------------------------------------
# Mixed-precision optimizers: BF16_Optimizer and ZeRO-1 (DeepSpeedZeroOptimizer)
# --------------------------------------------------------------------------------------------------------------


def bf16_hp_grads(module: torch.nn.Module) -> List[torch.Tensor]:
    """BF16_Optimizer accumulates each parameter's gradient in fp32 ``_hp_grad``; ``p.grad`` is not the step's."""
    return [g for p in module.parameters() if (g := getattr(p, "_hp_grad", None)) is not None]


def zero_reduced_grads(optimizer: Any) -> List[torch.Tensor]:
    """ZeRO-1 moves the reduced gradients into this data-parallel rank's partitions."""
    return [g for grads in optimizer.averaged_gradients.values() for g in grads if g is not None]


def bf16_fp32_partitions(optimizer: Any) -> List[torch.Tensor]:
    return list(optimizer.fp32_groups_flat_partition)


def zero_fp32_partitions(optimizer: Any) -> List[torch.Tensor]:
    return list(optimizer.single_partition_of_fp32_groups)


# --------------------------------------------------------------------------------------------------------------
# Re-binding a built engine to the process groups of a re-formed world (in-place recovery)
# --------------------------------------------------------------------------------------------------------------


def form_solo_world(rank: int, world_size: int) -> None:
    """A world in which this process is ``rank`` of ``world_size`` but no collective reaches a peer (torch's fake
    backend): a replacement builds its engine in it before any peer is there, then re-binds to the real world."""
    import torch.testing._internal.distributed.fake_pg  # noqa: F401 - registers the fake backend

    dist.init_process_group(dist.Backend.FAKE, rank=rank, world_size=world_size)


def world_is_solo() -> bool:
    """Whether the current world is the solo one of :func:`form_solo_world`."""
    return dist.is_initialized() and str(dist.get_backend()).lower() == str(dist.Backend.FAKE).lower()


def _bind_groups(engine: PipelineEngine, world_group: Any, grid: Any) -> None:
    """Point every process-group slot of the engine, its module, its optimizer wrapper and DeepSpeed's globals at
    ``grid``'s groups (``grid`` None: at nothing)."""
    from deepspeed.utils import groups

    module = engine.module
    module.world_group = world_group
    module._grid = engine.grid = engine.mpu = groups.mpu = grid
    if grid is None:
        p2p._grid = p2p._groups = None
        module.tied_comms = {}
        engine.data_parallel_group = engine.seq_data_parallel_group = None
    else:
        module.tied_comms = module._index_tied_modules()
        engine.data_parallel_group = groups._get_data_parallel_group()
        engine.seq_data_parallel_group = groups._get_sequence_data_parallel_group()
        if engine.is_pipe_parallel:
            p2p.init_process_groups(grid)
    optimizer = engine.optimizer
    if hasattr(optimizer, "dp_process_group"):  # BF16_Optimizer, ZeRO-1/2
        optimizer.dp_process_group = engine.seq_data_parallel_group
        optimizer.real_dp_process_group = [engine.seq_data_parallel_group] * len(optimizer.real_dp_process_group)
        optimizer.mpu = grid
        if hasattr(optimizer, "model_parallel_group"):  # ZeRO: the norm's group (None without an mpu)
            optimizer.model_parallel_group = None if grid is None else grid.get_model_parallel_group()


def rebind_process_groups(engine: PipelineEngine) -> None:
    """Point a built engine at process groups of the current world (a new ``init_process_group`` after the old
    world was destroyed), creating them in the order DeepSpeed does while it builds an engine: the module's world
    group, its grid (pipeline, data-parallel, slice groups), its tied-weight groups. Every rank of the world calls
    this, survivors and the replacement alike, so that the groups match. Nothing else of the engine is touched: its
    module, optimizer state and fp32 masters stay where they are."""
    from deepspeed.runtime.pipe.topology import PipelineParallelGrid

    world_group = dist.new_group(ranks=range(dist.get_world_size()))
    _bind_groups(engine, world_group, PipelineParallelGrid(process_group=world_group, topology=engine.module._topo))
    stale = stale_group_references(engine)
    if stale:
        raise RuntimeError(f"after re-binding, {', '.join(stale)} still refer to a process group of the old world: "
                           f"this DeepSpeed version keeps a group where CheckFree does not expect one "
                           f"(see pipe/ds_internals.rebind_process_groups)")


def release_process_groups(engine: PipelineEngine) -> None:
    """Drop every reference the engine, its module, optimizer and DeepSpeed's globals hold to the process groups of
    a failed world, before it is destroyed (:func:`rebind_process_groups` re-creates them).

    gloo closes a group's connections only when its last reference goes (aborting or shutting it down does not wake
    a pending operation, measured with torch 2.13). Inside DeepSpeed the world group keeps references this does not
    reach, so peers still waiting on this rank learn of the failure through the connection cut instead
    (:mod:`deepspeed_checkfree.resilience.connection_cut`); releasing still lets the old groups be freed."""
    _bind_groups(engine, None, None)
    held = stale_group_references(engine, live=set())
    if held:  # not fatal, but a sign DeepSpeed moved a reference: the old groups then stay allocated
        logger.warning("%s still hold a process group after release_process_groups: the failed world's groups "
                       "are not freed", ", ".join(held))


def forget_failed_world() -> None:
    """Undo what a failed ``init_process_group`` left behind. torch names the default group from a counter it takes
    before the group's rendezvous, and resets the counter only in ``destroy_process_group``, which is not called
    when no world exists: the next ``init_process_group`` of this process would then rendezvous under the next
    name, where peers that formed their world first (a fresh replacement) wait under the first, and every later
    generation would time out."""
    if not dist.is_initialized():
        c10d._world.group_count = 0


def abort_world() -> None:
    """Abort every communicator of the current world (NCCL: ``ncclCommAbort``), from any thread; a pending
    operation then fails at once. (gloo's abort does not wake a pending operation: there the generation's
    connections are cut instead, see :mod:`deepspeed_checkfree.resilience.connection_cut`.)"""
    c10d._abort_process_group()


def _live_groups() -> set:
    return set(c10d._world.pg_map)


def stale_group_references(engine: PipelineEngine, live: Optional[set] = None) -> List[str]:
    """The attributes of the engine, its module, optimizer and grid (and of the lists and dicts they hold, one level
    down) that hold a process group which is not in ``live`` (default: the groups of the current world)."""
    live = _live_groups() if live is None else live
    found = []
    owners = {"engine": engine, "module": engine.module, "optimizer": engine.optimizer, "grid": engine.grid}
    for owner_name, owner in owners.items():
        if owner is None:
            continue
        for name, value in vars(owner).items():
            values = list(value.values()) if isinstance(value, dict) else value if isinstance(value, list) else [value]
            for v in values:
                inner = list(v.values()) if isinstance(v, dict) else [v]
                if any(isinstance(g, dist.ProcessGroup) and g not in live for g in inner):
                    found.append(f"{owner_name}.{name}")
                    break
    return found


PIPE_STEP_STATE = ("pipe_recv_buf", "grad_layer", "meta_buffer", "pipe_partition_input_meta_cache",
                   "pipe_partition_output_meta_cache", "pipe_partition_grad_meta_cache",
                   "grad_partition_grad_layer_meta_cache", "total_loss", "total_additional_losses")


def reset_step_state(engine: PipelineEngine) -> None:
    """Forget everything of a step a failure interrupted: the pipeline buffers (activations and their graphs), the
    received-shape state (DeepSpeed sends tensor metadata once per peer: a new peer needs it again), and the
    gradients accumulated so far, in the torch module and in the bf16/ZeRO wrappers' buffers."""
    for key in engine.pipe_buffers:
        engine.pipe_buffers[key] = []
    engine.num_pipe_buffers = 0
    for name in PIPE_STEP_STATE:
        setattr(engine, name, None)
    engine._grad_layer_buf = []
    engine.first_output_send = engine.first_gradient_send = True
    engine._force_grad_boundary = False
    for timer in getattr(engine.timers, "timers", {}).values():  # a step's timers left running (train_batch's)
        if timer.started_:
            timer.reset()
    optimizer = engine.optimizer
    engine.module.zero_grad(set_to_none=True)
    if hasattr(optimizer, "clear_hp_grads"):  # BF16_Optimizer: fp32 accumulation buffers
        optimizer.clear_lp_grads(set_to_none=True)
        optimizer.clear_hp_grads()
    elif hasattr(optimizer, "averaged_gradients"):  # ZeRO-1/2: the reduced partitions of the interrupted step
        optimizer.zero_grad(set_to_none=True)
        optimizer.averaged_gradients = {}


# --------------------------------------------------------------------------------------------------------------
# A plain training script under the supervisor (resilience/drop_in.py): DeepSpeed's entry points, wrapped
# --------------------------------------------------------------------------------------------------------------

def loads_per_step(engine: PipelineEngine) -> int:
    """How many items one ``train_batch`` takes from this stage's data iterator: its schedule's ``LoadMicroBatch``
    instructions (the first and last stage's, and under CheckFree+ the data stages')."""
    from deepspeed.runtime.pipe.schedule import LoadMicroBatch
    return sum(isinstance(cmd, LoadMicroBatch) for step in engine._train_schedule() for cmd in step)
