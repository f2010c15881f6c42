"""The "checkfree" config section: defaults, both carriers, and errors that name the rule, the values and the fix."""
from __future__ import annotations

import json

import pytest

from deepspeed_checkfree.core.config import CheckFreeConfig, load_config, parse_section
from deepspeed_checkfree.errors import ConfigError


def test_absent_section_is_disabled_with_paper_defaults():
    cfg = CheckFreeConfig.from_ds_config({"train_batch_size": 8})
    assert not cfg.enabled
    assert (cfg.mode, cfg.strategy, cfg.lr_boost, cfg.eps, cfg.norm) == \
        ("checkfree", "gradnorm_average", 1.1, 1e-4, "plain")
    assert cfg.per_stage_clip is None and cfg.failure_injection.at == []


def test_unknown_key_gets_a_did_you_mean_hint():
    with pytest.raises(ConfigError, match=r"unknown key 'lr_bost'.*Did you mean 'lr_boost'"):
        parse_section({"enabled": True, "lr_bost": 1.2})


def test_unknown_nested_key_names_its_location():
    with pytest.raises(ConfigError, match=r"failure_injection\.at\.0: unknown key 'stag'.*'stage'"):
        parse_section({"failure_injection": {"at": [{"stag": 1, "step": 2}]}})


@pytest.mark.parametrize("section,pattern", [
    ({"lr_boost": 0}, r"checkfree\.lr_boost: .*greater than 0 \(got 0\)"),
    ({"mode": "plus"}, r"checkfree\.mode: .*'checkfree' or 'checkfree_plus' \(got 'plus'\)"),
    ({"strategy": "average"}, r"checkfree\.strategy"),
    ({"eps": -1}, r"checkfree\.eps"),
    ({"failure_injection": {"probability": 1.5}}, r"probability"),
])
def test_invalid_values_are_rejected_with_the_value(section, pattern):
    with pytest.raises(ConfigError, match=pattern):
        parse_section(section)


def test_section_must_be_a_mapping():
    with pytest.raises(ConfigError, match="must be a mapping"):
        CheckFreeConfig.from_ds_config({"checkfree": True})


def test_fewer_than_three_stages_is_rejected_with_the_fix():
    cfg = parse_section({"enabled": True})
    with pytest.raises(ConfigError, match=r"num_stages >= 3; the topology has num_stages=2.*enabled=false"):
        cfg.validate_for(2)
    parse_section({"enabled": False}).validate_for(1)  # disabled: nothing to check


def test_checkfree_plus_needs_four_stages():
    with pytest.raises(ConfigError, match="num_stages >= 4"):
        parse_section({"enabled": True, "mode": "checkfree_plus"}).validate_for(3)


def test_failure_plan_naming_a_missing_stage_is_rejected():
    cfg = parse_section({"enabled": True, "failure_injection": {"at": [{"stage": 4, "step": 1}]}})
    with pytest.raises(ConfigError, match=r"at\[0\] names stage 4.*stages 0\.\.3"):
        cfg.validate_for(4)
    cfg = parse_section({"enabled": True, "failure_injection": {"stages": [9], "probability": 0.1}})
    with pytest.raises(ConfigError, match="lists stage 9"):
        cfg.validate_for(4)


def test_failure_plan_losing_an_edge_stage_needs_checkfree_plus():
    cfg = parse_section({"enabled": True, "failure_injection": {"at": [{"stage": 0, "step": 1}]}})
    with pytest.raises(ConfigError, match="checkfree_plus"):
        cfg.validate_for(4)
    parse_section({"enabled": True, "mode": "checkfree_plus",
                   "failure_injection": {"at": [{"stage": 0, "step": 1}]}}).validate_for(4)


def test_json_and_yaml_carriers_parse_to_the_same_config(tmp_path):
    section = {"enabled": True, "lr_boost": 1.2, "failure_injection": {"at": [{"stage": 2, "step": 5}]}}
    (tmp_path / "ds.json").write_text(json.dumps({"train_batch_size": 8, "checkfree": section}))
    (tmp_path / "cf.yaml").write_text("enabled: true\nlr_boost: 1.2\nfailure_injection:\n  at:\n"
                                      "    - {stage: 2, step: 5}\n")
    assert load_config(tmp_path / "ds.json") == load_config(tmp_path / "cf.yaml") == parse_section(section)


def test_unreadable_or_unparsable_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_config(tmp_path / "bad.json")


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_ds_config_can_name_a_yaml_file_for_the_section(tmp_path):
    (tmp_path / "cf.yaml").write_text("enabled: true\nstrategy: copy\n")
    cfg = CheckFreeConfig.from_ds_config({"checkfree": str(tmp_path / "cf.yaml")})
    assert cfg.enabled and cfg.strategy == "copy"
    with pytest.raises(ConfigError, match="cannot read"):
        CheckFreeConfig.from_ds_config({"checkfree": str(tmp_path / "nope.yaml")})


def test_plus_recompute_edges_takes_true_false_or_all_under_checkfree_plus_only():
    plus = {"enabled": True, "mode": "checkfree_plus"}
    assert parse_section(plus).plus_recompute_edges is False
    assert parse_section({**plus, "plus_recompute_edges": True}).plus_recompute_edges is True
    assert parse_section({**plus, "plus_recompute_edges": "all"}).plus_recompute_edges == "all"
    with pytest.raises(ConfigError, match=r"checkfree\.plus_recompute_edges: must be true, false or 'all'.*"
                                          r"\(got 'yes'\)"):
        parse_section({**plus, "plus_recompute_edges": "yes"})
    with pytest.raises(ConfigError, match=r"plus_recompute_edges=True .* mode='checkfree'\. Set "
                                          r"mode='checkfree_plus' or remove plus_recompute_edges"):
        parse_section({"enabled": True, "plus_recompute_edges": True})
