"""The front's TCP links to its workers (distributed.link), over loopback in one process:
stage messages both ways, heartbeats with the time inside a step, and every way a wait
for a worker ends (its message, its closed link, the deadline) naming the worker."""

import pickle
import socket
import time

import pytest
import torch

from llamadist.distributed.link import (HELLO, OBJ, CrewLinks, FrontLink, Rejoin,
                                        WorkerLink, WorkerLost, _Socket, read_hello)
from llamadist.distributed.p2p import Kind, Message


@pytest.fixture
def pair():
    """(worker's link, front's link) for worker index 3."""
    server = socket.create_server(("127.0.0.1", 0))
    worker = WorkerLink(f"127.0.0.1:{server.getsockname()[1]}", 3, "tok", beat_s=0.05)
    sock, _ = server.accept()
    assert read_hello(sock) == (3, "tok")
    front = FrontLink(sock, 3)
    yield worker, front
    worker.close()
    front.close()
    server.close()


def test_messages_objects_and_heartbeats(pair):
    worker, front = pair
    links = CrewLinks(0, {3: front}, timeout=5.0, failure=lambda: None)
    step = torch.arange(40, dtype=torch.uint8)
    links.send(3, Message(Kind.STEP, tensor=step))
    got = worker.recv(0)
    assert got.kind == Kind.STEP and torch.equal(got.tensor, step)
    links.send(3, Message(Kind.IDLE))
    assert worker.recv(0).kind == Kind.IDLE
    tokens = torch.tensor([5, -1, 2 ** 40], dtype=torch.int64)
    worker.send(0, Message(Kind.TOKENS, tensor=tokens))
    assert links.recv(3).tensor.tolist() == tokens.tolist()
    worker.send_obj({"ready": 3, "load_s": 1.5})
    assert front.get(front.objects, 5.0) == {"ready": 3, "load_s": 1.5}
    worker.stuck = lambda: 2.0  # the main thread inside one step for 2 s
    deadline = time.monotonic() + 5
    while front.stuck_s != 2.0:
        assert time.monotonic() < deadline, "no heartbeat arrived"
        time.sleep(0.02)
    assert front.stuck(time.monotonic()) >= 2.0 and time.monotonic() - front.seen < 1


def test_the_rejoin_order_ends_a_wait_for_a_step_and_skips_stale_steps(pair):
    """cli.rejoin's order reaches a survivor between steps (``recv`` raises Rejoin) or
    after its own lost peer (``await_order`` drops the steps meant for the broken world)."""
    worker, front = pair
    front.send_obj({"rejoin": 4321})
    with pytest.raises(Rejoin) as e:
        worker.recv(0)
    assert e.value.order == {"rejoin": 4321}
    front.send(Message(Kind.STEP, tensor=torch.arange(8, dtype=torch.uint8)))
    front.send(Message(Kind.IDLE))
    front.send_obj({"rejoin": 4322})
    front.send(Message(Kind.STEP, tensor=torch.arange(3, dtype=torch.uint8)))
    assert worker.await_order() == {"rejoin": 4322}
    assert worker.recv(0).tensor.tolist() == [0, 1, 2]  # the new world's first step


def test_a_silent_worker_misses_the_deadline_and_a_closed_one_is_named(pair):
    worker, front = pair
    links = CrewLinks(1, {3: front}, timeout=0.3, failure=lambda: None)
    t0 = time.monotonic()
    with pytest.raises(WorkerLost, match=r"worker 3 did not answer within 0.3 s") as e:
        links.recv(3)
    assert e.value.replica == 1 and e.value.peer == 3 and time.monotonic() - t0 < 2
    worker.close()
    with pytest.raises(WorkerLost, match="worker 3 closed its connection"):
        links.recv(3)


def test_a_failure_found_by_the_watch_fails_the_wait_at_once(pair):
    _, front = pair
    lost = WorkerLost(0, 4, "rank 4 (pid 1) was killed by signal 9")
    links = CrewLinks(0, {3: front}, timeout=30.0, failure=lambda: lost)
    t0 = time.monotonic()
    with pytest.raises(WorkerLost, match="rank 4"):
        links.recv(3)
    assert time.monotonic() - t0 < 1


