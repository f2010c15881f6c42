"""Membership's batched reads on a store without them (the embedded store's path; the etcd store reads them in
one request, tests/distributed/test_etcd_store.py)."""
from __future__ import annotations

import torch.distributed as dist

from deepspeed_checkfree.resilience.contract import rank_generation_key
from deepspeed_checkfree.resilience.membership import Membership


def test_the_supervisors_tick_reads_the_stop_and_the_fresh_start_epoch_together():
    membership = Membership(dist.HashStore(), "tok", 0, 2, join_timeout_s=1.0)
    assert membership.job_signals() == (None, 0)
    membership.request_fresh_start()
    assert membership.job_signals() == (None, 1)
    membership.stop(1, "trainer", "a config error")
    assert membership.job_signals() == ({"rank": 1, "cause": "trainer", "reason": "a config error"}, 1)


def test_every_ranks_last_generation_is_read_together():
    stores = dist.HashStore()
    members = [Membership(stores, "tok", r, 3, join_timeout_s=1.0) for r in range(3)]
    assert members[0].last_generations() == [-1, -1, -1] and members[0].latest_generation() == -1
    stores.set(members[0].key(rank_generation_key(2)), "4")
    assert members[1].last_generations() == [-1, -1, 4] and members[1].latest_generation() == 4
    assert members[0].values_if_set([members[0].key(rank_generation_key(2)), members[0].key("unset")]) == [b"4", None]


def test_a_trainer_exit_is_decided_on_facts_read_together_and_its_replacement_recorded_in_one_write():
    from deepspeed_checkfree.resilience.contract import TrainerDeath, formed_key

    store = dist.HashStore()
    supervisor = Membership(store, "tok", 1, 2, join_timeout_s=1.0)
    assert supervisor.exit_facts(1) == dict(job_stopped=False, job_has_progress=False, group_formed=False,
                                            trainer_finished=False)
    store.set(supervisor.key(rank_generation_key(1)), "3")
    store.set(supervisor.key(formed_key(3)), "1")
    supervisor.record_progress()
    assert supervisor.exit_facts(1) == dict(job_stopped=False, job_has_progress=True, group_formed=True,
                                            trainer_finished=False)
    moves = supervisor.incarnation_moves()
    supervisor.record_replacement(1, 0, TrainerDeath(time=12.5, returncode=-9))
    assert supervisor.incarnation(1) == 1 and supervisor.death(1, 0) == TrainerDeath(time=12.5, returncode=-9)
    assert supervisor.incarnation_moves() == moves + 1
