"""``CHECKFREE_DISABLE_SHM_COMM=1``: with ``import deepspeed_checkfree``, DeepSpeed's communication backend does not
load (on a fresh machine: JIT-compile, minutes) its shared-memory all-reduce op on CPU, and creates no /dev/shm
buffers; without it, DeepSpeed is left as it is. Each case in a fresh interpreter, in the solo world."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

PROBE = r"""
import json, os, sys
import deepspeed_checkfree
import deepspeed
probed = "__compatible_ops__" in vars(deepspeed.ops)  # DeepSpeed probes its ops on first access only
flag = deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"]
result = {"probed_at_import": probed, "shm_op_enabled": flag}
if not flag:
    from deepspeed_checkfree.pipe import ds_internals
    ds_internals.form_solo_world(1, 4)
    deepspeed.init_distributed(dist_backend="gloo")
    from deepspeed import comm
    result["shm_comm_op"] = repr(comm.comm.cdb.shm_comm_op)
print("RESULT " + json.dumps(result))
"""


def probe(tmp_path: Path, switch: str) -> dict:
    env = dict(os.environ, RANK="1", WORLD_SIZE="4", LOCAL_RANK="1", LOCAL_SIZE="4", MASTER_ADDR="127.0.0.1",
               MASTER_PORT="29500", OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", TORCH_EXTENSIONS_DIR=str(tmp_path),
               PYTHONPATH=str(REPO), CHECKFREE_DISABLE_SHM_COMM=switch)
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))[7:])


def test_the_switch_keeps_deepspeed_from_loading_the_shm_op(tmp_path):
    result = probe(tmp_path, "1")
    assert result == {"probed_at_import": True, "shm_op_enabled": False, "shm_comm_op": "None"}
    assert not any(tmp_path.iterdir()), "nothing was compiled into the extensions folder"


@pytest.mark.parametrize("switch", ["", "0"])
def test_without_the_switch_deepspeed_is_untouched(tmp_path, switch):
    # (the op stays enabled: the first init_distributed would build it; not done here, it takes minutes)
    assert probe(tmp_path, switch) == {"probed_at_import": False, "shm_op_enabled": True}
