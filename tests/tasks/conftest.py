"""Fixtures of the task tests."""

import socket

import pytest


@pytest.fixture
def listener():
    """A TCP server on 127.0.0.1 (any free port) that sandboxed programs must not reach; `accept` waits 0.5 s."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    server.settimeout(0.5)
    yield server
    server.close()
