"""``checkfree repair`` on small synthetic checkpoints laid out exactly as Megatron (legacy) and DeepSpeed (pipeline)
write them: detection, the rebuild math, optimizer groups, and bad input. No process group, no Megatron import.
The same paths on checkpoints written by the real frameworks are in tests/megatron/.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil

import pytest
import torch

from deepspeed_checkfree import cli
from deepspeed_checkfree.errors import ConfigError, RecoveryError
from deepspeed_checkfree.events import read_events
from deepspeed_checkfree.repair import detect_format, repair_checkpoint
from deepspeed_checkfree.repair.megatron_common import stage_layer_counts, write_norms, write_replica

H, V, IT = 8, 16, 5
EPS = 1e-4


# ---------------------------------------------------------------------------------------------------------------
# Synthetic Megatron legacy checkpoint (iter_XXXXXXX/mp_rank_00_PPP/model_optim_rng.pt)
# ---------------------------------------------------------------------------------------------------------------


def _layer(g: torch.Generator, k: int) -> dict:
    p = f"decoder.layers.{k}."
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return {p + "input_layernorm.weight": r(H), p + "input_layernorm.bias": r(H),
            p + "self_attention.linear_qkv.weight": r(3 * H, H), p + "self_attention.linear_qkv.bias": r(3 * H),
            p + "self_attention.linear_qkv._extra_state": None,
            p + "mlp.linear_fc1.weight": r(4 * H, H), p + "mlp.linear_fc1.bias": r(4 * H),
            p + "mlp.linear_fc2.weight": r(H, 4 * H), p + "mlp.linear_fc2._extra_state": None}


def _groups(model: dict) -> list:
    names = [(k, v) for k, v in model.items() if isinstance(v, torch.Tensor)]
    decay = [k for k, v in names if not (k.endswith(".bias") or v.dim() == 1)]
    base = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "lr_mult": 1.0, "is_expert_parallel": False,
            "is_decoupled_lr": False, "default_config": True}
    return [{**base, "wd_mult": 1.0, "weight_decay": 0.01, "params": list(range(len(decay)))},
            {**base, "wd_mult": 0.0, "weight_decay": 0.0, "params": list(range(len(decay), len(names)))}]


def make_megatron(root, num_stages=4, layers=2, norms=(1.0, 2.0, 3.0, 0.5), replicas=True, sidecar=True,
                  position="rope", seed=0) -> dict:
    """Write a legacy checkpoint; returns each stage's model state dict."""
    g = torch.Generator().manual_seed(seed)
    args = argparse.Namespace(num_layers=num_stages * layers, pipeline_model_parallel_size=num_stages,
                              tensor_model_parallel_size=1, untie_embeddings_and_output_weights=False,
                              position_embedding_type=position, use_distributed_optimizer=False,
                              virtual_pipeline_model_parallel_size=None, hidden_size=H)
    it_dir = os.path.join(root, f"iter_{IT:07d}")
    emb = torch.randn(V, H, generator=g)
    models = {}
    for s in range(num_stages):
        model = {}
        if s == 0:
            model["embedding.word_embeddings.weight"] = emb.clone()
            if position == "learned_absolute":
                model["embedding.position_embeddings.weight"] = torch.randn(32, H, generator=g)
        for k in range(layers):
            model.update(_layer(g, k))
        if s == num_stages - 1:
            model.update({"decoder.final_layernorm.weight": torch.randn(H, generator=g),
                          "decoder.final_layernorm.bias": torch.randn(H, generator=g),
                          "output_layer.weight": emb.clone()})
        models[s] = model
        n = sum(isinstance(v, torch.Tensor) for v in model.values())
        state = {i: {"step": torch.tensor(3.0), "exp_avg": torch.ones(1), "exp_avg_sq": torch.ones(1)}
                 for i in range(n)}
        path = os.path.join(it_dir, f"mp_rank_00_{s:03d}", "model_optim_rng.pt")
        os.makedirs(os.path.dirname(path))
        torch.save({"args": args, "checkpoint_version": 3.0, "iteration": IT, "model": model,
                    "optimizer": {"state": state, "param_groups": _groups(model)},
                    "opt_param_scheduler": {"num_steps": 40}, "rng_state": [{"torch_rng_state": torch.get_rng_state()}],
                    "num_floating_point_operations_so_far": 0}, path)
    with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write(str(IT))
    if sidecar:
        for s in range(num_stages):
            write_norms(it_dir, s, num_stages, IT, dict(enumerate(norms[:num_stages])))
    if replicas:
        write_replica(it_dir, 0, 0, {k: v for k, v in models[0].items() if k.startswith("embedding.")})
        last = num_stages - 1
        write_replica(it_dir, last, 0, {k: v for k, v in models[last].items() if not k.startswith("decoder.layers")})
    return models


