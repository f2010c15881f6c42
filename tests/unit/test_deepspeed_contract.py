"""The DeepSpeed internals the CheckFree engine relies on. If DeepSpeed changes them, this fails loudly here
instead of the engine silently doing nothing (e.g. an unmapped _exec_* override is never called)."""
from __future__ import annotations

import inspect

import deepspeed
import pytest
from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
from deepspeed.runtime.engine import DeepSpeedEngine
from deepspeed.runtime.pipe import schedule
from deepspeed.runtime.pipe.engine import PipelineEngine
from deepspeed.runtime.pipe.module import PipelineModule, TiedLayerSpec
from deepspeed.runtime.pipe.topology import PipelineParallelGrid
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

import deepspeed_checkfree
from deepspeed_checkfree.pipe.engine import CheckFreeEngine


def test_deepspeed_is_the_pinned_version():
    assert deepspeed.__version__ == "0.19.8", (
        f"deepspeed_checkfree is tested with DeepSpeed 0.19.8 and touches private engine internals; found "
        f"{deepspeed.__version__}. Re-run this contract test's checks against the new version before unpinning.")


def test_initialize_builds_pipeline_engines_through_the_module_global():
    src = inspect.getsource(deepspeed.initialize)
    assert "else PipelineEngine" in src and "engine_cls(" in src


def test_import_registers_the_selector():
    from deepspeed_checkfree.pipe.selector import PipelineEngineSelector
    assert deepspeed.PipelineEngine is PipelineEngineSelector
    assert issubclass(CheckFreeEngine, deepspeed.PipelineEngine)
    assert issubclass(PipelineEngine, deepspeed.PipelineEngine)


def test_schedule_dispatch_goes_through_the_instruction_map():
    src = inspect.getsource(PipelineEngine._exec_schedule)
    assert "self._INSTRUCTION_MAP[type(cmd)]" in src
    assert PipelineEngine._INSTRUCTION_MAP[schedule.OptimizerStep] is PipelineEngine._exec_optimizer_step
    assert CheckFreeEngine._INSTRUCTION_MAP[schedule.OptimizerStep] is CheckFreeEngine._exec_optimizer_step
    assert CheckFreeEngine._INSTRUCTION_MAP[schedule.ReduceTiedGrads] is CheckFreeEngine._exec_reduce_tied_grads
    ours = (schedule.OptimizerStep, schedule.ReduceTiedGrads)
    other = {k: v for k, v in CheckFreeEngine._INSTRUCTION_MAP.items() if k not in ours}
    assert other == {k: v for k, v in PipelineEngine._INSTRUCTION_MAP.items() if k not in ours}
    assert "get_tied_weights_and_groups" in inspect.getsource(PipelineEngine._exec_reduce_tied_grads)


def test_optimizer_step_then_scheduler_step_in_take_model_step():
    src = inspect.getsource(DeepSpeedEngine._take_model_step)
    assert src.index("self.optimizer.step()") < src.index("self.lr_scheduler.step(")
    assert "_take_model_step" in inspect.getsource(PipelineEngine._exec_optimizer_step)


def test_pipeline_module_layout_attributes():
    src = inspect.getsource(PipelineModule)
    for attr in ("self._local_start", "self._local_stop", "self._layer_specs", "self.tied_modules",
                 "self.num_stages", "self.add_module(name, module)"):
        assert attr in src, attr
    assert "key" in inspect.signature(TiedLayerSpec.__init__).parameters
    # checkfree repair's client state reads every stage's layer range from the public ``parts``.
    assert "self._set_bounds(start=self.parts[stage_id], stop=self.parts[stage_id + 1])" in src
    assert "stage_to_global" in dir(PipelineParallelGrid)


@pytest.mark.parametrize("cls", [BF16_Optimizer, DeepSpeedZeroOptimizer])
def test_mixed_precision_optimizers_can_refresh_master_weights(cls):
    assert callable(getattr(cls, "refresh_fp32_params", None))


