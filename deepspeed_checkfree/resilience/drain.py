"""Leaving on a preemption notice, exactly: a trainer told that its machine goes (SIGTERM, or ``checkfree drain``)
finishes its step, leaves the job, and hands its stage's exact state to the machine that replaces it, or parks it on
a neighbour until one comes. Nothing is approximated: the job ends bit-identical to one that lost nothing.

The leaving trainer, at a step boundary:

1. records that it leaves (its rank is free for a joiner at once, no lease wait), aborts its generation (the others
   stop at their step and wait for the rank's successor) and lets its world go;
2. waits for a successor until the deadline leaves just enough time to park: a joiner's trainer that takes the
   state over directly (a world of two, the accelerator's backend);
3. otherwise parks it in host memory on a neighbour that has room (a world of two over gloo), where the successor
   takes it from minutes later; where none can, it says why and the successor is rebuilt from the neighbours;
4. ends with :data:`~.contract.LEFT_EXIT_CODE`; its supervisor logs the join command for a replacement.

Who takes over a rank checks first whether its predecessor left a state to take (:func:`take_over`), before it
arrives for the next generation; a parker serves requests while it waits for a generation to form
(:class:`Parking`). A stage that kept a data-parallel replica needs no hand-over: the replica restores it.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import time
import uuid
from datetime import timedelta
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from ..core.rejoin import PREEMPTION
from ..events import EventLog, identity
from ..pipe.handover import StageState, transfer
from .contract import (DRAIN_TIMEOUT_ENV, DRAIN_TIMEOUT_S, SUPERVISOR_ID_ENV, TrainerDeath, handover_key, inbox_key, leaving_fact,
                       lost_fact)
from .membership import Membership
from .store_access import get_if_set, wait_for

logger = logging.getLogger(__name__)

PARK_BANDWIDTH = 100e6     # bytes per second assumed when deciding how early to start parking (conservative)
PARK_SETUP_S = 3.0         # and the fixed part: a parker's reaction (it looks every 2 s) and the world of two
TAKER_WAIT_S = 5.0         # how long a successor waits for a parked state's holder to answer it


class DrainRequest:
    """The trainer's side of a notice: SIGTERM and SIGINT note when it came (the first one; later ones change
    nothing, only SIGKILL cuts a drain short), and the loop leaves at its next step boundary."""

    def __init__(self, timeout_s: Optional[float] = None) -> None:
        self.timeout_s = timeout_s if timeout_s is not None else float(os.environ.get(DRAIN_TIMEOUT_ENV,
                                                                                       DRAIN_TIMEOUT_S))
        self.at: Optional[float] = None

    def install(self) -> "DrainRequest":
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._note)
        return self

    def _note(self, signum, frame) -> None:
        if self.at is None:
            self.at = time.time()
            logger.warning("%s told to leave (%s): this trainer hands its stage over at its next step boundary, "
                           "within %g s", identity(rank=int(os.environ.get("RANK", -1))),
                           signal.Signals(signum).name, self.timeout_s)

    @property
    def requested(self) -> bool:
        return self.at is not None

    @property
    def deadline(self) -> float:
        return (self.at or time.time()) + self.timeout_s


def _world_of_two(backend: str, store: dist.Store, prefix: str, rank: int, timeout_s: float) -> None:
    dist.init_process_group(backend, store=dist.PrefixStore(prefix, store), rank=rank, world_size=2,
                            timeout=timedelta(seconds=max(5.0, timeout_s)))


def _park_margin_s(nbytes: int) -> float:
    return PARK_SETUP_S + nbytes / PARK_BANDWIDTH


def leave(membership: Membership, state: Optional[StageState], *, incarnation: int, generation: int,
          parkers: List[int], backend: str, request: DrainRequest, events: EventLog, replica_kept: bool,
          release_world: Callable[[], None]) -> str:
    """Carry out the leaving trainer's part (see the module docstring); returns what became of its state:
    "exact hand-over", "parked on rank P", "kept by a data-parallel replica", or why it was not handed over."""
    rank, store = membership.rank, membership.store
    left = time.time()
    record = {"rank": rank, "incarnation": incarnation, "notice": request.at, "left": left,
              "deadline": request.deadline, "generation": generation,
              "bytes": state.nbytes if state is not None else 0}
    owner = os.environ.get(SUPERVISOR_ID_ENV)
    membership.record(leaving_fact(rank, incarnation), record)
    membership.record(lost_fact(rank), {"incarnation": incarnation, "cause": PREEMPTION, "owner": owner,
                                        "time": request.at})
    membership.record_loss(rank, incarnation, TrainerDeath(time=request.at, returncode=None, cause=PREEMPTION,
                                                           left=left), generation)
    membership.post_signal("lost", rank=rank, incarnation=incarnation, cause=PREEMPTION, owner=owner)
    release_world()
    prefix = identity(rank=rank)
    logger.warning("%s left generation %d %.2f s after the notice; %s", prefix, generation, left - request.at,
                   "its data-parallel replica keeps its stage" if replica_kept or state is None else
                   f"offering its stage ({record['bytes'] / 2**20:.0f} MiB) to the machine that replaces it")
    if replica_kept or state is None:
        return "kept by a data-parallel replica" if replica_kept else "nothing to hand over (no step held)"
    taker_key = membership.key(handover_key(rank, incarnation, "taker"))
    wait_s = request.deadline - _park_margin_s(record["bytes"]) - time.time()
    taker = wait_for(store, taker_key, max(0.0, wait_s)) if wait_s > 0 else None
    if taker is None:  # nobody came in time: take the key ourselves, unless a taker does so first
        taker = store.compare_set(taker_key, "", "parking")
    if taker != b"parking":
        taker_id = json.loads(taker)["id"]
        _world_of_two(backend, store, membership.key(handover_key(rank, incarnation, taker_id)), 0,
                      request.deadline - time.time())
        try:
            transfer(state, 0, None, state.params[0].device)
        finally:
            dist.destroy_process_group()
        return "exact hand-over"
    return _park(membership, state, incarnation, parkers, request, prefix)


def _park(membership: Membership, state: StageState, incarnation: int, parkers: List[int],
          request: DrainRequest, prefix: str) -> str:
    rank, store = membership.rank, membership.store
    for parker in parkers:
        left = request.deadline - time.time()
        if left <= 1.0:
            return "not parked: the drain's deadline came first (the parkers did not answer in time)"
        ask = {"kind": "park", "rank": rank, "incarnation": incarnation, "bytes": state.nbytes,
               "id": uuid.uuid4().hex[:12]}
        standing = store.compare_set(membership.key(inbox_key(parker)), "", json.dumps(ask))
        if json.loads(standing).get("id") != ask["id"]:
            continue  # it is busy with another request
        answer = wait_for(store, membership.key(handover_key(rank, incarnation, f"answer-{ask['id']}")), left - 1.0)
        if answer is None:
            store.compare_set(membership.key(inbox_key(parker)), json.dumps(ask), "")
            logger.warning("%s rank %d did not answer the request to park this stage", prefix, parker)
            continue
        verdict = json.loads(answer)
        if not verdict["accepted"]:
            logger.warning("%s rank %d cannot park this stage: %s", prefix, parker, verdict["reason"])
            continue
        _world_of_two("gloo", store, membership.key(handover_key(rank, incarnation, ask["id"])), 0,
                      request.deadline - time.time())
        try:
            transfer(state, 0, None, torch.device("cpu"))
        finally:
            dist.destroy_process_group()
        return f"parked on rank {parker}"
    return "not parked: no neighbour could hold it"


# ---------------------------------------------------------------------------------------------------------------
# The parker: a neighbour that holds a leaving stage's state while the job waits for its successor
# ---------------------------------------------------------------------------------------------------------------

class Parking:
    """The states this trainer holds for others (rank -> (incarnation, state)), and the service of its inbox,
    called while it waits for a generation to form.

    Args:
        membership: this trainer's view of the job.
        memory_fraction: a state is accepted only if it fits in this fraction of the memory the machine has
            available (``MemAvailable``).
        events: the event log.
    """

    def __init__(self, membership: Membership, memory_fraction: float, events: EventLog) -> None:
        self.membership, self.memory_fraction, self.events = membership, memory_fraction, events
        self.held: Dict[int, Tuple[int, StageState]] = {}

    @property
    def held_bytes(self) -> int:
        return sum(state.nbytes for _, state in self.held.values())

    def serve(self) -> None:
        """Answer the request in this trainer's inbox, if there is one (one read when there is none)."""
        m = self.membership
        key = m.key(inbox_key(m.rank))
        raw = get_if_set(m.store, key)
        if not raw:
            return
        ask = json.loads(raw)
        m.store.compare_set(key, raw, "")  # taken
        if ask["kind"] == "park":
            self._park(ask)
        elif ask["kind"] == "take":
            self._hand_over(ask)

    def _park(self, ask: dict) -> None:
        m, rank, incarnation = self.membership, int(ask["rank"]), int(ask["incarnation"])
        room = available_memory() * self.memory_fraction - self.held_bytes
        accepted = ask["bytes"] <= room
        reason = "accepted" if accepted else (f"{ask['bytes'] / 2**20:.0f} MiB do not fit in {self.memory_fraction:g} "
                                              f"of this machine's available memory ({room / 2**20:.0f} MiB left)")
        m.store.set(m.key(handover_key(rank, incarnation, f"answer-{ask['id']}")),
                    json.dumps({"accepted": accepted, "reason": reason}))
        if not accepted:
            return
        t0 = time.time()
        _world_of_two("gloo", m.store, m.key(handover_key(rank, incarnation, ask["id"])), 1, 60.0)
        try:
            state = transfer(None, 0, None, torch.device("cpu"))
        finally:
            dist.destroy_process_group()
        self.held[rank] = (incarnation, state)
        m.store.set(m.key(handover_key(rank, incarnation, "parked")), json.dumps({"holder": m.rank,
                                                                                  "bytes": state.nbytes}))
        logger.warning("%s parked rank %d's stage %d (%.0f MiB of host memory) in %.2f s until its successor "
                       "takes it", identity(rank=m.rank), rank, state.stage_id, state.nbytes / 2**20, time.time() - t0)
        self.events.write("parked", rank=m.rank, for_rank=rank, stage=state.stage_id, bytes=state.nbytes,
                          duration_s=round(time.time() - t0, 6))

    def _hand_over(self, ask: dict) -> None:
        m, rank = self.membership, int(ask["rank"])
        incarnation, state = self.held.pop(rank)
        _world_of_two("gloo", m.store, m.key(handover_key(rank, incarnation, ask["id"])), 0, 60.0)
        try:
            transfer(state, 0, None, torch.device("cpu"))
        finally:
            dist.destroy_process_group()
        logger.warning("%s handed rank %d's parked stage to its successor", identity(rank=m.rank), rank)


