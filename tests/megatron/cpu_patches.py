"""Test-only monkeypatches that let megatron-core (0.16.1 and 0.19.x) run pipeline parallelism on CPU with gloo.

These are the five patches of shared/notes/megatron-on-cpu.md §2, each needed (dropping any one fails or hangs),
a sixth for the distributed optimizer (and gradient clipping), which accept only ``torch.cuda.*Tensor`` types, and a
seventh for 0.19, whose gradient sync waits on ``torch.cuda.current_stream()`` (CUDA-graph replay events).
They stay in tests: the library itself never fakes CUDA.
"""
from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

_APPLIED = False


class Stream:
    """A stand-in for ``torch.cuda.Stream``: every wait and synchronisation is a no-op (CPU work is in order)."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return None

    def synchronize(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _CudaToCpu(TorchFunctionMode):
    """Rewrites ``device="cuda..."`` keyword arguments to the CPU (schedules.py allocates scalars on "cuda")."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        dev = kwargs.get("device")
        if dev is not None and "cuda" in str(dev):
            kwargs["device"] = "cpu"
        return func(*args, **kwargs)


def apply() -> None:
    """Install the patches (idempotent). Call before building any megatron-core model."""
    global _APPLIED
    if _APPLIED:
        return
    _APPLIED = True
    from megatron.core.tensor_parallel import random as mrandom

    torch.Tensor.cuda = lambda self, *a, **k: self                       # 1: tied-embedding init moves to cuda
    torch.cuda.current_device = lambda: "cpu"                             # 2: p2p buffers on current_device()
    torch.cuda.synchronize = lambda *a, **k: None                         # 3: hangs after batch_isend_irecv
    # 4: the TP RNG tracker is backed by the CPU generator.
    torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    _CudaToCpu().__enter__()                                              # 5: device="cuda" literals
    # 6: DistributedOptimizer._build_model_and_main_param_groups and clip_grad_by_total_norm_fp32 check
    #    param.type() against the torch.cuda tensor type names.
    type_of = torch.Tensor.type
    cuda_names = {"torch.FloatTensor": "torch.cuda.FloatTensor", "torch.HalfTensor": "torch.cuda.HalfTensor",
                  "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor"}

    def tensor_type(self, *args, **kwargs):
        result = type_of(self, *args, **kwargs)
        return cuda_names.get(result, result) if not args and not kwargs else result

    torch.Tensor.type = tensor_type
    # 7: megatron.core 0.19 start_grad_sync waits for CUDA-graph replay events on the current stream.
    torch.cuda.Stream = Stream
    torch.cuda.current_stream = lambda *a, **k: Stream()
    torch.cuda.stream = lambda *a, **k: Stream()
