"""The etcd job store against a real 3-member etcd cluster on loopback: c10d semantics (checked against
TCPStore's), atomic counters from several processes, a gloo rendezvous and all_reduce on it, isolation between
job tokens, one member killed (the store keeps working, a rendezvous still forms), every member stopped (a clear
error within the timeout), and etcd's users and roles keeping a job's keys to holders of its token.
"""
from __future__ import annotations

import json
import threading
import time
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
import torch.distributed as dist

from deepspeed_checkfree.core.rejoin import MemberInfo
from deepspeed_checkfree.errors import CheckFreeError
from deepspeed_checkfree.resilience.etcd_access import enable_auth, grant_job_access
from deepspeed_checkfree.resilience.etcd_client import EtcdEndpoints, b64, prefix_end, unb64
from deepspeed_checkfree.resilience.etcd_store import (EtcdStore, StoreAccessDenied, StoreKeyTimeout,
                                                       StoreUnreachable)
from deepspeed_checkfree.resilience.contract import JOIN_REQUESTS
from deepspeed_checkfree.resilience.joins import JoinReviewer, request_join
from deepspeed_checkfree.resilience.membership import Membership
from deepspeed_checkfree.resilience.store_address import (etcd_job_password, etcd_job_user, etcd_key_prefix,
                                                          parse_store_url)

from ..harness.etcd import TLSFiles, etcd_cluster, new_etcd_cluster  # noqa: F401 (fixtures)
from ..harness.ports import reserve_ports
from ..harness.ranks import run_ranks

pytestmark = pytest.mark.distributed

WORKER = Path(__file__).with_name("etcd_store_worker.py")
BACKEND = "gloo"  # the tests choose the backend; the library never does


def fresh_token() -> str:
    return uuid.uuid4().hex


def store_on(cluster, token=None, timeout_s: float = 10.0, **kw) -> EtcdStore:
    return EtcdStore(cluster.url, token or fresh_token(), timeout=timedelta(seconds=timeout_s), **kw)


def read_ranks(out: Path, world_size: int) -> list:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world_size)]


def test_values_are_binary_safe_and_get_waits_until_the_key_is_set(etcd_cluster):
    store = store_on(etcd_cluster)
    store.set("bytes", b"\x00\xff\x80 gloo address")
    assert store.get("bytes") == b"\x00\xff\x80 gloo address"
    store.set("text", "é")
    assert store.get("text") == "é".encode()
    writer = store.clone()
    threading.Timer(0.5, writer.set, args=("late", b"v")).start()
    t0 = time.monotonic()
    assert store.get("late") == b"v"
    assert 0.4 < time.monotonic() - t0 < 3


def test_get_of_a_key_nobody_sets_times_out_naming_the_key_and_the_endpoints(etcd_cluster):
    store = store_on(etcd_cluster, timeout_s=1.0)
    t0 = time.monotonic()
    with pytest.raises(StoreKeyTimeout) as err:
        store.get("never/set")
    assert 0.9 < time.monotonic() - t0 < 2.5
    assert "'never/set'" in str(err.value) and etcd_cluster.endpoints[0] in str(err.value)
    assert isinstance(err.value, dist.DistStoreError)  # what c10d's own stores raise


def test_store_operations_follow_tcpstore(etcd_cluster):
    """The same calls on TCPStore and on the etcd store give the same answers."""
    with reserve_ports(1) as ports:
        tcp = dist.TCPStore("127.0.0.1", ports.port, is_master=True, wait_for_workers=False,
                            timeout=timedelta(seconds=10))
        etcd = store_on(etcd_cluster)
        answers = []
        for store in (tcp, etcd):
            a = [store.compare_set("cs", "", "first"), store.compare_set("cs", "wrong", "x"),
                 store.compare_set("cs", "first", "second"), store.compare_set("unset", "expected", "x"),
                 store.check(["unset"]), store.add("n", 5), store.add("n", -2), store.add("n", 0), store.get("n")]
            store.set("e", "")
            a += [store.compare_set("e", "", "filled"), store.check(["cs", "n"]), store.check(["cs", "nope"]),
                  store.delete_key("n"), store.delete_key("n"), store.check(["n"])]
            store.append("ap", "x")
            store.append("ap", "y")
            store.multi_set(["m1", "m2"], ["1", b"2"])
            a += [store.get("ap"), store.multi_get(["m1", "m2"])]
            answers.append(a)
        del tcp
    assert answers[0] == answers[1]
    assert etcd.num_keys() == 5  # cs, e, ap, m1, m2 (the add receipts are gone)


