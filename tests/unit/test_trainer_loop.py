"""The resilient training loop's bookkeeping of steps, without processes: a fake session stands for the job's
generations (JobSession is tested with real processes in tests/distributed and tests/e2e)."""
from __future__ import annotations

import json
import math

import torch.distributed

from deepspeed_checkfree.events import EventLog
from deepspeed_checkfree.resilience import trainer as trainer_module
from deepspeed_checkfree.resilience.drain import DrainRequest


class FakeSession:
    """Generation 0 runs from step 0; the failure comes in ``fail_at``; generation 1 resumes at ``resume_at``."""

    def __init__(self, resume_at: int):
        self.generation, self.resumes, self.engine = -1, [0, resume_at], object()

    def arrive(self):
        self.generation += 1

    def resume(self):
        return self.resumes[self.generation]

    def step_done(self):
        pass

    def failed(self, err, step):
        pass

    def finish(self):
        pass


def run(tmp_path, monkeypatch, resume_at: int, fail_at: int = 2, steps: int = 5):
    session = FakeSession(resume_at)
    monkeypatch.setattr(trainer_module, "JobSession", lambda *args, **kwargs: session)
    trainer = object.__new__(trainer_module.ResilientTrainer)
    trainer.config = trainer.backend = trainer.heartbeat = trainer._built = trainer.step = trainer.build_engine = None
    trainer.rank, trainer.world_size, trainer.incarnation = 0, 4, 0
    trainer.events, trainer.drain = EventLog(str(tmp_path / "events.jsonl")), DrainRequest()
    ran, reported = [], []

    def train_step(engine, step):
        ran.append(step)
        if step == fail_at and session.generation == 0:
            raise torch.distributed.DistNetworkError("the peer closed the connection")
        return 1.0 / (step + 1)

    trainer._train(steps, train_step, lambda engine, step, loss: reported.append((step, loss)))
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()] \
        if (tmp_path / "events.jsonl").exists() else []
    return ran, reported, events


def test_a_step_the_failure_interrupted_is_replayed_and_reported_once(tmp_path, monkeypatch):
    ran, reported, events = run(tmp_path, monkeypatch, resume_at=2)
    assert ran == [0, 1, 2, 2, 3, 4]
    assert [s for s, _ in reported] == [0, 1, 2, 3, 4] and all(math.isfinite(l) for _, l in reported)
    assert not [e for e in events if e["event"] == "loss_lost"]


def test_a_step_every_survivor_applied_before_the_failure_is_reported_with_a_nan_loss(tmp_path, monkeypatch):
    """The failure came after this rank's update of step 2 and before its train_batch returned (DeepSpeed's loss
    broadcast): the job goes on at step 3, and step 2 is still reported, once, with its loss unknown."""
    ran, reported, events = run(tmp_path, monkeypatch, resume_at=3)
    assert ran == [0, 1, 2, 3, 4]
    assert [s for s, _ in reported] == [0, 1, 2, 3, 4]
    assert math.isnan(dict(reported)[2]) and all(math.isfinite(l) for s, l in reported if s != 2)
    assert [(e["event"], e["step"]) for e in events if e["event"] == "loss_lost"] == [("loss_lost", 2)]