def test_zero_keeps_reduced_gradients_in_averaged_gradients():
    assert "self.averaged_gradients = {}" in inspect.getsource(DeepSpeedZeroOptimizer.__init__)


def test_bf16_gradients_live_in_hp_grad():
    assert "_hp_grad" in inspect.getsource(PipelineEngine._exec_reduce_tied_grads)


def test_mixed_precision_state_hand_over_and_master_access():
    # Surviving process loss keeps the wrapping optimizer's state (fp32 masters included) and reloads it in place.
    assert "fp32_groups_flat_partition" in inspect.getsource(BF16_Optimizer.state_dict)
    assert "single_partition_of_fp32_groups" in inspect.getsource(DeepSpeedZeroOptimizer.__init__)
    for cls in (BF16_Optimizer, DeepSpeedZeroOptimizer):
        params = inspect.signature(cls.load_state_dict).parameters
        assert {"state_dict_list", "load_optimizer_states", "load_from_fp32_weights"} <= set(params), cls
    # CheckFree+ re-synchronises a rebuilt tied copy's fp32 master through DeepSpeed's public fragment API.
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param
    assert "_hp_mapping" in inspect.getsource(safe_set_full_fp32_param)
    assert "_hp_mapping" in inspect.getsource(safe_get_full_fp32_param)


# ---------------------------------------------------------------------------------------------------------------
# Every entry of deepspeed_checkfree.pipe.ds_internals, by name
# ---------------------------------------------------------------------------------------------------------------

from deepspeed.runtime.pipe import p2p  # noqa: E402
import torch.distributed.distributed_c10d as c10d  # noqa: E402

from deepspeed_checkfree.pipe import ds_internals  # noqa: E402


@pytest.mark.parametrize("name", sorted(ds_internals.ENGINE_METHODS))
def test_engine_methods_the_engine_overrides_or_calls_keep_their_signatures(name):
    method = getattr(PipelineEngine, name)
    assert tuple(inspect.signature(method).parameters) == ds_internals.ENGINE_METHODS[name], name


@pytest.mark.parametrize("name", sorted(ds_internals.MODULE_METHODS))
def test_pipeline_module_methods_keep_their_signatures(name):
    assert tuple(inspect.signature(getattr(PipelineModule, name)).parameters) == ds_internals.MODULE_METHODS[name]


@pytest.mark.parametrize("attr", ds_internals.ENGINE_ATTRIBUTES)
def test_engine_attributes_the_routing_uses_exist(attr):
    assert f"self.{attr}" in inspect.getsource(PipelineEngine) or hasattr(PipelineEngine, attr), attr


@pytest.mark.parametrize("attr", ds_internals.MODULE_ATTRIBUTES)
def test_module_attributes_stage_layers_reads_exist(attr):
    assert f"self.{attr}" in inspect.getsource(PipelineModule) or attr == "_modules", attr


def test_module_layer_lookup_helpers():
    assert isinstance(inspect.getattr_static(PipelineModule, "_recursive_getattr"), staticmethod)
    assert "self._topo = topology" in inspect.getsource(PipelineModule.__init__)
    assert "self._topo = " in inspect.getsource(PipelineParallelGrid.__init__)
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
    assert PipeModelDataParallelTopology(num_pp=2, num_mp=1, num_dp=1).get_coord(1).pipe == 1


def test_p2p_module_globals_and_signatures():
    assert callable(p2p._is_valid_send_recv) and hasattr(p2p, "_grid")
    assert tuple(inspect.signature(p2p._is_valid_send_recv).parameters) == ("src_stage", "dest_stage")
    assert tuple(inspect.signature(p2p.send).parameters) == ("tensor", "dest_stage", "async_op")
    assert tuple(inspect.signature(p2p.recv).parameters) == ("tensor", "src_stage", "async_op")
    # The engine calls them by module attribute, so replacing the module's functions reaches every call.
    assert "p2p.send(" in inspect.getsource(PipelineEngine) and "p2p.recv(" in inspect.getsource(PipelineEngine)


