"""Real megatron-core GPT pipelines (PP=4 and PP=2, CPU/gloo): train, save in Megatron's legacy and torch_dist
formats with the CheckFree sidecar, lose one stage's shard (middle, first, last), repair it (online hook before the
load, offline API, offline console command), load into fresh megatron-core models with megatron.core's own APIs, and
check that the rebuilt stage equals the blend of its neighbours computed independently in the worker, that every
other stage equals what was saved, and that training goes on with a finite loss.

Each pipeline size runs once (one set of processes for all its scenarios); tests read the per-rank results.
"""
from __future__ import annotations

import json
import math
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("megatron.core")

from deepspeed_checkfree.errors import RecoveryError  # noqa: E402
from deepspeed_checkfree.repair import repair_checkpoint  # noqa: E402
from tests.megatron.conftest import PP2, PP4  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(400)]

def _results(out: Path, name: str, world: int) -> list:
    return [json.loads((out / f"{name}-rank{r}.json").read_text()) for r in range(world)]


def _check(results: list, sc: dict) -> None:
    lost = sc["lost"]
    num_stages = len(results)
    rebuilt = results[lost]
    assert rebuilt["stage"] == lost and rebuilt["iteration"] == 3  # (the --ckpt-step copy holds iteration 3 too)
    assert rebuilt["expected_keys_equal"], "the rebuilt stage must hold exactly the keys its model expects"
    # Bit-identical to the blend of the neighbours' pre-failure weights (CPU runs are deterministic).
    assert rebuilt["max_diff_rebuilt"] == 0.0
    if 0 < lost < num_stages - 1:
        n = rebuilt["norms"]
        w_prev, w_next = n[lost - 1] + 1e-4, n[lost + 1] + 1e-4
        assert rebuilt["weights"] == pytest.approx([w_prev / (w_prev + w_next), w_next / (w_prev + w_next)])
    for r in results:
        assert r["norms"][r["stage"]] == pytest.approx(r["own_norm"], rel=1e-5), "recorded stage norm"
        if r["stage"] == lost:
            continue
        assert r["keys_equal"] and r["max_diff_others"] == 0.0, f"stage {r['stage']} changed"
        tied_state = sc["format"] == "torch_dist" and lost == 0 and r["stage"] == num_stages - 1
        # torch_dist stores the tied output layer's Adam moments once, with stage 0's embedding: they restart too.
        if not tied_state:
            assert r["max_diff_optimizer"] == 0.0, f"stage {r['stage']}'s optimizer state changed"
    assert rebuilt["optimizer_state_entries"] == 0, "the rebuilt stage restarts with fresh Adam moments"
    # ... and a fresh step count: its first update after the rebuild is Adam's first (step 1), in every format.
    assert rebuilt["adam_steps_after"] == [1.0]
    assert results[lost - 1 if lost else 1]["adam_steps_after"] == [4.0]
    if sc.get("damage") == "nan":
        assert "non-finite" in next(r["report"] for r in results if "report" in r)["damaged"][str(lost)]
    losses = results[-1]["losses_after"]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert all(abs(x - math.log(128)) < 0.5 for x in losses), losses
    report = next((r["report"] for r in results if "report" in r), None)
    assert report is not None and report["rebuilds"][0]["stage"] == lost
    expected_sources = [lost - 1, lost + 1] if 0 < lost < num_stages - 1 else [1 if lost == 0 else num_stages - 2]
    assert report["rebuilds"][0]["sources"] == expected_sources


@pytest.mark.parametrize("sc", PP4, ids=[s["name"] for s in PP4])
def test_four_stage_pipeline_resumes_after_losing_a_stage_shard(pp4, sc):
    _check(_results(pp4, sc["name"], 4), sc)


@pytest.mark.parametrize("sc", PP2, ids=[s["name"] for s in PP2])
def test_two_stage_pipeline_copies_the_surviving_stage(pp2, sc):
    results = _results(pp2, sc["name"], 2)
    _check(results, sc)
    assert "2-stage pipeline" in next(r["report"] for r in results if "report" in r)["rebuilds"][0]["note"]


