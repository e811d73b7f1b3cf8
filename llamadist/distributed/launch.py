"""Start the local workers of a pipeline, watch them, and clean up after them.

One host, N processes::

    llamadist generate MODEL --nproc 2 --prompt "Hello"          # starts 2 workers itself
    torchrun --nproc-per-node 2 -m llamadist generate MODEL --pp 2 --prompt "Hello"

Two hosts (one process per GPU, 2 GPUs each, a 4-stage pipeline), run the same command
on both, with HOST0 reachable from HOST1 (torchrun's own rendezvous; any free port)::

    # on host0 and on host1:
    torchrun --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d \\
        --rdzv-endpoint HOST0:29500 --rdzv-id llamadist-1 \\
        -m llamadist generate MODEL --pp 4 --devices cuda --prompt "Hello"

    pp x tp x dp must equal nnodes x nproc-per-node (--pp 2 --tp 2 keeps each
    tensor-parallel pair on one host: tp ranks are neighbours). MODEL must be at the same
    path on both hosts; each rank reads only its own stage's tensors. Global rank 0 (on
    the host torchrun gives rank 0) prints the output; if a rank dies, the others exit
    within --timeout (default 60 s) and torchrun stops the rest of its workers. Set
    NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME if the hosts have several network interfaces.
    Without a rendezvous server, the static form works as well: --nnodes 2 --node-rank
    {0,1} --master-addr HOST0 --master-port 29500.

``llamadist ... --nproc N`` runs its workers as ``Crew``s (one per data-parallel replica,
each a world of its own) under cli.front, which outlives them and restarts them.
``Launcher`` is the plain form (the tests' worker worlds): rank 0 is the front.

The local launcher gives each worker torchrun's environment (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT on a free port), puts them in one process group of
their own and asks the kernel to kill them if the launcher dies (PR_SET_PDEATHSIG).
When a worker exits with an error, the others get a moment to exit by themselves (they
notice the closed connection at once, or time out on a silent peer); then the whole group
is killed, and the launcher names the rank that failed: the first that exited with its own
error, or else the one still running after the others gave up on it.
"""

from __future__ import annotations

import ctypes
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from llamadist.distributed.faults import EXIT_PEER_LOST

log = logging.getLogger(__name__)

GRACE_S = 2.0  # after the first failure, how long the other ranks get to exit themselves
POLL_S = 0.05
USER_ERROR = 2  # what the CLI exits with for a refused request (bad options, too long)
WORKER_ENV = "LLAMADIST_WORKER"  # set in workers: they must not launch again