def test_c10d_timeouts():
    assert tuple(inspect.signature(c10d._set_pg_timeout).parameters)[:2] == ("timeout", "group")
    assert hasattr(c10d._world, "pg_map")
    assert hasattr(c10d, "default_pg_timeout") and hasattr(c10d, "default_pg_nccl_timeout")


def test_c10d_group_creation_goes_through_one_helper_by_module_name():
    # ds_internals.bound_gloo_connect replaces the helper: its backend and store are the 4th and 5th positional
    # parameters, init_process_group and new_group pass the timeout by keyword and call it by its module name.
    params = tuple(inspect.signature(c10d._new_process_group_helper).parameters)
    assert params[3:5] == ("backend", "store") and "timeout" in params
    for caller in (c10d.init_process_group, c10d._new_group_with_tag):
        source = inspect.getsource(caller)
        assert "_new_process_group_helper(" in source and "timeout=timeout" in source, caller.__name__
    assert hasattr(c10d.PrefixStore, "underlying_store")


def test_config_keeps_the_raw_dict():
    from deepspeed.runtime.config import DeepSpeedConfig
    assert "self._param_dict" in inspect.getsource(DeepSpeedConfig.__init__)


# In-place recovery: what rebind_process_groups, release_process_groups and reset_step_state rely on.

def test_the_groups_an_engine_holds_are_where_rebind_looks_for_them():
    module_init = inspect.getsource(PipelineModule.__init__)
    assert "self.world_group = dist.new_group(ranks=range(dist.get_world_size()))" in module_init
    assert "self._grid = PipelineParallelGrid(process_group=self.world_group, topology=self._topo)" in module_init
    assert "self.tied_comms = self._index_tied_modules()" in module_init
    # The world group, then the grid's groups, then the tied groups: the order rebind creates them in.
    assert module_init.index("self.world_group =") < module_init.index("self._grid =") < module_init.index(
        "self.tied_comms =")
    assert tuple(inspect.signature(PipelineParallelGrid).parameters) == ("topology", "process_group")
    engine_src = inspect.getsource(DeepSpeedEngine)
    assert "self.data_parallel_group = groups._get_data_parallel_group()" in engine_src
    assert "self.seq_data_parallel_group = groups._get_sequence_data_parallel_group()" in engine_src
    for cls in (BF16_Optimizer, DeepSpeedZeroOptimizer):
        src = inspect.getsource(cls.__init__)
        assert "self.dp_process_group = dp_process_group" in src and "self.real_dp_process_group = [" in src
        assert "self.mpu = mpu" in src
    assert "self.model_parallel_group = mpu.get_model_parallel_group()" in inspect.getsource(
        DeepSpeedZeroOptimizer.__init__)
    from deepspeed.runtime.pipe import p2p
    assert hasattr(p2p, "_grid") and hasattr(p2p, "_groups")


@pytest.mark.parametrize("attr", ds_internals.PIPE_STEP_STATE + ("_grad_layer_buf", "first_output_send",
                                                                 "first_gradient_send", "num_pipe_buffers"))
def test_the_step_state_reset_step_state_clears_exists(attr):
    assert f"self.{attr} = " in inspect.getsource(PipelineEngine.__init__), attr


def test_the_solo_world_and_abort_exist():
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d
    from torch.testing._internal.distributed import fake_pg  # noqa: F401 - registers the backend
    assert dist.Backend.FAKE == "fake" and callable(c10d._abort_process_group)
    assert callable(BF16_Optimizer.clear_hp_grads) and callable(BF16_Optimizer.clear_lp_grads)
    from deepspeed.utils.timer import SynchronizedWallClockTimer
    timer = SynchronizedWallClockTimer()("t")
    assert hasattr(timer, "started_") and callable(timer.reset)