def test_the_first_update_after_a_rebuild_is_the_same_in_legacy_and_torch_dist(pp4):
    """One meaning of "fresh optimizer state": moments and step count reset together in both formats (torch_dist
    keeps one shared step on disk; the hook resets the rebuilt stage's after loading), so the same rebuilt weights
    take the same first step."""
    legacy = torch.load(pp4 / "legacy-middle-online-rank2-update.pt")
    dist = torch.load(pp4 / "dist-middle-online-rank2-update.pt")
    assert legacy.keys() == dist.keys()
    for k in legacy:
        assert torch.allclose(legacy[k], dist[k], rtol=1e-4, atol=1e-7), k
    assert max(float(v.abs().max()) for v in legacy.values()) > 0


def test_ckpt_step_repairs_the_iteration_megatron_loads_and_leaves_the_latest_alone(pp4):
    work = pp4 / "legacy-ckpt-step-online"
    assert (work / "iter_0000002" / "mp_rank_00_001" / "model_optim_rng.pt").exists()
    assert not (work / "iter_0000003" / "mp_rank_00_001" / "model_optim_rng.pt.corrupt").exists()
    report = _results(pp4, "legacy-ckpt-step-online", 4)[0]["report"]
    assert report["iteration"] == "2"


def test_events_record_every_detection_and_recovery(pp4):
    events = [json.loads(line) for line in (pp4 / "events.jsonl").read_text().splitlines()]
    by_kind = {}
    for e in events:
        by_kind.setdefault(e["event"], []).append(e)
    # online and cli scenarios write to the events file: legacy-middle, dist-middle, legacy-nan, dist-nan,
    # ckpt-step, legacy-last (cli), dist-first, dist-last.
    assert len(by_kind["detection"]) == len(by_kind["recovery"]) == 8
    assert {e["stage"] for e in by_kind["recovery"]} == {0, 1, 2, 3}


def test_repair_reads_the_neighbours_not_the_model(pp4):
    report = _results(pp4, "dist-middle-offline", 4)[0]["report"]
    # Stage 1 rebuilt from stages 0 and 2: about two stages' weights read (no optimizer state), of four stages.
    assert report["bytes_read"] < 0.5 * report["checkpoint_bytes"]


# ---------------------------------------------------------------------------------------------------------------
# Bad input, on the checkpoints the real run wrote
# ---------------------------------------------------------------------------------------------------------------


def _copy(pp4: Path, fmt: str, tmp_path: Path) -> Path:
    dst = tmp_path / fmt
    shutil.copytree(pp4 / f"pristine_{'legacy' if fmt == 'legacy' else 'dist'}", dst)
    return dst


@pytest.mark.parametrize("fmt", ["legacy", "dist"])
def test_an_intact_checkpoint_needs_nothing_and_every_tensor_was_checked(pp4, tmp_path, fmt):
    ckpt = _copy(pp4, fmt, tmp_path)
    before = {p: p.stat().st_mtime_ns for p in ckpt.rglob("*")}
    report = repair_checkpoint(str(ckpt), in_place=True)
    assert report.format == ("megatron_legacy" if fmt == "legacy" else "megatron_torch_dist")
    assert report.num_stages == 4 and not report.damaged and not report.rebuilds
    assert report.bytes_checked > 0.5 * report.checkpoint_bytes  # weights and Adam moments of every stage
    assert {p: p.stat().st_mtime_ns for p in ckpt.rglob("*")} == before, "an intact checkpoint is left untouched"


def test_truncated_distcp_file_is_detected_as_its_stage(pp4, tmp_path):
    ckpt = _copy(pp4, "dist", tmp_path)
    it = ckpt / "iter_0000003"
    last = sorted(it.glob("__2_*.distcp"))[-1]  # __2_1 (two writer threads, megatron.core 0.16) or __2_0 (0.19)
    data = last.read_bytes()
    last.write_bytes(data[:100])
    report = repair_checkpoint(str(ckpt), output=str(tmp_path / "out"))
    assert list(report.damaged) == [2] and "truncated" in report.damaged[2]
    assert report.rebuilds[0].sources == (1, 3)


