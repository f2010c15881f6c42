"""A warm spare loads the compiled ops its engine build will load (``spare_prewarm.prewarm_engine_ops``), so a
replacement's ``deepspeed.initialize`` neither compiles nor loads one in the outage: with ``"AdamW"`` (no
``torch_adam``) DeepSpeed builds FusedAdam, whose load takes seconds even from torch's extensions cache.

One process per case, in the solo world a replacement builds its engine in (torch's fake backend), with every load
DeepSpeed's op builders make during ``deepspeed.initialize`` recorded."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ..harness.ranks import REPO, cpu_env

pytestmark = pytest.mark.distributed

BUILD = r"""
import json, sys, time
import deepspeed
import deepspeed_checkfree
from deepspeed_checkfree.pipe.selector import disable_shm_comm_op
disable_shm_comm_op()  # (only the optimizer's op is looked at here)
import torch.utils.cpp_extension as cpp_extension
from deepspeed.ops.op_builder.builder import OpBuilder
from deepspeed_checkfree.models import gpt
from deepspeed_checkfree.pipe import ds_internals, spare_prewarm

config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4, "steps_per_print": 10**6,
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}, "checkfree": {"enabled": True}}
prewarmed = spare_prewarm.prewarm_engine_ops(config) if sys.argv[1] == "prewarm" else []

calls = []
jit_load, cpp_load = OpBuilder.jit_load, cpp_extension.load
def record_jit_load(self, *args, **kwargs):
    calls.append(f"jit_load {self.name}")
    return jit_load(self, *args, **kwargs)
def record_cpp_load(*args, **kwargs):
    calls.append(f"cpp_extension.load {kwargs.get('name')}")
    return cpp_load(*args, **kwargs)
OpBuilder.jit_load, cpp_extension.load = record_jit_load, record_cpp_load

ds_internals.form_solo_world(1, 4)
deepspeed.init_distributed(dist_backend="gloo")
model = gpt.pipeline_module(gpt.GPTConfig(vocab_size=256, seq_len=16, d_model=32, n_heads=4, n_layers=4),
                            num_stages=4, base_seed=0)
started = time.perf_counter()
engine, _, _, _ = deepspeed.initialize(model=model, config=config, model_parameters=list(model.parameters()))
print("RESULT " + json.dumps({"prewarmed": prewarmed, "calls": calls, "initialize_s": time.perf_counter() - started,
                              "optimizer": type(engine.basic_optimizer).__name__}))
"""


def build(case: str) -> dict:
    env = cpu_env(dict(RANK="1", WORLD_SIZE="4", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29500"))
    out = subprocess.run([sys.executable, "-c", BUILD, case], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))[7:])


def test_after_the_prewarm_the_engine_build_loads_no_op(fused_adam_op):
    cold = build("cold")
    # (the control: without the prewarm, the engine build itself loads FusedAdam, and the recording sees it)
    assert cold["optimizer"] == "FusedAdam" and "jit_load fused_adam" in cold["calls"], cold
    warm = build("prewarm")
    assert warm["prewarmed"] == ["fused_adam"] and warm["optimizer"] == "FusedAdam", warm
    assert warm["calls"] == [], f"deepspeed.initialize loaded ops after the prewarm: {warm['calls']}"
    print(f"{fused_adam_op}; deepspeed.initialize {cold['initialize_s']:.2f} s cold, "
          f"{warm['initialize_s']:.2f} s after the prewarm")