def requests_of(store: EtcdStore, call) -> int:
    """How many HTTP requests ``call()`` makes to etcd."""
    made, post = [], store.etcd.post
    store.etcd.post = lambda *a, **k: (made.append(a[0]), post(*a, **k))[1]
    try:
        call()
    finally:
        store.etcd.post = post
    return len(made)


def test_reads_of_many_keys_take_one_request_and_a_counter_read_writes_nothing(etcd_cluster):
    store = store_on(etcd_cluster)
    store.set("a", "1")
    store.add("n", 4)
    keys = ["a", "unset", "n"] + [f"more/{i}" for i in range(150)]  # more than one transaction's worth
    got = []
    assert requests_of(store, lambda: got.extend(store.values_if_set(keys))) == 2
    assert got[:3] == [b"1", None, b"4"] and got[3:] == [None] * 150
    assert requests_of(store, lambda: store.add("never set", 0)) == 1
    assert not store.check(["never set"]) and store.add("never set", 0) == 0


def test_an_add_costs_two_requests_and_leaves_at_most_one_receipt_until_close(etcd_cluster):
    store = store_on(etcd_cluster)
    receipts = f"{store.prefix}r/".encode()

    def receipts_left() -> int:
        out = store.etcd.post("kv/range", {"key": b64(receipts), "range_end": b64(prefix_end(receipts)),
                                           "count_only": True}, time.monotonic() + 5)
        return int(out.get("count", 0))

    assert [requests_of(store, lambda: store.add("n", 1)) for _ in range(5)] == [2] * 5
    assert store.get("n") == b"5" and receipts_left() == 1
    store.close()
    assert receipts_left() == 0


def test_a_rendezvous_reads_every_published_address_in_one_request_and_a_quiet_wait_costs_two(etcd_cluster):
    from deepspeed_checkfree.resilience.generation_store import GenerationStore

    store = store_on(etcd_cluster)
    writer = GenerationStore(store.clone(), lambda: None, 0, timedelta(seconds=10), prefix="g/0/pg")
    for rank in range(8):
        writer.set(f"0//cpu//0/{rank}", f"gloo address {rank}".encode())
    assert store.get("g/0/pg/0//cpu//0/3") == b"gloo address 3"  # PrefixStore's layout: the generation's keys
    group = GenerationStore(store, lambda: None, 0, timedelta(seconds=10), prefix="g/0/pg")
    got = []

    def read_all():
        for rank in range(8):
            group.wait([f"0//cpu//0/{rank}"])
            got.append(group.get(f"0//cpu//0/{rank}"))

    assert requests_of(store, read_all) == 1, "one range read of the group's prefix"
    assert got == [f"gloo address {rank}".encode() for rank in range(8)]
    # A late member: the wait blocks on its key with a watch (a read and a watch), then reads the prefix again.
    threading.Timer(0.3, writer.set, args=("0//cpu//0/8", b"late")).start()
    assert requests_of(store, lambda: group.wait(["0//cpu//0/8"])) <= 6
    assert group.get("0//cpu//0/8") == b"late"
    quiet = store.clone()
    assert quiet.wait_for("never", 1.0) is None and quiet.requests == 3, "a read, a watch, the last read"


def test_wait_returns_when_every_key_is_set_and_times_out_naming_the_missing_ones(etcd_cluster):
    store = store_on(etcd_cluster)
    store.set("w/a", "1")
    threading.Timer(0.3, store.clone().set, args=("w/b", "2")).start()
    store.wait(["w/a", "w/b"])
    t0 = time.monotonic()
    with pytest.raises(StoreKeyTimeout, match="'w/c', 'w/d'"):
        store.wait(["w/a", "w/c", "w/d"], timedelta(seconds=0.5))
    assert 0.4 < time.monotonic() - t0 < 2


def test_delete_prefix_removes_a_generations_keys_only(etcd_cluster):
    store = store_on(etcd_cluster)
    for generation in (0, 1):
        group = dist.PrefixStore(f"g/{generation}", store)
        for k in ("a", "b", "c"):
            group.set(k, "v")
    store.set("g/10/a", "other generation sharing the digits")
    assert store.num_keys() == 7
    assert store.delete_prefix("g/0/") == 3
    assert not store.check(["g/0/a"]) and store.check(["g/1/a", "g/10/a"])
    assert store.num_keys() == 4
    assert store.delete_prefix("") == 4 and store.num_keys() == 0


