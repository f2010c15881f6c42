"""Seeded failure plans."""
from __future__ import annotations

import pytest

from deepspeed_checkfree.core.config import parse_section
from deepspeed_checkfree.core.failures import FailurePlan, hourly_rate_to_probability, recoverable_stages


def test_explicit_failures_are_returned_at_their_step():
    plan = FailurePlan(num_stages=4, explicit=((2, 5), (1, 5), (1, 9)))
    assert plan.failures_at(5) == (1, 2)
    assert plan.failures_at(9) == (1,)
    assert plan.failures_at(6) == ()


def test_probabilistic_plan_is_deterministic_per_seed_and_order_independent():
    a = FailurePlan(num_stages=6, probability=0.05, stages=(1, 2, 3, 4), seed=7)
    b = FailurePlan(num_stages=6, probability=0.05, stages=(1, 2, 3, 4), seed=7)
    forward = [a.failures_at(s) for s in range(500)]
    backward = [b.failures_at(s) for s in reversed(range(500))][::-1]
    assert forward == backward
    assert forward != [FailurePlan(6, probability=0.05, stages=(1, 2, 3, 4), seed=8).failures_at(s)
                       for s in range(500)]


def test_probabilistic_plan_hits_only_eligible_stages_at_about_the_rate():
    plan = FailurePlan(num_stages=4, probability=0.1, stages=(1, 2), seed=0)
    events = plan.schedule(range(4000))
    hit = [s for _, lost in events for s in lost]
    assert set(hit) <= {1, 2}
    assert 0.08 * 8000 < len(hit) < 0.12 * 8000


def test_plan_from_config_defaults_to_the_stages_the_mode_can_rebuild():
    cfg = parse_section({"enabled": True, "failure_injection": {"probability": 0.5, "seed": 3}})
    assert FailurePlan.from_config(cfg, 5).stages == (1, 2, 3)
    plus = parse_section({"enabled": True, "mode": "checkfree_plus", "failure_injection": {"probability": 0.5}})
    assert FailurePlan.from_config(plus, 5).stages == (0, 1, 2, 3, 4)
    assert recoverable_stages(4, "checkfree") == (1, 2)


def test_hourly_rate_conversion_matches_the_papers_mapping():
    # 124M config: 10%/h -> p = 0.0006 at iterations of roughly 20 s.
    assert hourly_rate_to_probability(0.10, 20.0) == pytest.approx(0.0006, rel=0.05)
    assert hourly_rate_to_probability(0.0, 20.0) == 0.0
    with pytest.raises(ValueError, match="write 10%/h as 0.1"):
        hourly_rate_to_probability(10, 20.0)
