"""distributed.launch.free_port: rank 0's store port comes from below the kernel's
ephemeral range, where gloo's own outgoing connections (other worlds of the same host,
starting at the same time) cannot take it before rank 0 binds it; it is free when chosen."""

from __future__ import annotations

import itertools
import socket

from llamadist.distributed import launch


def test_port_is_free_and_below_the_ephemeral_range():
    low = launch._ephemeral_range()[0]
    for _ in range(20):
        port = launch.free_port()
        assert 1024 < port < low
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", port))  # free: binds


def test_taken_ports_are_skipped(monkeypatch):
    """A port already bound is never returned: free_port tries another."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", 0))
        taken = held.getsockname()[1]
        held.listen()
        monkeypatch.setattr(launch, "_ephemeral_range", lambda: (taken + 1, 60999))
        tries = itertools.chain([taken, taken], itertools.count(taken - 1, -1))
        monkeypatch.setattr(launch.random, "Random", lambda: type(
            "R", (), {"randrange": lambda self, a, b: next(tries)})())
        port = launch.free_port()
        assert port != taken
