"""A plain DeepSpeed pipeline script, unchanged, survives the loss of any rank under the supervisor.

The script is the usual one: ``deepspeed.init_distributed()`` (or none), ``deepspeed.initialize(...)``, then a loop
of ``engine.train_batch(data_iter)`` counted by the script (``for step in range(N)``) or by
``engine.global_steps``. Under the supervisor (which runs it through :mod:`.run_script`):

- ``deepspeed.init_distributed`` forms the job's world on the job's store (:class:`.JobSession`): the first
  trainers form generation 0 together and build their engines in it; a replacement builds its engine in a solo
  world and joins the running job at its first ``train_batch``, where its stage is rebuilt (or handed over).
- ``engine.train_batch`` re-forms the group in place when a peer is lost and replays the interrupted step from the
  micro-batches it kept; a rank that had already applied a step the others replay runs it again without applying
  it, with that step's micro-batches (it keeps the last completed step's).
- A replacement's first ``train_batch`` calls catch up without training: each takes one step's micro-batches from
  the data iterator, in the data order, and advances ``engine.global_steps``, until the script's count reaches the
  job's step. A deterministic iterator (a ``DataLoader`` over a seeded sampler, DeepSpeed's ``RepeatingLoader``, a
  generator) so continues exactly where the job is. These calls return a NaN loss
  (``engine.checkfree_catching_up`` tells them apart).
- A SIGTERM (a preemption notice) makes the trainer leave after its step, handing its stage over (:mod:`.drain`).

A loop shape that cannot work is refused when the script starts, naming the rule and the fix: a process group the
script forms itself (``init_method``, a fixed port, ``torch.distributed.init_process_group``), a model that is not a
``PipelineModule`` (a ``DeepSpeedEngine``, whose forward, backward and optimizer steps the script drives), or a
config without ``"checkfree": {"enabled": true}``.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Any, Callable, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist

from ..core.config import CheckFreeConfig
from ..core.fault_policy import COMMUNICATION, classify
from ..errors import UnsupportedSetupError
from ..events import EventLog, identity
from ..pipe import ds_internals
from .contract import incarnation_from_env, read_deepspeed_config, supervised
from .drain import DrainRequest
from .heartbeat import Heartbeat
from .membership import Fenced
from .session import JobSession, LeaveNow
from .trainer_process import default_backend, end_fenced, end_left

logger = logging.getLogger(__name__)

_CURRENT: List["DropIn"] = []


class Recorder:
    """A data iterator that hands out ``replay`` first, then ``source``'s items, and keeps what it handed out (a
    step's micro-batches, for its replay)."""

    def __init__(self, source: Optional[Iterator], replay: List[Any] = ()) -> None:
        self.source, self.replay, self.taken = source, list(replay), []

    def __iter__(self) -> "Recorder":
        return self

    def __next__(self) -> Any:
        if self.replay:
            item = self.replay.pop(0)
        elif self.source is None:
            raise StopIteration
        else:
            item = next(self.source)
        self.taken.append(item)
        return item


