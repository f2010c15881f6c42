"""A compiled op's build killed midway holds no later build up (``pipe/op_build_lock.py``): torch's own JIT load
(``torch.utils.cpp_extension.load``, as DeepSpeed's op builders call it) builds and loads a small op whose build
directory holds a lock that a killed process took with torch's ``FileBaton``, whether the kill came before the load
started or while it waited. Without the bound the same load is still waiting when it is stopped."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.distributed]

QUIET_S = 1.0
# A process that takes the build lock as torch's builder does, says so, and builds nothing (it is killed).
TAKE_LOCK = ("import sys, time\nfrom torch.utils.file_baton import FileBaton\n"
             "assert FileBaton(sys.argv[1]).try_acquire()\nprint('held', flush=True)\ntime.sleep(600)")
# torch's JIT load of the op, with or without the bound; prints the op's answer.
LOAD = ("import ctypes, sys\nfrom torch.utils import cpp_extension\n"
        "from deepspeed_checkfree.pipe import op_build_lock\n"
        "if sys.argv[3] == 'bounded':\n"
        f"    op_build_lock.bound_build_lock_wait(); op_build_lock.BoundedBaton.quiet_s = {QUIET_S}\n"
        "print('loading', flush=True)\n"
        "path = cpp_extension.load('cf_answer', [sys.argv[1]], build_directory=sys.argv[2], is_python_module=False)\n"
        "print('answer', ctypes.CDLL(path).answer(), flush=True)")


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}


def start(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env())


def said(proc: subprocess.Popen, line: str) -> bool:
    """Whether ``proc`` printed ``line`` before it ended (its other lines are logs)."""
    return any(out.strip() == line for out in iter(proc.stdout.readline, ""))


def killed_builder(lock: Path) -> subprocess.Popen:
    holder = start(TAKE_LOCK, str(lock))
    assert said(holder, "held")
    return holder


@pytest.fixture
def op(tmp_path):
    source = tmp_path / "answer.cpp"
    source.write_text('extern "C" int answer() { return 42; }\n')
    build = tmp_path / "build"
    build.mkdir()
    started = []
    yield source, build, started
    for proc in started:
        proc.kill()
        proc.wait(timeout=30)


def test_a_lock_left_by_a_build_killed_before_the_load_is_taken_over(op):
    source, build, started = op
    holder = killed_builder(build / "lock")
    started.append(holder)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(timeout=30)
    time.sleep(QUIET_S)
    loader = start(LOAD, str(source), str(build), "bounded")
    started.append(loader)
    out, _ = loader.communicate(timeout=120)
    assert loader.returncode == 0 and "answer 42" in out, out
    assert "a build was killed midway" in out
    assert not (build / "lock").exists()


def test_a_load_waiting_on_a_builder_that_is_killed_builds_the_op_itself(op):
    source, build, started = op
    holder = killed_builder(build / "lock")
    loader = start(LOAD, str(source), str(build), "bounded")
    started += [holder, loader]
    assert said(loader, "loading")
    time.sleep(2)  # (the load waits on the living builder's lock)
    assert loader.poll() is None
    os.kill(holder.pid, signal.SIGKILL)
    out, _ = loader.communicate(timeout=120)
    assert loader.returncode == 0 and "answer 42" in out, out


def test_without_the_bound_torch_waits_on_the_killed_builders_lock(op):
    source, build, started = op
    holder = killed_builder(build / "lock")
    started.append(holder)
    os.kill(holder.pid, signal.SIGKILL)
    loader = start(LOAD, str(source), str(build), "torch")
    started.append(loader)
    assert said(loader, "loading")
    time.sleep(5 + QUIET_S)
    assert loader.poll() is None, "torch's own wait has no deadline"