def test_two_job_tokens_see_none_of_each_others_keys(etcd_cluster):
    token_a = fresh_token()
    job_a, job_b = store_on(etcd_cluster, token_a), store_on(etcd_cluster)
    job_a.set("shared/name", "a")
    job_a.add("counter", 3)
    assert not job_b.check(["shared/name"]) and job_b.num_keys() == 0
    assert job_b.add("counter", 1) == 1
    assert job_b.delete_prefix("") == 1
    assert job_a.get("shared/name") == b"a" and job_a.num_keys() == 2
    # Neither the token nor anything but its hash reaches etcd.
    raw = EtcdEndpoints(parse_store_url(etcd_cluster.url))
    out = raw.post("kv/range", {"key": b64(b"\0"), "range_end": b64(b"\0"), "keys_only": True},
                   time.monotonic() + 5)
    keys = [kv["key"] for kv in out.get("kvs", [])]
    assert keys and not any(token_a.encode() in unb64(k) for k in keys)


def test_add_from_three_processes_counts_every_increment_once(etcd_cluster, tmp_path):
    token, adds, world = fresh_token(), 25, 3
    run_ranks(WORKER, world, ["counter", etcd_cluster.url, token, str(tmp_path), str(adds)], timeout_s=120,
              log_dir=tmp_path)
    recs = read_ranks(tmp_path, world)
    returned = sorted(v for r in recs for v in r["added"])
    assert returned == list(range(1, world * adds + 1)), "every add must return a distinct, gapless count"
    assert int(store_on(etcd_cluster, token).get("counter")) == world * adds
    winners = {r["compare_set"] for r in recs}
    assert len(winners) == 1 and winners <= {f"rank{r}" for r in range(world)}


@pytest.mark.parametrize("through", ["prefix_store", "generation_store"])
def test_gloo_rendezvous_and_all_reduce_on_the_etcd_store(etcd_cluster, tmp_path, through):
    # generation_store: the trainer's way (waits that end when a member dies, reads that return what they found)
    token, world = fresh_token(), 3
    run_ranks(WORKER, world, ["allreduce", etcd_cluster.url, token, str(tmp_path), BACKEND, "g/0", through],
              timeout_s=120, log_dir=tmp_path)
    assert [r["sum"] for r in read_ranks(tmp_path, world)] == [6.0] * world
    # Every key of the rendezvous is under the group's prefix, and goes with it.
    store = store_on(etcd_cluster, token)
    written = store.num_keys()
    assert written > 0 and store.delete_prefix("g/0/") == written and store.num_keys() == 0


def timed(call) -> float:
    t0 = time.monotonic()
    call()
    return time.monotonic() - t0


def test_losing_one_member_of_three_keeps_the_store_and_rendezvous_working(new_etcd_cluster, tmp_path):
    cluster = new_etcd_cluster()
    token = fresh_token()
    store = store_on(cluster, token, timeout_s=10)
    store.set("before", "1")
    # A follower this store talks to dies: the next member answers at once (connection refused is immediate).
    follower = next(i for i in range(3) if i != cluster.leader())
    store.etcd.current = follower
    cluster.kill(follower)
    follower_s = timed(lambda: store.set("after follower", "2"))
    assert follower_s < 0.5, f"the first call after losing a follower took {follower_s:.2f} s"
    cluster.start_member(follower)
    cluster.wait_healthy()
    # The leader dies while this store talks to it. A write that reaches a follower during the election is lost
    # with the leader; the store asks the next member after request_timeout_s (2 s) instead of waiting for
    # etcd's own ~5 s timeout.
    leader = cluster.leader()
    store.etcd.current = leader
    cluster.kill(leader)
    leader_s = timed(lambda: store.set("after leader", "3"))
    assert leader_s < 3, f"the first call after losing the leader took {leader_s:.2f} s"
    assert store.get("before") == b"1" and store.get("after follower") == b"2" and store.add("n", 1) == 1
    print(f"first call after killing a follower: {follower_s:.3f} s, the leader: {leader_s:.3f} s")
    # A new process group still forms on the two survivors.
    run_ranks(WORKER, 2, ["allreduce", cluster.url, token, str(tmp_path), BACKEND, "g/1", "generation_store"],
              timeout_s=120, log_dir=tmp_path)
    assert [r["sum"] for r in read_ranks(tmp_path, 2)] == [3.0, 3.0]


