"""A worker lost under `llamadist serve --nproc 2` costs latency, never a request: eight
concurrent streaming requests (greedy and seeded) survive a worker killed with SIGKILL
(a pipeline stage, a tensor-parallel rank, a data-parallel replica) or stopped with
SIGSTOP; each text equals the same request on a one-process server; /health says
recovering meanwhile, /metrics counts the recovery, and no worker is left behind. Under
--pp and --tp only the lost worker is started again: the other workers' processes stay
(their weights, their TP shards, kept; cli.rejoin), so only the victim's pid changes."""

import os
import signal
import threading
import time

import pytest

from tests.serve.conftest import ServerProcess, http
from tests.serve.test_serve_ranks import children

import openai  # a test dependency: missing, the tests fail (they never skip)

PROMPTS = ["The quick brown fox", "Once upon a time", "1 2 3 4", "def main():",
           "Distributed inference", "Water boils at", "The capital of France", "Hello"]
NEW = 120
# One replica: at most 8 sequences at once, so all eight streams run when the fault comes
# (with 4, the first four ran to their end before the last four had a first text, and
# only those four were in flight: the same fault, 120 steps later). Two replicas (--dp 2)
# keep 4 each: they hold the eight, and a lost replica's requests queue on the other.
ONE_REPLICA_BATCH = "8"


def request_kw(i: int) -> dict:
    """Request i: greedy for even i, seeded sampling for odd i."""
    kw = dict(model="tiny", prompt=PROMPTS[i], max_tokens=NEW, extra_body={"ignore_eos": True})
    if i % 2:
        return kw | dict(temperature=0.8, top_p=0.95, seed=100 + i)
    return kw | dict(temperature=0)


@pytest.fixture(scope="module")
def reference(client) -> list[str]:
    """The eight texts on the one-process server (the session's tiny server)."""
    return [client.completions.create(**request_kw(i)).choices[0].text
            for i in range(len(PROMPTS))]


def stream_all(url: str, started: threading.Event, n: int = len(PROMPTS),
               api_key: str = "none") -> tuple[list, list[threading.Thread]]:
    """``n`` streaming requests at once (request i % 8), each on its own thread;
    ``started`` is set once every stream has its first text. -> (results: text or the
    exception, threads)."""
    api = openai.OpenAI(base_url=url + "/v1", api_key=api_key, max_retries=0, timeout=120)
    results: list = [None] * n
    first = threading.Semaphore(0)

    def run(i: int) -> None:
        try:
            parts, told = [], False
            for chunk in api.completions.create(stream=True, **request_kw(i % len(PROMPTS))):
                parts.append(chunk.choices[0].text)
                if not told:
                    told = True
                    first.release()
            results[i] = "".join(parts)
        except Exception as e:  # noqa: BLE001 - the test reports it
            results[i] = e
            first.release()

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()

    def wait_first() -> None:
        for _ in threads:
            first.acquire()
        started.set()
    threading.Thread(target=wait_first, daemon=True).start()
    return results, threads


def streams_survive(server, log, reference, kills: list[tuple[int, int]]) -> None:
    """Start the streams, send each (pid, signal) of ``kills`` once every stream has its
    first text, and check every stream's text equals the run without a fault."""
    started = threading.Event()
    results, threads = stream_all(server.url, started)
    assert started.wait(60), log.read_text()[-3000:]
    for pid, sig in kills:
        os.kill(pid, sig)
    for t in threads:
        t.join(120)
    assert results == reference, log.read_text()[-3000:]


def assert_gone(pids: list[int]) -> None:
    """Each of ``pids`` has exited (gone, or a zombie its parent has not reaped yet)."""
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or \
            open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z", pid


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


