"""Real `llamadist serve` processes on free ports, shared by the server tests: one on the
tiny model (one process) for the whole session, started once."""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
API_KEY = "test-key"


def _ephemeral() -> range:
    """The ports the kernel gives outgoing connections (Linux's ip_local_port_range)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return range(int(low), int(high) + 1)
    except (OSError, ValueError):
        return range(32768, 61000)


def free_port() -> int:
    """A port free now, outside the ephemeral range: a port the kernel picked (bind to 0)
    is one it also gives outgoing connections, and one of those (another test worker's
    HTTP client) can take it in the seconds before the server binds it (a CI run lost the
    shared server so: "Address already in use")."""
    taken, rng = _ephemeral(), random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 65536)
        if port in taken:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # (every try held: the kernel's pick)
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body: bytes | dict | None = None,
         headers: dict | None = None, timeout: float = 60) -> tuple[int, bytes]:
    """(status, body) of one plain HTTP request (the standard library: no client of ours
    to hide what the server answered)."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    req = urllib.request.Request(url, data=data, headers=hdrs, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class ServerProcess:
    def __init__(self, model, *flags: str, log_path: Path, startup_s: float = 120,
                 env: dict | None = None, new_session: bool = False):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "llamadist", "serve", str(model),
                                      "--port", str(self.port), *flags], env=env, cwd=ROOT,
                                     stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=new_session)
        deadline = time.monotonic() + startup_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}): "
                                   f"{Path(log_path).read_text()[-3000:]}")
            try:
                if http("GET", self.url + "/health", timeout=1)[0] == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError("the server did not start in time")
            time.sleep(0.2)

    def stop(self) -> int:
        """SIGTERM, as a service manager would: the server must exit 0 by itself."""
        if self.proc.poll() is not None:
            return self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return -1
        finally:
            self.log.close()


@pytest.fixture(scope="session")
def tiny_server(tiny_model, tmp_path_factory):
    """The tiny model behind an API key, at most 4 sequences at once, 12 queued."""
    log = tmp_path_factory.mktemp("serve") / "tiny_server.log"
    server = ServerProcess(tiny_model, "--max-seq-len", "256", "--max-batch", "4",
                           "--max-queue", "12", "--api-key", API_KEY,
                           "--served-model-name", "tiny", log_path=log)
    yield server
    assert server.stop() == 0, log.read_text()[-3000:]


@pytest.fixture(scope="session")
def client(tiny_server):
    from openai import OpenAI
    return OpenAI(base_url=tiny_server.url + "/v1", api_key=API_KEY, max_retries=0,
                  timeout=60)


def open_stream(url: str, model: str = "tiny"):
    """A 200-token streaming completion, its first chunk read, the rest read by a daemon
    thread: -> the Event set when the stream has ended (finished, or cut by a shutdown's
    grace period)."""
    import threading

    import openai
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
    stream = client.completions.create(model=model, prompt="The quick brown fox",
                                       max_tokens=200, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    it = iter(stream)
    next(it)
    ended = threading.Event()

    def read_rest() -> None:
        try:
            for _ in it:
                pass
        except openai.APIError:
            pass  # cut when the grace period ran out
        ended.set()
    threading.Thread(target=read_rest, daemon=True).start()
    return ended
