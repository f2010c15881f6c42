"""Cutting a failed generation's connections: exactly the connected sockets opened since it began to form, never a
listener, a store connection or an older socket, and only once."""
from __future__ import annotations

import socket
import sys

import pytest

from deepspeed_checkfree.resilience.connection_cut import GenerationConnections, open_sockets

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sockets are found in /proc/self/fd")


def connected_pair(listener: socket.socket):
    client = socket.create_connection(listener.getsockname()[:2], timeout=5)
    server, _ = listener.accept()
    server.settimeout(5)
    return client, server


def closed_by_peer(sock: socket.socket) -> bool:
    """Whether the far end of ``sock`` was shut down: a read returns end-of-file at once."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


@pytest.fixture()
def listener():
    with socket.create_server(("127.0.0.1", 0)) as s:
        yield s


def test_it_cuts_the_generations_connections_and_nothing_else(listener):
    store = socket.create_server(("127.0.0.1", 0))
    old_client, old_server = connected_pair(listener)  # before the generation: untouched
    connections = GenerationConnections(keep_ports={store.getsockname()[1]})
    new_listener = socket.create_server(("127.0.0.1", 0))  # a listener of the generation: never touched
    client, server = connected_pair(listener)
    store_client, store_server = connected_pair(store)
    try:
        # This process holds both ends of each pair: the generation's two ends are cut, the rest are not.
        assert connections.cut() == 2
        assert connections.cut_count == 2
        with pytest.raises(OSError):
            client.send(b"x")
        assert closed_by_peer(server)
        for a, b in ((old_client, old_server), (store_client, store_server)):
            a.sendall(b"x")
            assert b.recv(1) == b"x"
        new_listener.settimeout(0.01)
        with pytest.raises(socket.timeout):
            new_listener.accept()  # still listening
    finally:
        for s in (old_client, old_server, client, server, store_client, store_server, new_listener, store):
            s.close()


def test_only_the_first_cut_acts(listener):
    connections = GenerationConnections(keep_ports=())
    assert connections.cut() == 0
    client, server = connected_pair(listener)  # opened after the cut: the next generation's
    try:
        assert connections.cut() == 0
        client.sendall(b"x")
        assert server.recv(1) == b"x"
    finally:
        client.close()
        server.close()


def test_open_sockets_sees_this_process_sockets(listener):
    inode_by_fd = {fd: inode for inode, fd in open_sockets().items()}
    assert listener.fileno() in inode_by_fd
