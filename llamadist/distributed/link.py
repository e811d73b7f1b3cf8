"""The front's link to its worker processes when the front is not a rank of their world
(``llamadist ... --nproc N``): one TCP connection per worker, framed, on loopback.

    frame = type (1 byte) + length (8 bytes, big-endian) + payload
    MSG   a stage message (distributed.p2p's header, then its CPU tensor's bytes)
    OBJ   a pickled setup object: hello, the RankSpec, ready, the final report
    BEAT  the worker's heartbeat: seconds inside the current step (8 bytes), then optionally
          its live statistics as JSON (``WorkerLink.stats``); any frame is a sign of life
    HELLO the worker's first frame, JSON: its index, its incarnation's token (the front
          unpickles nothing from a connection before its token matches a worker it started)
          and the address of its KV data listener (distributed.kv_direct)

Why sockets, not an extra torch.distributed rank: a gloo world cannot lose a member and
carry on, while the front must outlive every worker; a socket that closes tells the front
at once which worker is gone, a heartbeat tells it which one stopped, and a restart only
opens new sockets. The steps and tokens are a few KB per step, as over gloo.

``WorkerLink`` (worker side) has P2P's ``send``/``recv``/``flush``, so ``StageRank`` uses it
as its front link unchanged; ``FrontLink`` (front side) reads its socket on a thread and
keeps each worker's messages, objects and last sign of life; ``CrewLinks`` is the view a
``RankExecutor`` drives one replica through, failing fast (``WorkerLost``) when any worker
of that replica dies, stops beating, or misses the step deadline. A KV migration's acks
(distributed.kv_direct: a target rank's "imported", lane ACK) are kept apart from the
step results, since the target replica's tokens of earlier steps may come first.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import queue
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from llamadist.distributed.faults import EXIT_PEER_LOST, PeerError
from llamadist.distributed.kv_direct import ACK, KVServer
from llamadist.distributed.p2p import HEADER_LEN, Kind, Message, decode_header, encode_header

log = logging.getLogger(__name__)
MSG, OBJ, BEAT, HELLO = 1, 2, 3, 4
_FRAME = struct.Struct("!BQ")
_STUCK = struct.Struct("!d")
FRONT_ENV = "LLAMADIST_FRONT"        # host:port of the front, in a worker it started
INDEX_ENV = "LLAMADIST_WORKER_INDEX"  # the worker's global index (0 .. nproc-1)
TOKEN_ENV = "LLAMADIST_WORKER_TOKEN"  # one incarnation's nonce: a stale worker is refused
POLL_S = 0.05


class WorkerLost(PeerError):
    """A worker of replica ``replica`` died, stopped answering or stopped beating."""

    def __init__(self, replica: int, peer: int, message: str, seen_s: float | None = None):
        super().__init__(peer, message)
        self.replica = replica
        self.seen_s = seen_s  # monotonic time of the worker's last sign of life


class Rejoin(PeerError):
    """The front's order to a worker that survived a lost peer (``{"rejoin": port}``):
    leave the broken world and join a new one on that rendezvous port, keeping its stage
    (cli.rejoin). Raised by ``WorkerLink.recv`` when the order arrives between steps."""

    def __init__(self, order: dict):
        super().__init__(-1, f"the front orders a rejoin on port {order.get('rejoin')}")
        self.order = order


def _encode(msg: Message) -> bytes:
    t = msg.tensor
    if t is not None and t.device.type != "cpu":
        t = t.cpu()
        msg = Message(msg.kind, msg.step, msg.lane, msg.start, t)
    body = encode_header(msg).numpy().tobytes()
    if t is not None:
        body += t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return body


def _decode(body: bytes) -> Message:
    header = torch.frombuffer(bytearray(body[:HEADER_LEN * 8]), dtype=torch.int64)
    msg, shape, dtype, _ = decode_header(header)
    if shape is not None:
        data = bytearray(body[HEADER_LEN * 8:])
        msg.tensor = (torch.frombuffer(data, dtype=torch.uint8).view(dtype).reshape(shape)
                      if data else torch.empty(shape, dtype=dtype))
    return msg


class _Socket:
    """A connected socket with whole-frame send (one lock: the heartbeat thread shares it)
    and receive."""

    def __init__(self, sock: socket.socket):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self._lock = threading.Lock()

    def send_frame(self, kind: int, payload: bytes = b"") -> None:
        with self._lock:
            self.sock.sendall(_FRAME.pack(kind, len(payload)) + payload)

    def recv_frame(self) -> tuple[int, bytes]:
        kind, n = _FRAME.unpack(self._read(_FRAME.size))
        return kind, self._read(n)

    def _read(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(min(n - len(buf), 1 << 20))
            if not chunk:
                raise ConnectionError("connection closed")
            buf += chunk
        return bytes(buf)

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


class WorkerLink:
    """A worker's connection to the front: P2P's interface for the stage messages (the
    front is the only peer: ``dst``/``src`` are ignored), objects for setup, and a
    heartbeat thread. Waits for the front have no deadline: a front that dies closes the
    socket (and the kernel ends its workers: PR_SET_PDEATHSIG)."""

    def __init__(self, address: str, index: int, token: str, beat_s: float):
        host, port = address.rsplit(":", 1)
        self._s = _Socket(socket.create_connection((host, int(port))))
        self.index = index
        # KV blocks for another replica's rank are served from here (kv_direct), on the
        # address this worker reaches the front from
        self.kv_server = KVServer(self._s.sock.getsockname()[0])
        self._s.send_frame(HELLO, json.dumps({"hello": index, "token": token,
                                              "kv": self.kv_server.address}).encode())
        self._beat_s, self._closed = beat_s, False
        # seconds the worker's main thread has been inside one step (0: waiting), sent
        # with each heartbeat so the front can tell a hung rank from one that waits
        self.stuck: Callable[[], float] = lambda: 0.0
        # this rank's live statistics (a small JSON-able dict: StageRank.live_stats), sent
        # with each heartbeat, so the front's /metrics needs nothing from the step path
        self.stats: Callable[[], dict | None] = lambda: None
        self._stats_failed = False
        threading.Thread(target=self._beat, name="llamadist-heartbeat", daemon=True).start()

    def _beat(self) -> None:
        """Beat every beat_s; leave the process when the front is gone (this process was
        re-parented, or the link broke), wherever the main thread waits."""
        parent = int(os.environ.get("LLAMADIST_FRONT_PID", os.getppid()))
        while not self._closed:
            time.sleep(self._beat_s)
            try:
                if os.getppid() != parent:
                    raise OSError("the front process is gone")
                stats = self._stats()  # first: it may wait for the step to end
                self._s.send_frame(BEAT, beat_payload(self.stuck(), stats))
            except OSError as e:
                if self._closed:
                    return
                sys.stderr.write(f"llamadist[worker {self.index}]: error: lost the front "
                                 f"({e}); exiting\n")
                sys.stderr.flush()
                os._exit(EXIT_PEER_LOST)

    def _stats(self) -> dict | None:
        try:
            return self.stats()
        except Exception as e:  # noqa: BLE001 - statistics must never stop the heartbeat
            if not self._stats_failed:
                log.warning("worker %d: no live statistics: %r", self.index, e)
            self._stats_failed = True
            return None

    def send_obj(self, obj: Any) -> None:
        self._send(OBJ, pickle.dumps(obj))

    def recv_obj(self) -> Any:
        kind, body = self._recv()
        if kind != OBJ:
            raise PeerError(-1, f"worker {self.index}: expected setup from the front, got "
                                f"frame type {kind}")
        return pickle.loads(body)

    def send(self, dst: int, msg: Message) -> None:
        self._send(MSG, _encode(msg))

    def recv(self, src: int, idle: bool = False) -> Message:
        kind, body = self._recv()
        if kind == OBJ:  # the front's only order mid-run: rejoin a new world
            obj = pickle.loads(body)
            if isinstance(obj, dict) and "rejoin" in obj:
                raise Rejoin(obj)
            raise PeerError(-1, f"worker {self.index}: unexpected setup object mid-run")
        return _decode(body)

    def await_order(self) -> dict:
        """After a lost peer: the front's next order (a dict), skipping the stage messages
        sent to the broken world before it. The front closing fails it (PeerError)."""
        while True:
            kind, body = self._recv()
            if kind == OBJ:
                obj = pickle.loads(body)
                if isinstance(obj, dict):
                    return obj

    def flush(self) -> None:
        pass  # sendall returned: the bytes are in the kernel's buffer

    def post(self, src: int) -> None:
        pass

    def close(self) -> None:
        self._closed = True
        self.kv_server.close()
        self._s.close()

    def _send(self, kind: int, payload: bytes) -> None:
        try:
            self._s.send_frame(kind, payload)
        except OSError as e:
            raise PeerError(-1, f"worker {self.index}: the front closed its connection "
                                f"({e})") from e

    def _recv(self) -> tuple[int, bytes]:
        try:
            return self._s.recv_frame()
        except (OSError, ConnectionError) as e:
            raise PeerError(-1, f"worker {self.index}: the front closed its connection "
                                f"({e})") from e


_GONE = object()


def beat_payload(stuck_s: float, stats: dict | None) -> bytes:
    """A heartbeat's body: the seconds inside one step, then the statistics as JSON."""
    return _STUCK.pack(stuck_s) + (json.dumps(stats).encode() if stats else b"")


