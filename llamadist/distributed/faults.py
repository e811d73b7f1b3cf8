"""Failure handling shared by the workers and the launcher.

Layers, from the fastest to the last resort:

1. A dead peer closes its gloo sockets: the next receive from it fails at once, and the
   rank exits with :data:`EXIT_PEER_LOST` naming the peer (:class:`PeerError`); so does
   a collective inside the model (a TP all-reduce: :func:`collective_lost`), without the
   peer's name, which the launcher learns from the exits.
2. A peer that stops answering: every receive waits at most ``--timeout`` seconds
   (gloo's per-operation timeout), then the same exit.
3. A wait that ignores timeouts (an NCCL receive, a stuck kernel): the :class:`Watchdog`
   thread kills the process ``WATCHDOG_GRACE_S`` after the deadline of the guarded wait.
4. The launcher (``llamadist ... --nproc N``, or torchrun) sees the first rank exit, gives
   the others a moment to exit on their own, then kills the whole process group.

Exit codes let the launcher tell the rank that failed from the ranks that merely lost it.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

EXIT_PEER_LOST = 3  # this rank is fine; a peer died or stopped answering
EXIT_TEST_DIE = 17  # the LLAMADIST_TEST_DIE_AT_STEP hook
# the test hooks' variables (fault_hook): one-shot, a restarted worker must not inherit them
FAULT_VARS = ("LLAMADIST_TEST_DIE_AT_STEP", "LLAMADIST_TEST_HANG_AT_STEP")
WATCHDOG_GRACE_S = 2.0


class PeerError(RuntimeError):
    """A peer that died or stopped answering; ``peer`` is its global rank."""

    def __init__(self, peer: int, message: str):
        super().__init__(message)
        self.peer = peer


# How gloo's transport words a peer that died or stopped answering (every such error also
# names its gloo/transport source file); a RuntimeError without any is not a lost peer.
_LOST_WORDS = ("gloo/transport", "connection closed", "connection reset", "timed out")


def collective_lost(e: BaseException, rank: int, what: str) -> PeerError | None:
    """The PeerError for ``e`` raised by a collective inside the model (a tensor-parallel
    all-reduce, a context-parallel exchange) when a peer died or stopped answering, as
    distributed.p2p reports a lost peer on a receive; None for any other error (a bug:
    it must surface as itself)."""
    text = str(e).lower()
    if not isinstance(e, RuntimeError) or not any(w in text for w in _LOST_WORDS):
        return None
    return PeerError(-1, f"rank {rank} lost a peer in {what}: {str(e).splitlines()[0][:200]}")


class Watchdog:
    """A daemon thread that ends the process when a guarded wait overruns its deadline.

    Only one wait is guarded at a time (the worker loop is single-threaded); ``guard`` is
    cheap (two attribute writes), so it wraps every blocking receive."""

    def __init__(self, rank: int, timeout: float):
        self.rank, self.timeout = rank, timeout
        self._deadline: float | None = None
        self._what = ""
        self._thread = threading.Thread(target=self._run, name="llamadist-watchdog", daemon=True)
        self._thread.start()

    @contextmanager
    def guard(self, what: str, timeout: float | None = None) -> Iterator[None]:
        self._what = what
        self._deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        try:
            yield
        finally:
            self._deadline = None

    def _run(self) -> None:
        while True:
            time.sleep(0.25)
            deadline = self._deadline
            if deadline is not None and time.monotonic() > deadline + WATCHDOG_GRACE_S:
                sys.stderr.write(f"llamadist[rank {self.rank}]: error: {self._what}: no progress "
                                 f"within {self.timeout:.0f} s (watchdog); exiting\n")
                sys.stderr.flush()
                os._exit(EXIT_PEER_LOST)


@functools.cache
def _hooks() -> tuple[tuple[str, bool, int, int], ...]:
    out = []
    for var, die in zip(FAULT_VARS, (True, False)):
        spec = os.environ.get(var)
        if spec:
            r, s = (int(x) for x in spec.split(":"))
            out.append((var, die, r, s))
    return tuple(out)


def fault_hook(rank: int, step: int) -> None:
    """Test hooks: LLAMADIST_TEST_DIE_AT_STEP=rank:step exits that rank abruptly (as a crash
    would) when it reaches that generation step; LLAMADIST_TEST_HANG_AT_STEP hangs it.
    Under the front (every replica a world of its own) ``rank`` is the worker's global
    index (LLAMADIST_WORKER_INDEX)."""
    rank = int(os.environ.get("LLAMADIST_WORKER_INDEX", rank))
    for var, die, r, s in _hooks():
        if r == rank and s == step:
            if die:
                sys.stderr.write(f"llamadist[rank {rank}]: {var}: dying at step {step}\n")
                sys.stderr.flush()
                os._exit(EXIT_TEST_DIE)
            log.warning("rank %d: %s: hanging at step %d", rank, var, step)
            while True:
                time.sleep(3600)