def test_an_unreachable_cluster_raises_a_clear_error_within_the_timeout(new_etcd_cluster):
    cluster = new_etcd_cluster()
    timeout_s = 2.0
    store = store_on(cluster, timeout_s=timeout_s)
    store.set("k", "v")
    cluster.stop_all()
    for call in (lambda: store.set("k", "w"), lambda: store.get("k"), lambda: store.add("n", 1)):
        t0 = time.monotonic()
        with pytest.raises(StoreUnreachable) as err:
            call()
        elapsed = time.monotonic() - t0
        assert timeout_s - 0.1 < elapsed < timeout_s + 1.5, elapsed
        message = str(err.value)
        assert message.startswith("etcd unreachable at etcd://") and "check that the etcd cluster is up" in message
        assert all(f"{e}: connection refused" in message for e in cluster.endpoints), message
    print(f"unreachable error after {elapsed:.3f} s (timeout {timeout_s} s)")


def test_with_etcd_auth_only_holders_of_the_token_reach_the_jobs_keys(new_etcd_cluster):
    # A 1 s auth-token TTL, so the test also sees the store get a new token when its old one expired.
    cluster = new_etcd_cluster(members=1, extra_args=("--auth-token-ttl", "1"))
    token, other = fresh_token(), fresh_token()
    enable_auth(cluster.url, "root-pw")
    for t in (token, other):
        grant_job_access(cluster.url, t, admin_password="root-pw")
    job = store_on(cluster, token, token_auth=True)
    job.set("secret", "s")
    assert job.get("secret") == b"s" and job.add("n", 2) == 2 and job.delete_prefix("n") == 1
    assert job.etcd.authentications == 1
    time.sleep(2.5)  # past the TTL: etcd has dropped the token
    assert job.get("secret") == b"s" and job.etcd.authentications == 2
    with pytest.raises(StoreAccessDenied, match="user name is empty"):
        store_on(cluster, token).get("secret")  # the right token but no etcd user: auth is on
    with pytest.raises(StoreAccessDenied, match="authentication failed"):
        store_on(cluster, token, username=etcd_job_user(token), password="guessed").get("secret")
    # Another job's user, asking for this job's prefix directly, is denied by etcd itself.
    prefix = etcd_key_prefix(token).encode()
    intruder = EtcdEndpoints(parse_store_url(cluster.url), username=etcd_job_user(other),
                             password=etcd_job_password(other))
    with pytest.raises(StoreAccessDenied, match="permission denied"):
        intruder.post("kv/range", {"key": b64(prefix), "range_end": b64(prefix_end(prefix))}, time.monotonic() + 5)
    assert store_on(cluster, other, token_auth=True).num_keys() == 0


