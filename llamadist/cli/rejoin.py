"""Bringing a replica's workers up under the front (cli.front): all of them (a start, a
full restart), or only a lost one while the survivors keep their weights (a rejoin).

A rejoin (``--on-failure restart``, gloo): the lost worker alone is killed and started
again; every survivor gets the order ``{"rejoin": port}`` on its link. A survivor blocked
in a gloo receive, send or collective (a TP all-reduce, a CP exchange: reported as a lost
peer, distributed.faults.collective_lost) fails (its peer's sockets closed when the peer
died, or when another survivor left the broken world: it frees its groups, which closes
them), then reads the order; one waiting for the front's next step reads it there. It answers
``rejoining`` at once, leaves its world, joins a new one on ``port`` with the new worker
(same rank, same grid), keeps its stage (weights; its KV cache memory too, whose contents
the replay recomputes) and answers ``rejoined`` when the new worker has loaded its stage.
A survivor that does not answer within ``--timeout`` (hung, or gone too) turns the rejoin
into a full restart of the replica.

Tensor and context parallelism rejoin too: a survivor's tensor-parallel modules (and
expert blocks) give up the broken world's groups when it leaves and take the new world's
groups of the same names (distributed.groups.unbind_groups / rebind_groups; the grid is
the same, so are the names and their ranks); a context-parallel step reads its group from
the rank's groups each step, so nothing in the stage holds one. Only CPU workers over
gloo: an NCCL communicator whose peer died needs ncclCommAbort before anything else (not
done), so on GPUs the whole replica restarts. (Experts spread over replicas, --ep > tp,
share one world under no front of ours: refused here too.)
"""

from __future__ import annotations

import logging
import queue
import secrets
import time
from typing import Any

from llamadist.distributed.faults import FAULT_VARS
from llamadist.distributed.launch import free_port
from llamadist.distributed.link import POLL_S, FrontLink, WorkerLost
from llamadist.distributed.p2p import Message
from llamadist.planning.layout import Layout

# front: a cli.front.Front; r: its Replica; rec: a cli.replan.Recovery (the front imports
# this module, so no import of it here)
log = logging.getLogger(__name__)
STARTUP_S = 600.0  # a worker's start and load (a big checkpoint from a slow disk)


def rejoin_allowed(layout: Layout, policy: str) -> bool:
    """Whether this layout's survivors can keep their stage after a lost worker."""
    cpu = all(str(d).split(":")[0] == "cpu" for d in layout.devices)
    return policy == "restart" and cpu and not layout.lockstep


def can_rejoin(front: Any, r: Any, lost: int) -> bool:
    """A rejoin for replica ``r`` after losing worker ``lost``: allowed by the layout, the
    lost worker known, and some other worker of the replica still running."""
    dead = {e.rank for e in r.crew.exits()} - {lost}
    survivors = [i for i in r.crew.indices if i != lost and i not in dead and i in r.links]
    return bool(r.setup.get("rejoin")) and lost in r.crew.indices and not dead and \
        len(survivors) == len(r.crew.indices) - 1 > 0


def await_workers(front: Any, r: Any, want: set[int],
                  rejoining: frozenset[int] = frozenset()) -> tuple[float, float]:
    """Wait for the workers ``want`` (just started) to connect, send each its setup, and
    wait until they are loaded and the ``rejoining`` survivors are in the new world.
    -> (seconds from the start to connected, connected to loaded)."""
    deadline = time.monotonic() + STARTUP_S

    def check(what: str) -> None:
        exits = r.crew.exits()
        if exits:
            raise WorkerLost(r.index, exits[0].rank, f"{exits[0].describe()} while {what}")
        if time.monotonic() > deadline:
            raise WorkerLost(r.index, -1, f"replica {r.index} was not {what} within "
                                          f"{STARTUP_S:.0f} s")
    while not want <= set(r.links):
        with front._cond:
            front._cond.wait(POLL_S)
            for i in want - set(r.links):
                link = front._arrived.pop((i, r.token), None)
                if link is not None:
                    r.links[i] = link
        check("connecting")
    connected = time.monotonic()
    for i in want:
        r.links[i].send_obj({**r.setup, "replica": r.index})
    need, ready = want | rejoining, set()
    while ready != need:
        for i in need - ready:
            link = r.links[i]
            obj = link.get(link.objects, POLL_S / len(need))
            if isinstance(obj, dict) and ("ready" in obj or "rejoined" in obj):
                ready.add(i)
            elif obj is not None and not isinstance(obj, dict):
                raise WorkerLost(r.index, i, f"worker {i} {link.lost} while loading")
        check("loading")
    r.status = "running"
    return connected - r.crew.started_at, time.monotonic() - connected


def rejoin(front: Any, r: Any, lost: int, rec: Any) -> bool:
    """Start worker ``lost`` again and have the survivors join it (their stage kept); the
    lost worker is already dead. True when the replica runs again; False (every worker
    killed, links closed) when a survivor did not follow: restart them all."""
    survivors = frozenset(i for i in r.crew.indices if i != lost)
    gone = r.links.pop(lost, None)
    if gone is not None:
        gone.close()
    port = free_port()
    r.token = secrets.token_hex(8)  # before "starting": a stale hello never matches
    r.status, r.failure, r.peer_lost_at = "starting", None, None
    try:
        for i in survivors:
            r.links[i].send_obj({"rejoin": port})
        r.crew.start_one(lost, r.token, port, drop=FAULT_VARS)
        _await_acks(front, r, survivors)
        rec.restart_s, rec.reload_s = await_workers(front, r, {lost}, survivors)
    except (WorkerLost, OSError) as e:
        log.warning("replica %d: the survivors did not rejoin (%s); restarting all its "
                    "workers", r.index, e)
        r.status = "lost"
        r.crew.kill()
        r.close_links()
        return False
    for i in survivors:  # tokens of the broken world's steps, sent before "rejoined"
        _drain(r.links[i])
    rec.kept = len(survivors)
    log.warning("replica %d: worker %d started again; workers %s kept their stages",
                r.index, lost, sorted(survivors))
    return True


def _await_acks(front: Any, r: Any, survivors: frozenset[int]) -> None:
    """Every survivor took the order within --timeout (it is alive and not stuck)."""
    deadline, acked = time.monotonic() + front.timeout, set()
    while acked != survivors:
        for i in survivors - acked:
            link = r.links[i]
            obj = link.get(link.objects, POLL_S / len(survivors))
            if isinstance(obj, dict) and "rejoining" in obj:
                acked.add(i)
            elif obj is not None and not isinstance(obj, dict):
                raise WorkerLost(r.index, i, f"worker {i} {link.lost} before rejoining")
        dead = [e for e in r.crew.exits() if e.rank in survivors]
        if dead:
            raise WorkerLost(r.index, dead[0].rank, dead[0].describe())
        if time.monotonic() > deadline:
            missing = sorted(survivors - acked)
            raise WorkerLost(r.index, missing[0], f"workers {missing} did not take the order "
                                                  f"to rejoin within {front.timeout:g} s")


def _drain(link: FrontLink) -> None:
    while True:
        try:
            item = link.messages.get_nowait()
        except queue.Empty:
            return
        if not isinstance(item, Message):  # the link's end: later readers learn it too
            link.messages.put(item)
            return