def test_the_optimizer_ops_follow_the_rules_engine_op_builders_copies():
    """``spare_prewarm.engine_op_builders`` restates which op the engine's optimizer loads; a new rule in DeepSpeed
    must be copied there, or a warm spare would leave that op to the outage."""
    configure = inspect.getsource(DeepSpeedEngine.get_optimizer_configuration)
    assert configure.index("if torch_adam:") < configure.index("if self.zero_use_cpu_optimizer():") < \
        configure.index("FusedAdam")
    assert "return (torch.optim.AdamW if adam_w_mode else torch.optim.Adam)" in configure
    basic = inspect.getsource(DeepSpeedEngine._configure_basic_optimizer)
    for rule in ("FusedLamb(", "DeepSpeedCPULion(", "FusedLion(", "DeepSpeedCPUAdagrad(", "MuonWithAuxAdam(",
                 "getattr(torch.optim, self.optimizer_name())"):
        assert rule in basic, rule
    from deepspeed.ops.op_builder.builder import OpBuilder
    assert "if self.name in __class__._loaded_ops:" in inspect.getsource(OpBuilder.load)  # loaded once per process


def test_the_communication_backend_loads_the_shm_op_unless_marked_off():
    import importlib
    ds_comm_torch = importlib.import_module("deepspeed.comm.torch")  # (deepspeed.comm.torch is also torch)
    build = inspect.getsource(ds_comm_torch.build_shm_op)
    assert 'create_op_builder("ShareMemCommBuilder")' in build
    assert "deepspeed.ops.__compatible_ops__.get(builder.NAME, False)" in build
    assert "self.shm_comm_op = build_shm_op()" in inspect.getsource(ds_comm_torch.TorchBackend.__init__)
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder
    from deepspeed_checkfree.pipe.selector import SHM_COMM_OP
    assert ShareMemCommBuilder.NAME == SHM_COMM_OP

# CheckFree+ routing, recomputation of the first pair, and activation checkpointing.

def test_the_routing_relies_on_the_engine_attributes_it_names():
    # The route-aware schedule reuses DeepSpeed's buffer slots and computes the loss on two ranks: if one of these
    # were renamed, the routing would write to an attribute DeepSpeed no longer reads.
    routing = {"pipe_buffers", "total_additional_losses", "agg_additional_losses", "prev_stage", "next_stage",
               "loss", "total_loss", "fwd_outputs"}
    assert routing <= set(ds_internals.ENGINE_ATTRIBUTES)
    src = inspect.getsource(PipelineEngine)
    assert "self.pipe_buffers['outputs'][buffer_id] = outputs" in src
    assert "self.total_additional_losses[name] = add_to_total_loss(total, loss)" in src
    assert "self.agg_additional_losses = " in src
    assert "p2p.send(outputs, self.next_stage)" in src and "p2p.recv(self.pipe_recv_buf, self.prev_stage)" in src


def test_pipeline_module_forward_runs_its_segments_with_the_layer_seed_offset():
    # A recomputed stage runs PipelineModule.forward twice with the same micro_offset and its segments off.
    src = inspect.getsource(PipelineModule.forward)
    assert src.count("self.micro_offset += 1") == 1
    assert "local_micro_offset = self.micro_offset + 1" in src
    assert "if self.activation_checkpoint_interval == 0:" in src
    assert "self.activation_checkpoint_func(exec_range_func(start_idx, end_idx), *x)" in src
    assert "self._is_checkpointable(funcs)" in inspect.getsource(PipelineModule._precompute_checkpointable_values)


def test_non_reentrant_checkpoint_is_deepspeeds_choice_when_use_reentrant_is_off():
    from deepspeed.runtime.activation_checkpointing.checkpointing import non_reentrant_checkpoint
    assert tuple(inspect.signature(non_reentrant_checkpoint).parameters) == ("function", "args")
    src = inspect.getsource(PipelineEngine.__init__)
    assert "self.module.activation_checkpoint_func = ds_checkpointing.non_reentrant_checkpoint" in src
    assert "self.module._precompute_checkpointable_values()" in src