def test_of_writers_that_count_a_prefix_together_the_last_to_commit_sees_them_all(etcd_cluster):
    """The arrival on etcd: each of 8 members writes its entry and counts the generation's entries in one request;
    the counts seen are all different (each transaction counts the writes committed before it and its own), so
    exactly one member sees all 8; an entry written again (a replacement's) counts once."""
    token = fresh_token()
    stores = [store_on(etcd_cluster, token) for _ in range(8)]
    seen, requests = [None] * 8, [0] * 8

    def arrive(rank: int) -> None:
        before = stores[rank].requests
        seen[rank] = stores[rank].set_and_count([f"g/3/at/{rank}", f"g/3/member/{rank}"], ["3", f"m{rank}"],
                                                "g/3/member/")
        requests[rank] = stores[rank].requests - before

    threads = [threading.Thread(target=arrive, args=(r,)) for r in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(seen) == list(range(1, 9)) and requests == [1] * 8, (seen, requests)
    assert stores[0].set_and_count(["g/3/member/5"], ["again"], "g/3/member/") == 8
    assert stores[0].set_and_count([], [], "g/30/member/") == 0  # (g/3/ and g/30/ do not mix)
    with pytest.raises(ValueError, match="at most 99 keys"):
        stores[0].set_and_count([f"k{i}" for i in range(100)], ["v"] * 100, "k")


def test_membership_runs_unchanged_on_the_etcd_store(etcd_cluster):
    """The supervisor's Membership and join admission, over EtcdStore instead of the embedded TCPStore."""
    token = fresh_token()
    stores = [store_on(etcd_cluster, token) for _ in range(2)]
    members = [Membership(s, token, rank, 2, join_timeout_s=10) for rank, s in enumerate(stores)]
    for rank, m in enumerate(members):
        m.record_trainer(rank, 0)
    infos = [MemberInfo(rank=r, fresh=True, completed_steps=0, incarnation=0, pid=100 + r) for r in range(2)]
    threading.Thread(target=members[1].arrive, args=(0, infos[1])).start()
    before = stores[0].requests
    assert members[0].arrive(0, infos[0]) == (0, {0: infos[0], 1: infos[1]})
    # (no contended counter: the entry and the count are one transaction, Membership._count_in)
    assert stores[0].requests - before <= 8, "an arrival is a handful of requests"
    assert members[1].last_generations() == [0, 0]
    members[0].record("note", {"a": 1})
    assert members[1].fact("note") == {"a": 1}
    for m in members:
        m.finish()
    assert members[0].finished() == 2
    joiner = threading.Thread(target=request_join, args=(stores[1], token, 1, 10))
    joiner.start()
    deadline = time.monotonic() + 10
    # rank 1's supervisor never renewed its lease: its join is admitted after the lease timeout
    reviewer = JoinReviewer(members[0], token, lease_timeout_s=0.5, renewed_at={})
    decided = []
    while not decided and time.monotonic() < deadline:
        decided = reviewer.review(time.monotonic(), stores[0].add(JOIN_REQUESTS, 0))
        time.sleep(0.05)
    joiner.join(10)
    assert [(req["rank"], admitted) for req, admitted, _ in decided] == [(1, True)]


def test_over_tls_the_store_needs_the_ca_and_a_client_certificate(new_etcd_cluster, tmp_path):
    tls = TLSFiles(tmp_path / "tls")
    cluster = new_etcd_cluster(members=1, tls=tls)
    assert cluster.url.startswith("etcds://")
    store = store_on(cluster, ca_cert=str(tls.ca_cert), client_cert=str(tls.client_cert),
                     client_key=str(tls.client_key))
    store.set("k", "v")
    assert store.get("k") == b"v"
    with pytest.raises(StoreUnreachable, match="TLS"):  # no client certificate: etcd ends the handshake
        store_on(cluster, timeout_s=0.5, ca_cert=str(tls.ca_cert)).get("k")
    with pytest.raises(StoreUnreachable, match="TLS certificate verification failed"):  # not our CA: certifi's
        store_on(cluster, timeout_s=0.5, client_cert=str(tls.client_cert), client_key=str(tls.client_key)).get("k")
    with pytest.raises(CheckFreeError, match="plain HTTP: write etcds://"):
        EtcdStore(cluster.url.replace("etcds://", "etcd://"), fresh_token(), ca_cert=str(tls.ca_cert))


def test_the_leader_deletes_the_keys_of_generations_every_rank_has_left(etcd_cluster):
    """A long job's store does not grow with its generations: the leading supervisor's coordinator deletes every
    generation all ranks have moved past (members, formed, the process group's rendezvous keys)."""
    from deepspeed_checkfree.events import EventLog
    from deepspeed_checkfree.resilience.contract import formed_key, group_store_prefix, member_key, rank_generation_key
    from deepspeed_checkfree.resilience.coordinator import Coordinator

    token, world = fresh_token(), 2
    store = store_on(etcd_cluster, token)
    membership = Membership(store, token, 0, world, join_timeout_s=10)
    for generation in range(4):
        for r in range(world):
            store.set(membership.key(member_key(generation, r)), "{}")
        store.set(membership.key(formed_key(generation)), "{}")
        dist.PrefixStore(membership.key(group_store_prefix(generation)), store).set("0", "gloo address")
    for r, last in enumerate((3, 2)):  # rank 1 is still in generation 2
        store.set(membership.key(rank_generation_key(r)), str(last))
    leader = Coordinator(membership, token, owner="o0", hosted=False, external=True, lease_timeout_s=5.0,
                         events=EventLog(None), prefix="[test]")
    leader.tick(time.monotonic())
    assert leader.leading  # (claimed in its first look; its duties start with the next)
    leader.next_look = 0.0
    leader.tick(time.monotonic())
    left = lambda g: [k for k in (member_key(g, 0), formed_key(g), group_store_prefix(g) + "/0")  # noqa: E731
                      if store.check([membership.key(k)])]
    assert left(0) == left(1) == [] and len(left(2)) == len(left(3)) == 3
    store.set(membership.key(rank_generation_key(1)), "3")
    leader.next_look = leader.next_cleanup = 0.0
    leader.tick(time.monotonic())
    assert left(2) == [] and len(left(3)) == 3, "the generation in use stays"
    assert store.check([membership.key(rank_generation_key(0))]), "job-wide keys stay"