def read_beat(body: bytes) -> tuple[float, dict | None]:
    """(seconds inside one step, statistics or None) of a heartbeat's body; statistics
    that do not parse as a JSON object are dropped (the heartbeat still counts)."""
    stuck = _STUCK.unpack(body[:_STUCK.size])[0]
    try:
        stats = json.loads(body[_STUCK.size:]) if len(body) > _STUCK.size else None
    except ValueError:
        return stuck, None
    return stuck, stats if isinstance(stats, dict) else None


def read_hello(sock: socket.socket, timeout: float = 30.0) -> tuple[int, str]:
    """(index, token) from a new connection's first frame (JSON, never a pickle)."""
    return read_hello_kv(sock, timeout)[:2]


def read_hello_kv(sock: socket.socket, timeout: float = 30.0) -> tuple[int, str, str | None]:
    """``read_hello`` and the worker's KV listener address (None: it has none)."""
    sock.settimeout(timeout)
    kind, body = _Socket(sock).recv_frame()
    sock.settimeout(None)
    if kind != HELLO or len(body) > 4096:
        raise ValueError(f"the first frame is of type {kind}, not a hello")
    hello = json.loads(body)
    kv = hello.get("kv")
    return int(hello["hello"]), str(hello["token"]), str(kv) if kv else None