def shard(root, s, it_dir=None):
    return os.path.join(it_dir or os.path.join(root, f"iter_{IT:07d}"), f"mp_rank_00_{s:03d}", "model_optim_rng.pt")


def lose(root, s):
    shutil.rmtree(os.path.dirname(shard(root, s)))


@pytest.fixture
def mega(tmp_path):
    root = str(tmp_path / "ckpt")
    return root, make_megatron(root)


def test_middle_stage_is_the_gradnorm_weighted_average_of_its_neighbours(mega, tmp_path):
    root, models = mega
    lose(root, 2)
    out = str(tmp_path / "out")
    events = str(tmp_path / "events.jsonl")
    report = repair_checkpoint(root, output=out, events_file=events)
    assert report.format == "megatron_legacy" and list(report.damaged) == [2]
    (r,) = report.rebuilds
    assert r.stage == 2 and r.strategy == "gradnorm_average" and r.sources == (1, 3)
    w1, w3 = 2.0 + EPS, 0.5 + EPS
    assert r.weights == pytest.approx((w1 / (w1 + w3), w3 / (w1 + w3)))
    rebuilt = torch.load(shard(out, 2), weights_only=False)
    for key, value in models[1].items():
        if isinstance(value, torch.Tensor):
            expected = (value * w1 + models[3][key] * w3) / (w1 + w3)
            torch.testing.assert_close(rebuilt["model"][key], expected, rtol=0, atol=1e-6)
        else:
            assert rebuilt["model"][key] is None
    assert set(rebuilt["model"]) == set(models[1])
    # Fresh optimizer state with the groups (and sizes) a middle stage has; the rest of the shard carried over.
    original_groups = _groups(models[1])
    assert rebuilt["optimizer"]["state"] == {}
    sizes = [len(g["params"]) for g in rebuilt["optimizer"]["param_groups"]]
    assert sizes == [len(g["params"]) for g in original_groups]
    assert rebuilt["iteration"] == IT and rebuilt["opt_param_scheduler"] == {"num_steps": 40}
    # The other stages are copied untouched, and the output is a loadable save directory.
    for s in (0, 1, 3):
        with open(shard(root, s), "rb") as a, open(shard(out, s), "rb") as b:
            assert a.read() == b.read()
    assert open(os.path.join(out, "latest_checkpointed_iteration.txt")).read() == str(IT)
    kinds = [e["event"] for e in read_events(events)]
    assert kinds == ["detection", "recovery"]
    # Only the two neighbours' tensors are read, not the whole model.
    assert report.bytes_read < 0.6 * report.checkpoint_bytes


def test_first_stage_is_a_copy_of_stage_1_plus_its_replicated_embedding(mega, tmp_path):
    root, models = mega
    lose(root, 0)
    out = str(tmp_path / "out")
    (r,) = repair_checkpoint(root, output=out).rebuilds
    assert (r.strategy, r.sources, r.weights) == ("copy", (1,), (1.0,))
    assert "replica kept by stage 1" in r.note
    rebuilt = torch.load(shard(out, 0), weights_only=False)
    assert set(rebuilt["model"]) == set(models[0])
    for key, value in models[0].items():
        if value is None:
            assert rebuilt["model"][key] is None
        elif key.startswith("decoder.layers."):
            assert torch.equal(rebuilt["model"][key], models[1][key])
        else:
            assert torch.equal(rebuilt["model"][key], value)
    # Group sizes follow Megatron's rule for the first stage's own parameters (embedding included).
    assert [len(g["params"]) for g in rebuilt["optimizer"]["param_groups"]] == \
        [len(g["params"]) for g in _groups(models[0])]