# One case per way a worker is lost and found. A killed last stage (the one that samples)
# is pp3-kill's victim, with stage 0 rejoining as under --pp 2 (and a --pp 2 pair lost
# whole in test_a_survivor_that_does_not_rejoin_restarts_the_replica); a killed TP rank
# whose peer fails in the all-reduce and rebinds is tp2pp2-kill's, and --tp 2 alone is
# recovered in tp-stop: so --pp 2 and --tp 2 kills have no case of their own.
@pytest.mark.parametrize("nproc,grid,victim,sig", [
    # stage 0's second TP rank (ranks: stage-major, tp innermost): its TP peer fails in
    # an all-reduce; stage 1's two ranks, blocked on that live peer, follow when it
    # leaves the broken world; all three rebind their TP modules to the new world
    (4, ["--tp", "2", "--pp", "2"], 1, signal.SIGKILL),
    # a context-parallel rank: a step reads its CP group from the rank's groups, so the
    # survivor's stage needs no rebinding, only the new world
    (2, ["--cp", "2"], 1, signal.SIGKILL),
    (2, ["--pp", "2"], 0, signal.SIGSTOP),   # a hung first stage: no heartbeat for --timeout
    # a hung TP rank: its peer, stuck in an all-reduce with it, must not be the one blamed
    (2, ["--tp", "2"], 1, signal.SIGSTOP),
    (2, ["--dp", "2"], 1, signal.SIGKILL),   # a data-parallel replica: fail-over, restart behind
    # replica 1's second TP rank: fail-over, and in the background its TP peer rejoins
    (4, ["--tp", "2", "--dp", "2"], 3, signal.SIGKILL),
    # the last stage, which samples; stage 1 survives, blocked on stage 0, also alive
    (3, ["--pp", "3"], 2, signal.SIGKILL),
], ids=["tp2pp2-kill", "cp-kill", "pp-stop", "tp-stop", "dp-kill",
        "tp2dp2-kill", "pp3-kill"])
def test_requests_survive_a_lost_worker(tiny_model, tmp_path, reference, nproc, grid, victim,
                                        sig):
    log = tmp_path / "server.log"
    batch = "4" if "--dp" in grid else ONE_REPLICA_BATCH
    server = ServerProcess(tiny_model, "--nproc", str(nproc), *grid, "--max-seq-len", "256",
                           "--max-batch", batch, "--timeout", "3", "--served-model-name", "tiny",
                           log_path=log)
    try:
        workers = children(server.proc.pid)
        assert len(workers) == nproc
        started = threading.Event()
        results, threads = stream_all(server.url, started)
        assert started.wait(60), log.read_text()[-3000:]
        os.kill(workers[victim], sig)
        seen = set()
        while any(t.is_alive() for t in threads):
            seen.add(http("GET", server.url + "/health", timeout=5)[1])
            time.sleep(0.1)
        assert results == reference, log.read_text()[-3000:]
        status, body = http("GET", server.url + "/health")
        assert status == 200, body
        if "--dp" not in grid:  # one replica: requests waited while it was replaced
            assert any(b'"recovering"' in b for b in seen), seen
        deadline = time.monotonic() + 60  # a replica restarted in the background rejoins
        while b'"replicas":"2/2"' not in body and "--dp" in grid:
            assert time.monotonic() < deadline, body
            time.sleep(0.2)
            body = http("GET", server.url + "/health")[1]
        text = http("GET", server.url + "/metrics")[1].decode()
        assert metric(text, "llamadist_recoveries_total") == 1
        assert metric(text, "llamadist_worker_restarts_total") == 1
        assert metric(text, 'llamadist_recovery_seconds_count{phase="restart"}') == 1
        # the fault came with requests in flight (one replica: all eight, replayed)
        replayed = metric(text, "llamadist_replayed_requests_total")
        assert replayed >= 1 and ("--dp" in grid or replayed == len(PROMPTS)), replayed
        now = children(server.proc.pid)
        assert len(now) == nproc and workers[victim] not in now  # a new one took its place
        # the other workers kept their weights (cli.rejoin; with --dp the other replicas
        # are not touched at all)
        assert set(workers) - set(now) == {workers[victim]}, (workers, now, log.read_text()[-4000:])
        dp = int(grid[grid.index("--dp") + 1]) if "--dp" in grid else 1
        if nproc // dp > 1:  # the lost worker's replica had others: they rejoined it
            assert "kept their stages" in log.read_text(), log.read_text()[-4000:]
    finally:
        code = server.stop()
    assert code == 0, log.read_text()[-3000:]
    assert_gone(workers + now)  # no worker outlives the front


def test_a_survivor_that_does_not_rejoin_restarts_the_replica(tiny_model, tmp_path,
                                                              reference):
    """Worker 1 killed while worker 0 is stopped: worker 0 cannot take the order to rejoin
    within --timeout, so the front restarts the whole replica (both processes new), and the
    eight requests still end as without the fault."""
    log = tmp_path / "server.log"
    server = ServerProcess(tiny_model, "--nproc", "2", "--pp", "2", "--max-seq-len", "256",
                           "--max-batch", ONE_REPLICA_BATCH, "--timeout", "3",
                           "--served-model-name", "tiny", log_path=log)
    try:
        workers = children(server.proc.pid)
        streams_survive(server, log, reference,
                        [(workers[0], signal.SIGSTOP), (workers[1], signal.SIGKILL)])
        assert "the survivors did not rejoin" in log.read_text()
        now = children(server.proc.pid)
        assert len(now) == 2 and not set(now) & set(workers), (workers, now)
    finally:
        code = server.stop()
    assert code == 0, log.read_text()[-3000:]
    assert_gone(workers + now)