class DropIn:
    """One trainer process's drop-in (see the module docstring). It engages at the script's first
    ``deepspeed.init_distributed`` (or ``deepspeed.initialize``); the explicit API (``ResilientTrainer``) makes it
    stand aside."""

    def __init__(self) -> None:
        self.rank, self.world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        self.explicit = False     # the script drives the job itself (ResilientTrainer)
        self.session: Optional[JobSession] = None
        self.cold = True          # generation 0 (or a fresh start): the engine is built in the real world
        self.bound = False
        self.catch_up_to = 0      # a replacement: the job's step, which the script's count catches up to
        self._samples = 0
        self.previous: List[Any] = []  # the last completed step's micro-batches (a replay one step back)

    # deepspeed.init_distributed and deepspeed.initialize --------------------------------------------------------

    def init_distributed(self, original: Callable, *args, **kwargs) -> None:
        if self.explicit:
            return original(*args, **kwargs)
        if dist.is_initialized():
            if self.session is None:
                raise UnsupportedSetupError(
                    "this script formed its own process group (torch.distributed.init_process_group) before "
                    "DeepSpeed's: under the CheckFree supervisor the job's groups are formed on the job's store, so "
                    "that a lost rank can be replaced. Call deepspeed.init_distributed() instead (or nothing)")
            return original(*args, **kwargs)  # (the world formed here: DeepSpeed wraps it)
        default_port = default_distributed_port()
        if kwargs.get("init_method") or kwargs.get("distributed_port", default_port) != default_port:
            raise UnsupportedSetupError(
                "under the CheckFree supervisor the job's process groups are formed on the job's store, so that a "
                "lost rank can be replaced; this script asks deepspeed.init_distributed for a rendezvous of its own "
                f"(init_method={kwargs.get('init_method')!r}, distributed_port={kwargs.get('distributed_port')}). "
                "Call deepspeed.init_distributed() without them (or not at all: deepspeed.initialize calls it)")
        backend = default_backend(args[0] if args else kwargs.get("dist_backend"))
        self._engage(backend)
        return original(dist_backend=backend)

    def _engage(self, backend: str) -> None:
        ds_config = read_deepspeed_config()
        self.config = CheckFreeConfig.from_ds_config(ds_config) if ds_config is not None else CheckFreeConfig()
        self.events = EventLog(self.config.events_file)
        self.heartbeat = Heartbeat.from_env(self.config.heartbeat_s, self.config.detection_timeout_s)
        self.drain = DrainRequest().install()
        self.session = JobSession(self.config, backend, self.rank, self.world_size, incarnation_from_env(), None,
                                  self.events, self.heartbeat, drain=self.drain)
        if self.session.membership.has_progress():
            # A replacement: the others hold the job's state and wait; build the engine alone and join the job at
            # the first train_batch.
            self.cold = False
            ds_internals.form_solo_world(self.rank, self.world_size)
            return
        try:
            self.session.arrive()
            self.session.form_world()
        except Fenced as err:
            end_fenced(err, self.rank, self.events, self.heartbeat)

    def initialize(self, original: Callable, *args, **kwargs):
        from ..pipe.engine import CheckFreeEngine

        result = original(*args, **kwargs)  # (it calls deepspeed.init_distributed, which engages the drop-in)
        if self.explicit:
            return result
        engine = result[0]
        if not isinstance(engine, CheckFreeEngine) or not engine.checkfree.enabled:
            what = ("the stock PipelineEngine: the DeepSpeed config has no \"checkfree\": {\"enabled\": true}"
                    if hasattr(engine, "train_batch") else
                    "a DeepSpeedEngine (the model is not a PipelineModule): CheckFree keeps pipeline-parallel training "
                    "alive, whose steps engine.train_batch runs, not a script's own forward, backward and optimizer "
                    "steps")
            raise UnsupportedSetupError(f"under the CheckFree supervisor deepspeed.initialize returned {what}. Build "
                                        f"the model as a deepspeed.pipe.PipelineModule and enable CheckFree in the "
                                        f"config, or run the script without the supervisor")
        engine._checkfree_drop_in = self
        return result

    # engine.train_batch -----------------------------------------------------------------------------------------

    def train_batch(self, engine, run: Callable[[Iterator], Any], data_iter: Optional[Iterator]):
        """``engine.train_batch(data_iter)`` under the supervisor; ``run(iterator)`` runs one step (the engine's
        own ``train_batch``)."""
        source = data_iter if data_iter is not None else getattr(engine, "data_iterator", None)
        try:
            if not self.bound:
                self._bind(engine)
            if engine.global_steps < self.catch_up_to:
                return self._catch_up(engine, source)
            return self._step(engine, run, source)
        except Fenced as err:
            end_fenced(err, self.rank, self.events, self.heartbeat)
        except LeaveNow:
            end_left(self.session, self.heartbeat)
        finally:
            if data_iter is None and source is not None:
                point_data_iterator(engine, source)  # (the engine's own loader goes on)

    def _step(self, engine, run: Callable[[Iterator], Any], source: Optional[Iterator]):
        step = engine.global_steps
        current = Recorder(source)
        pending: List[Tuple[int, Recorder]] = [(step, current)]
        loss = None
        while True:
            try:
                for _, recorder in pending:
                    loss = run(recorder)
                break
            except Exception as err:  # noqa: BLE001 - only a lost peer is recovered here
                if classify(err) != COMMUNICATION:
                    raise
                failure = err
            kept = current.taken
            self.session.failed(failure, step)
            del failure
            replay = self._join(self.session)
            # Every step from the one the job replays to this call's: the one before with the last completed step's
            # micro-batches (this rank had applied it: the engine does not apply it again), this call's with what it
            # took so far, then the iterator's next ones.
            current = Recorder(source, kept)
            pending = [(t, current if t == step else Recorder(None, self.previous)) for t in range(replay, step + 1)]
            if not pending:  # (every rank had applied this call's step: nothing is left to run)
                loss = getattr(engine, "agg_train_loss", None)
        if pending:  # (else no step ran in the new generation yet: its first is the next call's)
            self.session.step_done()
        self.previous = current.taken
        if self.drain.requested:
            raise LeaveNow()
        return loss if loss is not None else torch.tensor(math.nan)

    def _bind(self, engine) -> None:
        """The first train_batch: bind the engine the script built to the job (a replacement joins it now)."""
        session = self.session
        if session is None:
            raise UnsupportedSetupError("engine.train_batch under the CheckFree supervisor needs the engine of "
                                        "deepspeed.initialize")
        session.engine = engine
        if self.cold:
            session.bind_engine(built_in_world=True)
            session.start()
        else:
            dist.destroy_process_group()  # the solo world it was built in
            step = self._join(session)
            self.catch_up_to, self._samples = step, engine.global_samples
            engine.global_steps = 0
            logger.warning("%s joined the job at step %d: the script's first %d train_batch calls catch up on the "
                           "data without training", identity(engine.stage_id, self.rank, step), step, step)
        self.bound = True

    def _join(self, session: JobSession) -> int:
        """Arrive and resume until a generation forms; return the step the job runs next."""
        while True:
            session.arrive()
            try:
                return session.resume()
            except Exception as err:  # noqa: BLE001 - a lost peer while joining: join the next generation
                if classify(err) != COMMUNICATION:
                    raise
                failure = err
            session.failed(failure, None)
            del failure

    def _catch_up(self, engine, source: Optional[Iterator]):
        """A replacement's call before the job's step: take the step's micro-batches, train nothing."""
        for _ in range(ds_internals.loads_per_step(engine) if source is not None else 0):
            next(source)
        engine.global_steps += 1
        if engine.global_steps == self.catch_up_to:
            engine.global_samples = self._samples
        return torch.tensor(math.nan, device=engine.device)

    def catching_up(self, engine) -> bool:
        return engine.global_steps < self.catch_up_to

    def finish(self) -> None:
        """The script ended: the trainer is done with the job."""
        if self.session is not None and self.bound:
            self.session.finish()