def test_last_stage_gets_its_final_norm_and_head_from_the_replica(mega, tmp_path):
    root, models = mega
    lose(root, 3)
    out = str(tmp_path / "out")
    repair_checkpoint(root, output=out)
    rebuilt = torch.load(shard(out, 3), weights_only=False)["model"]
    assert set(rebuilt) == set(models[3])
    for key in ("decoder.final_layernorm.weight", "decoder.final_layernorm.bias", "output_layer.weight"):
        assert torch.equal(rebuilt[key], models[3][key])
    key = "decoder.layers.1.mlp.linear_fc1.weight"
    assert torch.equal(rebuilt[key], models[2][key])


def test_first_stage_without_replica_takes_the_tied_output_layer(tmp_path):
    root = str(tmp_path / "ckpt")
    models = make_megatron(root, replicas=False)
    lose(root, 0)
    (r,) = repair_checkpoint(root, output=str(tmp_path / "out")).rebuilds
    assert "tied copy" in r.note
    rebuilt = torch.load(shard(str(tmp_path / "out"), 0), weights_only=False)["model"]
    assert torch.equal(rebuilt["embedding.word_embeddings.weight"], models[0]["embedding.word_embeddings.weight"])


def test_lost_edge_parameters_that_exist_nowhere_else_are_refused(tmp_path):
    root = str(tmp_path / "ckpt")
    make_megatron(root, replicas=False, position="learned_absolute")
    lose(root, 0)
    with pytest.raises(RecoveryError, match="learned position embeddings.*checkfree hook"):
        repair_checkpoint(root, output=str(tmp_path / "out"))
    root2 = str(tmp_path / "ckpt2")
    make_megatron(root2, replicas=False)
    lose(root2, 3)
    with pytest.raises(RecoveryError, match="final layer norm"):
        repair_checkpoint(root2, output=str(tmp_path / "out2"))


def test_without_recorded_norms_the_average_is_uniform_with_a_warning(tmp_path):
    root = str(tmp_path / "ckpt")
    make_megatron(root, sidecar=False)
    lose(root, 1)
    report = repair_checkpoint(root, output=str(tmp_path / "out"))
    assert report.rebuilds[0].weights == (0.5, 0.5)
    assert report.rebuilds[0].fallback and any("no gradient norms were recorded" in w for w in report.warnings)


def test_two_stage_pipeline_copies_the_other_stage_and_says_why(tmp_path):
    root = str(tmp_path / "ckpt")
    models = make_megatron(root, num_stages=2, norms=(1.0, 2.0))
    lose(root, 1)
    (r,) = repair_checkpoint(root, output=str(tmp_path / "out")).rebuilds
    assert (r.strategy, r.sources) == ("copy", (0,))
    assert "2-stage pipeline" in r.note and ">= 3 stages" in r.note
    rebuilt = torch.load(shard(str(tmp_path / "out"), 1), weights_only=False)["model"]
    key = "decoder.layers.0.mlp.linear_fc1.weight"
    assert torch.equal(rebuilt[key], models[0][key])


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_a_corrupt_shard_is_detected_and_set_aside_when_repaired_in_place(mega, damage):
    root, models = mega
    path = shard(root, 1)
    if damage == "truncate":
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])
    else:
        open(path, "wb").write(b"not a checkpoint")
    report = repair_checkpoint(root, in_place=True)
    assert list(report.damaged) == [1] and "unreadable" in report.damaged[1]
    assert os.path.exists(path + ".corrupt")
    rebuilt = torch.load(path, weights_only=False)["model"]
    assert set(rebuilt) == set(models[1])


def test_a_stage_named_with_stage_is_rebuilt_even_if_it_looks_intact(mega, tmp_path):
    root, _ = mega
    report = repair_checkpoint(root, output=str(tmp_path / "out"), stages=[2])
    assert report.damaged == {2: "named with --stage"} and report.rebuilds[0].sources == (1, 3)


def test_dry_run_writes_nothing(mega, tmp_path):
    root, _ = mega
    lose(root, 2)
    report = repair_checkpoint(root, dry_run=True)
    assert report.dry_run and report.rebuilds[0].stage == 2 and not os.path.exists(shard(root, 2))


