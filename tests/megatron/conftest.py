"""The real megatron-core runs every test of this directory reads: one set of processes per pipeline size, shared by
all its scenarios (a process group and megatron.core's import are the cost), started once per test session."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.distributed.spawn import run_ranks  # noqa: E402

WORKER = Path(__file__).with_name("mcore_worker.py")
PP4 = [
    {"name": "legacy-middle-online", "format": "legacy", "lost": 2, "repair": "online"},
    {"name": "dist-middle-online", "format": "torch_dist", "lost": 2, "repair": "online"},
    {"name": "legacy-nan-online", "format": "legacy", "lost": 2, "repair": "online", "damage": "nan"},
    {"name": "dist-nan-online", "format": "torch_dist", "lost": 1, "repair": "online", "damage": "nan"},
    {"name": "legacy-ckpt-step-online", "format": "legacy", "lost": 1, "repair": "online", "ckpt_step": True},
    {"name": "legacy-first-offline", "format": "legacy", "lost": 0, "repair": "offline"},
    {"name": "legacy-last-cli", "format": "legacy", "lost": 3, "repair": "cli"},
    {"name": "dist-middle-offline", "format": "torch_dist", "lost": 1, "repair": "offline"},
    {"name": "dist-first-online", "format": "torch_dist", "lost": 0, "repair": "online"},
    {"name": "dist-last-online", "format": "torch_dist", "lost": 3, "repair": "online"},
]
PP2 = [
    {"name": "legacy-first-online", "format": "legacy", "lost": 0, "repair": "online"},
    {"name": "dist-last-offline", "format": "torch_dist", "lost": 1, "repair": "offline"},
]
# Settings beyond one plain block of layers per rank, in the PP=2 processes (tests/megatron/test_megatron_settings.py).
VARIANTS = [
    {"name": "distopt", "distributed_optimizer": True, "lose": [0, 1]},
    {"name": "vpp", "vpp": 2, "lose": [0, 1]},
    # Real files whose args claim a custom layout (--pipeline-model-parallel-layout), which repair does not handle.
    {"name": "layout", "claim": {"pipeline_model_parallel_layout": "Et*2|t*2L"}, "lose": [1]},
]


def _run(tmp_path_factory, world: int, num_layers: int, scenarios: list, variants: list = ()) -> Path:
    out = tmp_path_factory.mktemp(f"mcore-pp{world}")
    spec = {"out": str(out), "num_layers": num_layers, "steps": 3, "scenarios": scenarios, "variants": list(variants)}
    run_ranks(WORKER, world, [json.dumps(spec)], timeout_s=300, log_dir=out)
    return out


@pytest.fixture(scope="session")
def pp4(tmp_path_factory):
    return _run(tmp_path_factory, 4, 8, PP4)


@pytest.fixture(scope="session")
def pp2(tmp_path_factory):
    return _run(tmp_path_factory, 2, 4, PP2, VARIANTS)


