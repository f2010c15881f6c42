"""Engine scenarios as data: the model, the DeepSpeed config a scenario asks for, and the "checkfree" sections of
the usual cases. Shared by the worker (tests/harness/scenario_worker.py) and the tests that check its records."""
from __future__ import annotations

import re
from pathlib import Path
from typing import List, Mapping

from deepspeed_checkfree.models import gpt

WORKER = Path(__file__).with_name("scenario_worker.py")
MODEL = gpt.GPTConfig(vocab_size=256, seq_len=32, d_model=32, n_heads=4, n_layers=8)
LR = 3e-3
MICRO_BATCH = 2


def checkfree(**kw) -> dict:
    return {"enabled": True, **kw}


def plus(**kw) -> dict:
    return checkfree(mode="checkfree_plus", **kw)


def lose(stage: int, step: int, **kw) -> dict:
    """CheckFree losing ``stage`` before step ``step`` (``mode="checkfree_plus"`` for CheckFree+)."""
    return checkfree(failure_injection={"at": [{"stage": stage, "step": step}]}, **kw)


def ds_config(sc: Mapping) -> dict:
    """The DeepSpeed config of scenario ``sc`` (keys: gas, clip, constant_lr, precision, zero, checkfree)."""
    cfg = {
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": sc.get("gas", 4),
        "steps_per_print": 10**9,
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.01, "torch_adam": True}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": LR,
                                                     "warmup_num_steps": 6, "warmup_type": "linear"}},
        "gradient_clipping": sc.get("clip", 1.0),
    }
    if sc.get("constant_lr"):
        del cfg["scheduler"]
    if sc.get("precision") == "bf16":
        cfg["bf16"] = {"enabled": True}
    if sc.get("precision") == "fp16":
        cfg["fp16"] = {"enabled": True}
    if sc.get("zero"):
        cfg["zero_optimization"] = {"stage": sc["zero"]}
    if sc.get("checkfree") is not None:
        cfg["checkfree"] = sc["checkfree"]
    return cfg


# DeepSpeed 0.19.8 accumulates bf16 gradients in bf16 (data_types.grad_accum_dtype defaults to the model's dtype);
# the library measures their norm in fp32, so every precision agrees with the norm computed here to fp32 rounding.
NORM_REL = 1e-5


def norm_tolerance(sc: Mapping) -> float:
    """Relative tolerance between the library's stage gradient norm and the one the test computes."""
    return NORM_REL


def check_clear_error(records: List[Mapping], error: str, pattern: str) -> None:
    """Every rank stopped before training with the error class ``error`` and a message matching ``pattern``."""
    for r, rec in enumerate(records):
        assert "error" in rec, f"rank {r} did not fail"
        assert rec["error"] == error, (r, rec["error"], rec["message"])
        assert re.search(pattern, rec["message"]), rec["message"]