class FrontLink:
    """The front's end of one worker's connection, read by a thread of its own."""

    def __init__(self, sock: socket.socket, index: int, kv_address: str | None = None):
        self._s = _Socket(sock)
        self.index = index
        self.kv_address = kv_address  # the worker's KV data listener (kv_direct), if any
        self.messages: queue.Queue = queue.Queue()
        self.acks: queue.Queue = queue.Queue()  # KV imports' acks (lane ACK)
        self.kv_bytes_in = self.kv_bytes_out = 0  # KV relayed through this front (bytes)
        self.objects: queue.Queue = queue.Queue()
        self.seen = time.monotonic()  # the last frame's arrival
        self.stuck_s = 0.0  # the last heartbeat's time inside one step
        self.stats: dict | None = None  # the last heartbeat's live statistics, if any
        self.lost: str | None = None  # why the connection ended
        threading.Thread(target=self._read, name=f"llamadist-link-{index}", daemon=True).start()

    def _read(self) -> None:
        try:
            while True:
                kind, body = self._s.recv_frame()
                self.seen = time.monotonic()
                if kind == MSG:
                    msg = _decode(body)
                    if msg.kind == Kind.KV and msg.lane == ACK:
                        self.acks.put(msg)
                        continue
                    if msg.kind == Kind.KV and msg.tensor is not None:
                        self.kv_bytes_in += msg.tensor.nbytes
                    self.messages.put(msg)
                elif kind == OBJ:
                    self.objects.put(pickle.loads(body))
                elif kind == BEAT:
                    stuck, stats = read_beat(body)
                    self.stuck_s = stuck
                    if stats is not None:
                        self.stats = stats
        except (OSError, ConnectionError, pickle.UnpicklingError, struct.error) as e:
            self.lost = f"closed its connection ({e})" if not isinstance(e, ConnectionError) \
                else "closed its connection (it died or exited)"
            self.messages.put(_GONE)
            self.objects.put(_GONE)
            self.acks.put(_GONE)

    def stuck(self, now: float) -> float:
        """Seconds the worker has been inside one step, as of ``now`` (0: it waits)."""
        return self.stuck_s + (now - self.seen) if self.stuck_s > 0 else 0.0

    def send(self, msg: Message) -> None:
        if msg.kind == Kind.KV and msg.tensor is not None:
            self.kv_bytes_out += msg.tensor.nbytes
        self._s.send_frame(MSG, _encode(msg))

    def send_obj(self, obj: Any) -> None:
        self._s.send_frame(OBJ, pickle.dumps(obj))

    def get(self, box: queue.Queue, wait_s: float) -> Any:
        """The next item of ``box`` within ``wait_s`` (None: not yet; _GONE: lost)."""
        try:
            item = box.get(timeout=wait_s)
        except queue.Empty:
            return None
        if item is _GONE:
            box.put(_GONE)  # later readers learn it too
        return item

    def close(self) -> None:
        self._s.close()


