"""Which network interface the supervisor gives its trainer's gloo: the pure decision on constructed facts, the probe
on this machine's own loopback, and the supervisor's step (environment, log line, stop record). No process."""
from __future__ import annotations

import logging
import socket
from dataclasses import replace

import pytest

from deepspeed_checkfree.events import EventLog, read_events
from deepspeed_checkfree.resilience import network
from deepspeed_checkfree.resilience.network import NetworkFacts, choose_gloo_interface

INTERFACES = {"lo": ["127.0.0.1", "::1"], "eth0": ["10.1.0.5", "10.9.0.5", "fd00::5"], "ib0": ["10.2.0.5"]}
# A machine of a multi-host job whose hostname resolves to loopback (Debian's default 127.0.1.1 does).
LOOPBACK_HOSTNAME = NetworkFacts(gloo_ifname=None, hostname="node3", hostname_address="127.0.1.1", peer="10.1.0.1",
                                 peer_address="10.1.0.1", route_source="10.1.0.5", interfaces=INTERFACES)


def test_a_hostname_on_loopback_in_a_multi_host_job_gets_the_interface_that_routes_to_the_master_address():
    choice = choose_gloo_interface(LOOPBACK_HOSTNAME)
    assert choice.ifname == "eth0" and not choice.error
    assert "'node3' resolves to 127.0.1.1 (loopback)" in choice.reason
    assert "interface eth0 (10.1.0.5), which routes to the master address 10.1.0.1" in choice.reason


def test_rank_0s_machine_whose_own_address_is_the_master_address_gets_that_interface():
    # Rank 0's trainer advertises its address to every other rank too: loopback would fail the job just the same.
    facts = replace(LOOPBACK_HOSTNAME, peer="10.2.0.5", peer_address="10.2.0.5", route_source="10.2.0.5")
    assert choose_gloo_interface(facts).ifname == "ib0"


def test_a_secondary_address_and_ipv6_find_their_interface():
    assert choose_gloo_interface(replace(LOOPBACK_HOSTNAME, route_source="10.9.0.5")).ifname == "eth0"
    v6 = replace(LOOPBACK_HOSTNAME, hostname_address="::1", peer="fd00::1", peer_address="fd00::1",
                 route_source="fd00::5")
    assert choose_gloo_interface(v6).ifname == "eth0"


def test_nothing_changes_when_the_user_named_an_interface_or_gloo_already_binds_a_real_address():
    assert choose_gloo_interface(replace(LOOPBACK_HOSTNAME, gloo_ifname="ib0")).ifname is None
    assert choose_gloo_interface(replace(LOOPBACK_HOSTNAME, gloo_ifname="ib0", peer_address=None)).error is False
    real = choose_gloo_interface(replace(LOOPBACK_HOSTNAME, hostname_address="10.1.0.5"))
    assert real.ifname is None and not real.error and "10.1.0.5" in real.reason
    # torch ignores a one-character GLOO_SOCKET_IFNAME, so the decision does too.
    assert choose_gloo_interface(replace(LOOPBACK_HOSTNAME, gloo_ifname="x")).ifname == "eth0"


def test_a_job_on_one_machine_keeps_loopback():
    one = replace(LOOPBACK_HOSTNAME, peer="127.0.0.1", peer_address="127.0.0.1", route_source="127.0.0.1")
    choice = choose_gloo_interface(one)
    assert choice.ifname is None and not choice.error and "runs on this machine" in choice.reason


def test_a_hostname_that_resolves_to_nothing_bindable_is_gloos_loopback_fallback():
    assert choose_gloo_interface(replace(LOOPBACK_HOSTNAME, hostname_address=None)).ifname == "eth0"


