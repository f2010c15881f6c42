"""Markers by cost (declared in pytest.ini, ``--strict-markers``):

    distributed  real multi-process runs on CPU with gloo         e2e  the launch scripts through a real launcher
    slow         takes more than a minute                         gpu  needs a GPU (skipped without one)

The fast tier is ``-m "not distributed and not e2e"``. The harness refuses to start processes for a test that
carries neither marker, so a multi-process test cannot slip into the fast tier.
"""
from __future__ import annotations

import pytest

from tests.harness import ranks
from tests.harness.ops import ensure_op_built


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    # Runs before the item's fixtures, so a module-scoped launch fixture sees the markers of its first test.
    ranks.current_markers = {m.name for m in item.iter_markers()}


def pytest_runtest_teardown(item: pytest.Item) -> None:
    ranks.current_markers = None


# The tiers run cheapest first (a stable sort: the order within a tier is pytest's): single-process tests while
# `.ci/run` still builds the Python 3.12 venv in the background, the multi-process tiers after.
TIER_ORDER = ("unit", "harness", "distributed", "megatron", "e2e")


def tier_rank(item: pytest.Item) -> int:
    parts = item.path.parts
    tier = parts[parts.index("tests") + 1] if "tests" in parts[:-1] else ""
    return TIER_ORDER.index(tier) if tier in TIER_ORDER else len(TIER_ORDER)


def pytest_collection_modifyitems(config: pytest.Config, items) -> None:
    items.sort(key=tier_rank)
    gpu_tests = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_tests:
        return
    import torch
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a GPU; this machine has none")
    for item in gpu_tests:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def fused_adam_op() -> str:
    """DeepSpeed's FusedAdam op, built once per machine before the tests that load it (a fresh machine pays the JIT
    build here, about a minute on 2 cores, instead of inside a timed job)."""
    return ensure_op_built("FusedAdamBuilder")