def available_memory() -> int:
    """``MemAvailable`` of this machine, in bytes (0 where /proc/meminfo does not say)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# ---------------------------------------------------------------------------------------------------------------
# The successor: takes its predecessor's state before it arrives for a generation
# ---------------------------------------------------------------------------------------------------------------

def take_over(membership: Membership, engine_for: Callable[[], "object"], backend: str,
              prefix: str) -> Optional[str]:
    """If this rank's previous trainer left on a notice and its state waits (with the leaving trainer, or parked),
    take it into the engine ``engine_for()`` builds (in a solo world); returns how ("exact hand-over" or "parked
    hand-over"), or None when there is nothing to take (the rank is then rebuilt as after a loss)."""
    rank, store = membership.rank, membership.store
    lost = membership.fact(lost_fact(rank))
    if not lost or lost.get("cause") != PREEMPTION:
        return None
    incarnation = int(lost["incarnation"])
    leaving = membership.fact(leaving_fact(rank, incarnation))
    if not leaving or not leaving.get("bytes"):
        return None
    engine = engine_for()
    me = {"id": uuid.uuid4().hex[:12], "pid": os.getpid()}
    standing = store.compare_set(membership.key(handover_key(rank, incarnation, "taker")), "", json.dumps(me))
    if standing != b"parking":  # the leaving trainer waits for us (or took our id already)
        if json.loads(standing)["id"] != me["id"]:
            return None  # another process of this rank took it: not ours
        _world_of_two(backend, store, membership.key(handover_key(rank, incarnation, me["id"])), 1,
                      max(5.0, leaving["deadline"] - time.time()))
        how = "exact hand-over"
    else:
        parked = wait_for(store, membership.key(handover_key(rank, incarnation, "parked")),
                          max(0.0, leaving["deadline"] - time.time()) + TAKER_WAIT_S)
        if parked is None:
            logger.warning("%s the previous trainer of rank %d left, but its state was not parked in time: the stage "
                           "is rebuilt from its neighbours", prefix, rank)
            return None
        holder = json.loads(parked)["holder"]
        ask = {"kind": "take", "rank": rank, "id": me["id"]}
        deadline = time.time() + 60.0
        while store.compare_set(membership.key(inbox_key(holder)), "", json.dumps(ask)) != json.dumps(ask).encode():
            if time.time() > deadline:
                raise TimeoutError(f"rank {holder} holds rank {rank}'s parked stage but its inbox stayed busy")
            time.sleep(0.2)
        _world_of_two("gloo", store, membership.key(handover_key(rank, incarnation, me["id"])), 1, 60.0)
        how = "parked hand-over"
    try:
        state = transfer(None, 0, list(engine.module.parameters()),
                         engine.device if how == "exact hand-over" else torch.device("cpu"))
    finally:
        dist.destroy_process_group()
    engine.load_stage_state(state)
    return how
