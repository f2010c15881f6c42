"""Megatron-LM's own training loop, as the megatron-core 0.19 wheel ships it (``megatron.training.pretrain``), with the
CheckFree hook installed by the runner, on CPU processes over gloo (tests/megatron/pretrain_worker.py): 2 and 4
pipeline stages train 3 iterations and save, lose the first, a middle or the last stage's files, and resume with the
hook to iteration 5, in the legacy (``torch``) and ``torch_dist`` formats, under the plain and the distributed
optimizer (with the fix proposed to megatron.core, docs/megatron.md: its own loader cannot resume that optimizer
without apex or Transformer Engine). Megatron's loader itself reads the repaired checkpoint; the test checks that every stage loaded what it
should (the rebuilt one: the blend or copy of its neighbours' saved weights, computed here; the others: exactly what
they saved), that the rebuilt stage restarts with a fresh Adam state and the LR boost, and that training goes on.

megatron-core 0.16.1 (Python 3.11) does not ship ``megatron.training``: these tests run in the Python 3.12 tier of CI.
"""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

if importlib.util.find_spec("megatron") is None or importlib.util.find_spec("megatron.training") is None:
    pytest.skip("megatron.training is not installed (megatron-core < 0.19 does not ship it)", allow_module_level=True)

from deepspeed_checkfree.core.recovery import blend  # noqa: E402
from tests.distributed.spawn import run_ranks  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(600)]

WORKER = Path(__file__).with_name("pretrain_worker.py")
CONFIGS = [(fmt, distopt) for fmt in ("torch", "torch_dist") for distopt in (False, True)]
# Which stage each resume loses (None: the intact checkpoint), per pipeline size and (format, distributed optimizer).
# Two stages: every config loses either stage and resumes intact. Four: the plain optimizer loses the first, a middle
# and the last stage; the distributed optimizer a middle one (its edge stages are the two-stage cases).
LOSSES = {2: {cfg: [None, 0, 1] for cfg in CONFIGS},
          4: {cfg: ([2] if cfg[1] else [0, 2, 3]) for cfg in CONFIGS}}
CASES = [(world, fmt, distopt, lost) for world in (2, 4) for fmt, distopt in CONFIGS
         for lost in LOSSES[world][(fmt, distopt)]]


def _launch(tmp_path_factory, world: int) -> Path:
    out = tmp_path_factory.mktemp(f"pretrain-pp{world}")
    spec = {"out": str(out), "num_layers": 2 * world,
            "configs": [{"format": fmt, "distopt": distopt, "lose": LOSSES[world][(fmt, distopt)]}
                        for fmt, distopt in CONFIGS]}
    run_ranks(WORKER, world, [json.dumps(spec)], timeout_s=560, log_dir=out)
    return out


@pytest.fixture(scope="session")
def pretrain_runs(tmp_path_factory):
    launched = {}

    def get(world: int) -> Path:
        if world not in launched:
            launched[world] = _launch(tmp_path_factory, world)
        return launched[world]

    return get


def _records(out: Path, name: str, world: int) -> list:
    return [torch.load(out / f"{name}-rank{r}.pt", weights_only=False) for r in range(world)]


def _expected(saved: list, lost: int, weights: list) -> dict:
    """The lost stage's weights as CheckFree rebuilds them, from the stages' saved weights: its transformer layers
    are the gradient-norm blend of its neighbours' (a copy of the one neighbour at either end), its embedding / final
    norm / output layer its own pre-failure values (the replicas its neighbour kept)."""
    last = len(saved) - 1
    sources = [lost - 1, lost + 1] if 0 < lost < last else [1 if lost == 0 else last - 1]
    return {k: blend([saved[s][k] for s in sources], weights) if k.startswith("decoder.layers.") else v
            for k, v in saved[lost].items()}


@pytest.mark.parametrize("world,fmt,distopt,lost", CASES,
                         ids=[f"pp{w}-{f}-{'distopt' if d else 'adam'}-{'intact' if s is None else f'lost{s}'}"
                              for w, f, d, s in CASES])
def test_megatron_pretrain_resumes_with_the_hook_after_losing_a_stage(pretrain_runs, world, fmt, distopt, lost):
    out = pretrain_runs(world)
    name = f"{fmt}-{'distopt' if distopt else 'adam'}"
    save = _records(out, f"{name}-save", world)
    case = f"{name}-{'intact' if lost is None else f'lost{lost}'}"
    runs = _records(out, case, world)
    assert all(r["error"] is None for r in save + runs), [r["error"] for r in save + runs]
    assert [r["saved_iteration"] for r in save] == [3] * world
    assert [r["loaded_iteration"] for r in runs] == [3] * world, "Megatron's loader resumed at the saved iteration"
    saved = [r["saved"] for r in save]
    for r in runs:
        stage = r["stage"]
        assert sorted(r["loaded"]) == sorted(saved[stage])
        if stage != lost:  # survivors load exactly what they saved, moments included
            assert all(torch.equal(r["loaded"][k], v) for k, v in saved[stage].items()), f"stage {stage} changed"
            assert r["lr_scale"] == 1.0 and r["optimizer_after_load"]["moments_nonzero"] > 0
        assert r["rebuilt_stages"] == ([] if lost is None else [lost])
    events = out / f"{case}.events.jsonl"
    if lost is None:
        assert not events.exists() or "recovery" not in events.read_text(), "an intact checkpoint is loaded as it is"
    else:
        records = [json.loads(line) for line in events.read_text().splitlines()]
        assert [e["stage"] for e in records if e["event"] == "detection"] == [lost]
        (recovery,) = [e for e in records if e["event"] == "recovery"]
        norms = [r["saved_norm"] for r in save]
        if 0 < lost < world - 1:
            w_prev, w_next = norms[lost - 1] + 1e-4, norms[lost + 1] + 1e-4
            assert recovery["sources"] == [lost - 1, lost + 1]
            assert recovery["weights"] == pytest.approx([w_prev / (w_prev + w_next), w_next / (w_prev + w_next)])
        else:
            assert recovery["sources"] == [1 if lost == 0 else world - 2] and recovery["weights"] == [1.0]
        rebuilt = runs[lost]
        expected = _expected(saved, lost, recovery["weights"])
        worst = max(float((rebuilt["loaded"][k] - v).abs().max()) for k, v in expected.items())
        assert worst == 0.0, f"the rebuilt stage {lost} differs from the blend of its neighbours by {worst}"
        # A fresh Adam state (none yet, as the legacy repair writes it, or zero moments at step 0) and the LR boost
        # for the rest of training.
        assert rebuilt["optimizer_after_load"]["moments_nonzero"] == 0
        assert rebuilt["optimizer_after_load"]["steps"] in ([], [0.0])
        assert rebuilt["lr_scale"] == pytest.approx(1.1)
    losses = runs[-1]["losses"]  # iterations 4 and 5, on the last stage
    assert len(losses) == 2 and all(math.isfinite(x) and 0 < x < math.log(256) + 0.5 for x in losses), losses
