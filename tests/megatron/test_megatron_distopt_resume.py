"""The reproduction docs/megatron.md gives Megatron's maintainers (tests/megatron/distopt_resume_repro.py) still
reproduces, on the installed megatron-core (0.16.1 and 0.19.2 in CI): with torch's Adam (no apex or Transformer
Engine) megatron.core's DistributedOptimizer cannot be resumed the way Megatron-LM's loader resumes it, in either
checkpoint format, and the two proposed changes resume both with the saved weights. One process, no CheckFree code.

When a megatron-core release fixes its loader, the first assertion fails: then the note, the reproduction and the
fix test_megatron_pretrain.py applies can go.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.distributed.spawn import run_ranks

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(300)]

REPRO = Path(__file__).with_name("distopt_resume_repro.py")


def _outcomes(output: str) -> dict:
    return dict(re.findall(r"^(legacy \(torch\)|torch_dist): (.*)$", output, flags=re.MULTILINE))


def test_megatron_cannot_resume_the_distributed_optimizer_without_apex_and_the_proposed_fix_can(tmp_path):
    (without,) = run_ranks(REPRO, 1, ["--cpu"], timeout_s=240, log_dir=tmp_path)
    failed = _outcomes(without)
    assert sorted(failed) == ["legacy (torch)", "torch_dist"], without[-3000:]
    # Inside megatron.core's own optimizer, in both formats.
    assert all(v.startswith("FAILED with") and "megatron/core/optimizer/distrib_optimizer.py:" in v
               for v in failed.values()), failed
    assert failed["torch_dist"].startswith("FAILED with AssertionError"), failed

    (fixed,) = run_ranks(REPRO, 1, ["--cpu", "--with-fix"], timeout_s=240, log_dir=tmp_path)
    assert _outcomes(fixed) == {"legacy (torch)": "resumed, weights equal to the saved ones",
                                "torch_dist": "resumed, weights equal to the saved ones"}, fixed[-3000:]
