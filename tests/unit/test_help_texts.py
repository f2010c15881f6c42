"""Every ``--help`` a user can print (the ``checkfree`` command and its subcommands, the supervisor, the demo and
its training script, the Megatron hook's options) cites nothing outside the repository and nothing meant only
for the project's own tests."""
from __future__ import annotations

import argparse
import contextlib
import io
import re

import pytest

# What a user who has only the package (or a clone) cannot follow.
OUTSIDE = re.compile(r"shared notes|notes/|/work/|/root/|for demos and tests|issue \d+", re.IGNORECASE)


def help_of(main, *argv: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
        main([*argv, "--help"])
    assert done.value.code == 0
    return out.getvalue()


def helps() -> dict:
    from deepspeed_checkfree import cli, demo
    from deepspeed_checkfree.demo import train
    from deepspeed_checkfree.megatron.training_hook import add_args
    from deepspeed_checkfree.resilience import supervisor

    texts = {"checkfree": help_of(cli.main)}
    texts.update({f"checkfree {name}": help_of(cli.main, name) for name in cli.SUBCOMMAND_MODULES})
    texts["python -m deepspeed_checkfree.supervisor"] = help_of(supervisor.parse_args)
    texts["python -m deepspeed_checkfree.demo"] = help_of(demo.main)
    texts["the demo's training script"] = help_of(train.parse_args)
    texts["the Megatron hook's options"] = add_args(argparse.ArgumentParser(prog="pretrain_gpt.py")).format_help()
    return texts


def test_help_texts_cite_nothing_outside_the_repository():
    texts = helps()
    assert {"checkfree demo", "checkfree events", "checkfree experiment", "checkfree repair"} <= set(texts)
    cited = {name: OUTSIDE.findall(text) for name, text in texts.items() if OUTSIDE.search(text)}
    assert cited == {}


def test_the_supervisor_help_tells_users_which_pid_to_kill():
    from deepspeed_checkfree.resilience import supervisor
    text = " ".join(help_of(supervisor.parse_args).split())
    assert "rank<R>.pid holds the pid of rank R's active trainer" in text and "rank<R>.spare.pid" in text
