"""Seconds of a stage's work, measured without stopping the host (``Engine.timed``).

A stage's compute and transfer seconds are the time its device spent on them, but a host
sync after each stage to read that time would stop the host from preparing step n+1
while the device runs step n (the engine schedules ahead), so the measured run would be
slower than the one users get (on an H200 at batch 1: bench with a sync per stage 5.53
ms per step, the untimed Python API 4.55 ms). So on CUDA the work is bracketed by two
events recorded on the stream that runs it, and their elapsed time is read only once the
device has passed the second one: at the next bracket's end (``event.query``, which
never waits), when the executor collects a step, or at the end of a run
(``settle(wait=True)``). On a CPU the work
is done when the call returns, so the host clock is the device clock.

A window opens after its input is ready: ``start(device, after=src)`` makes ``device``'s
stream wait for ``src``'s first (a dependency the cross-device copy that follows makes
anyway), so a stage's window never holds the time the stage before it still computes.

Events are few and reused: each bracket's pair goes back to a per-device pool once read;
at most ``max_pending`` brackets wait to be read (past that the oldest is waited for,
which the engine, at most a step or two ahead of its device, never reaches).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any, Callable

import torch


def _cuda_event() -> Any:
    return torch.cuda.Event(enable_timing=True)


def _is_cuda(device: torch.device) -> bool:
    return device.type == "cuda"


class WorkTimer:
    """Adds the seconds of bracketed work to a counter: ``mark = start(device)``, the
    work, ``stop(mark, device, stats, "compute_s")`` adds them to ``stats.compute_s``
    (at once on a CPU, once the device has done the work on CUDA). ``event``, ``stream``
    (a device's current stream) and ``queued`` (the devices timed with events) are CUDA's
    unless a test gives its own."""

    def __init__(self, max_pending: int = 64, event: Callable[[], Any] = _cuda_event,
                 stream: Callable[[torch.device], Any] = torch.cuda.current_stream,
                 queued: Callable[[torch.device], bool] = _is_cuda):
        self.max_pending = max_pending
        self._event, self._stream, self._queued = event, stream, queued
        self._free: dict[Any, list] = {}  # stream's device -> events read and free again
        # (start, end, stream's device, stats, field) of brackets not read yet, oldest first
        self._pending: deque[tuple[Any, Any, Any, Any, str]] = deque()
        self._lock = threading.Lock()  # settle(wait=True) may come from another thread

    @property
    def pending(self) -> int:
        return len(self._pending)

    def start(self, device: torch.device, after: torch.device | None = None) -> Any:
        """Open a window on ``device``: the host clock on a CPU; on CUDA an event on the
        device's current stream, recorded after that stream waits for ``after``'s (a
        CUDA device the work's input comes from) so the window starts with the input."""
        if not self._queued(device):
            return time.perf_counter()
        stream = self._stream(device)
        if after is not None and after != device and self._queued(after):
            stream.wait_stream(self._stream(after))
        ev = self._take(stream.device)
        ev.record(stream)
        return ev

    def stop(self, mark: Any, device: torch.device, stats: Any, field: str) -> None:
        """Close the window ``mark`` opened on ``device``, adding its seconds to
        ``stats.<field>``: now on a CPU; on CUDA when the device has passed it."""
        if not self._queued(device):
            setattr(stats, field, getattr(stats, field) + time.perf_counter() - mark)
            return
        stream = self._stream(device)
        end = self._take(stream.device)
        end.record(stream)
        with self._lock:
            self._pending.append((mark, end, stream.device, stats, field))
        self.settle()
        while len(self._pending) > self.max_pending:  # the device is far behind: wait
            self._read_oldest(wait=True)

    def settle(self, wait: bool = False) -> None:
        """Add every window the device has finished (``wait``: every window; the host
        waits for the device). Call it from the thread that records (CUDA forbids an event
        query in another thread while that one captures a graph)."""
        while self._pending and self._read_oldest(wait):
            pass

    def clear(self) -> None:
        """Forget the windows not read yet (their events are dropped, not reused)."""
        with self._lock:
            self._pending.clear()

    def _read_oldest(self, wait: bool) -> bool:
        with self._lock:
            if not self._pending:
                return False
            oldest = self._pending[0]
        start, end, dev, stats, field = oldest
        if wait:  # outside the lock: a thread recording meanwhile must not block on it
            end.synchronize()
        elif not end.query():
            return False
        with self._lock:
            if not self._pending or self._pending[0] is not oldest:
                return True  # another thread read it (or cleared) meanwhile
            self._pending.popleft()
            setattr(stats, field, getattr(stats, field) + start.elapsed_time(end) / 1e3)
            self._free.setdefault(dev, []).extend((start, end))
        return True

    def _take(self, dev: Any) -> Any:
        free = self._free.get(dev)
        return free.pop() if free else self._event()
