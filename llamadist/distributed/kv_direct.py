"""A worker's data listener for KV migration straight from one replica's rank to the same
rank of another (engine.replicas, a drained replica's requests), without the front
relaying the bytes.

Every worker under the front (``--nproc``) opens one listener (TCP, on the address its
link to the front uses) and reports ``host:port`` in its hello (distributed.link). A
direct migration is four orders, all in order with the steps on the step paths:

    front ── EXPORT(tag, src_blocks), lane DIRECT ──► source replica (every rank)
              each source rank copies its blocks out and STAGES them under ``tag`` on
              its listener, then answers a KV message [bytes] (lane DIRECT) on its link
    front ── IMPORT(tag, dst_blocks), lane DIRECT ──► target replica (every rank), and to
              each target rank on its own link: the address of the source rank at the
              same position (same layers, same heads)
              each target rank connects there, asks for ``tag``, gets the bytes, writes
              them into its blocks and ACKs [bytes] (or [-1]: failed) on its link
    the front's engine thread waits for every target rank's ack before it schedules the
    target's next step that reads those blocks (the rank imports before it reads the
    next message on its step path anyway; the ack says whether the bytes arrived)

A failed fetch (refused, closed, timed out, an unknown tag) is acked [-1]; the engine then
recomputes the request on the target, as after a failed relayed import. The bytes travel
once, source rank -> target rank; the front sees a few dozen bytes per rank.

The tag is the fetch's credential: a random 62-bit number the front draws per transfer
and sends only over its own links (engine.replicas), never a guessable counter; an export
is served once, to the first connection that names its tag, and dropped after STAGED_S if
nobody came for it. Each connection is answered on a thread of its own and must name its
tag within TAG_WAIT_S, so an idle client cannot hold up a transfer.

On a data connection the target sends the tag (8 bytes); the source answers a status
byte (HIT or MISS: no such tag), and on a hit the length (8 bytes) and a KV message
(distributed.p2p's header, then the tensor's bytes), then closes. distributed.link
imports this module (its ``WorkerLink`` opens the listener), not the other way round.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import threading
from collections import OrderedDict

import torch

from llamadist.distributed.p2p import HEADER_LEN, Kind, Message, decode_header, encode_header

log = logging.getLogger(__name__)

HIT, MISS = 1, 0         # a data connection's status byte
RELAY, DIRECT, ACK = 0, 1, 2  # Message.lane of the migration orders and answers
KEEP = 4                 # staged exports kept at most (a target that never came for one)
STAGED_S = 120.0         # ... and for at most this long
TAG_WAIT_S = 2.0         # a connection names its tag within this, or is closed
_TAG = struct.Struct("!q")
_LEN = struct.Struct("!Q")
# test hook: "refuse" closes a rank's listener as soon as it stages an export, so the
# target's connection is refused (the direct path fails; the request must recompute)
FAULT_ENV = "LLAMADIST_TEST_KV_DIRECT_FAIL"


class KVServer:
    """One worker's listener: serves each staged export once, to whoever asks with its
    tag (a target rank the front sent here)."""

    def __init__(self, host: str = "127.0.0.1"):
        self._listener = socket.create_server((host, 0))
        self.address = f"{host}:{self._listener.getsockname()[1]}"
        self._staged: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.served_bytes = 0  # bytes handed to fetches (counted as each send starts)
        threading.Thread(target=self._serve, name="llamadist-kv-listener", daemon=True).start()

    def stage(self, tag: int, data: torch.Tensor) -> None:
        """Serve ``data`` (flat on the wire: the import checks its size) under ``tag``."""
        with self._lock:
            self._staged[tag] = data.reshape(-1)
            while len(self._staged) > KEEP:
                self._staged.popitem(last=False)
        expiry = threading.Timer(STAGED_S, self._drop, args=(tag,))
        expiry.daemon = True
        expiry.start()
        if os.environ.get(FAULT_ENV) == "refuse":
            log.warning("%s=refuse: closing the KV listener %s", FAULT_ENV, self.address)
            self.close()

    def _drop(self, tag: int) -> None:
        with self._lock:
            self._staged.pop(tag, None)

    def _serve(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._connection, args=(sock,), daemon=True,
                             name="llamadist-kv-fetch").start()

    def _connection(self, sock: socket.socket) -> None:
        try:
            self._answer(sock)
        except Exception as e:  # noqa: BLE001 - the target acks the failure; serve on
            log.warning("KV listener %s: a fetch failed: %s", self.address, e)
        finally:
            sock.close()

    def _answer(self, sock: socket.socket) -> None:
        sock.settimeout(TAG_WAIT_S)
        tag = _TAG.unpack(_read(sock, _TAG.size))[0]
        sock.settimeout(30.0)
        with self._lock:
            data = self._staged.pop(tag, None)
        if data is None:
            sock.sendall(bytes([MISS]))
            return
        header = encode_header(Message(Kind.KV, lane=DIRECT, tensor=data)).numpy().tobytes()
        body = data.contiguous().view(torch.uint8).numpy()
        with self._lock:  # counted before the send: the fetcher may hold every byte
            self.served_bytes += data.nbytes  # before this thread runs again
        sock.sendall(bytes([HIT]) + _LEN.pack(len(header) + body.nbytes) + header)
        sock.sendall(memoryview(body))

    def close(self) -> None:
        """Stop listening (a connection after this is refused)."""
        try:  # shutdown first: it wakes the thread blocked in accept (close alone does not)
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self._listener.close()
        except OSError:
            pass


def _read(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:], min(n - got, 1 << 22))
        if not k:
            raise ConnectionError("connection closed")
        got += k
    return buf


def fetch(address: str, tag: int, timeout: float) -> torch.Tensor:
    """The export staged under ``tag`` at ``address`` (a source rank's KVServer). Raises
    OSError / ConnectionError (refused, closed, timed out) or LookupError (no such tag)."""
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(_TAG.pack(tag))
        status = _read(sock, 1)[0]
        if status != HIT:
            raise LookupError(f"{address} has no export tagged {tag}")
        body = _read(sock, _LEN.unpack(_read(sock, _LEN.size))[0])
    header = torch.frombuffer(body[:HEADER_LEN * 8], dtype=torch.int64)
    msg, shape, dtype, _ = decode_header(header)
    if msg.kind != Kind.KV or shape is None:
        raise ConnectionError(f"{address} answered a {msg.kind!r} message")
    if len(body) == HEADER_LEN * 8:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(body, dtype=torch.uint8, offset=HEADER_LEN * 8).view(
        dtype).reshape(shape)  # no copy of the bytes


def address_tensor(address: str) -> torch.Tensor:
    """``host:port`` as a message's tensor (uint8), and back (``tensor_address``)."""
    return torch.tensor(list(address.encode()), dtype=torch.uint8)


def tensor_address(t: torch.Tensor) -> str:
    return bytes(t.tolist()).decode()
