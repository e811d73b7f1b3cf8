"""`llamadist serve --nproc 2 --ep 2` on a tiny Mixtral: the experts spread over two
data-parallel replicas stepping in lockstep behind the HTTP front; /metrics exports the
tokens routed to each expert of each layer (a labelled counter) and each layer's
imbalance. Rank 0's counts cover both replicas' tokens (every rank of a token-local
dispatch counts every replica's tokens: parallel.expert)."""

import threading

import pytest

from tests.serve.conftest import ServerProcess
from tests.serve.test_api import metrics

import openai  # a test dependency: missing, the tests fail (they never skip)


def moe_server(tiny_mixtrals, tmp_path_factory, name: str, *grid: str):
    """`serve` on the tiny top-2 Mixtral over two processes laid out by ``grid``."""
    log = tmp_path_factory.mktemp(name) / "server.log"
    server = ServerProcess(tiny_mixtrals["moe_top2_gqa"], "--nproc", "2", *grid,
                           "--max-seq-len", "128", "--max-batch", "2",
                           "--served-model-name", "moe", log_path=log)
    yield server
    assert server.stop() == 0, log.read_text()[-3000:]


@pytest.fixture(scope="module")
def ep_server(tiny_mixtrals, tmp_path_factory):
    yield from moe_server(tiny_mixtrals, tmp_path_factory, "serve_ep", "--ep", "2")


def test_expert_load_in_metrics_covers_both_replicas(ep_server):
    api = openai.OpenAI(base_url=ep_server.url + "/v1", api_key="none", max_retries=0,
                        timeout=60)
    before = metrics(ep_server.url)
    assert not any(k.startswith("llamadist_expert_routed_tokens_total") and v
                   for k, v in before.items())
    # a long stream on one replica; the second request, sent while it runs, goes to the
    # other (the least loaded)
    stream = api.completions.create(model="moe", prompt="The quick brown fox", max_tokens=40,
                                    temperature=0, stream=True, stream_options={
                                        "include_usage": True},
                                    extra_body={"ignore_eos": True})
    it = iter(stream)
    next(it)
    second = {}
    t = threading.Thread(target=lambda: second.update(r=api.completions.create(
        model="moe", prompt="1 2 3 4 5 6", max_tokens=6, temperature=0,
        extra_body={"ignore_eos": True})))
    t.start()
    usage = [c.usage for c in it if c.usage is not None][-1]
    t.join(60)
    other = second["r"].usage
    m = metrics(ep_server.url)
    # every computed token (prompt tokens, and every sampled token but the last) goes to
    # top-2 experts in each of the 3 layers
    computed = usage.prompt_tokens + 39 + other.prompt_tokens + 5
    for layer in range(3):
        counts = [m[f"llamadist_expert_routed_tokens_total{{expert={e},layer={layer}}}"]
                  for e in range(4)]
        assert sum(counts) == 2 * computed, (layer, counts, computed)
        imbalance = m[f"llamadist_expert_load_imbalance{{layer={layer}}}"]
        assert imbalance == pytest.approx(max(counts) * 4 / sum(counts))
        assert 1.0 <= imbalance <= 4.0


@pytest.fixture(scope="module")
def pp_server(tiny_mixtrals, tmp_path_factory):
    yield from moe_server(tiny_mixtrals, tmp_path_factory, "serve_moe_pp", "--pp", "2")


def test_expert_load_in_metrics_covers_every_stage_under_the_front(pp_server):
    """With --nproc the front holds no stage: every MoE layer's counts come from the
    workers' heartbeats, the first stage's layers and the second's."""
    import time
    api = openai.OpenAI(base_url=pp_server.url + "/v1", api_key="none", max_retries=0,
                        timeout=60)
    computed = 0
    for prompt, n in (("The quick brown fox", 12), ("1 2 3 4 5 6", 5)):
        r = api.completions.create(model="moe", prompt=prompt, max_tokens=n, temperature=0,
                                   extra_body={"ignore_eos": True})
        computed += r.usage.prompt_tokens + n - 1  # the last token is sampled, not computed
    deadline = time.monotonic() + 15
    while True:  # the heartbeats (about one a second) bring the counts of the last steps
        m = metrics(pp_server.url)
        sums = {layer: sum(m.get(f"llamadist_expert_routed_tokens_total{{expert={e},"
                                 f"layer={layer}}}", 0) for e in range(4)) for layer in range(3)}
        if all(v >= 2 * computed for v in sums.values()):
            break
        assert time.monotonic() < deadline, (sums, computed)
        time.sleep(0.2)
    assert sums == {layer: 2 * computed for layer in range(3)}, (sums, computed)  # top-2
    stages = {k.split("stage=")[1].rstrip("}") for k in m
              if k.startswith("llamadist_stage_busy_seconds_total{")}
    assert stages == {"0", "1"}