def test_two_adjacent_missing_stages_are_refused(mega, tmp_path):
    root, _ = mega
    lose(root, 1)
    lose(root, 2)
    with pytest.raises(RecoveryError, match=r"stages 1 and 2 are both damaged.*adjacent"):
        repair_checkpoint(root, output=str(tmp_path / "out"))


def test_non_adjacent_missing_stages_are_both_rebuilt(tmp_path):
    root = str(tmp_path / "ckpt")
    make_megatron(root, num_stages=5, norms=(1.0, 1.0, 1.0, 1.0, 1.0))
    lose(root, 1)
    lose(root, 3)
    report = repair_checkpoint(root, output=str(tmp_path / "out"))
    assert [(r.stage, r.sources) for r in report.rebuilds] == [(1, (0, 2)), (3, (2, 4))]


def test_neighbours_with_mismatched_shapes_are_refused_with_the_parameters_named(mega, tmp_path):
    root, models = mega
    path = shard(root, 3)
    state = torch.load(path, weights_only=False)
    state["model"]["decoder.layers.0.mlp.linear_fc1.weight"] = torch.zeros(5 * H, H)
    torch.save(state, path)
    lose(root, 2)
    with pytest.raises(RecoveryError, match=r"layer 0 .*stage 3.*mlp\.linear_fc1\.weight"):
        repair_checkpoint(root, output=str(tmp_path / "out"))


def test_output_must_be_new_and_exactly_one_destination_given(mega, tmp_path):
    root, _ = mega
    lose(root, 2)
    with pytest.raises(ConfigError, match="--output DIR .* or --in-place"):
        repair_checkpoint(root)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    with pytest.raises(ConfigError, match="not an empty directory"):
        repair_checkpoint(root, output=str(busy))
    with pytest.raises(ConfigError, match="does not exist: the checkpoint has 4 pipeline stages"):
        repair_checkpoint(root, output=str(tmp_path / "o"), stages=[7])


def test_stage_layer_counts_follow_megatrons_uneven_first_and_last_rule():
    assert stage_layer_counts(8, 4) == [2, 2, 2, 2]
    assert stage_layer_counts(10, 4, first=1, last=1) == [1, 4, 4, 1]
    assert stage_layer_counts(7, 3, last=1) == [3, 3, 1]
    with pytest.raises(RecoveryError, match="do not split evenly"):
        stage_layer_counts(7, 4)


# ---------------------------------------------------------------------------------------------------------------
# Console command
# ---------------------------------------------------------------------------------------------------------------


def test_cli_prints_stage_sources_and_weights(mega, tmp_path, capsys):
    root, _ = mega
    lose(root, 2)
    assert cli.main(["repair", root, "-o", str(tmp_path / "out")]) == 0
    text = capsys.readouterr().out
    assert "stage 2: mp_rank_00_002/model_optim_rng.pt missing" in text
    assert "rebuilt stage 2 by gradnorm_average from stage(s) [1, 3]; weights {1: 0.8000, 3: 0.2000}" in text


