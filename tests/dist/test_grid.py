"""The pieces of the multi-process engine that need no processes: the grid, the message
header, the step message, the launcher's blame and the rank table."""

from __future__ import annotations

import time

import pytest
import torch

from llamadist.distributed.faults import EXIT_PEER_LOST
from llamadist.distributed.grid import GridError, coords, grid_size, group_ranks, rank_of
from llamadist.distributed.launch import WorkerExit, blame
from llamadist.cli.front import Front, Replica
from llamadist.cli.plan import format_rank_table
from llamadist.planning.layout import stage_devices
from llamadist.distributed.p2p import Kind, Message, decode_header, encode_header
from llamadist.generation.sampling import SamplingParams
from llamadist.runtime.step_work import SampleSpec, SeqWork, StepWork


def test_grid_sizes_and_refusals():
    assert grid_size(None, 2, 1, 1) == (2, 2)
    assert grid_size(8, None, 2, 2) == (8, 2)
    assert grid_size(None, None, 2, 1) == (2, 1)
    with pytest.raises(GridError, match=r"--nproc 3 with pp=2 x tp=1 x dp=1 = 2: the grid must"):
        grid_size(3, 2, 1, 1)
    with pytest.raises(GridError, match="does not divide by tp=2 x dp=1"):
        grid_size(3, None, 2, 1)
    with pytest.raises(GridError, match="--pp must be >= 1"):
        grid_size(None, 0, 1, 1)


def test_tensor_parallel_is_innermost():
    pp, tp, dp = 2, 2, 2
    for rank in range(8):
        d, p, t = coords(rank, pp, tp, dp)
        assert rank_of(d, p, t, pp, tp) == rank
    assert group_ranks("tp", pp, tp, dp) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert group_ranks("pp", pp, tp, dp) == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert group_ranks("dp", pp, tp, dp) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    # Experts spread over one stage's tp x dp ranks (EP = TP x DP).
    assert group_ranks("ep", pp, tp, dp) == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert group_ranks("ep", 2, 2, 1) == group_ranks("tp", 2, 2, 1)
    assert group_ranks("ep", 2, 1, 2) == group_ranks("dp", 2, 1, 2)
    # Every rank is in exactly one group of each dimension.
    for dim in ("tp", "pp", "dp", "ep"):
        assert sorted(r for g in group_ranks(dim, pp, tp, dp) for r in g) == list(range(8))


def test_header_round_trip():
    hidden = torch.zeros(3, 1, 64, dtype=torch.bfloat16)
    msg, shape, dtype, on_cpu = decode_header(encode_header(Message(Kind.HIDDEN, 7, 2, 40, hidden)))
    assert (msg.kind, msg.step, msg.lane, msg.start) == (Kind.HIDDEN, 7, 2, 40)
    assert shape == (3, 1, 64) and dtype == torch.bfloat16 and on_cpu
    for kind in (Kind.END, Kind.IDLE):  # no tensor follows
        msg, shape, _, _ = decode_header(encode_header(Message(kind)))
        assert msg.kind == kind and shape is None
    empty = torch.zeros(0, dtype=torch.long)  # a step that samples nothing: a tensor still
    assert decode_header(encode_header(Message(Kind.TOKENS, tensor=empty)))[1] == (0,)


def test_step_message_round_trip():
    """A step crosses processes as bytes and builds the same PagedBatch on the other side."""
    spec = SampleSpec(SamplingParams(temperature=0.7, seed=3, stop=("x",)), 3, 2, (5, 6))
    work = StepWork([SeqWork("a", (5, 6, 7), (1, 2, 4), 6, spec),
                     SeqWork("b", (9,), (3,), 0, None)], 4, reset_stats=True)
    packed = work.pack()
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    back = StepWork.unpack(packed)
    assert back.seqs == work.seqs and back.block_size == 4 and back.reset_stats
    assert back.sampled_ids == ["a"] and back.tokens().tolist() == [5, 6, 7, 9]
    a, b = work.batch(), back.batch()
    assert torch.equal(a.slot_mapping, b.slot_mapping) and b.positions.tolist() == [6, 7, 8, 0]


def test_blame_prefers_the_rank_with_its_own_error():
    lost = WorkerExit(0, 10, EXIT_PEER_LOST, at=1.0)
    died = WorkerExit(1, 11, 17, at=1.5)  # seen later, but it is the cause
    assert blame([lost, died]) == [died]
    hung = WorkerExit(2, 12, None, at=9.0)
    assert blame([lost, hung]) == [hung]
    assert "stopped answering" in hung.describe() and "rank 2" in hung.describe()
    assert blame([WorkerExit(0, 1, 0, 0.0)]) == []


class _Link:
    def __init__(self, seen: float, stuck_s: float = 0.0, lost: str | None = None):
        self.seen, self.stuck_s, self.lost = seen, stuck_s, lost

    def stuck(self, now: float) -> float:
        return self.stuck_s + (now - self.seen) if self.stuck_s > 0 else 0.0


class _Crew:
    """A killed worker 2 whose exit the system reports only after ``reaped_after`` s."""

    def __init__(self, reaped_after: float):
        self.procs = {i: type("P", (), {"pid": 100 + i})() for i in range(3)}
        self.reaped_at = time.monotonic() + reaped_after

    def exits(self) -> list[WorkerExit]:
        now = time.monotonic()
        return [WorkerExit(2, 102, -9, now)] if now >= self.reaped_at else []


def test_blame_waits_for_the_exit_of_a_worker_whose_link_closed():
    """pp=3, the last stage killed: its link closes at once, its exit shows later (a busy
    machine), and meanwhile the two survivors look stuck inside the step. The front blames
    the dead worker, not a survivor (which would restart every worker of the replica)."""
    front = object.__new__(Front)
    front.timeout = 3.0
    now = time.monotonic()
    r = Replica(0, _Crew(reaped_after=0.4))
    r.links = {0: _Link(now - 1.0, stuck_s=1.0), 1: _Link(now - 1.0, stuck_s=0.8),
               2: _Link(now - 1.0, lost="closed its connection")}
    found = front._blame(r)
    assert found is not None and found.peer == 2, found


def test_rank_table_and_stage_devices():
    assert stage_devices("cpu", 3) == ["cpu"] * 3
    assert stage_devices("cpu,cpu", 2) == ["cpu", "cpu"]
    with pytest.raises(ValueError, match="give one per stage"):
        stage_devices("cpu,cpu", 3)
    table = format_rank_table([(0, 3), (3, 5)], ["cuda:0", "cuda:1"], 2, 2, 1)
    rows = table.splitlines()[2:]
    assert len(rows) == 4 and "[3, 5)" in rows[2] and "head" in rows[3]
    assert "cuda:LOCAL_RANK" in rows[0] and "1/2 shard" in rows[0]
