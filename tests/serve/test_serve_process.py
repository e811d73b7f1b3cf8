"""The HTTP server runs in a process of its own, a child of the engine's process:
/metrics names both pids; SIGTERM to the engine's process ends both with exit 0 (an open
stream finished or cut); an HTTP process that dies ends the server with 1 and says why."""

import importlib.util
import os
import signal
import time

from tests.serve.conftest import ServerProcess, http, open_stream
from tests.serve.test_api import metrics
from tests.serve.test_serve_ranks import children


def gone(pid: int) -> bool:
    if not os.path.exists(f"/proc/{pid}"):
        return True
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "Z"


def installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def pids(server: ServerProcess) -> tuple[int, int]:
    m = metrics(server.url)
    return int(m["llamadist_engine_pid"]), int(m["llamadist_http_pid"])


def test_http_runs_apart_from_the_engine_and_sigterm_leaves_no_process(tiny_model, tmp_path):
    log = tmp_path / "server.log"
    server = ServerProcess(tiny_model, "--max-seq-len", "256", "--max-batch", "4",
                           "--served-model-name", "tiny", log_path=log)
    try:
        engine_pid, http_pid = pids(server)
        assert engine_pid == server.proc.pid and http_pid != engine_pid
        assert children(server.proc.pid, http=True) == [http_pid]  # the one child: HTTP
        with open(f"/proc/{http_pid}/cmdline", "rb") as f:
            assert b"llamadist.serve.http_server" in f.read()
        assert "llamadist_http_process_resident_memory_bytes" in metrics(server.url)
        with open(f"/proc/{http_pid}/maps") as f:  # the HTTP process never loads torch
            maps = f.read()
        assert "libtorch" not in maps and "libc" in maps
        # uvicorn's fast parts, where installed (the serve extra), run it: uvloop's loop
        # (its library loads only when the loop is made) and httptools' parser
        for fast in ("uvloop", "httptools"):
            assert (f"/{fast}/" in maps) == installed(fast), fast
        ended = open_stream(server.url)
    finally:
        code = server.stop()
    assert code == 0, log.read_text()[-3000:]
    assert ended.wait(10)
    assert gone(http_pid) and gone(engine_pid)
    assert log.read_text().count("llamadist: serving 'tiny'") == 1


def test_a_dead_http_process_ends_the_server_with_an_error(tiny_model, tmp_path):
    log = tmp_path / "server.log"
    server = ServerProcess(tiny_model, "--max-seq-len", "256", "--served-model-name", "tiny",
                           log_path=log)
    try:
        _, http_pid = pids(server)
        os.kill(http_pid, signal.SIGKILL)
        t0 = time.monotonic()
        assert server.proc.wait(15) == 1
        assert time.monotonic() - t0 < 10
    finally:
        server.stop()
    text = log.read_text()
    assert f"the HTTP server process (pid {http_pid}) exited by itself (killed by signal 9)" \
        in text, text[-3000:]
    assert children(server.proc.pid, http=True) == []
    status = None
    try:
        status = http("GET", server.url + "/health", timeout=2)[0]
    except OSError:
        pass
    assert status is None  # nothing listens any more


def test_build_server_keeps_one_process_for_the_python_api(tiny_model):
    """serve.server.build_server: the app and the engine in this process (over a Pipe),
    answering as the engine itself does."""
    from starlette.testclient import TestClient

    from llamadist import LLM, SamplingParams
    from llamadist.serve.server import build_server
    llm = LLM(str(tiny_model), devices="cpu", max_batch=4, max_seq_len=256)
    want = llm.generate(["The quick brown fox"], SamplingParams(max_new_tokens=8,
                                                                temperature=0))[0].text
    app, engine = build_server(llm, "tiny")
    try:
        with TestClient(app) as c:
            r = c.post("/v1/completions", json={"model": "tiny", "prompt": "The quick brown fox",
                                                "max_tokens": 8, "temperature": 0})
            assert r.status_code == 200 and r.json()["choices"][0]["text"] == want
            m = c.get("/metrics").text
            assert f"llamadist_engine_pid {float(os.getpid())}" in m
            assert f"llamadist_http_pid {float(os.getpid())}" in m
            assert c.get("/health").json() == {"status": "ok"}
    finally:
        engine.shutdown()


def test_ctrl_c_to_the_process_group_is_handled_once(tiny_model, tmp_path):
    """SIGINT to the whole group, as a terminal's Ctrl-C: the HTTP process (a session of its
    own) gets it once, through the engine's process; both exit, the command returns 0."""
    log = tmp_path / "server.log"
    server = ServerProcess(tiny_model, "--max-seq-len", "256", "--served-model-name", "tiny",
                           log_path=log, new_session=True)
    try:
        engine_pid, http_pid = pids(server)
        assert os.getpgid(http_pid) != os.getpgid(engine_pid) == engine_pid
        os.killpg(engine_pid, signal.SIGINT)
        assert server.proc.wait(30) == 0, log.read_text()[-3000:]
    finally:
        server.stop()
    assert gone(http_pid)
    assert "Traceback" not in log.read_text() and "error" not in log.read_text()


def test_the_port_stays_bound_from_the_check_until_the_server_takes_it():
    """cli.jobs.check_port keeps the port bound (not listening) through the model's load;
    nothing else can bind it, and a client is refused, until serve hands it over."""
    import socket

    import pytest

    from llamadist.cli import jobs
    from tests.serve.conftest import free_port
    port = free_port()
    jobs.check_port("127.0.0.1", port)
    try:
        with socket.socket() as other, pytest.raises(OSError):
            other.bind(("127.0.0.1", port))
        with socket.socket() as client, pytest.raises(ConnectionRefusedError):
            client.connect(("127.0.0.1", port))
    finally:
        sock = jobs.reserved_socket("127.0.0.1", port)
    assert sock is not None and sock.getsockname() == ("127.0.0.1", port)
    sock.close()
    assert jobs.reserved_socket("127.0.0.1", port) is None
    with socket.socket() as other:
        other.bind(("127.0.0.1", port))  # free again
