"""The Triton paged decode kernel (llamadist/kernels/paged_attention.py) on the CPU, through
Triton's interpreter, against the PyTorch paged path: float32 within 1e-5, bfloat16
within 2e-2, the cache written exactly. TRITON_INTERPRET must be set before triton is
imported, so the cases run in a subprocess (tests/paged_kernel_cases.py). Skipped when
triton is not installed (CPU-only torch wheels have none; the GPU test covers the
compiled kernel: tests/gpu/test_paged_gpu.py)."""

from __future__ import annotations

import importlib.util

import pytest

from llamadist.kernels.paged_attention import MAX_SPLITS, num_splits
from tests.interpreted import start_all


def test_num_splits(monkeypatch):
    from llamadist.kernels import paged_attention as front
    monkeypatch.setattr(front, "SPLIT_GRAIN", front.BLOCK_N)  # ranges of whole tiles
    assert num_splits(8, 8192) == 64        # Llama-3-8B batch 1, long context: 2 per SM
    assert num_splits(8, 640) == 8          # 10 tiles of 64: 8 splits, each with a tile
    assert num_splits(1024, 8192) == 1      # batch 128: the rows fill the SMs already
    assert num_splits(8, 10) == 1
    for rows in (1, 3, 8, 256, 1024):
        for slots in (1, 64, 65, 1000, 131072):
            n = num_splits(rows, slots)
            assert n & (n - 1) == 0 and 1 <= n <= MAX_SPLITS
            assert n <= max(1, -(-slots // front.SPLIT_GRAIN))


def test_num_splits_counts_grains(monkeypatch):
    """A split's range is whole grains (SPLIT_GRAIN), not whole tiles: a finer grain gives a
    short bucket more splits, a long one as many as before (two per SM)."""
    from llamadist.kernels import paged_attention as front
    monkeypatch.setattr(front, "SPLIT_GRAIN", 64)
    assert num_splits(8, 256) == 4              # 4 grains of 64 slots
    monkeypatch.setattr(front, "SPLIT_GRAIN", 16)
    assert num_splits(8, 256) == 16             # 16 grains of 16 slots
    assert num_splits(8, 8192) == 64
    assert num_splits(32, 8192) == 16           # batch 4: 2 * 132 / 32 rows, rounded up


no_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                               reason="triton not installed")


KINDS = ["llama3", "gqa_tied"]


@pytest.fixture(scope="module")
def interpreted(tiny_models, tmp_path_factory):
    """Every interpreted run of this module started at once (tests/interpreted.py)."""
    runs = start_all(tmp_path_factory.mktemp("paged_runs"), "paged_kernel_cases",
                     {"cpu": ("cpu",),
                      **{kind: ("model", str(tiny_models[kind])) for kind in KINDS}})
    yield runs
    for run in runs.values():
        run.stop()


@no_triton
def test_kernel_interpreted_matches_pytorch_paged_path(interpreted):
    proc = interpreted["cpu"].result()
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    # 2 dtypes x 4 cases x 3 split counts; grains 8 and 128 x 4 cases x 2 split counts;
    # EARLY_TILE's 2 dtypes x 2 grains x 3 split counts (the last two lines name a grain)
    assert proc.stdout.count("splits=") == 24 + 16 + 12
    assert proc.stdout.count("grain=") == 16 + 12
    assert proc.stdout.count("early tile") == 12
    assert "stored k / v: out" in proc.stdout  # attend(q, None, None) (stored_case)
    assert "refused: paged decode attention takes 1 to 64 splits, not 65" in proc.stdout


@no_triton
@pytest.mark.parametrize("kind", KINDS)
def test_graph_path_buffers_interpreted_equal_pytorch_tokens(interpreted, kind):
    """LLMEngine's decode-only steps through the paged graphs' static buffers (padding rows,
    buckets) and the interpreted kernel, without capture: the same greedy tokens as the
    PyTorch paged path."""
    proc = interpreted[kind].result()
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    assert "torch._dynamo not imported" in proc.stdout  # no compile, no compiler imported
