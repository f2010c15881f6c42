"""Restricting the job's etcd keys to holders of the job token, with etcd's own users and roles.

Without etcd authentication, anyone who reaches etcd's client port can read and write every key: the token-derived
prefix then separates well-behaved jobs, nothing more. With authentication on, :func:`grant_job_access` (run once
by whoever holds etcd's root password) creates a user and a role for the job, both derived from the token, the role
allowed to read and write the job's prefix only; the ranks then open ``EtcdStore(url, token, token_auth=True)``.
A process without the token cannot compute the user's password, and another job's user is denied these keys.
Use TLS (``etcds://``) as well, or the password and auth token cross the network in clear text.

The same with etcdctl: ``user add``, ``role add``, ``role grant-permission --prefix=true <role> readwrite
<prefix>``, ``user grant-role``; and to turn authentication on: ``user add root``, ``auth enable``.
"""
from __future__ import annotations

import time
from typing import Optional, Union

from .etcd_client import EtcdEndpoints, StoreError, b64, prefix_end
from .store_address import StoreURL, etcd_job_password, etcd_job_user, etcd_key_prefix, parse_store_url


def _admin(url: Union[str, StoreURL], username: Optional[str], password: Optional[str],
           **tls: Optional[str]) -> EtcdEndpoints:
    return EtcdEndpoints(url if isinstance(url, StoreURL) else parse_store_url(url), username=username,
                         password=password, **tls)


def _ensure(etcd: EtcdEndpoints, path: str, payload: dict, deadline: float) -> None:
    """Create something, accepting that it already exists (granting twice is harmless)."""
    try:
        etcd.post(path, payload, deadline)
    except StoreError as e:
        if "already exists" not in str(e):
            raise


def grant_job_access(url: Union[str, StoreURL], token: str, *, admin_username: str = "root",
                     admin_password: Optional[str] = None, timeout_s: float = 30.0, ca_cert: Optional[str] = None,
                     client_cert: Optional[str] = None, client_key: Optional[str] = None) -> str:
    """Create (or keep) the job's etcd user and role: read and write on the job's key prefix, nothing else.

    Args:
        url: the etcd cluster (``etcd://...`` / ``etcds://...``).
        token: the job token.
        admin_username, admin_password: an etcd user with the ``root`` role (none while auth is still off).
        timeout_s: how long to retry while etcd does not answer.
        ca_cert, client_cert, client_key: TLS options, as for :class:`.EtcdStore`.

    Returns:
        The job's etcd user name (also its role's name).
    """
    etcd = _admin(url, admin_username if admin_password else None, admin_password, ca_cert=ca_cert,
                  client_cert=client_cert, client_key=client_key)
    deadline = time.monotonic() + timeout_s
    user = etcd_job_user(token)
    prefix = etcd_key_prefix(token).encode()
    try:
        _ensure(etcd, "auth/user/add", {"name": user, "password": etcd_job_password(token)}, deadline)
        _ensure(etcd, "auth/role/add", {"name": user}, deadline)
        etcd.post("auth/role/grant", {"name": user, "perm": {"permType": "READWRITE", "key": b64(prefix),
                                                             "range_end": b64(prefix_end(prefix))}}, deadline)
        etcd.post("auth/user/grant", {"user": user, "role": user}, deadline)
    finally:
        etcd.close()
    return user


def revoke_job_access(url: Union[str, StoreURL], token: str, *, admin_username: str = "root",
                      admin_password: Optional[str] = None, timeout_s: float = 30.0,
                      **tls: Optional[str]) -> None:
    """Delete the job's etcd user and role (after the job, with its keys: ``EtcdStore.delete_prefix("")``)."""
    etcd = _admin(url, admin_username if admin_password else None, admin_password, **tls)
    deadline = time.monotonic() + timeout_s
    try:
        etcd.post("auth/user/delete", {"name": etcd_job_user(token)}, deadline)
        etcd.post("auth/role/delete", {"role": etcd_job_user(token)}, deadline)
    finally:
        etcd.close()


def enable_auth(url: Union[str, StoreURL], root_password: str, *, timeout_s: float = 30.0,
                **tls: Optional[str]) -> None:
    """Turn etcd authentication on: create the ``root`` user with the ``root`` role, then enable auth (what
    ``etcdctl user add root && etcdctl auth enable`` does). Cluster-wide: every client then needs a user."""
    etcd = _admin(url, None, None, **tls)
    deadline = time.monotonic() + timeout_s
    try:
        _ensure(etcd, "auth/user/add", {"name": "root", "password": root_password}, deadline)
        _ensure(etcd, "auth/role/add", {"name": "root"}, deadline)
        etcd.post("auth/user/grant", {"user": "root", "role": "root"}, deadline)
        etcd.post("auth/enable", {}, deadline)
    finally:
        etcd.close()
