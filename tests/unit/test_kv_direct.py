"""A worker's KV data listener (distributed.kv_direct) over loopback in one process: a
staged export is served once, byte for byte, to whoever asks with its tag; an unknown tag,
a closed listener and the test hook that closes it all fail the fetch; and a drain's kv
names its policy and route (engine.migration.parse_kv)."""

import socket
import time

import pytest
import torch

from llamadist.distributed import kv_direct
from llamadist.distributed.kv_direct import (FAULT_ENV, KEEP, KVServer, address_tensor, fetch,
                                             tensor_address)
from llamadist.engine.migration import parse_kv


def test_a_staged_export_is_served_once_byte_for_byte():
    server = KVServer()
    try:
        blocks = torch.randn(2, 2, 3, 4, 5).to(torch.bfloat16)
        server.stage(7, blocks)
        got = fetch(server.address, 7, timeout=5)
        assert got.dtype == blocks.dtype and torch.equal(got.reshape(blocks.shape), blocks)
        assert server.served_bytes == blocks.nbytes
        with pytest.raises(LookupError):  # served once: a second fetch misses
            fetch(server.address, 7, timeout=5)
        for tag in range(KEEP + 1):  # a target that never came: the oldest is dropped
            server.stage(100 + tag, torch.full((3,), float(tag)))
        with pytest.raises(LookupError):
            fetch(server.address, 100, timeout=5)
        assert fetch(server.address, 100 + KEEP, timeout=5).tolist() == [float(KEEP)] * 3
    finally:
        server.close()
    with pytest.raises(OSError):  # closed: refused
        fetch(server.address, 1, timeout=5)


def test_an_idle_client_does_not_hold_up_a_fetch_and_unfetched_exports_expire(monkeypatch):
    """A connection that never names a tag (another local process) neither blocks the
    target's fetch nor stays past TAG_WAIT_S; an export nobody fetches is dropped after
    STAGED_S."""
    monkeypatch.setattr(kv_direct, "STAGED_S", 0.5)
    server = KVServer()
    try:
        host, port = server.address.rsplit(":", 1)
        idle = socket.create_connection((host, int(port)), timeout=10)
        server.stage(11, torch.arange(6.0))
        assert fetch(server.address, 11, timeout=1).tolist() == list(range(6))
        idle.settimeout(kv_direct.TAG_WAIT_S + 5)
        assert idle.recv(1) == b""  # closed by the listener, having named no tag
        idle.close()
        server.stage(12, torch.ones(2))
        time.sleep(1.0)
        with pytest.raises(LookupError):
            fetch(server.address, 12, timeout=5)
    finally:
        server.close()


def test_the_fault_hook_closes_the_listener_once_it_stages(monkeypatch):
    server = KVServer()
    monkeypatch.setenv(FAULT_ENV, "refuse")
    server.stage(1, torch.ones(4))
    with pytest.raises(OSError):
        fetch(server.address, 1, timeout=5)


def test_addresses_travel_as_tensors_and_kv_names_policy_and_route():
    assert tensor_address(address_tensor("127.0.0.1:40123")) == "127.0.0.1:40123"
    assert parse_kv("auto") == ("auto", "auto")
    assert parse_kv("migrate-relay") == ("migrate", "relay")
    assert parse_kv("replay-direct") == ("replay", "direct")
    for bad in ("teleport", "migrate-pigeon", "migrate-", "-relay"):
        with pytest.raises(ValueError):
            parse_kv(bad)
