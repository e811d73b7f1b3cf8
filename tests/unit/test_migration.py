"""KV migration's pieces without a model run: the cost rule (engine.migration) and the
paged cache's export/import of blocks (runtime.paged_kv)."""

import pytest
import torch

from llamadist.config import named_shape
from llamadist.engine.migration import FRONT_RELAY, KVPath, MigrationCost
from llamadist.planning.cost import LINKS
from llamadist.runtime.paged_kv import PagedKVCache

RELAY = KVPath(FRONT_RELAY, hops=2, messages=4)


def test_on_a_cpu_shipping_kv_through_the_front_beats_recomputing_it():
    cost = MigrationCost(named_shape("smollm2-135m"), "bfloat16", 2, "cpu")
    ratios = [cost.replay_s(t) / cost.migrate_s(RELAY, t) for t in (8, 64, 512, 4096)]
    assert all(r > 1 for r in ratios)
    assert ratios[-1] > ratios[0]  # prefill's attention grows with t^2, the bytes with t
    assert cost.choose("auto", RELAY, 512, 512) == "migrate"
    # the target's prefix cache holds all but one token: nothing worth shipping
    assert cost.choose("auto", RELAY, 512, 1) == "replay"


def test_on_a_gpu_the_front_s_tcp_relay_loses_to_a_prefill_but_nvlink_wins():
    cost = MigrationCost(named_shape("llama3-8b"), "bfloat16", 2, "cuda:0")
    assert cost.choose("auto", RELAY, 4096, 4096) == "replay"
    direct = KVPath(LINKS["nvlink"], hops=1, messages=2)
    assert cost.choose("auto", direct, 4096, 4096) == "migrate"


def test_forced_policies_and_an_executor_without_a_path():
    cost = MigrationCost(named_shape("smollm2-135m"), "float32", 4, "cpu")
    assert cost.choose("migrate", RELAY, 2, 2) == "migrate"
    assert cost.choose("replay", RELAY, 4096, 4096) == "replay"
    assert cost.choose("migrate", None, 4096, 4096) == "replay"  # no path: replay
    assert cost.choose("auto", RELAY, 0, 0) == "replay"  # nothing computed
    with pytest.raises(ValueError, match="KV policy"):
        cost.choose("teleport", RELAY, 8, 8)


def test_exported_blocks_land_in_other_block_ids_of_another_cache():
    config = named_shape("smollm2-135m")
    layers = range(3, 6)
    src = PagedKVCache(config, layers, 8, 4, "cpu", torch.float32)
    dst = PagedKVCache(config, layers, 8, 4, "cpu", torch.float32)
    torch.manual_seed(0)
    for t in src.layers.values():
        t.normal_()
    payload = src.export_blocks([5, 2])
    assert payload.numel() == 3 * 2 * 2 * config.num_kv_heads * 4 * config.head_dim
    dst.import_blocks([1, 6], payload)
    for i in layers:
        assert torch.equal(dst.kv(i)[:, [1, 6]], src.kv(i)[:, [5, 2]])
        assert not dst.kv(i)[:, [0, 2, 3, 4, 5, 7]].any()  # no other block written
    with pytest.raises(ValueError, match="does not fit"):
        dst.import_blocks([1], payload)
