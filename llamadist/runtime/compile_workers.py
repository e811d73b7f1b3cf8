"""Inductor's compile workers, stopped at once when a process is done (issue 13).

The first torch.compile of a layer with CUDA inputs starts Inductor's compile-worker
"sidecar" (``python .../compile_worker/__main__.py``, which imports torch) and asks it to
fork its pool of ``TORCHINDUCTOR_COMPILE_THREADS`` workers. With warm caches nothing is
ever sent to them, and a short job (``generate`` of 64 tokens) ends while the sidecar is
still importing torch or forking; Inductor's own atexit hook then sends it SHUTDOWN and
waits (up to 300 s) for it to get that far and take its pool down: 10 s of a 30 s
``generate`` on the H200 (torch 2.11), 7 s of an 11 s CPU reproduction (torch 2.13).

``stop_compile_workers`` freezes the sidecar (SIGSTOP: it forks no more), kills every
process below it (its workers and multiprocessing's resource tracker; a worker whose
parent dies would otherwise live on for up to 60 s, until its watchdog looks), kills the
sidecar, and then lets Inductor's shutdown run, which finds nothing left to wait for.
Nothing a worker does is lost: the process asking is done with every compile it needed,
and Inductor's and Triton's caches are written atomically. It never imports Inductor:
a process that compiled nothing has nothing to stop.
"""

from __future__ import annotations

import atexit
import inspect
import logging
import os
import signal
import sys
import time

log = logging.getLogger(__name__)

STOP_WAIT_S = 1.0  # how long a frozen process may take to stop (one in the kernel: D state)
_registered = False


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (Linux /proc; [] elsewhere)."""
    out = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return out
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:  # exited meanwhile
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses
        fields = stat[stat.rfind(b")") + 2:].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            out.append(int(name))
    return out


def _state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rfind(b")") + 2:].split()[0].decode()


def _freeze(pid: int) -> None:
    """SIGSTOP ``pid`` and wait (briefly) until it is stopped: a stopped process forks no
    more, and cannot reap its children, so their pids stay theirs until killed."""
    try:
        os.kill(pid, signal.SIGSTOP)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + STOP_WAIT_S
    while _state(pid) not in (None, "T", "t", "Z", "X") and time.monotonic() < deadline:
        time.sleep(0.001)


def kill_tree(pid: int) -> list[int]:
    """Kill ``pid`` and every process below it -> the pids killed. Each level is frozen
    before its children are listed, so none escapes by forking in between."""
    frozen, todo = [], [pid]
    while todo:
        p = todo.pop()
        _freeze(p)
        frozen.append(p)
        todo.extend(children(p))
    for p in reversed(frozen):  # the deepest first; SIGKILL ends stopped processes too
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return frozen


def _pool_processes(pool) -> list:
    """The processes to kill of one Inductor pool: a SubprocPool's sidecar (a Popen), or
    a process pool's workers (multiprocessing Processes, TORCHINDUCTOR_WORKER_START=fork
    or spawn)."""
    sidecar = getattr(pool, "process", None)
    if sidecar is not None:
        return [sidecar]
    return list((getattr(pool, "_processes", None) or {}).values())


def stop_compile_workers() -> int:
    """Kill the compile workers of every Inductor pool this process started, then let
    Inductor's own shutdown run (quick now) -> how many processes were killed."""
    ac = sys.modules.get("torch._inductor.async_compile")
    pools = list(getattr(ac, "_pool_set", ()) or ())
    if not pools:
        return 0
    killed = 0
    for pool in pools:
        shutdown = getattr(pool, "shutdown", None)
        try:
            if shutdown is not None and "wait" in inspect.signature(shutdown).parameters:
                # newer torch: mark the pool closed first, so the sidecar's death reads
                # as the shutdown it is (its parent sees EOF there), not as a crash
                shutdown(wait=False)
        except Exception as e:  # noqa: BLE001 - killing below is what matters
            log.info("compile workers: shutdown(wait=False) failed (%s)", e)
        for proc in _pool_processes(pool):
            if proc.pid is not None and _alive(proc):
                killed += len(kill_tree(proc.pid))
                _reap(proc)
    try:
        ac.shutdown_compile_workers()  # pipes, log files, futures: nothing left to wait for
    except Exception as e:  # noqa: BLE001 - at exit, a failed cleanup must not hide the output
        log.info("compile workers: Inductor's shutdown failed (%s: %s)", type(e).__name__, e)
    if killed:
        log.info("compile workers: killed %d process(es) at exit", killed)
    return killed


def _alive(proc) -> bool:
    if hasattr(proc, "poll"):  # subprocess.Popen
        return proc.poll() is None
    return proc.is_alive()  # multiprocessing.Process


def _reap(proc) -> None:
    try:
        if hasattr(proc, "poll"):
            proc.wait(timeout=5)
        else:
            proc.join(timeout=5)
    except Exception as e:  # noqa: BLE001 - a zombie until exit costs nothing
        log.info("compile workers: %s not reaped (%s)", proc.pid, e)


def stop_at_exit() -> None:
    """Run ``stop_compile_workers`` at exit before Inductor's own hook (atexit runs the
    last registered first): call it once Inductor's async_compile is imported."""
    global _registered
    if not _registered:
        import importlib
        importlib.import_module("torch._inductor.async_compile")  # its atexit hook first
        atexit.register(stop_compile_workers)
        _registered = True
