"""A tensor-parallel survivor keeps its stage across worlds (cli.rejoin's worker side):
two gloo ranks build a TP=2 stage and run it; then, as after a lost peer, rank 0 takes its
modules' groups out (unbind_groups), both leave the world and form a new one on another
port; rank 1 builds its stage again (a restarted worker), rank 0 only rebinds its modules
to the new world's TP group. The logits in the new world equal the first world's, and
between the worlds no module of rank 0 holds a process group. A dense model and a
mixture-of-experts one (whose expert blocks, spread over the TP ranks, hold the group
too). A module holding a group that is none of the rank's is refused."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from llamadist.distributed.groups import (ParallelGroups, init_distributed, rebind_groups,
                                          unbind_groups)
from llamadist.distributed.launch import free_port

MAX_SEQ = 64
PROMPT = [5, 9, 14, 3, 27, 8, 11]


def _world(rank: int, port: int) -> ParallelGroups:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return ParallelGroups(init_distributed(60, "cpu"), 1, 2)


def _stage(folder: str, groups: ParallelGroups):
    from llamadist.runtime.stage import build_tp_stage
    from llamadist.weights.safetensors_ckpt import HFCheckpoint
    ckpt = HFCheckpoint(Path(folder))
    return build_tp_stage(ckpt, range(ckpt.config.num_layers), "cpu", torch.float32, 1,
                          MAX_SEQ, groups.tp.device_group, groups.tp_index, 2)


def _logits(stage) -> torch.Tensor:
    ids = torch.tensor([PROMPT])  # (1, T)
    with torch.inference_mode():
        return stage.forward(ids, torch.arange(len(PROMPT)).view(1, -1), 0, None,
                             logits="all")[0].clone()  # (T, V)


def _held(model) -> list:
    """Every process group a module of ``model`` holds (one entry per attribute)."""
    return [g for m in model.modules() for g in (getattr(m, "group", None),
                                                 getattr(m, "reduce_group", None))
            if isinstance(g, dist.ProcessGroup)]


def _worker(rank: int, folder: str, ports: tuple[int, int], out: str) -> None:
    torch.set_num_threads(1)
    groups = _world(rank, ports[0])
    stage = _stage(folder, groups)
    first = _logits(stage)
    res: dict = {"first": first}
    if rank == 0:
        foreign = dist.new_group([0, 1], backend="gloo")  # no name in groups.named()
        head = stage.model.lm_head
        head.group, kept = foreign, head.group
        try:
            unbind_groups(stage.model, groups)
        except ValueError as e:
            res["refused"] = str(e)
        head.group = kept
        del foreign
        res["held_before"] = len(_held(stage.model))
        bound = unbind_groups(stage.model, groups)
        res["bound"] = len(bound)
        res["held_between"] = len(_held(stage.model))
    else:
        dist.new_group([0, 1], backend="gloo")  # rank 0's foreign group (collective)
        del stage
    groups = None
    dist.destroy_process_group()
    gc.collect()
    groups = _world(rank, ports[1])
    if rank == 0:
        rebind_groups(bound, groups)
        held = _held(stage.model)
        res["rebound"] = len(held) == res["held_before"] and all(
            g is groups.tp.device_group for g in held)
        res["experts"] = sum(type(m).__name__ == "ExpertParallelMoE"
                             for m in stage.model.modules())
    else:
        stage = _stage(folder, groups)  # a restarted worker loads its shard again
    res["second"] = _logits(stage)
    torch.save(res, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.parametrize("kind", ["gqa_tied", "moe_top2_gqa"])
def test_a_tp_survivor_rebinds_its_modules_to_the_new_world(kind, tiny_models, tiny_mixtrals,
                                                            tmp_path):
    folder = {**tiny_models, **tiny_mixtrals}[kind]
    ports = (free_port(), free_port())
    mp.spawn(_worker, args=(str(folder), ports, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert (r0["experts"] > 0) == kind.startswith("moe"), r0["experts"]
    assert "not one of" in r0["refused"], r0.get("refused")
    assert r0["held_before"] > 0 and r0["bound"] >= r0["held_before"]
    assert r0["held_between"] == 0
    assert r0["rebound"]
    for r in (r0, r1):  # the TP head's all-gather gives every rank the full logits
        assert torch.equal(r["first"], r["second"])
    assert torch.equal(r0["second"], r1["second"])


def test_a_lost_peer_in_a_collective_is_a_peer_error_and_a_bug_is_not():
    from llamadist.distributed.faults import PeerError, collective_lost
    closed = RuntimeError("[/x/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection "
                          "closed by peer [127.0.0.1]:5000. This is typically caused by ...")
    lost = collective_lost(closed, 3, "a step's collective")
    assert isinstance(lost, PeerError) and lost.peer == -1
    assert "rank 3 lost a peer in a step's collective" in str(lost)
    assert isinstance(collective_lost(RuntimeError("Timed out waiting 3000ms for recv "
                                                   "operation to complete"), 0, "x"), PeerError)
    # a shape bug or any other error surfaces as itself
    assert collective_lost(RuntimeError("mat1 and mat2 shapes cannot be multiplied"), 0,
                           "x") is None
    assert collective_lost(ValueError("connection closed"), 0, "x") is None
