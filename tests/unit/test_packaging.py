"""The wheel ships what the package needs at run time: a non-editable install into a fresh folder finds the corpus,
and keeps launch scripts, configs, patches and benchmarks out."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_a_non_editable_install_finds_the_shipped_corpus(tmp_path):
    # Built from a copy of the sources, so the build leaves nothing in the repository.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "deepspeed_checkfree", src / "deepspeed_checkfree",
                    ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--no-cache-dir", "--target", str(target), str(src)], check=True, timeout=300, cwd=tmp_path)
    installed = target / "deepspeed_checkfree"
    assert (installed / "models" / "sotu.txt.xz").is_file()
    assert not any((target / name).exists() for name in ("launch", "configs", "patches", "benchmarks", "tests"))
    probe = ("import deepspeed_checkfree.models.corpus as c; "
             "print(c.DEFAULT_CORPUS); print(len(c.load_corpus()))")
    out = subprocess.run([sys.executable, "-c", probe], env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
                         cwd=tmp_path, capture_output=True, text=True, timeout=120, check=True).stdout.split()
    assert Path(out[0]).resolve().is_relative_to(installed.resolve())
    assert int(out[1]) > 10_000_000  # the 10.8 MB corpus, read from the installed copy


def test_the_megatron_extra_picks_the_megatron_core_each_python_can_run(tmp_path):
    """megatron-core 0.17+ requires Python >= 3.12: the [megatron] extra pins 0.16.1 below and 0.19.x from 3.12."""
    from importlib.metadata import PathDistribution

    from packaging.requirements import Requirement

    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(REPO / "setup.py", src / "setup.py")
    (src / "deepspeed_checkfree").mkdir()
    shutil.copy(REPO / "deepspeed_checkfree" / "__init__.py", src / "deepspeed_checkfree" / "__init__.py")  # version
    subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path)], cwd=src, check=True,
                   timeout=120, capture_output=True)
    requires = [Requirement(r) for r in PathDistribution(next(tmp_path.glob("*.egg-info"))).requires]

    def picked(python: str) -> list:
        env = {"python_version": python, "python_full_version": f"{python}.0", "extra": "megatron"}
        return [str(r.specifier) for r in requires if r.name == "megatron-core" and r.marker.evaluate(env)]

    assert picked("3.10") == picked("3.11") == ["==0.16.1"]
    assert picked("3.12") == picked("3.13") == ["<0.20,>=0.19.2"]
