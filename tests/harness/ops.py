"""DeepSpeed's compiled ops for the tests that need one: built once per machine (torch's extensions cache keeps
it), by one process the test session starts, so no test pays the JIT build inside a timed job."""
from __future__ import annotations

import subprocess
import sys
import time

from .ranks import cpu_env, require_multi_process_marker

# A fresh CI machine JIT-compiles FusedAdam's CPU kernel here: 63 s on 2 idle cores (181 s measured on a busy
# one); with the cache in place the load takes ~2.5 s.
BUILD_TIMEOUT_S = 900

BUILD = """
import sys, time
from deepspeed.accelerator import get_accelerator
t = time.perf_counter()
module = get_accelerator().create_op_builder(sys.argv[1]).load()
print(f"{sys.argv[1]}: {module.__file__} in {time.perf_counter() - t:.1f} s")
"""


def ensure_op_built(builder: str) -> str:
    """Load (JIT-compiling it the first time on this machine) DeepSpeed's op ``builder`` on the CPU accelerator, in
    a process of its own; return what it printed (the op's file and the time it took)."""
    require_multi_process_marker()
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-c", BUILD, builder], env=cpu_env(), capture_output=True, text=True,
                         timeout=BUILD_TIMEOUT_S)
    assert out.returncode == 0, f"building DeepSpeed's {builder} failed:\n{out.stderr[-3000:]}"
    return f"{out.stdout.strip()} ({time.monotonic() - started:.1f} s with start-up)"
