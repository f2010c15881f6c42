"""The Megatron-LM hook's plumbing against a stand-in ``megatron.training`` (Megatron-LM is not on PyPI, so CI cannot
import it): options, provider composition, which functions get wrapped and that every argument passes through.
The hook's collective parts run against real megatron-core in tests/megatron/.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import types

import pytest

from deepspeed_checkfree.megatron import training_hook
from deepspeed_checkfree.megatron.run import main as run_main


def test_checkfree_options_are_added_once_and_compose_with_another_provider():
    def other(parser):
        parser.add_argument("--modelopt-thing", type=int, default=3)
        return parser

    parser = argparse.ArgumentParser()
    provider = training_hook.extra_args_provider(other)
    parser = provider(parser)
    parser = training_hook.add_args(parser)  # idempotent: the runner and a patched script may both add them
    args = parser.parse_args(["--checkfree-strategy", "uniform_average", "--checkfree-lr-boost", "1.2"])
    assert (args.modelopt_thing, args.checkfree_strategy, args.checkfree_lr_boost) == (3, "uniform_average", 1.2)
    assert args.checkfree_repair == "auto" and not args.checkfree_no_replicas
    with pytest.raises(SystemExit):
        parser.parse_args(["--checkfree-strategy", "ours-grad-avg"])


@pytest.fixture
def fake_megatron(monkeypatch):
    """A stand-in for megatron.training with the signatures of Megatron-LM core_v0.16.1."""
    calls = []
    margs = argparse.Namespace(save=None, load="/nowhere", checkfree_repair="off", checkfree_lr_boost=1.1)
    T = types.ModuleType("megatron.training.training")

    def train_step(forward_step_func, data_iterator, model, optimizer, opt_param_scheduler, config,
                   forward_backward_func, iteration=None):
        calls.append(("train_step", iteration))
        return "stepped"

    def save_checkpoint(iteration, model, optimizer, opt_param_scheduler, num_floating_point_operations_so_far,
                        checkpointing_context=None, non_persistent_ckpt=False, **kwargs):
        calls.append(("save", iteration, non_persistent_ckpt))

    def load_checkpoint(ddp_model, optimizer, opt_param_scheduler, load_arg="load", strict=True,
                        checkpointing_context=None, skip_load_to_model_and_opt=False):
        calls.append(("load", load_arg, skip_load_to_model_and_opt))
        return 7, 0

    def pretrain(train_valid_test_dataset_provider, model_provider, model_type, forward_step_func,
                 process_non_loss_data_func=None, extra_args_provider=None, args_defaults={}, **kwargs):
        parser = extra_args_provider(argparse.ArgumentParser())
        calls.append(("pretrain", sorted(a.dest for a in parser._actions if a.dest.startswith("checkfree"))))

    T.train_step, T.save_checkpoint, T.load_checkpoint, T.pretrain = train_step, save_checkpoint, load_checkpoint, \
        pretrain
    MT = types.ModuleType("megatron.training")
    MT.training, MT.pretrain, MT.get_args = T, pretrain, lambda: margs
    try:
        importlib.import_module("megatron")
    except ImportError:
        monkeypatch.setitem(sys.modules, "megatron", types.ModuleType("megatron"))
    monkeypatch.setitem(sys.modules, "megatron.training", MT)
    monkeypatch.setitem(sys.modules, "megatron.training.training", T)
    # /nowhere holds no checkpoint, so the hook has no directory to read CheckFree's records from.
    monkeypatch.setattr(training_hook, "state_after_load", lambda *a, **k: calls.append(("after_load",) + a[:2]))
    return T, MT, calls


def test_install_wraps_the_names_pretrain_calls_and_passes_every_argument(fake_megatron):
    T, MT, calls = fake_megatron
    state = training_hook.install()
    assert training_hook.install() is state  # idempotent
    assert T.train_step("f", "it", "model", None, "sched", "cfg", "fb", iteration=5) == "stepped"
    T.save_checkpoint(10, "model", None, None, 0, non_persistent_ckpt=True)
    assert T.load_checkpoint("model", None, None, checkpointing_context={}, skip_load_to_model_and_opt=True) == (7, 0)
    MT.pretrain("data", "model", "type", "fwd", extra_args_provider=None)
    assert calls == [("train_step", 5), ("save", 10, True), ("load", "load", True), ("after_load", None, 7),
                     ("pretrain", ["checkfree_events_file", "checkfree_lr_boost", "checkfree_no_replicas",
                                   "checkfree_no_value_check", "checkfree_repair", "checkfree_strategy"])]


def test_runner_runs_the_script_as_main_with_its_directory_on_the_path(fake_megatron, tmp_path, monkeypatch):
    _, _, calls = fake_megatron
    (tmp_path / "helper_mod.py").write_text("VALUE = 41\n")
    script = tmp_path / "pretrain_fake.py"
    script.write_text("import sys\nfrom helper_mod import VALUE\nfrom megatron.training import pretrain\n"
                      "if __name__ == '__main__':\n    sys.modules['helper_mod'].SEEN = (VALUE + 1, sys.argv[1:])\n"
                      "    pretrain('d', 'm', 't', 'f')\n")
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    run_main([str(script), "--num-layers", "4"])
    assert sys.modules["helper_mod"].SEEN == (42, ["--num-layers", "4"])
    assert calls[-1][0] == "pretrain" and "checkfree_strategy" in calls[-1][1]
    monkeypatch.delitem(sys.modules, "helper_mod")


def test_runner_without_a_script_says_how_to_use_it(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_main(["/no/such/pretrain_gpt.py"])
    assert exit_info.value.code == 2 and "is not a file" in capsys.readouterr().err


def test_a_rebuilt_stage_steps_with_the_boosted_lr_and_the_scheduler_keeps_the_base_lr():
    import torch

    from deepspeed_checkfree.megatron.checkpoint import CheckFreeState, boosted_step

    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=0.5)
    seen = []
    state = CheckFreeState(lr_scale=1.2)
    p.grad = torch.ones(2)
    boosted_step(opt, lambda: (seen.append(opt.param_groups[0]["lr"]), opt.step()), state)
    assert seen == [pytest.approx(0.6)] and opt.param_groups[0]["lr"] == 0.5
    assert torch.allclose(p.detach(), torch.full((2,), -0.6))
