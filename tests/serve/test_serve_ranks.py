"""`llamadist serve --nproc 2 --pp 2`: the engine in the launcher process (the HTTP
server in a child process of its own), both stages in worker ranks; the same answers as one process, streamed or
not; logprobs travel back from the sampling rank; SIGTERM to the launcher ends every
rank with exit 0."""

import pytest

from tests.serve.conftest import ServerProcess, open_stream

import openai  # a test dependency: missing, the tests fail (they never skip)
MSG = [{"role": "user", "content": "Once upon a time there was"}]


@pytest.fixture(scope="module")
def two_ranks(tiny_model, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve_ranks") / "server.log"
    server = ServerProcess(tiny_model, "--nproc", "2", "--pp", "2", "--max-seq-len", "256",
                           "--max-batch", "4", "--served-model-name", "tiny", log_path=log)
    yield server
    assert server.stop() == 0, log.read_text()[-3000:]


def test_chat_over_two_ranks_equals_one_process(two_ranks, client):
    ranks = openai.OpenAI(base_url=two_ranks.url + "/v1", api_key="none", max_retries=0)
    kw = dict(model="tiny", messages=MSG, max_tokens=16, temperature=0, logprobs=True,
              top_logprobs=2)
    want = client.chat.completions.create(**kw)
    got = ranks.chat.completions.create(**kw)
    assert got.choices[0].message.content == want.choices[0].message.content
    assert got.usage == want.usage
    lp = [(e.token, e.logprob) for e in got.choices[0].logprobs.content]
    assert [t for t, _ in lp] == [e.token for e in want.choices[0].logprobs.content]
    assert [v for _, v in lp] == pytest.approx(
        [e.logprob for e in want.choices[0].logprobs.content], abs=1e-4)
    streamed = "".join(c.choices[0].delta.content or "" for c in ranks.chat.completions.create(
        model="tiny", messages=MSG, max_tokens=16, temperature=0, stream=True))
    assert streamed == want.choices[0].message.content


def stage_rows(m: dict, name: str) -> dict[tuple[str, str], float]:
    """{(stage, layers): value} of a per-stage metric parsed by test_api.metrics."""
    out = {}
    for key, value in m.items():
        if key.startswith(name + "{"):
            labels = dict(kv.split("=", 1) for kv in key[len(name) + 1:-1].split(","))
            out[(labels["stage"], labels["layers"])] = value
    return out


def test_metrics_show_every_stage_live(two_ranks):
    """The workers' heartbeats carry their statistics: /metrics has both stages' busy
    seconds, layers, steps and memory while the server runs (not only at the end)."""
    import time

    from tests.serve.test_api import metrics
    ranks = openai.OpenAI(base_url=two_ranks.url + "/v1", api_key="none", max_retries=0)
    for prompt in ("one two three", "The sky is"):
        ranks.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0,
                                 extra_body={"ignore_eos": True})
    m0 = metrics(two_ranks.url)
    steps = m0["llamadist_engine_steps_total"]
    deadline = time.monotonic() + 15
    while True:  # the next heartbeats (about one a second) bring the steps of the requests
        m = metrics(two_ranks.url)
        done = stage_rows(m, "llamadist_stage_steps_total")
        if len(done) == 2 and min(done.values()) >= steps:
            break
        assert time.monotonic() < deadline, done
        time.sleep(0.2)
    busy = stage_rows(m, "llamadist_stage_busy_seconds_total")
    assert sorted(busy) == [("0", "0:3"), ("1", "3:5")]  # 5 layers cut 3 + 2
    assert all(v > 0 for v in busy.values()), busy
    assert all(0 <= v <= 1 for v in stage_rows(m, "llamadist_stage_busy_fraction").values())
    assert all(v > 1e6 for v in stage_rows(m, "llamadist_stage_memory_used_bytes").values())
    assert len(stage_rows(m, "llamadist_stage_memory_used_bytes")) == 2


def test_sigterm_with_an_open_stream_exits_0(two_ranks):
    """Last in this module: SIGTERM while a stream is open; the stream ends (finished or
    cancelled after the grace period), every rank exits and the launcher returns 0."""
    import os
    import time
    ended = open_stream(two_ranks.url)
    workers = children(two_ranks.proc.pid)
    assert len(workers) == 2
    t0 = time.monotonic()
    assert two_ranks.stop() == 0
    assert ended.wait(10) and time.monotonic() - t0 < 20
    for pid in workers:  # no rank left behind
        assert not os.path.exists(f"/proc/{pid}") or "Z" in open(f"/proc/{pid}/stat").read().split()[2]


def children(pid: int, http: bool = False) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc): the worker ranks, without the
    HTTP server process (serve.http_server) unless ``http``."""
    import os
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmd = f.read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid and \
                    (http or b"llamadist.serve.http_server" not in cmd):
                out.append(int(entry))
    return sorted(out)


def test_a_dead_worker_ends_open_streams_with_an_error(tiny_model, tmp_path):
    """--on-failure fail: no recovery; the stream ends with an error event naming the
    worker, /health answers 503, and the server exits non-zero 2 s later."""
    import os
    import signal
    from tests.serve.conftest import http
    server = ServerProcess(tiny_model, "--nproc", "2", "--pp", "2", "--max-seq-len", "256",
                           "--on-failure", "fail", "--served-model-name", "tiny",
                           log_path=tmp_path / "server.log")
    try:
        ranks = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0,
                              timeout=30)
        stream = ranks.completions.create(model="tiny", prompt="The quick brown fox",
                                          max_tokens=240, temperature=0, stream=True,
                                          extra_body={"ignore_eos": True})
        it = iter(stream)
        next(it)
        rank0, rank1 = children(server.proc.pid)  # the launcher's two workers
        os.kill(rank1, signal.SIGKILL)
        with pytest.raises(openai.APIError, match=f"engine failed: rank 1 .pid {rank1}. was "
                                                  f"killed by signal 9"):
            for _ in it:
                pass
        health = http("GET", server.url + "/health", timeout=5)
        assert health[0] == 503 and b"--on-failure fail" in health[1], health
        assert server.proc.wait(15) == 1  # the server ends itself, FAIL_GRACE_S later
    finally:
        code = server.stop()
    assert code == 1, "the front reported no failure"
    assert children(server.proc.pid, http=True) == [] and not os.path.exists(f"/proc/{rank0}")


def test_a_hung_worker_turns_health_503_within_the_timeout(tiny_model, tmp_path):
    """Rank 1 stops answering at its 10th step (alive, silent, --on-failure fail): the
    front gives up after --timeout 3, the open stream ends with an error event and
    /health answers 503 naming rank 1."""
    import time
    from tests.serve.conftest import http
    server = ServerProcess(tiny_model, "--nproc", "2", "--pp", "2", "--max-seq-len", "256",
                           "--timeout", "3", "--on-failure", "fail", "--served-model-name", "tiny",
                           log_path=tmp_path / "server.log",
                           env={"LLAMADIST_TEST_HANG_AT_STEP": "1:10"})
    try:
        ranks = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0,
                              timeout=60)
        t0 = time.monotonic()
        with pytest.raises(openai.APIError, match="engine failed"):
            for _ in ranks.completions.create(model="tiny", prompt="The quick brown fox",
                                              max_tokens=100, temperature=0, stream=True,
                                              extra_body={"ignore_eos": True}):
                pass
        status, body = http("GET", server.url + "/health")
        assert status == 503 and b"rank 1" in body, body
        assert time.monotonic() - t0 < 3 + 10  # the timeout, plus the steps before it
    finally:
        server.stop()  # rank 1 is still hung: the exit code is the launcher's to judge