@pytest.mark.parametrize("change,problem", [
    (dict(route_source=None), "no route to the master address 10.1.0.1"),
    (dict(peer="master.invalid", peer_address=None, route_source=None),
     "the master address 'master.invalid' does not resolve here"),
    (dict(route_source="10.7.0.7"), "no interface of this machine holds 10.7.0.7"),
])
def test_without_a_usable_interface_the_error_names_both_variables_and_the_fix(change, problem):
    choice = choose_gloo_interface(replace(LOOPBACK_HOSTNAME, **change))
    assert choice.error and choice.ifname is None
    assert problem in choice.reason
    assert "resolves to 127.0.1.1 (loopback)" in choice.reason
    assert "Set GLOO_SOCKET_IFNAME on every machine" in choice.reason and "NCCL_SOCKET_IFNAME" in choice.reason
    assert "`ip route get " in choice.reason


# ---------------------------------------------------------------------------------------------------------------
# The probe, on this machine's loopback only
# ---------------------------------------------------------------------------------------------------------------

def test_the_probe_reads_this_machines_loopback():
    assert "127.0.0.1" in network.interface_addresses()["lo"]
    assert network.route_source("127.0.0.1") == "127.0.0.1"
    assert network.is_loopback(network.bindable_address("localhost"))
    assert network.bindable_address("name.invalid") is None
    facts = network.probe({"GLOO_SOCKET_IFNAME": "eth7"}, ["name.invalid", "127.0.0.1"])
    assert facts.gloo_ifname == "eth7" and facts.hostname == socket.gethostname()
    assert facts.peer == "127.0.0.1" and facts.peer_address == "127.0.0.1" and facts.route_source == "127.0.0.1"


def test_the_peers_are_the_master_address_then_the_stores_endpoints():
    assert network.peers("10.0.0.1", None) == ["10.0.0.1"]
    assert network.peers("any", "etcd://10.0.0.7:2379,[fd00::8]:2379") == ["any", "10.0.0.7", "fd00::8"]


# ---------------------------------------------------------------------------------------------------------------
# The supervisor's step: environment, one log line, and a stop record
# ---------------------------------------------------------------------------------------------------------------

def test_the_supervisor_step_sets_the_variable_for_the_trainer_and_says_so(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(network, "probe", lambda environ, peers: LOOPBACK_HOSTNAME)
    environ = {}
    with caplog.at_level(logging.WARNING, logger=network.__name__):
        ok = network.set_gloo_interface(environ, master_addr="10.1.0.1", store_url=None, rank=3,
                                        events=EventLog(str(tmp_path / "e.jsonl")), prefix="[checkfree rank=3]")
    assert ok and environ == {"GLOO_SOCKET_IFNAME": "eth0"}
    [line] = [r.getMessage() for r in caplog.records]
    assert line.startswith("[checkfree rank=3] GLOO_SOCKET_IFNAME=eth0 for the trainer: this machine's hostname")
    assert not (tmp_path / "e.jsonl").exists()


def test_the_supervisor_step_leaves_a_users_setting_alone_without_probing(monkeypatch, tmp_path):
    monkeypatch.setattr(network, "probe", lambda environ, peers: pytest.fail("probed"))
    environ = {"GLOO_SOCKET_IFNAME": "ib0"}
    assert network.set_gloo_interface(environ, master_addr="10.1.0.1", store_url=None, rank=0, events=EventLog(),
                                      prefix="")
    assert environ == {"GLOO_SOCKET_IFNAME": "ib0"}


def test_the_supervisor_step_refuses_and_records_the_stop_when_no_interface_reaches_the_master(monkeypatch, tmp_path,
                                                                                                caplog):
    monkeypatch.setattr(network, "probe", lambda environ, peers: replace(LOOPBACK_HOSTNAME, route_source=None))
    environ = {}
    with caplog.at_level(logging.ERROR, logger=network.__name__):
        ok = network.set_gloo_interface(environ, master_addr="10.1.0.1", store_url=None, rank=2,
                                        events=EventLog(str(tmp_path / "e.jsonl")), prefix="[checkfree rank=2]")
    assert not ok and environ == {}
    assert "[checkfree rank=2] cannot start a trainer: this machine's hostname" in caplog.text
    [record] = read_events(str(tmp_path / "e.jsonl"))
    assert record["event"] == "job_stopped" and record["cause"] == "network" and record["rank"] == 2
    assert "GLOO_SOCKET_IFNAME" in record["reason"]
