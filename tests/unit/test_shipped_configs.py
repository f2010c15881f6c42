"""Every file in configs/ parses, so a stale config fails CI."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from deepspeed_checkfree.core.config import CheckFreeConfig, load_config

ROOT = Path(__file__).resolve().parents[2] / "configs"
# configs/experiments/ holds `checkfree experiment` files, loaded by the experiment tests.
CONFIGS = sorted(p for p in ROOT.rglob("*.*") if "experiments" not in p.relative_to(ROOT).parts)


def test_there_are_configs():
    assert len(CONFIGS) >= 3


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads(path):
    if path.suffix == ".json":
        ds = json.loads(path.read_text())
        if "train_micro_batch_size_per_gpu" in ds:  # a DeepSpeed config
            assert "optimizer" in ds and ds["optimizer"]["params"].get("torch_adam"), \
                "CPU configs must use torch_adam (FusedAdam would JIT-compile for minutes)"
            cfg = CheckFreeConfig.from_ds_config(ds)
            if cfg.enabled:
                cfg.validate_for(4)
            return
    if path.suffix in (".yaml", ".yml", ".json"):
        cfg = load_config(path)
        cfg.validate_for(4)
