"""The sampler over processes: a seeded request gives the same tokens over 2 pipeline
processes (at most 2 sequences per step, so rows are regrouped) as in one process, in a batch or alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from llamadist.api import LLM
from llamadist.generation.sampling import SamplingParams

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["The quick brown fox", "Distributed inference splits a model across devices and",
           "1 2 3", "Once upon a time there was a tiny language model that dreamed"]
NEW, SEED, MAX_SEQ = 12, 4321, 64
FLAGS = ["--max-new-tokens", str(NEW), "--seed", str(SEED), "--temperature", "0.8",
         "--top-p", "0.9", "--max-seq-len", str(MAX_SEQ), "--json"]


def run_cli(*args: str) -> list[list[int]]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-m", "llamadist", "generate", *args, *FLAGS,
                          *[a for p in PROMPTS for a in ("--prompt", p)]],
                         cwd=ROOT, text=True, capture_output=True, env=env, timeout=180)
    assert out.returncode == 0, out.stderr
    return [json.loads(line)["token_ids"] for line in out.stdout.splitlines()
            if line.startswith("{")]


def test_seeded_tokens_same_over_two_processes_and_alone(tiny_model):
    llm = LLM(str(tiny_model), max_batch=1, max_seq_len=MAX_SEQ)
    params = SamplingParams(max_new_tokens=NEW, temperature=0.8, top_p=0.9, seed=SEED)
    alone = [llm.generate(p, params)[0].token_ids for p in PROMPTS]
    greedy = [llm.generate(p, max_new_tokens=NEW)[0].token_ids for p in PROMPTS]
    assert alone != greedy  # really sampled
    one = run_cli(str(tiny_model))
    two = run_cli(str(tiny_model), "--nproc", "2", "--pp", "2", "--max-batch", "2")
    assert one == alone
    assert two == alone
