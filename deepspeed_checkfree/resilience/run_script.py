"""What the supervisor runs for each trainer: ``python -m deepspeed_checkfree.resilience.run_script SCRIPT ARGS``.

It routes DeepSpeed's entry points through the drop-in (:mod:`.drop_in`), so that a plain script survives the loss
of any rank whether or not it imports ``deepspeed_checkfree``. A warm spare prepares here (the libraries and the
compiled ops the engine build loads, the store's client) and waits for its activation before the script runs at
all, so nothing the script does, side effects included, happens in a spare that is never used. With
``"spare_builds_engine": true`` the script runs in the spare, which then builds its engine ahead (the explicit API,
``ResilientTrainer``, does that). The script's errors that are not a lost peer stop the job (exit code 78).
"""
from __future__ import annotations

import os
import runpy
import sys

from .contract import is_spare, read_deepspeed_config


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit("usage: python -m deepspeed_checkfree.resilience.run_script SCRIPT [ARGS...]")
    script = sys.argv[1]
    sys.argv = [script, *sys.argv[2:]]
    sys.path[0] = os.path.dirname(os.path.abspath(script))  # as `python SCRIPT` has it
    from . import drop_in
    drop_in.install()
    from .stopping import ScriptGuard
    guard = ScriptGuard(int(os.environ.get("RANK", "0")))
    with guard:  # (a config it cannot read or parse stops the job here, with its cause)
        ds_config = read_deepspeed_config()
        section = ds_config.get("checkfree") if isinstance(ds_config, dict) else None
        if isinstance(section, dict):
            guard.events_file = section.get("events_file")
        if is_spare() and not (isinstance(section, dict) and section.get("spare_builds_engine")):
            from ..core.config import CheckFreeConfig
            from .trainer_process import wait_as_spare
            config = CheckFreeConfig.from_ds_config(ds_config) if ds_config is not None else CheckFreeConfig()
            wait_as_spare(config, ds_config)
        runpy.run_path(script, run_name="__main__")
    current = drop_in.current()
    if current is not None:
        current.finish()


if __name__ == "__main__":
    main()