def test_a_connection_must_say_hello_before_anything_is_unpickled():
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    sock, _ = server.accept()
    _Socket(client).send_frame(OBJ, pickle.dumps({"hello": 0, "token": "x"}))
    with pytest.raises(ValueError, match="not a hello"):
        read_hello(sock)
    client2 = socket.create_connection(server.getsockname())
    sock2, _ = server.accept()
    _Socket(client2).send_frame(HELLO, b'{"hello": 2, "token": "abc"}')
    assert read_hello(sock2) == (2, "abc")
    for s in (client, sock, client2, sock2, server):
        s.close()


def test_heartbeats_carry_live_statistics_as_json(pair):
    from llamadist.distributed.link import beat_payload, read_beat
    assert read_beat(beat_payload(1.5, None)) == (1.5, None)
    assert read_beat(beat_payload(0.0, {"rank": 3, "busy": 0.25})) == (0.0, {"rank": 3,
                                                                          "busy": 0.25})
    assert read_beat(beat_payload(2.0, None) + b"\x80garbage") == (2.0, None)  # not JSON
    assert read_beat(beat_payload(2.0, None) + b"[1, 2]") == (2.0, None)  # not an object
    worker, front = pair
    worker.stats = lambda: {"rank": 3, "expert_load": {"1": [4, 0, 2]}}
    deadline = time.monotonic() + 5
    while front.stats is None:
        assert time.monotonic() < deadline, "no statistics arrived"
        time.sleep(0.02)
    assert front.stats == {"rank": 3, "expert_load": {"1": [4, 0, 2]}}

    def broken():
        raise RuntimeError("no counters")
    worker.stats, worker.stuck = broken, lambda: 7.0  # the heartbeat still flows
    while front.stuck_s != 7.0:
        assert time.monotonic() < deadline, "the heartbeat stopped"
        time.sleep(0.02)
    assert front.stats["expert_load"] == {"1": [4, 0, 2]} and front.lost is None


def test_live_stats_busy_fraction_expert_counts_between_steps_and_merge():
    import threading
    from types import SimpleNamespace

    from llamadist.runtime.live_stats import LiveStats, merge_expert_load
    from llamadist.runtime.stage_rank import RankStats
    load = {0: [1, 2], 2: [3, 0]}
    stage = SimpleNamespace(model=SimpleNamespace(config=SimpleNamespace(is_moe=True)),
                            device=torch.device("cpu"), expert_load=lambda: dict(load))
    rs = SimpleNamespace(stats=RankStats(), stage=stage, step_lock=threading.Lock())
    live = LiveStats(rs, {"stage": 1, "rank": 3, "dp": 0, "tp": 0})
    time.sleep(0.2)
    rs.stats.compute_s, rs.stats.steps = 0.1, 5
    s = live()
    assert (s["stage"], s["rank"], s["steps"], s["compute_s"]) == (1, 3, 5, 0.1)
    assert 0.2 < s["busy"] < 0.55  # 0.1 s computing in about 0.2 s
    assert s["expert_load"] == {"0": [1, 2], "2": [3, 0]} and s["memory_used_bytes"] > 0
    load[0] = [9, 9]
    with rs.step_lock:  # inside a step: the counters stay on the device, the last go out
        assert live()["expert_load"]["0"] == [1, 2]
    assert live()["expert_load"]["0"] == [9, 9] and live()["busy"] == 0.0
    reports = [{"tp": 0, "expert_load": {"0": [1, 2]}},
               {"tp": 1, "expert_load": {"0": [1, 2]}},  # the same tokens as tp 0
               {"tp": 0, "expert_load": {"0": [10, 0], "5": [0, 4]}},  # another replica
               {"tp": 0}]  # a dense stage
    assert merge_expert_load(reports) == {0: [11, 2], 5: [0, 4]}
