"""The engine over processes on CUDA: 2 ranks (NCCL with a GPU each, or sharing one GPU
through host memory), their decode steps through CUDA graphs, against the single-process
stage on the same GPU, float32; and TP=2 (an all-reduce inside the graphs where NCCL runs
it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llamadist.generation.generate import generate
from llamadist.generation.sampling import SamplingParams
from llamadist.runtime.engine import Engine

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="needs CUDA")]
ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["The quick brown fox", "Distributed inference splits a model", "1 2 3",
           "Once upon a time there was a tiny language model"]


@pytest.mark.parametrize("grid,max_batch", [(("--pp", "2"), "4"), (("--pp", "2"), "2"),
                                            (("--tp", "2"), "4")])
def test_two_ranks_on_cuda_match_engine(tiny_model, grid, max_batch):
    engine = Engine.load(str(tiny_model), devices=["cuda:0"], max_batch=4, max_seq_len=64)
    tok = engine.ckpt.tokenizer()
    ref = generate(engine, tok, [tok.encode(p) for p in PROMPTS],
                   SamplingParams(max_new_tokens=12))
    env = dict(os.environ, NCCL_NVLS_ENABLE="0")
    out = subprocess.run([sys.executable, "-m", "llamadist", "generate", str(tiny_model),
                          "--nproc", "2", "--devices", "cuda", "--dtype", "float32",
                          *grid, "--max-batch", max_batch, "--max-new-tokens", "12", "--max-seq-len",
                          "64", "--json", *[a for p in PROMPTS for a in ("--prompt", p)]],
                         cwd=ROOT, env=env, text=True, capture_output=True, timeout=300)
    assert out.returncode == 0, out.stderr
    got = [json.loads(line)["token_ids"] for line in out.stdout.splitlines()
           if line.startswith("{")]
    assert got == [r.token_ids for r in ref]