def _ephemeral_range() -> tuple[int, int]:
    """The ports the kernel hands out to outgoing connections (Linux's default where
    unknown)."""
    try:
        low, high = (int(v) for v in
                     open("/proc/sys/net/ipv4/ip_local_port_range").read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A port free now for rank 0's store, chosen at random below the ephemeral range: a
    port the kernel picked (bind to 0) is one that gloo's own connections, opened by this
    host's other worlds while rank 0 starts, may take before rank 0 binds it (seen as
    EADDRINUSE under `--dp 2`); one outside that range only another launch could take."""
    low = _ephemeral_range()[0]
    rng = random.Random()
    for _ in range(64):
        port = rng.randrange(20000, low) if low > 20001 else 0
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(rank: int, nproc: int, port: int, base: dict[str, str] | None = None,
               local_rank: int | None = None, local_world: int | None = None
               ) -> dict[str, str]:
    """torchrun's variables for rank ``rank`` of a world of ``nproc``; ``local_rank`` /
    ``local_world``: its place among every worker of this host (its GPU), when the host
    runs several worlds (one per data-parallel replica under the front)."""
    env = dict(os.environ if base is None else base)
    local_rank = rank if local_rank is None else local_rank
    local_world = nproc if local_world is None else local_world
    env.update(RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(local_rank),
               LOCAL_WORLD_SIZE=str(local_world), GROUP_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port), NCCL_NVLS_ENABLE="0", PYTHONUNBUFFERED="1")
    env[WORKER_ENV] = "1"
    # N processes share the cores; an oversubscribed OpenMP pool is much slower than none.
    share = str(max(1, (os.cpu_count() or 1) // local_world))
    env.setdefault("OMP_NUM_THREADS", share)
    # Inductor forks min(32, usable cores) compile workers per process, each importing
    # torch: two ranks on 16 cores forked 32 that competed with both ranks' tracing (issue
    # 15). Each rank gets its share of that (an explicit value bypasses Inductor's cap).
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)
    env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", str(max(1, min(32, usable) // local_world)))
    return env


def _preexec(pgid_holder: list[int]) -> None:
    # Runs in the child between fork and exec: join the workers' process group (the first
    # worker founds it) and die with the launcher even if it is SIGKILLed.
    os.setpgid(0, pgid_holder[0] if pgid_holder else 0)
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


@dataclass
class WorkerExit:
    rank: int
    pid: int
    code: int | None  # None: still running when the group was killed
    at: float  # monotonic time the exit was seen

    def describe(self) -> str:
        if self.code is None:
            return f"rank {self.rank} (pid {self.pid}) stopped answering; killed"
        if self.code < 0:
            return f"rank {self.rank} (pid {self.pid}) was killed by signal {-self.code}"
        return f"rank {self.rank} (pid {self.pid}) exited with code {self.code}"


def blame(exits: list[WorkerExit]) -> list[WorkerExit]:
    """The ranks that caused a failure: those that exited with their own error (earliest
    first); else those that never exited (hung) while the others lost them."""
    own = sorted((e for e in exits if e.code not in (None, 0, EXIT_PEER_LOST)), key=lambda e: e.at)
    if own:
        return own
    hung = [e for e in exits if e.code is None]
    return hung or sorted((e for e in exits if e.code), key=lambda e: e.at)


class Launcher:
    """``nproc`` copies of ``python ARGV`` with worker environments, as one process group."""

    def __init__(self, argv: list[str], nproc: int, env: dict[str, str] | None = None,
                 stdin_to_rank0: bool = False, grace: float = GRACE_S,
                 term_to_rank0: bool = False):
        self.argv, self.nproc, self.grace = argv, nproc, grace
        self.base_env, self.stdin_to_rank0 = env, stdin_to_rank0
        self.term_to_rank0 = term_to_rank0  # a server: SIGTERM lets rank 0 close the run
        self.procs: list[subprocess.Popen] = []
        self.pgid: list[int] = []

    def start(self) -> None:
        port = free_port()
        for rank in range(self.nproc):
            relay = rank == 0 and self.stdin_to_rank0
            p = subprocess.Popen([sys.executable, *self.argv],
                                 env=worker_env(rank, self.nproc, port, self.base_env),
                                 stdin=subprocess.PIPE if relay else subprocess.DEVNULL,
                                 preexec_fn=lambda: _preexec(self.pgid))
            if not self.pgid:
                self.pgid.append(p.pid)
            self.procs.append(p)
            if relay:
                threading.Thread(target=_relay_stdin, args=(p,), daemon=True).start()
        if self.term_to_rank0:
            signal.signal(signal.SIGTERM, lambda *_: self.procs[0].send_signal(signal.SIGTERM))
        log.info("started %d workers (pids %s) on port %d", self.nproc,
                 [p.pid for p in self.procs], port)

    def wait(self) -> int:
        """Watch until every worker exits (0) or one fails (its code; the rest are killed)."""
        exits: dict[int, WorkerExit] = {}
        failed_at: float | None = None
        while len(exits) < self.nproc:
            now = time.monotonic()
            for rank, p in enumerate(self.procs):
                if rank not in exits and p.poll() is not None:
                    exits[rank] = WorkerExit(rank, p.pid, p.returncode, now)
                    if p.returncode != 0 and failed_at is None:
                        failed_at = now
            if failed_at is not None and now - failed_at > self.grace:
                for rank, p in enumerate(self.procs):
                    if rank not in exits:
                        exits[rank] = WorkerExit(rank, p.pid, None, now)
                self.kill()
                break
            time.sleep(POLL_S)
        self.kill()  # nothing may outlive the launcher, even a worker's stray child
        bad = blame(list(exits.values()))
        if not bad:
            return 0
        if all(e.code in (0, USER_ERROR) for e in exits.values()):
            return USER_ERROR  # a refused request: the rank has said why, once
        others = [e.describe() for e in sorted(exits.values(), key=lambda e: e.rank)
                  if e not in bad and e.code not in (0, None)]
        sys.stderr.write(f"llamadist: error: {'; '.join(e.describe() for e in bad)}"
                         + (f" (then {'; '.join(others)})" if others else "") + "\n")
        code = bad[0].code
        return code if code and code > 0 else 1

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.pgid:
            try:
                os.killpg(self.pgid[0], sig)
            except (ProcessLookupError, PermissionError):
                pass
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()

    def run(self) -> int:
        try:
            self.start()  # inside the try: a failed start must not strand the ranks started
            return self.wait()
        except KeyboardInterrupt:
            return 130
        finally:
            self.kill()


class Crew:
    """The worker processes of one torch.distributed world under the front (one
    data-parallel replica): started together on a fresh rendezvous port, watched, and
    killed together (their own process group). Each worker learns the front's address,
    its global index and this incarnation's token from its environment."""

    def __init__(self, argv: list[str], indices: list[int], nproc: int,
                 env: dict[str, str], extra: dict[str, str]):
        self.argv, self.indices, self.nproc = argv, indices, nproc
        self.env, self.extra = env, extra
        self.procs: dict[int, subprocess.Popen] = {}
        self.pgid = 0  # the crew's process group (its first worker's pid), 0: none yet
        self.started_at = 0.0

    def start(self, token: str, drop: tuple[str, ...] = ()) -> None:
        """Start every worker (``drop``: environment variables a restart must not
        inherit, such as a test's fault injection)."""
        self.kill()
        port = free_port()
        self.started_at = time.monotonic()
        for index in self.indices:
            self.procs[index] = self._popen(index, port, token, drop)
        log.info("started workers %s (pids %s) on port %d", self.indices,
                 [p.pid for p in self.procs.values()], port)

    def start_one(self, index: int, token: str, port: int, drop: tuple[str, ...] = ()) -> None:
        """Start worker ``index`` again (the old one must be gone: ``kill_one``), in the
        crew's process group, to meet the survivors on rendezvous port ``port``."""
        self.started_at = time.monotonic()
        self.procs[index] = self._popen(index, port, token, drop)
        log.info("started worker %d again (pid %d) on port %d", index, self.procs[index].pid,
                 port)

    def _popen(self, index: int, port: int, token: str, drop: tuple[str, ...]
               ) -> subprocess.Popen:
        base = {k: v for k, v in self.env.items() if k not in drop}
        rank = self.indices.index(index)
        env = worker_env(rank, len(self.indices), port, base, index, self.nproc)
        env.update(self.extra, LLAMADIST_WORKER_INDEX=str(index),
                   LLAMADIST_WORKER_TOKEN=token, LLAMADIST_FRONT_PID=str(os.getpid()))
        # process_group, not a preexec_fn: the front has threads (fork + Python = risk).
        # No PR_SET_PDEATHSIG either: it fires when the *thread* that forked exits (a
        # restart runs on a passing thread); the worker's heartbeat thread leaves
        # instead when the front is gone (distributed.link.WorkerLink)
        p = subprocess.Popen([sys.executable, *self.argv], env=env,
                             stdin=subprocess.DEVNULL, process_group=self.pgid)
        self.pgid = self.pgid or p.pid
        return p

    def kill_one(self, index: int) -> None:
        """Kill worker ``index`` alone (a lost one: the survivors stay)."""
        p = self.procs.get(index)
        if p is not None:
            if p.poll() is None:
                p.kill()
            p.wait()

    def exits(self) -> list[WorkerExit]:
        """The workers that have exited, now."""
        now = time.monotonic()
        return [WorkerExit(i, p.pid, p.returncode, now) for i, p in self.procs.items()
                if p.poll() is not None]

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs.values()]

    def wait(self, seconds: float) -> bool:
        """Wait up to ``seconds`` for every worker to exit by itself; True if they did."""
        deadline = time.monotonic() + seconds
        while any(p.poll() is None for p in self.procs.values()):
            if time.monotonic() > deadline:
                return False
            time.sleep(POLL_S)
        return True

    def kill(self) -> None:
        if not self.procs:
            return
        try:
            if self.pgid:  # never 0: killpg(0) is the front's own group
                os.killpg(self.pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
            p.wait()
        self.procs, self.pgid = {}, 0


def _relay_stdin(p: subprocess.Popen) -> None:
    """Copy the launcher's stdin to rank 0 line by line (rank 0 is not in the terminal's
    foreground group, so it must not read the terminal itself)."""
    assert p.stdin is not None
    try:
        for line in sys.stdin:
            p.stdin.write(line.encode())
            p.stdin.flush()
        p.stdin.close()
    except (BrokenPipeError, OSError, ValueError):
        pass
