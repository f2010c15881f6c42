"""A warm spare imports what building the first engine would (pipe/spare_prewarm.ENGINE_LAZY_IMPORTS), so that a
replacement's engine build does not pay DeepSpeed's lazy imports (1.4 s measured, of 858 modules) in the outage.
If a DeepSpeed or torch upgrade moves the cost elsewhere, this fails and names what the first build imported."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

BUILD_AFTER_PREWARM = r"""
import json, os, sys
from deepspeed import ops as ds_ops
ds_ops.__compatible_ops__["deepspeed_shm_comm"] = False
import deepspeed
import deepspeed_checkfree
from deepspeed_checkfree.core.config import CheckFreeConfig
from deepspeed_checkfree.models import gpt
from deepspeed_checkfree.pipe import ds_internals, spare_prewarm
spare_prewarm.prewarm_engine_imports()
config = json.load(open("configs/checkfree_no_failure.json"))
config["checkfree"] = json.loads(CheckFreeConfig.from_ds_config(config).model_dump_json())
ds_internals.form_solo_world(1, 4)
deepspeed.init_distributed(dist_backend="gloo")
model = gpt.pipeline_module(gpt.GPTConfig(vocab_size=256, seq_len=16, d_model=32, n_heads=4, n_layers=4),
                            num_stages=4, base_seed=0)
before = set(sys.modules)
deepspeed.initialize(model=model, config=config, model_parameters=list(model.parameters()))
print("NEW " + json.dumps(sorted(set(sys.modules) - before)))
"""


def test_after_the_prewarm_the_first_engine_build_imports_almost_nothing():
    env = dict(os.environ, RANK="1", WORLD_SIZE="4", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29500",
               OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    out = subprocess.run([sys.executable, "-c", BUILD_AFTER_PREWARM], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    new = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("NEW "))[4:])
    heavy = [m for m in new if m.split(".")[0] in ("sympy", "mpmath") or m.startswith("torch._dynamo")]
    assert not heavy and len(new) < 100, f"the first engine build still imported {len(new)} modules: {new[:40]}"


def test_the_ops_the_engine_build_loads_follow_the_optimizer_config(monkeypatch):
    """Which compiled ops a warm spare loads for a config (``spare_prewarm.engine_op_builders``): selection only,
    nothing is built or loaded."""
    from deepspeed.ops.op_builder.builder import OpBuilder

    from deepspeed_checkfree.pipe.spare_prewarm import engine_op_builders

    def no_load(self, *args, **kwargs):
        raise AssertionError(f"selecting the ops loaded {self.name}")

    monkeypatch.setattr(OpBuilder, "load", no_load)
    monkeypatch.setattr(OpBuilder, "jit_load", no_load)
    adamw = {"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}
    assert engine_op_builders(adamw) == ("FusedAdamBuilder",)
    assert engine_op_builders({"optimizer": {"type": "adam"}}) == ("FusedAdamBuilder",)  # DeepSpeed's names ignore case
    assert engine_op_builders({"optimizer": {"type": "AdamW", "params": {"torch_adam": True}}}) == ()
    offloaded = {**adamw, "zero_optimization": {"stage": 1, "offload_optimizer": {"device": "cpu"}}}
    assert engine_op_builders(offloaded) == ("CPUAdamBuilder",)
    assert engine_op_builders({**adamw, "zero_optimization": {"stage": 1}}) == ("FusedAdamBuilder",)
    assert engine_op_builders({"optimizer": {"type": "Lamb"}}) == ("FusedLambBuilder",)
    assert engine_op_builders({"optimizer": {"type": "SGD", "params": {"lr": 0.1}}}) == ()  # torch.optim.SGD
    assert engine_op_builders({"train_batch_size": 8}) == ()  # a client optimizer, passed to initialize
