"""Offline repair, the Megatron hook, ``checkfree --help`` and the demo's launcher load neither DeepSpeed nor
Megatron-LM's training loop: each import runs in a fresh interpreter (a module imported earlier by another test
would hide a heavy import)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("deepspeed", "megatron.training", "megatron.core")

CASES = {
    # Each format subpackage too, in case the dispatcher ever imports them lazily.
    "repair": "import deepspeed_checkfree.repair\nimport deepspeed_checkfree.repair.ds_pipeline, "
              "deepspeed_checkfree.repair.megatron_legacy, deepspeed_checkfree.repair.megatron_dist",
    "megatron": "import deepspeed_checkfree.megatron",
    "megatron_training_hook": "import deepspeed_checkfree.megatron.training_hook",
    "megatron_checkpoint": "import deepspeed_checkfree.megatron.checkpoint",
    "megatron_distopt": "import deepspeed_checkfree.megatron.distopt, deepspeed_checkfree.repair.megatron_distopt",
    "checkfree_repair_command": "from deepspeed_checkfree import cli\n"
                                "try:\n    cli.main(['repair', '--help'])\nexcept SystemExit as e:\n"
                                "    assert e.code == 0, e.code",
    "checkfree_help": "from deepspeed_checkfree import cli\n"
                      "try:\n    cli.main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0, e.code",
    # (the demo's ranks load DeepSpeed; the process that launches them does not)
    "checkfree_demo_command": "from deepspeed_checkfree import cli\nimport deepspeed_checkfree.demo.job\n"
                              "try:\n    cli.main(['demo', '--help'])\nexcept SystemExit as e:\n"
                              "    assert e.code == 0, e.code",
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_import_leaves_deepspeed_and_megatron_unloaded(name):
    probe = (f"import sys, json, contextlib, io\n"
             f"with contextlib.redirect_stdout(io.StringIO()):\n"
             + "".join(f"    {line}\n" for line in CASES[name].splitlines())
             + f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))\n")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert loaded == [], (f"{CASES[name]!r} imported {loaded}; these modules must import DeepSpeed and Megatron only "
                          f"inside the functions that need them")
