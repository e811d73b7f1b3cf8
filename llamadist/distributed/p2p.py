"""Point-to-point stage messages: a fixed-size header over the CPU gloo group, then the
tensor over the device group (NCCL on GPU), or over the CPU group when it is a CPU tensor.

    header (int64, HEADER_LEN): kind, step, lane, start, dtype code, ndim, shape[0..3],
                                where the tensor comes (0 none, 1 CPU group, 2 device group)

Only hidden states travel on the device group, and always forward (stage s -> s+1), so
each NCCL pair carries one direction: NCCL sends block until the matching receive runs,
and a pair used both ways by several steps in flight could deadlock. The sampled
tokens (a few bytes, needed on the host anyway for stop checks) go back to the first
stage on the CPU group.

The header has a fixed size, so the receiver can post its receive *before* it knows what
is coming (``post``) and let it land while the stage computes. Sends are asynchronous
(``isend``): the sender keeps the tensors alive until the work completes and goes on to
its next step, so a transfer overlaps the next compute. Every blocking wait has a
timeout (gloo's per-operation one, plus the watchdog for NCCL): a dead or silent peer
raises :class:`PeerError` naming its rank.
"""

from __future__ import annotations

import datetime
import logging
import time
from dataclasses import dataclass, field
from enum import IntEnum

import torch
import torch.distributed as dist

from llamadist.distributed.faults import PeerError, Watchdog
from llamadist.distributed.groups import Group

log = logging.getLogger(__name__)

HEADER_LEN = 11
MAX_NDIM = 4
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.int64: 3,
               torch.int32: 4, torch.bool: 5, torch.uint8: 6}
CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}
IDLE_TIMEOUT_S = 24 * 3600.0  # waiting for work that may never come (see P2P.recv)


class Kind(IntEnum):
    HIDDEN = 1  # stage output (B, T, D) for the next stage
    TOKENS = 2  # sampled tokens (B,) from the last stage back to the first
    END = 3  # no more work: the receiver passes it on and leaves its loop
    STEP = 4  # a scheduled step (runtime.step_work.StepWork.pack: uint8 on the CPU)
    IDLE = 5  # nothing in flight: the receiver may wait without a deadline until the next STEP
    # KV migration between data-parallel replicas (engine.replicas): the block ids (int64)
    # travel the step paths in order with the steps; each rank answers an EXPORT with its
    # own layers' blocks as a KV message to the front, and reads a KV message from the
    # front for an IMPORT (runtime.stage_rank.StageRank.move_kv)
    EXPORT = 6
    IMPORT = 7
    KV = 8  # one rank's K/V of some blocks (PagedKVCache.export_blocks: flat, the cache's dtype)


@dataclass
class Message:
    kind: Kind
    step: int = 0  # generation step: 0 is the prefill, k > 0 feeds the k-th sampled token
    lane: int = 0  # free for the sender (the engine keys steps by their StepWork)
    start: int = 0  # cache slot of the first position
    tensor: torch.Tensor | None = None


def encode_header(msg: Message) -> torch.Tensor:
    t = msg.tensor
    shape = list(t.shape) if t is not None else []
    if len(shape) > MAX_NDIM:
        raise ValueError(f"stage messages carry at most {MAX_NDIM} dims, got shape {shape}")
    dtype = DTYPE_CODES[t.dtype] if t is not None else 0
    vals = [int(msg.kind), msg.step, msg.lane, msg.start, dtype, len(shape)]
    vals += shape + [0] * (MAX_NDIM - len(shape))
    vals.append(0 if t is None else 1 if t.device.type == "cpu" else 2)  # where it comes
    return torch.tensor(vals, dtype=torch.int64)


def decode_header(h: torch.Tensor
                  ) -> tuple[Message, tuple[int, ...] | None, torch.dtype, bool]:
    """-> (message without its tensor, the tensor's shape (None: no tensor follows), its
    dtype, whether it comes on the CPU group)."""
    v = h.tolist()
    ndim, where = v[5], v[6 + MAX_NDIM]
    msg = Message(Kind(v[0]), v[1], v[2], v[3])
    return msg, tuple(v[6:6 + ndim]) if where else None, CODE_DTYPES[v[4]], where == 1


@dataclass
class LinkStats:
    wait_s: float = 0.0  # blocked in receives: the bubble seen from this rank
    bytes_sent: int = 0
    bytes_recv: int = 0
    messages: int = 0


@dataclass
class _Posted:
    header: torch.Tensor
    work: dist.Work


