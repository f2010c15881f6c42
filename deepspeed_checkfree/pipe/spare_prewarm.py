"""What a warm spare loads before it is needed, so that the replacement it becomes pays none of it in the outage:
the modules the first ``deepspeed.initialize`` imports lazily and the compiled ops the engine build loads."""
from __future__ import annotations

import importlib
from typing import List, Tuple

# What the first ``deepspeed.initialize`` imports lazily: measured with DeepSpeed 0.19.8 and torch 2.13, it
# imports 858 modules and takes 1.4 s, of which torch._dynamo (through torch.compiler, with sympy) is 1.15 s; the
# second call takes 6 ms.
ENGINE_LAZY_IMPORTS = ("torch._dynamo", "deepspeed.runtime.zero.stage_1_and_2", "deepspeed.runtime.bf16_optimizer")


def prewarm_engine_imports() -> None:
    """Import what building the first engine would, without building one (no memory for the stage's tensors)."""
    for name in ENGINE_LAZY_IMPORTS:
        importlib.import_module(name)


# The compiled op DeepSpeed's communication backend loads on CPU at init_distributed (TorchBackend.__init__ ->
# build_shm_op), unless deepspeed.ops.__compatible_ops__ marks it off. Only the CPU accelerator has it.
SHM_COMM_BUILDER = "ShareMemCommBuilder"


def engine_op_builders(ds_config: dict) -> Tuple[str, ...]:
    """The op builders (DeepSpeed's class names) ``deepspeed.initialize`` loads for the optimizer ``ds_config``
    names, by the rules of ``DeepSpeedEngine._configure_basic_optimizer`` and ``get_optimizer_configuration``
    (DeepSpeed 0.19.8): Adam and AdamW (and Muon's Adam half) load FusedAdam, unless ``"torch_adam": true`` (torch's
    Adam) or ZeRO offloads the optimizer (CPU Adam); Lamb loads FusedLamb; Lion FusedLion, or CPU Lion when
    offloaded; Adagrad CPU Adagrad when offloaded. Every other optimizer is torch's, and without an ``"optimizer"``
    section (a client optimizer) there is none. The bf16 and ZeRO-1/2 wrappers load no op. Nothing is built here.

    Raises:
        pydantic.ValidationError: the ``zero_optimization`` section is invalid (as ``deepspeed.initialize`` says).
    """
    from deepspeed.runtime import config as ds
    from deepspeed.runtime.zero.config import get_zero_config
    from deepspeed.runtime.zero.offload_config import OffloadDeviceEnum

    name = ds.get_optimizer_name(ds_config)
    if name is None:
        return ()
    name = name.lower() if name.lower() in ds.DEEPSPEED_OPTIMIZERS else name
    params = ds.get_optimizer_params(ds_config) or {}
    offload = get_zero_config(ds_config).offload_optimizer
    offloaded = offload is not None and offload.device in (OffloadDeviceEnum.cpu, OffloadDeviceEnum.nvme)
    if name in (ds.ADAM_OPTIMIZER, ds.ADAMW_OPTIMIZER, ds.MUON_OPTIMIZER):
        if params.get(ds.TORCH_ADAM_PARAM, False):
            return ()
        return ("CPUAdamBuilder",) if offloaded else ("FusedAdamBuilder",)
    if name == ds.LAMB_OPTIMIZER:
        return ("FusedLambBuilder",)
    if name == ds.LION_OPTIMIZER:
        return ("CPULionBuilder",) if offloaded else ("FusedLionBuilder",)
    if name == ds.ADAGRAD_OPTIMIZER and offloaded:
        return ("CPUAdagradBuilder",)
    return ()


def prewarm_engine_ops(ds_config: dict) -> List[str]:
    """Load, in this process, every compiled op that building an engine for ``ds_config`` will load: the
    optimizer's (:func:`engine_op_builders`, as the current accelerator provides it) and, on CPU, the shared-memory
    all-reduce of DeepSpeed's communication backend unless it is marked off. DeepSpeed keeps a loaded op for the
    life of the process, so a later engine build finds it and loads nothing: a warm spare calls this, and the
    replacement it becomes does not load an op in the outage (2.4 s for FusedAdam from the cache on 2 idle CPU
    cores, more on busy ones). The first load of an op on a machine JIT-compiles it into torch's extensions cache
    (FusedAdam: about a minute on CPU); the ranks' own builds then find it there.

    Returns:
        The names of the ops loaded (DeepSpeed's, e.g. ``"fused_adam"``).
    """
    from deepspeed import ops
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    builders = [accelerator.create_op_builder(name) for name in engine_op_builders(ds_config)]
    shm = accelerator.create_op_builder(SHM_COMM_BUILDER)
    if shm is not None and ops.__compatible_ops__.get(shm.NAME, False):
        builders.append(shm)
    loaded = []
    for builder in builders:
        # None or "not implemented": this accelerator has no such op, and the engine build fails as it would anyway
        if builder is None or builder.NAME == "deepspeed_not_implemented":
            continue
        builder.load()
        loaded.append(builder.name)
    return loaded
