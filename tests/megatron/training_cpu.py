"""Test-only workarounds that let Megatron-LM's training loop (``megatron.training``: from a core_v0.16.1 checkout, or
the one the megatron-core 0.19 wheel ships) run on CPU processes over gloo.

On top of the megatron.core patches of :mod:`.cpu_patches`, the loop needs what shared/notes/megatron-on-cpu.md §4
lists: ``initialize_megatron`` asserts CUDA (so ``is_available`` says yes and one device is counted; with none it
silently skips model-parallel initialisation), seeding and device selection become no-ops, the dependency build
(make, nvcc) and the JIT warm-up on ``device="cuda"`` are skipped, and torch.compile is off. With a CUDA build of
torch (the only torch 2.13 on the registry for Python 3.12) faking ``is_available`` would make the DataLoader pin
memory through CUDA, so torch's accelerator API keeps reporting none. They fake CUDA, so they stay out of the library.
"""
from __future__ import annotations

import sys
import types

import torch

from . import cpu_patches

_APPLIED = False


def _stub_triton_kernels() -> None:
    """megatron/training/initialize.py imports a triton-only module unguarded; triton (1 GB) comes with CUDA builds
    of torch only. Without triton, a stand-in module takes its place (batch-invariant mode stays off)."""
    try:
        import triton  # noqa: F401
        return
    except ImportError:
        pass
    stub = types.ModuleType("megatron.core.transformer.custom_layers.batch_invariant_kernels")
    stub.enable_batch_invariant_mode = lambda *a, **k: None
    stub.is_batch_invariant_mode_enabled = lambda *a, **k: False
    sys.modules[stub.__name__] = stub


def apply() -> None:
    """Install the workarounds (idempotent). Call before importing ``megatron.training``."""
    global _APPLIED
    if _APPLIED:
        return
    _APPLIED = True
    import megatron.core  # noqa: F401 - bind the pip wheel's megatron.core (compiled dataset helpers) first
    import megatron.core.datasets.helpers  # noqa: F401

    torch._dynamo.config.disable = True  # torch.compile'd fusions
    _stub_triton_kernels()
    cpu_patches.apply()
    torch.cuda.is_available = lambda: True
    torch.cuda.device_count = lambda: 1
    torch.cuda.set_device = lambda *a, **k: None
    torch.cuda.manual_seed_all = lambda *a, **k: None
    torch.cuda.empty_cache = lambda: None
    # torch's own consumers (DataLoader pin memory, autocast defaults) ask the accelerator API, not is_available.
    if hasattr(torch, "accelerator"):
        torch.accelerator.is_available = lambda: False
        torch.accelerator.current_accelerator = lambda *a, **k: None
    # dist_checkpointing's results queue lives in a spawn-context Manager whose child re-imports __main__ (the
    # script); a fork-context Manager avoids that on this CPU box.
    import multiprocessing as mp

    from megatron.core.dist_checkpointing.strategies import filesystem_async
    if hasattr(filesystem_async, "_results_queue"):
        filesystem_async._results_queue = mp.get_context("fork").Manager().Queue()
    import megatron.training.initialize as initialize

    initialize._compile_dependencies = lambda *a, **k: None
    if hasattr(initialize, "_warmup_jit_function"):
        initialize._warmup_jit_function = lambda *a, **k: None
