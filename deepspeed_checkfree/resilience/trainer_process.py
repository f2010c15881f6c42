"""What every trainer process does around its training, whichever way the script trains (the explicit
:class:`~.trainer.ResilientTrainer` or a plain script's ``train_batch`` through :mod:`.drop_in`): its backend, a
warm spare's wait, and its endings when it leaves on a notice or finds its rank taken over."""
from __future__ import annotations

import logging
import os
import sys
from typing import Callable, Optional

from ..core.config import CheckFreeConfig
from ..events import EventLog, identity
from ..pipe import op_build_lock, spare_prewarm
from ..pipe.engine import CheckFreeEngine
from .contract import (FENCED_EXIT_CODE, LEFT_EXIT_CODE, PID_DIR_ENV, activated, read_activation, spare_ready_file,
                       write_pid_file)
from .coordination import prepare_client
from .heartbeat import Heartbeat
from .membership import Fenced
from .session import JobSession

logger = logging.getLogger("deepspeed_checkfree.resilience.trainer")


def default_backend(backend: Optional[str]) -> str:
    """``backend``, or the DeepSpeed accelerator's (NCCL on GPUs, gloo on CPU)."""
    if backend is not None:
        return backend
    from deepspeed.accelerator import get_accelerator
    return get_accelerator().communication_backend_name()


def wait_as_spare(config: CheckFreeConfig, ds_config: Optional[dict],
                  build_solo: Optional[Callable[[], CheckFreeEngine]] = None) -> Optional[CheckFreeEngine]:
    """In a warm spare: prepare everything a replacement needs (what building the engine imports and the compiled
    ops it loads, the store's client; with ``spare_builds_engine``, the engine itself, in the solo world), then wait
    until the supervisor activates this process in place of a trainer that died, which saves the replacement the
    seconds of start-up. Returns the engine built meanwhile (or None). Exits when the supervisor ends without
    needing this spare."""
    op_build_lock.bound_build_lock_wait()  # (a compiled op's build killed midway holds no later build up)
    engine = build_solo() if build_solo is not None and config.spare_builds_engine else None
    if engine is None:
        spare_prewarm.prewarm_engine_imports()
        if ds_config is not None:
            spare_prewarm.prewarm_engine_ops(ds_config)  # e.g. FusedAdam: never loaded in the outage
    prepare_client()
    pid_dir = os.environ.get(PID_DIR_ENV)
    if pid_dir:
        write_pid_file(spare_ready_file(pid_dir, int(os.environ["RANK"])), os.getpid())
    incarnation = read_activation(sys.stdin)
    if incarnation is None:
        sys.exit(0)  # the supervisor ended without needing this spare
    activated(os.environ, incarnation)  # for the training script, as for a respawned trainer
    return engine


def end_left(session: JobSession, heartbeat: Optional[Heartbeat]) -> None:
    """This trainer was told to leave (a preemption notice): hand its stage over and end without a respawn."""
    outcome = session.leave()
    logger.warning("%s left the job on a preemption notice: %s. The job goes on without this machine.",
                   identity(rank=session.rank), outcome)
    if heartbeat is not None:
        heartbeat.finish()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(LEFT_EXIT_CODE)  # (no interpreter shutdown: the job's world and its stores are let go already)


def end_fenced(err: Fenced, rank: int, events: EventLog, heartbeat: Optional[Heartbeat]) -> None:
    """This trainer's rank was recorded lost while it was cut off: end without touching the job."""
    logger.error("%s %s. This trainer ends (its supervisor ends too); the job goes on without it.",
                 identity(rank=rank), err)
    events.write("fenced", rank=rank, reason=str(err))
    if heartbeat is not None:
        heartbeat.finish()
    sys.stdout.flush()
    sys.stderr.flush()
    raise SystemExit(FENCED_EXIT_CODE) from None