def test_replan_shrinks_three_stages_to_two(tiny_model, tmp_path, reference):
    """`--on-failure replan`: a stage's worker killed mid-generation; the pipeline is
    planned again over the two rank slots left, its workers load the new split, and the
    eight requests replay and end as without the fault."""
    log = tmp_path / "server.log"
    server = ServerProcess(tiny_model, "--nproc", "3", "--pp", "3", "--on-failure", "replan",
                           "--max-seq-len", "256", "--max-batch", ONE_REPLICA_BATCH,
                           "--timeout", "5",
                           "--served-model-name", "tiny", log_path=log)
    try:
        workers = children(server.proc.pid)
        assert len(workers) == 3
        assert b'"stages":3' in http("GET", server.url + "/health")[1]
        streams_survive(server, log, reference, [(workers[1], signal.SIGKILL)])
        status, body = http("GET", server.url + "/health")
        assert status == 200 and b'"stages":2' in body, body
        now = children(server.proc.pid)
        assert len(now) == 2 and not set(now) & set(workers)
    finally:
        code = server.stop()
    assert code == 0, log.read_text()[-3000:]
    assert_gone(workers + now)


def test_replan_with_data_parallel_replicas(tiny_model, tmp_path, reference):
    """`--on-failure replan --dp 2`: replica 1's last stage killed mid-generation; its
    requests move to replica 0 at once, replica 1 is re-planned over its one rank slot
    left (2 stages -> 1) and started in the background, then serves again; replica 0's
    workers are never touched, and the eight requests end as without the fault."""
    log = tmp_path / "server.log"
    server = ServerProcess(tiny_model, "--nproc", "4", "--pp", "2", "--dp", "2",
                           "--on-failure", "replan", "--max-seq-len", "256", "--max-batch",
                           "4", "--timeout", "5", "--served-model-name", "tiny", log_path=log)
    try:
        workers = children(server.proc.pid)
        assert len(workers) == 4
        # replica 1 = workers 2, 3 (stage 1)
        streams_survive(server, log, reference, [(workers[3], signal.SIGKILL)])
        deadline, body = time.monotonic() + 60, b""
        while b'"replicas":"2/2"' not in body:  # replica 1 back, re-planned
            assert time.monotonic() < deadline, (body, log.read_text()[-3000:])
            time.sleep(0.2)
            status, body = http("GET", server.url + "/health")
        assert status == 200 and b'"replica":1' in body and b'"layout":"1 stage(s)' in body, body
        assert b'"stages":2' in body, body  # replica 0 keeps its two stages
        now = children(server.proc.pid)
        assert len(now) == 3 and set(workers[:2]) <= set(now), (workers, now)
        assert not set(workers[2:]) & set(now)
        # both replicas serve again: more requests than one replica's batch, all correct
        results, threads = stream_all(server.url, threading.Event())
        for t in threads:
            t.join(120)
        assert results == reference, log.read_text()[-3000:]
        text = http("GET", server.url + "/metrics")[1].decode()
        assert metric(text, "llamadist_recoveries_total") == 1
        assert metric(text, "llamadist_replicas_running") == 2
    finally:
        code = server.stop()
    assert code == 0, log.read_text()[-3000:]
    assert_gone(workers + now)


def test_replan_with_a_one_stage_replica_keeps_the_others_serving(tiny_model, tmp_path,
                                                                  reference):
    """`--on-failure replan --dp 2` with one stage per replica: a lost replica has no
    device left to re-plan over, so it stays down with that reason on /health while the
    other serves every request (none lost or altered); no worker is left behind."""
    log = tmp_path / "server.log"
    server = ServerProcess(tiny_model, "--nproc", "2", "--dp", "2", "--on-failure", "replan",
                           "--max-seq-len", "256", "--max-batch", "4", "--timeout", "5",
                           "--served-model-name", "tiny", log_path=log)
    try:
        workers = children(server.proc.pid)
        streams_survive(server, log, reference, [(workers[1], signal.SIGKILL)])
        deadline, body = time.monotonic() + 30, b""
        while b'"replicas_down"' not in body:
            assert time.monotonic() < deadline, (body, log.read_text()[-3000:])
            time.sleep(0.2)
            status, body = http("GET", server.url + "/health")
        assert status == 200 and b'"replicas":"1/2"' in body, body
        assert b"cannot re-plan" in body and b"no device is left" in body, body
        now = children(server.proc.pid)
        assert now == workers[:1], (workers, now)
    finally:
        code = server.stop()
    assert code == 0, log.read_text()[-3000:]
    assert_gone(workers + now)
