"""Kept for tests/megatron, which imports ``run_ranks`` from here: the harness lives in tests/harness."""
from tests.harness.ports import free_port  # noqa: F401
from tests.harness.ranks import REPO, cpu_env, run_ranks  # noqa: F401