# DeepSpeed's entry points (public names), wrapped

def wrap_entry_points(init_distributed_hook: Callable, initialize_hook: Callable) -> None:
    """Route ``deepspeed.init_distributed`` (every name DeepSpeed exports it under, and the call inside
    ``deepspeed.initialize``) through ``init_distributed_hook(original, *args, **kwargs)``, and
    ``deepspeed.initialize`` through ``initialize_hook(original, *args, **kwargs)``. Idempotent."""
    import deepspeed
    from deepspeed import comm
    from deepspeed.comm import comm as comm_module

    if getattr(deepspeed.initialize, "_checkfree_wrapped", False):
        return
    original_init = comm_module.init_distributed

    def init_distributed(*args, **kwargs):
        return init_distributed_hook(original_init, *args, **kwargs)

    original_initialize = deepspeed.initialize

    def initialize(*args, **kwargs):
        return initialize_hook(original_initialize, *args, **kwargs)

    for holder in (comm_module, comm, deepspeed):
        holder.init_distributed = init_distributed
    init_distributed._checkfree_wrapped = initialize._checkfree_wrapped = True
    initialize.__doc__ = original_initialize.__doc__
    deepspeed.initialize = initialize


def default_distributed_port() -> int:
    """``deepspeed.init_distributed``'s default ``distributed_port`` (a script that passes another fixed one)."""
    from deepspeed.constants import TORCH_DISTRIBUTED_DEFAULT_PORT
    return TORCH_DISTRIBUTED_DEFAULT_PORT


def point_data_iterator(engine, iterator: Any) -> None:
    """Make ``iterator`` the engine's data iterator without DeepSpeed's bookkeeping (for the drop-in's replay)."""
    engine.data_iterator = iterator


def current() -> Optional[DropIn]:
    """This trainer's drop-in, if the supervisor installed one."""
    return _CURRENT[0] if _CURRENT else None


def install() -> None:
    """Under the supervisor: route DeepSpeed's entry points through the drop-in (idempotent)."""
    if not supervised() or _CURRENT:
        return
    drop_in = DropIn()
    _CURRENT.append(drop_in)
    wrap_entry_points(drop_in.init_distributed, drop_in.initialize)


def stand_aside() -> None:
    """The script uses the explicit API (``ResilientTrainer``), which forms and re-forms the job itself."""
    if _CURRENT:
        _CURRENT[0].explicit = True
