"""The public surface after the move into layer packages: the engine registers with DeepSpeed whichever is imported
first, and every 0.1 import path and command still works (each in a fresh interpreter, so no earlier import helps)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from deepspeed_checkfree._moved import MOVED


def run_python(code: str, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *(("-c", code) if code else ()), *args], capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("order", ["checkfree_first", "deepspeed_first"])
def test_importing_the_package_registers_the_engine_selector_before_or_after_deepspeed(order):
    imports = ["import deepspeed_checkfree", "import deepspeed"]
    code = "\n".join(imports if order == "checkfree_first" else imports[::-1]) + (
        "\nfrom deepspeed_checkfree.pipe.selector import PipelineEngineSelector"
        "\nassert deepspeed.PipelineEngine is PipelineEngineSelector, deepspeed.PipelineEngine"
        "\nfrom deepspeed_checkfree import CheckFreeEngine"
        "\nassert issubclass(CheckFreeEngine, deepspeed.PipelineEngine)")
    run_python(code)


def test_old_module_paths_are_the_moved_modules_themselves():
    code = ("import importlib, warnings\n"
            "warnings.simplefilter('ignore', DeprecationWarning)\n"
            f"moved = {MOVED!r}\n"
            "for old, new in moved.items():\n"
            "    assert importlib.import_module(old) is importlib.import_module(new), old\n"
            "from deepspeed_checkfree.engine import CheckFreeEngine\n"
            "from deepspeed_checkfree.pipe.engine import CheckFreeEngine as New\n"
            "assert CheckFreeEngine is New\n"
            "from deepspeed_checkfree.plus import checkfree_plus_module\n"
            "from deepspeed_checkfree.supervisor import Supervisor, main\n"
            "from deepspeed_checkfree.resilience.supervisor import Supervisor as S2\n"
            "assert Supervisor is S2\n")
    run_python(code)


def test_an_old_path_warns_with_its_new_home():
    out = run_python("import warnings\n"
                     "with warnings.catch_warnings(record=True) as caught:\n"
                     "    warnings.simplefilter('always')\n"
                     "    import deepspeed_checkfree.recovery\n"
                     "print([str(w.message) for w in caught if w.category is DeprecationWarning])").stdout
    assert "deepspeed_checkfree.recovery moved to deepspeed_checkfree.core.recovery" in out


def test_supervisor_command_and_cli_still_run():
    assert "--join" in run_python("", "-m", "deepspeed_checkfree.supervisor", "--help").stdout
    assert "repair" in run_python("", "-m", "deepspeed_checkfree.cli", "--help").stdout