def test_cli_json_report(mega, tmp_path, capsys):
    root, _ = mega
    lose(root, 1)
    assert cli.main(["repair", root, "-o", str(tmp_path / "out"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rebuilds"][0]["sources"] == [0, 2] and report["format"] == "megatron_legacy"


def test_cli_reports_nothing_to_do_on_an_intact_checkpoint(mega, capsys):
    root, _ = mega
    assert cli.main(["repair", root, "--in-place"]) == 0
    assert "Nothing to do" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["not-a-dir", "wrong-dir", "adjacent"])
def test_cli_exits_nonzero_with_a_clear_message(mega, tmp_path, capsys, case):
    root, _ = mega
    if case == "not-a-dir":
        target, expect = str(tmp_path / "nope"), "is not a directory"
    elif case == "wrong-dir":
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "notes.txt").write_text("hi")
        target, expect = str(tmp_path / "empty"), "is not a checkpoint this tool knows"
    else:
        lose(root, 2)
        lose(root, 3)
        target, expect = root, "adjacent"
    assert cli.main(["repair", target, "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("checkfree repair: error:") and expect in err


# ---------------------------------------------------------------------------------------------------------------
# Synthetic DeepSpeed pipeline checkpoint (tag/layer_XX-model_states.pt + tag/mp_rank_SS_model_states.pt)
# ---------------------------------------------------------------------------------------------------------------


def _block(g):
    return {"ln1.weight": torch.randn(H, generator=g), "qkv.weight": torch.randn(3 * H, H, generator=g),
            "fc.weight": torch.randn(4 * H, H, generator=g)}


def make_deepspeed(root, mode="checkfree_plus", record=True, norms=(1.0, 2.0, 3.0, 4.0)) -> dict:
    """4 stages; plus: [E0 B B | E1 B B | B B H2 | B B H3]; plain: [E B B | B B | B B | B B H]."""
    g = torch.Generator().manual_seed(1)
    emb = {"layer.tok.weight": torch.randn(V, H, generator=g)}
    head = {"layer.lm.weight": torch.randn(V, H, generator=g)}
    if mode == "checkfree_plus":
        stages = [["E", "B", "B"], ["E", "B", "B"], ["B", "B", "H"], ["B", "B", "H"]]
    else:
        stages = [["E", "B", "B"], ["B", "B"], ["B", "B"], ["B", "B", "H"]]
        emb = {"tok.weight": emb["layer.tok.weight"]}
        head = {"lm.weight": head["layer.lm.weight"]}
    tag = os.path.join(root, "t3")
    os.makedirs(tag)
    layers, idx = {}, 0
    for s, kinds in enumerate(stages):
        start = idx
        n_params = 0
        for kind in kinds:
            state = {"E": emb, "H": head}.get(kind) or _block(g)
            layers[idx] = {k: v.clone() for k, v in state.items()}
            torch.save(layers[idx], os.path.join(tag, f"layer_{idx:02d}-model_states.pt"))
            n_params += len(state)
            idx += 1
        mp = {"module": None, "optimizer": {"state": {i: {"exp_avg": torch.ones(1)} for i in range(n_params)},
                                            "param_groups": [{"lr": 1e-3, "weight_decay": 0.01,
                                                              "params": list(range(n_params))}]},
              "global_steps": 3, "lr_scheduler": None, "mp_world_size": 4, "dp_world_size": 1,
              "checkpoint_parallel_dimensions": {"pp_degree": 4, "tp_degree": 1},
              "ds_config": {"checkfree": {"enabled": True, "mode": mode}},
              "checkfree_stage_grad_norm": norms[s]}
        if record:
            mp["checkfree_stage_layers"] = [start, idx]
        torch.save(mp, os.path.join(tag, f"mp_rank_{s:02d}_model_states.pt"))
    with open(os.path.join(root, "latest"), "w") as f:
        f.write("t3")
    return layers


def lose_ds(root, stage, layer_ids):
    tag = os.path.join(root, "t3")
    os.remove(os.path.join(tag, f"mp_rank_{stage:02d}_model_states.pt"))
    for i in layer_ids:
        os.remove(os.path.join(tag, f"layer_{i:02d}-model_states.pt"))


@pytest.mark.parametrize("record", [True, False], ids=["recorded-layers", "inferred-layers"])
def test_deepspeed_first_stage_is_copied_from_stage_1_under_checkfree_plus(tmp_path, record):
    root = str(tmp_path / "ds")
    layers = make_deepspeed(root, record=record)
    lose_ds(root, 0, [0, 1, 2])
    assert detect_format(root) == "deepspeed"
    out = str(tmp_path / "out")
    (r,) = repair_checkpoint(root, output=out).rebuilds
    assert (r.stage, r.strategy, r.sources) == (0, "copy", (1,))
    for tgt, src in ((0, 3), (1, 4), (2, 5)):
        rebuilt = torch.load(os.path.join(out, "t3", f"layer_{tgt:02d}-model_states.pt"))
        assert rebuilt.keys() == layers[src].keys()
        assert all(torch.equal(rebuilt[k], layers[src][k]) for k in rebuilt)
    mp = torch.load(os.path.join(out, "t3", "mp_rank_00_model_states.pt"), weights_only=False)
    assert mp["optimizer"]["state"] == {} and len(mp["optimizer"]["param_groups"][0]["params"]) == 7
    assert mp["checkfree_stage_grad_norm"] is None and mp["global_steps"] == 3
    assert open(os.path.join(out, "latest")).read() == "t3"


def test_deepspeed_last_stage_mirrors_stage_p_minus_2_when_all_its_files_are_gone(tmp_path):
    root = str(tmp_path / "ds")
    layers = make_deepspeed(root, record=False)
    lose_ds(root, 3, [9, 10, 11])
    out = str(tmp_path / "out")
    (r,) = repair_checkpoint(root, output=out).rebuilds
    assert r.sources == (2,)
    for tgt, src in ((9, 6), (10, 7), (11, 8)):
        rebuilt = torch.load(os.path.join(out, "t3", f"layer_{tgt:02d}-model_states.pt"))
        assert all(torch.equal(rebuilt[k], layers[src][k]) for k in layers[src])


def test_deepspeed_middle_stage_blends_the_blocks_of_both_neighbours(tmp_path):
    root = str(tmp_path / "ds")
    layers = make_deepspeed(root, mode="checkfree", record=False)
    lose_ds(root, 2, [5, 6])
    out = str(tmp_path / "out")
    (r,) = repair_checkpoint(root, output=out).rebuilds
    w1, w3 = 2.0 + EPS, 4.0 + EPS
    assert r.sources == (1, 3) and r.weights == pytest.approx((w1 / (w1 + w3), w3 / (w1 + w3)))
    for tgt, (a, b) in ((5, (3, 7)), (6, (4, 8))):
        rebuilt = torch.load(os.path.join(out, "t3", f"layer_{tgt:02d}-model_states.pt"))
        for k in rebuilt:
            torch.testing.assert_close(rebuilt[k], (layers[a][k] * w1 + layers[b][k] * w3) / (w1 + w3),
                                       rtol=0, atol=1e-6)


def test_deepspeed_first_stage_under_plain_checkfree_is_refused(tmp_path):
    root = str(tmp_path / "ds")
    make_deepspeed(root, mode="checkfree")
    lose_ds(root, 0, [0, 1, 2])
    with pytest.raises(RecoveryError, match="checkfree_plus.*mode='checkfree'"):
        repair_checkpoint(root, output=str(tmp_path / "out"))


def test_deepspeed_stage_1_under_checkfree_plus_is_a_copy_of_stage_0_with_the_embedding_replica(tmp_path):
    root = str(tmp_path / "ds")
    layers = make_deepspeed(root, record=False)
    lose_ds(root, 1, [3, 4, 5])
    out = str(tmp_path / "out")
    (r,) = repair_checkpoint(root, output=out).rebuilds
    assert (r.strategy, r.sources) == ("copy", (0,))
    for tgt, src in ((3, 0), (4, 1), (5, 2)):
        rebuilt = torch.load(os.path.join(out, "t3", f"layer_{tgt:02d}-model_states.pt"))
        assert rebuilt.keys() == layers[src].keys() and all(torch.equal(rebuilt[k], layers[src][k]) for k in rebuilt)


def test_version_0_1_repair_module_paths_resolve_to_the_format_subpackages():
    import importlib
    import warnings

    from deepspeed_checkfree.repair import ds_pipeline, megatron_common, megatron_dist, megatron_legacy

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old_ds = importlib.import_module("deepspeed_checkfree.repair_deepspeed")
        old_legacy = importlib.import_module("deepspeed_checkfree.repair_megatron")
        old_dist = importlib.import_module("deepspeed_checkfree.repair_megatron_dist")
    assert (old_ds, old_legacy, old_dist) == (ds_pipeline, megatron_legacy, megatron_dist)
    assert old_ds.checkpoint_client_state is ds_pipeline.files.checkpoint_client_state
    # repair_megatron held the layout and sidecar helpers as well as the legacy reader.
    assert old_legacy.write_norms is megatron_common.write_norms
    assert old_legacy.MegatronLayout is megatron_common.MegatronLayout
    assert old_legacy.MegatronLegacyCheckpoint.__module__ == "deepspeed_checkfree.repair.megatron_legacy.checkpoint"
    assert old_dist.MegatronDistCheckpoint.__module__ == "deepspeed_checkfree.repair.megatron_dist.checkpoint"
