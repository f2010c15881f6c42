"""The experiment on the real DeepSpeed engine (4 gloo ranks) agrees with the simulated pipeline: same losses, step
by step, for CheckFree, the random ablation, CheckFree+, checkpointing and redundant computation, with failures."""
from __future__ import annotations

import pytest

from deepspeed_checkfree.experiment.config import parse_experiment
from deepspeed_checkfree.experiment.runner import run_experiment

pytestmark = pytest.mark.distributed

# Failures at stages 1 and 2 of 4: a gradnorm blend (plain CheckFree), and edge-pair copies with the embedding /
# head replicas (CheckFree+: 1 <- 0, 2 <- 3); rollbacks to the checkpoints of step 2 (iteration 3) and of step 4
# (iteration 5).
CONFIG = {
    "name": "engine agreement",
    "model": {"num_stages": 4, "layers_per_stage": 1, "d_model": 32, "n_heads": 4, "seq_len": 32},
    "training": {"iterations": 8, "micro_batch_size": 2, "micro_batches": 4, "lr": 3e-3, "eval_every": 4,
                 "eval_batches": 2},
    "failures": {"at": [{"stage": 1, "iteration": 3}, {"stage": 2, "iteration": 5}]},
    "strategies": ["no_failure", "gradnorm_average", "random", "checkfree_plus", "checkpoint_2", "redundant"],
    "wall_clock": {"iteration_time_s": 10.0, "stage_bytes": 1.0e6},
}


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    out = tmp_path_factory.mktemp("engine")
    engine = run_experiment(parse_experiment({**CONFIG, "backend": "deepspeed"}), out / "engine", progress=False,
                            plots=False, timeout_s=420)
    sim = run_experiment(parse_experiment(CONFIG), out / "sim", progress=False, plots=False)
    return out, engine, sim


def _records(path):
    import csv
    return {(r["strategy"], int(r["iteration"])): r for r in csv.DictReader(open(path))}


@pytest.mark.timeout(600)
def test_engine_and_simulated_paths_agree_step_by_step(both):
    out, engine, sim = both
    a, b = _records(out / "engine" / "results.csv"), _records(out / "sim" / "results.csv")
    assert a.keys() == b.keys() and len(a) == 6 * 8
    for key in a:
        assert a[key]["step"] == b[key]["step"] and a[key]["lost"] == b[key]["lost"], key
        assert float(a[key]["train_loss"]) == pytest.approx(float(b[key]["train_loss"]), abs=2e-5), key
        if b[key]["val_loss"]:
            assert float(a[key]["val_loss"]) == pytest.approx(float(b[key]["val_loss"]), abs=2e-5), key
    # The failures really changed the runs (so agreement is not just agreement of unaffected training).
    for name in ("gradnorm_average", "random", "checkpoint_2"):
        assert a[(name, 3)]["train_loss"] != a[("no_failure", 3)]["train_loss"], name
    assert [a[("checkpoint_2", i)]["step"] for i in range(8)] == ["0", "1", "2", "2", "3", "4", "5", "6"]
    for i in range(8):
        assert a[("redundant", i)]["train_loss"] == a[("no_failure", i)]["train_loss"]


def test_engine_summary_matches_the_simulated_one(both):
    _, engine, sim = both
    for name, row in sim["strategies"].items():
        assert engine["strategies"][name]["failures"] == row["failures"]
        assert engine["strategies"][name]["final_val_loss"] == pytest.approx(row["final_val_loss"], abs=2e-5)
