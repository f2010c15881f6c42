"""The bound on torch's wait for a compiled op's build lock (``pipe/op_build_lock.py``): a lock that a living
process holds is waited for; one that nothing holds and whose directory is quiet is taken over. Real files, real
open descriptors and a real killed process; no compile (tests/distributed/test_op_build_lock.py builds one)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from deepspeed_checkfree.pipe.op_build_lock import CHECKER, BoundedBaton, StaleBuildLock, holders, last_change


def age(path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_holders_names_the_processes_that_keep_the_file_open(tmp_path):
    lock = tmp_path / "lock"
    fd = os.open(lock, os.O_CREAT | os.O_EXCL)
    assert holders(str(lock)) == [os.getpid()]
    os.close(fd)
    assert holders(str(lock)) == []


def test_the_last_change_is_the_newest_file_but_the_checker(tmp_path):
    (tmp_path / "fused_adam.o").write_text("")
    age(tmp_path / "fused_adam.o", 100)
    (tmp_path / CHECKER).write_text("")
    assert time.time() - last_change(str(tmp_path)) == pytest.approx(100, abs=5)


def baton(tmp_path, quiet_s: float) -> BoundedBaton:
    b = BoundedBaton(str(tmp_path / "lock"), wait_seconds=0.05)
    b.quiet_s = quiet_s
    return b


def test_a_lock_nothing_holds_in_a_quiet_directory_is_taken_over_at_the_start(tmp_path, caplog):
    (tmp_path / "lock").write_text("")
    age(tmp_path / "lock", 120)
    b = baton(tmp_path, quiet_s=60)
    assert b.try_acquire()
    assert holders(str(tmp_path / "lock")) == [os.getpid()]  # this process holds it now, as torch's builder does
    b.release()
    assert "a build was killed midway" in caplog.text


def test_a_lock_in_a_directory_that_changed_lately_is_not_taken_over(tmp_path):
    (tmp_path / "lock").write_text("")
    (tmp_path / "fused_adam.o").write_text("")  # (a builder on another machine writes as it compiles)
    assert not baton(tmp_path, quiet_s=60).try_acquire()
    assert (tmp_path / "lock").exists()


def test_a_lock_a_living_process_holds_is_waited_for_however_old(tmp_path):
    fd = os.open(tmp_path / "lock", os.O_CREAT | os.O_EXCL)
    age(tmp_path / "lock", 3600)
    b = baton(tmp_path, quiet_s=0)
    assert not b.try_acquire()
    os.close(fd)
    os.remove(tmp_path / "lock")  # the builder's release
    b.wait()  # returns: the op is built


def test_a_wait_on_a_builder_that_is_killed_ends_in_the_quiet_period(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import os, sys, time\n"
                               f"os.open({str(tmp_path / 'lock')!r}, os.O_CREAT | os.O_EXCL)\n"
                               "print('held', flush=True)\ntime.sleep(600)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        b = baton(tmp_path, quiet_s=1.0)
        assert not b.try_acquire()
        os.kill(holder.pid, signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(StaleBuildLock):  # (torch's load, wrapped, then builds the op: see the distributed test)
            b.wait()
        assert time.monotonic() - started < 30
        assert not (tmp_path / "lock").exists()
    finally:
        holder.kill()
        holder.wait(timeout=30)


def test_the_torch_internals_it_wraps_are_as_it_expects():
    """torch 2.13: ``_jit_compile(name, ...)`` takes its lock with the module's ``FileBaton`` and builds only when
    its versioner's entry for ``name`` changed."""
    import inspect

    from torch.utils import cpp_extension
    from torch.utils.file_baton import FileBaton

    source = inspect.getsource(inspect.unwrap(cpp_extension._jit_compile))
    assert "FileBaton(os.path.join(build_directory, 'lock'))" in source and "baton.wait()" in source
    assert list(inspect.signature(inspect.unwrap(cpp_extension._jit_compile)).parameters)[0] == "name"
    assert isinstance(cpp_extension.JIT_EXTENSION_VERSIONER.entries, dict)
    assert {"try_acquire", "wait", "release"} <= set(vars(FileBaton))
