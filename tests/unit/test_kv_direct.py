"""A worker's KV data listener (distributed.kv_direct) over loopback in one process: a
staged export is served once, byte for byte, to whoever asks with its tag; an unknown tag,
a closed listener and the test hook that closes it all fail the fetch; and a drain's kv
names its policy and route (engine.migration.parse_kv)."""

import pytest
import torch

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