def test_both_neighbours_missing_is_refused(pp4, tmp_path):
    ckpt = _copy(pp4, "dist", tmp_path)
    it = ckpt / "iter_0000003"
    for name in os.listdir(it):
        if name.startswith(("__1_", "__2_")):
            os.remove(it / name)
    with pytest.raises(RecoveryError, match="stages 1 and 2 are both damaged"):
        repair_checkpoint(str(ckpt), output=str(tmp_path / "out"))


@pytest.mark.parametrize("what", [".metadata", "common.pt"])
def test_lost_global_torch_dist_files_cannot_be_rebuilt(pp4, tmp_path, what):
    ckpt = _copy(pp4, "dist", tmp_path)
    if not (ckpt / "iter_0000003" / what).exists():
        pytest.skip(f"this megatron-core writes no {what} (from 0.19 the common state is in global rank 0's file)")
    os.remove(ckpt / "iter_0000003" / what)
    with pytest.raises(RecoveryError, match=f"{what} is missing.*cannot be rebuilt from neighbours"):
        repair_checkpoint(str(ckpt), output=str(tmp_path / "out"))


def test_first_stage_common_state_is_rebuilt_from_its_replica_or_refused_without_one(pp4, tmp_path):
    """megatron.core >= 0.19 keeps the common state (args, iteration, scheduler) only in global rank 0's file: the
    hook's replica brings it back with stage 0, byte for byte; without the replica the rebuild is refused."""
    ckpt = _copy(pp4, "dist", tmp_path)
    it = ckpt / "iter_0000003"
    if (it / "common.pt").exists():
        pytest.skip("this megatron-core keeps the common state in common.pt, a file of no stage")
    replica = (it / "checkfree" / "common_state_replica.bin").read_bytes()
    for name in os.listdir(it):
        if name.startswith("__0_"):
            os.remove(it / name)
    (tmp_path / "out").mkdir()
    report = repair_checkpoint(str(ckpt), output=str(tmp_path / "out" / "repaired"))
    assert list(report.damaged) == [0] and report.rebuilds[0].sources == (1,)
    out = tmp_path / "out" / "repaired" / "iter_0000003"
    md = pickle.loads((out / ".metadata").read_bytes())
    info = next(v for i, v in md.storage_data.items() if i.fqn == "common_state/shard_0_1")
    assert info.relative_path.startswith("__0_")
    assert (out / info.relative_path).read_bytes()[info.offset:info.offset + info.length] == replica
    os.remove(it / "checkfree" / "common_state_replica.bin")
    with pytest.raises(RecoveryError, match="common state .* no CheckFree replica"):
        repair_checkpoint(str(ckpt), output=str(tmp_path / "out2"))


def test_corrupt_torch_dist_metadata_is_reported(pp4, tmp_path):
    ckpt = _copy(pp4, "dist", tmp_path)
    (ckpt / "iter_0000003" / ".metadata").write_bytes(b"garbage")
    with pytest.raises(RecoveryError, match="unreadable"):
        repair_checkpoint(str(ckpt), output=str(tmp_path / "out"))


def test_first_torch_dist_stage_without_replica_is_refused(pp4, tmp_path):
    ckpt = _copy(pp4, "dist", tmp_path)
    it = ckpt / "iter_0000003"
    os.remove(it / "checkfree" / "edge_replica_stage_000_tp_00.pt")
    for name in os.listdir(it):
        if name.startswith("__0_"):
            os.remove(it / name)
    with pytest.raises(RecoveryError, match="word_embeddings.weight of stage 0 exists only in the lost shard"):
        repair_checkpoint(str(ckpt), output=str(tmp_path / "out"))


def test_corrupt_legacy_shard_is_rebuilt_in_place(pp4, tmp_path):
    ckpt = _copy(pp4, "legacy", tmp_path)
    path = ckpt / "iter_0000003" / "mp_rank_00_001" / "model_optim_rng.pt"
    path.write_bytes(b"\0" * 64)
    report = repair_checkpoint(str(ckpt), in_place=True)
    assert list(report.damaged) == [1] and (path.parent / "model_optim_rng.pt.corrupt").exists()
    assert report.rebuilds[0].sources == (0, 2)
