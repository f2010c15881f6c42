"""The external store's URL and the etcd names a job token derives: pure, no process, no etcd."""
from __future__ import annotations

import pytest

from deepspeed_checkfree.errors import ConfigError
from deepspeed_checkfree.resilience.etcd_client import prefix_end
from deepspeed_checkfree.resilience.store_address import (etcd_job_password, etcd_job_user, etcd_key_prefix,
                                                          parse_store_url)


def test_a_url_lists_every_member_in_order():
    url = parse_store_url("etcd://h1:2379,10.0.0.2:2381,[::1]:2390")
    assert url.scheme == "etcd" and url.protocol == "http"
    assert url.endpoints == (("h1", 2379), ("10.0.0.2", 2381), ("::1", 2390))
    assert str(url) == "etcd://h1:2379,10.0.0.2:2381,[::1]:2390"


def test_etcds_means_tls_and_a_missing_port_means_2379():
    url = parse_store_url("etcds://h1,h2:3000/")
    assert url.protocol == "https" and url.endpoints == (("h1", 2379), ("h2", 3000))


@pytest.mark.parametrize("url,rule", [
    ("etcd://", "list of etcd endpoints is empty"),
    ("etcd:// , ", "empty"),
    ("etcd://h1:2379,,h2:2379", "between commas is empty"),
    ("etcd://h1:port", "number from 1 to 65535, got 'port'"),
    ("etcd://h1:0", "got '0'"),
    ("etcd://h1:70000", "got '70000'"),
    ("etcd://h1:", "gives no port"),
    ("etcd://:2379", "has no host"),
    ("tcp://h1:2379", "unknown scheme 'tcp'"),
    ("h1:2379", "no scheme"),
    ("etcd://h1:2379/v3/kv", "no path"),
    ("etcd://user:pw@h1:2379", "give credentials to the store's constructor"),
    ("etcd://::1:2379", "write it as [::1"),
    ("etcd://[::1:2379", "does not close it"),
    ("etcd://h1:2379,h1:2379", "listed twice"),
])
def test_a_bad_url_is_refused_with_the_rule_what_it_got_and_the_form(url, rule):
    with pytest.raises(ConfigError) as err:
        parse_store_url(url)
    message = str(err.value)
    assert rule in message and repr(url) in message and "etcd://host:port[,host:port...]" in message


def test_the_job_names_are_stable_distinct_per_token_and_never_contain_it():
    token = "0123456789abcdef0123456789abcdef"
    prefix, user, password = etcd_key_prefix(token), etcd_job_user(token), etcd_job_password(token)
    assert prefix == etcd_key_prefix(token) and prefix.startswith("/checkfree/") and prefix.endswith("/")
    assert all(token not in name and token[:12] not in name for name in (prefix, user, password))
    assert etcd_key_prefix(token + "x") != prefix and etcd_job_user(token + "x") != user
    assert password not in prefix and password[:16] not in user  # one name does not give away another


def test_prefix_end_selects_exactly_the_keys_under_a_prefix():
    assert prefix_end(b"/a/") == b"/a0"
    assert prefix_end(b"a\xff") == b"b"
    assert prefix_end(b"\xff\xff") == b"\0"  # every key
    assert b"/a/zzz" < prefix_end(b"/a/") and not b"/a0" < prefix_end(b"/a/")
