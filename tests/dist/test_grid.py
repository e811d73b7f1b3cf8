"""The pieces of the process pipeline that need no processes: the grid, the message
header, micro-batch splitting, the launcher's blame and the rank table."""

from __future__ import annotations

import pytest
import torch

from llamadist.distributed.faults import EXIT_PEER_LOST
from llamadist.distributed.grid import GridError, coords, grid_size, group_ranks, rank_of
from llamadist.distributed.launch import WorkerExit, blame
from llamadist.cli.plan import format_rank_table
from llamadist.planning.layout import stage_devices
from llamadist.distributed.p2p import Kind, Message, decode_header, encode_header
from llamadist.runtime.pipeline import Lane, replica_rows, split_rows


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
    msg, shape, _, _ = decode_header(encode_header(Message(Kind.END)))
    assert msg.kind == Kind.END and shape == ()


def test_micro_batches_and_replicas():
    assert split_rows(8, 2) == [range(0, 4), range(4, 8)]
    assert split_rows(5, 3) == [range(0, 2), range(2, 4), range(4, 5)]
    assert split_rows(2, 4) == [range(0, 1), range(1, 2)]  # never an empty micro-batch
    assert replica_rows(5, 2, 1) == range(3, 5)
    assert replica_rows(1, 2, 1) == range(1, 1)  # a replica with nothing to do


def test_lane_pads_on_its_own():
    lane = Lane(0, range(2, 4), [[5, 6, 7], [8]], pad_id=0, max_seq_len=16,
                device=torch.device("cpu"))
    assert lane.tokens.tolist() == [[5, 6, 7], [0, 0, 8]]
    positions, start, mask = lane.inputs(2)  # second decode step
    assert start == 4 and positions.tolist() == [[4], [2]]
    assert mask.shape == (2, 1, 1, 5) and mask[1, 0, 0].tolist() == [False, False, True, True, True]


def test_blame_prefers_the_rank_with_its_own_error():
    lost = WorkerExit(0, 10, EXIT_PEER_LOST, at=1.0)
    died = WorkerExit(1, 11, 17, at=1.5)  # seen later, but it is the cause
    assert blame([lost, died]) == [died]
    hung = WorkerExit(2, 12, None, at=9.0)
    assert blame([lost, hung]) == [hung]
    assert "stopped answering" in hung.describe() and "rank 2" in hung.describe()
    assert blame([WorkerExit(0, 1, 0, 0.0)]) == []


def test_rank_table_and_stage_devices():
    assert stage_devices("cpu", 3) == ["cpu"] * 3
    assert stage_devices("cpu,cpu", 2) == ["cpu", "cpu"]
    with pytest.raises(ValueError, match="give one per stage"):
        stage_devices("cpu,cpu", 3)
    table = format_rank_table([(0, 3), (3, 5)], ["cuda:0", "cuda:1"], 2, 2, 1)
    rows = table.splitlines()[2:]
    assert len(rows) == 4 and "[3, 5)" in rows[2] and "head" in rows[3]
    assert "cuda:LOCAL_RANK" in rows[0] and "1/2 shard" in rows[0]
