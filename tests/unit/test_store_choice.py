"""Which store a job uses: the supervisor's --store (or $CHECKFREE_STORE) and checkfree.store of the training
script's DeepSpeed config may each name it, never two different ones; a trainer on another store stops."""
from __future__ import annotations

import json

import pytest

from deepspeed_checkfree.errors import ConfigError
from deepspeed_checkfree.resilience.coordination import check_trainer_store, choose_store, configured_store

ETCD = "etcd://10.0.0.1:2379,10.0.0.2:2379"


def script_args(tmp_path, checkfree, form="space"):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 1, "checkfree": checkfree}))
    flag = ["--deepspeed_config", str(path)] if form == "space" else [f"--deepspeed_config={path}"]
    return ["--steps", "3", *flag]


@pytest.mark.parametrize("form", ["space", "equals"])
def test_the_config_key_is_read_from_the_scripts_deepspeed_config(tmp_path, form):
    args = script_args(tmp_path, {"enabled": True, "store": ETCD}, form)
    assert configured_store(args)[0] == ETCD
    assert choose_store(None, args) == ETCD


def test_the_flag_alone_the_same_url_in_both_and_neither(tmp_path):
    assert choose_store(ETCD, ["--steps", "3"]) == ETCD
    assert choose_store("etcd://10.0.0.1:2379,10.0.0.2", script_args(tmp_path, {"store": ETCD})) == ETCD
    assert choose_store(None, script_args(tmp_path, {"enabled": True})) is None
    assert choose_store(None, []) is None


def test_two_different_stores_are_refused_naming_both(tmp_path):
    with pytest.raises(ConfigError, match="every rank must use one store") as err:
        choose_store("etcd://10.9.9.9:2379", script_args(tmp_path, {"store": ETCD}))
    assert "10.9.9.9" in str(err.value) and "10.0.0.1" in str(err.value) and "ds.json" in str(err.value)


def test_a_malformed_url_or_value_is_a_clear_error_and_an_unreadable_config_is_the_trainers_to_report(tmp_path):
    with pytest.raises(ConfigError, match="etcd://"):
        choose_store(None, script_args(tmp_path, {"store": "http://10.0.0.1:2379"}))
    with pytest.raises(ConfigError, match="must be a URL string"):
        configured_store(script_args(tmp_path, {"store": 2379}))
    # An unreadable config names no store here: the trainer reports it and stops the job (exit code 78).
    assert configured_store(["--deepspeed_config", str(tmp_path / "missing.json")])[0] is None
    assert configured_store(script_args(tmp_path, "/nonexistent/checkfree.yaml"))[0] is None


def test_a_trainer_whose_config_names_another_store_than_its_supervisors_stops():
    check_trainer_store(None, {})
    check_trainer_store(ETCD, {"CHECKFREE_STORE": ETCD})
    with pytest.raises(ConfigError, match="the embedded store: start the supervisor with --store"):
        check_trainer_store(ETCD, {})
    with pytest.raises(ConfigError, match="uses etcd://10.9.9.9:2379"):
        check_trainer_store(ETCD, {"CHECKFREE_STORE": "etcd://10.9.9.9:2379"})
