"""Tensor parallelism over native (quantized) weights: two gloo ranks on the tiny GGUF of
test_gguf (Q4_0, Q4_1, Q8_0, Q4_K, Q6_K blocks beside float tensors) against the
single-process native stage. Every column cut falls on a block boundary (o_proj at 128
inputs, down_proj at 256), so each rank keeps its shard in blocks: the logits agree to
1e-4 (the all-reduce reorders sums) and the greedy tokens are identical.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from llamadist.config import RuntimeConfig
from llamadist.kernels import cpu_quant
from llamadist.kernels.quant import QuantizedTensor
from tests.unit.test_gguf import LAYERS, write_tiny_gguf

pytestmark = pytest.mark.skipif(not cpu_quant.available(), reason="no C compiler")
PROMPT = [5, 9, 30, 7, 2, 44, 61, 3]
NEW = 8


def _run(stage) -> dict:
    t = len(PROMPT)
    with torch.inference_mode():
        logits = stage.forward(torch.tensor([PROMPT]), torch.arange(t).view(1, t), 0, None,
                               logits="all")[0]
        tokens, last = [], logits[-1]
        for i in range(NEW):
            tokens.append(int(last.argmax()))
            last = stage.forward(torch.tensor([[tokens[-1]]]), torch.tensor([[t + i]]), t + i,
                                 None)[0, -1]
    blocks = sum(isinstance(m.__dict__.get("weight"), QuantizedTensor)
                 for m in stage.model.modules())
    return {"logits": logits.clone(), "tokens": tokens, "blocks": blocks}


def _worker(rank: int, world: int, store: str, path: str, out: str) -> None:
    from llamadist.runtime.stage import build_tp_stage
    from llamadist.weights.gguf import GGUFCheckpoint
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        group = dist.new_group(list(range(world)))
        stage = build_tp_stage(GGUFCheckpoint(path), range(LAYERS), "cpu", torch.float32, 1, 32,
                               group, rank, world, runtime=RuntimeConfig(weights="native"))
        torch.save(_run(stage), Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_tp2_native_blocks_match_one_process(tmp_path):
    from llamadist.runtime.stage import build_stage
    from llamadist.weights.gguf import GGUFCheckpoint
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    ref = _run(build_stage(GGUFCheckpoint(path), range(LAYERS), "cpu", torch.float32, 1, 32,
                           runtime=RuntimeConfig(weights="native")))
    store = tempfile.mktemp(dir=tmp_path, prefix="store")
    mp.spawn(_worker, args=(2, store, str(path), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert got["blocks"] >= 5  # o/down of both layers and the head stayed blocks
        assert (got["logits"] - ref["logits"]).abs().max().item() <= 1e-4
        assert got["tokens"] == ref["tokens"]