class CrewLinks:
    """One replica's workers as seen by its ``RankExecutor``: P2P's interface over global
    worker indices. Every wait checks ``failure()`` (a worker of this replica that exited,
    stopped beating, or closed its socket) every POLL_S, and gives up after ``timeout``
    seconds without the message (a hung worker): both raise ``WorkerLost``."""

    def __init__(self, replica: int, links: dict[int, FrontLink], timeout: float,
                 failure: Callable[[], WorkerLost | None]):
        self.replica, self.links, self.timeout, self.failure = replica, links, timeout, failure

    def send(self, dst: int, msg: Message) -> None:
        self._check()
        try:
            self.links[dst].send(msg)
        except OSError as e:
            raise WorkerLost(self.replica, dst, f"worker {dst} closed its connection while "
                                                f"the front sent a step ({e})") from e

    def recv(self, src: int, idle: bool = False) -> Message:
        return self._wait(src, "messages", idle)

    def recv_ack(self, src: int) -> Message:
        """Worker ``src``'s next KV import ack (kv_direct), within ``timeout``."""
        return self._wait(src, "acks", False)

    def _wait(self, src: int, box: str, idle: bool) -> Message:
        link, t0 = self.links[src], time.monotonic()
        while True:
            self._check()
            item = link.get(getattr(link, box), POLL_S)
            if item is _GONE:
                raise WorkerLost(self.replica, src, f"worker {src} {link.lost}", link.seen)
            if item is not None:
                return item
            if not idle and time.monotonic() - t0 > self.timeout:
                raise WorkerLost(self.replica, src, f"worker {src} did not answer within "
                                                    f"{self.timeout:g} s (--timeout)", t0)

    def _check(self) -> None:
        lost = self.failure()
        if lost is not None:
            raise lost

    def flush(self) -> None:
        pass

    def post(self, src: int) -> None:
        pass