@dataclass
class P2P:
    """Sends and receives stage messages within one pipeline ``Group``."""
    group: Group
    device: torch.device
    timeout: float
    watchdog: Watchdog | None = None
    stats: LinkStats = field(default_factory=LinkStats)
    _pending: list[tuple[list[dist.Work], list[torch.Tensor]]] = field(default_factory=list)
    _posted: dict[int, _Posted] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # A GPU stage whose device group is gloo (ranks sharing a GPU) stages through host.
        self._via_host = (self.device.type != "cpu"
                          and dist.get_backend(self.group.device_group) == "gloo")

    def send(self, dst: int, msg: Message) -> None:
        """Post the header and tensor to global rank ``dst``; returns without waiting."""
        if self._via_host and msg.tensor is not None:
            msg = Message(msg.kind, msg.step, msg.lane, msg.start, msg.tensor.cpu())
        header = encode_header(msg)
        try:  # gloo may fail a send to a dead peer at once, before any wait
            works = [dist.isend(header, dst, group=self.group.cpu_group)]
            keep = [header]
            if msg.tensor is not None:
                t = msg.tensor.contiguous()
                group = self.group.cpu_group if t.device.type == "cpu" \
                    else self.group.device_group
                works.append(dist.isend(t, dst, group=group))
                keep.append(t)
                self.stats.bytes_sent += t.nbytes
        except RuntimeError as e:
            raise self._lost(e, dst, "a send to start") from e
        self._pending.append((works, keep))
        self.stats.messages += 1
        self._pending = [(w, k) for w, k in self._pending if not all(x.is_completed() for x in w)]

    def post(self, src: int) -> None:
        """Post the next header receive from ``src`` now, so it arrives during compute."""
        if src not in self._posted:
            header = torch.empty(HEADER_LEN, dtype=torch.int64)
            try:
                work = dist.irecv(header, src, group=self.group.cpu_group)
            except RuntimeError as e:
                raise self._lost(e, src, "a message") from e
            self._posted[src] = _Posted(header, work)

    def recv(self, src: int, idle: bool = False) -> Message:
        """Block (at most ``timeout``) for the next message from global rank ``src``.
        ``idle``: the message may be long in coming (a worker waiting for the next request
        of a server): no deadline for its header, but a dead peer still fails it at once
        (its socket closes); the tensor after the header keeps the deadline."""
        self.post(src)
        posted = self._posted.pop(src)
        t0 = time.perf_counter()
        self._wait(posted.work, src, "a message", IDLE_TIMEOUT_S if idle else None)
        msg, shape, dtype, on_cpu = decode_header(posted.header)
        if shape is not None:
            buf = torch.empty(shape, dtype=dtype, device="cpu" if on_cpu else self.device)
            group = self.group.cpu_group if on_cpu else self.group.device_group
            try:
                work = dist.irecv(buf, src, group=group)
            except RuntimeError as e:
                raise self._lost(e, src, "a tensor") from e
            self._wait(work, src, "a tensor")
            msg.tensor = buf
            self.stats.bytes_recv += buf.nbytes
        self.stats.wait_s += time.perf_counter() - t0
        return msg

    def flush(self) -> None:
        """Wait for every send still in flight (before shutdown or reusing buffers)."""
        for works, _ in self._pending:
            for w in works:
                self._wait(w, None, "a send to complete")
        self._pending.clear()

    def _wait(self, work: dist.Work, peer: int | None, what: str,
              seconds: float | None = None) -> None:
        peer_txt = f"rank {peer}" if peer is not None else "a peer"
        me = self.group.rank
        limit = datetime.timedelta(seconds=seconds or self.timeout)
        try:
            if self.watchdog is None or seconds:
                work.wait(timeout=limit)
            else:
                with self.watchdog.guard(f"rank {me} waiting for {what} from {peer_txt}"):
                    work.wait(timeout=limit)
        except RuntimeError as e:
            raise self._lost(e, peer, what) from e

    def _lost(self, e: RuntimeError, peer: int | None, what: str) -> PeerError:
        """The PeerError naming ``peer`` for gloo's (or NCCL's) error ``e``."""
        peer_txt = f"rank {peer}" if peer is not None else "a peer"
        me = self.group.rank
        blame, text = (peer if peer is not None else -1), str(e).lower()
        if "closed" in text or "reset" in text:
            return PeerError(blame, f"{peer_txt} closed its connection (it died or exited) "
                                    f"while rank {me} was waiting for {what}")
        if "timed out" in text or "timeout" in text:
            return PeerError(blame, f"{peer_txt} did not answer within {self.timeout:.0f} s "
                                    f"(rank {me} waiting for {what})")
        return PeerError(blame, f"lost {peer_txt}: {str(e).splitlines()[0][:200]}")
