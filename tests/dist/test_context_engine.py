"""Context parallelism through the multi-process engine (gloo on CPU) against one process.

Each rank keeps 4-token stripes of every request (llamadist.runtime.cp_step); prompts of
3 (shorter than a stripe: one rank holds it), 4 (one stripe), 8 (one stripe per rank at
CP 2), 37 and 50 tokens (many stripes, on every rank), and one sharing 29 tokens with the
37-token prompt (a prefix-cache hit: a prefill that continues after cached tokens).
Jobs: every request at once (several prompts in one ring step, then decodes over the
sharded caches), two at a time with 6-token steps (chunked prefill; the prefix hit), and a
KV budget so small the scheduler preempts. Worlds: CP 2, CP 3, CP 2 x TP 2, CP 2 x PP 2
(4 processes are slow on 2 cores: one job each). Tolerance: 1e-5 max abs fp32 logits.
"""

from __future__ import annotations

import json

import pytest
import torch

from llamadist.generation.generate import generate
from llamadist.generation.sampling import SamplingParams
from llamadist.runtime.engine import Engine
from tests.dist.test_pipeline import (GREEDY, MAX_SEQ, Recorder, check_logits,
                                      llamadist, run_worker_world)

LENGTHS = [37, 3, 4, 8, 50]
CHUNKED = {"name": "chunked", "max_batch": 2, "max_batch_tokens": 6, "params": GREEDY}
JOBS = [{"name": "all", "max_batch": 6, "params": GREEDY}, CHUNKED,
        # 13 blocks of 8 tokens (12 usable: 96 tokens) for requests of up to 60
        {"name": "preempt", "max_batch": 6, "num_blocks": 13, "params": GREEDY}]


@pytest.fixture(scope="module")
def prompts(tiny_model) -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    vocab = json.loads((tiny_model / "config.json").read_text())["vocab_size"]
    out = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in LENGTHS]
    out.insert(4, out[0][:29] + torch.randint(3, vocab, (12,), generator=g).tolist())
    return out


@pytest.fixture(scope="module")
def reference(tiny_model, prompts) -> dict:
    rec = Recorder(Engine.load(str(tiny_model), max_batch=len(prompts), max_seq_len=MAX_SEQ))
    results = generate(rec, None, prompts, SamplingParams(**GREEDY))
    return {"tokens": [r.token_ids for r in results], "logits": rec.steps}


def world(tmp_path_factory, tiny_model, prompts, name, nproc, jobs, pp=1, **grid):
    ranges = [[0, 5]] if pp == 1 else [[0, 3], [3, 5]]
    return run_worker_world(tmp_path_factory.mktemp(name), tiny_model, nproc, pp, ranges, jobs,
                            prompts, **grid)


@pytest.fixture(scope="module")
def cp2(tiny_model, prompts, tmp_path_factory):
    return world(tmp_path_factory, tiny_model, prompts, "cp2", 2, JOBS, cp=2)


def check(result: dict, name: str, reference: dict) -> None:
    assert result["tokens"] == reference["tokens"]
    check_logits(name, result["logits"], reference["logits"])


@pytest.mark.parametrize("job", [j["name"] for j in JOBS])
def test_cp2_matches_one_process(cp2, reference, job):
    check(cp2[job], job, reference)


def test_cp2_prefix_hit_and_preemption_happened(cp2):
    assert cp2["chunked"]["cached"] >= 16  # the shared prompt reused cached stripes
    assert cp2["preempt"]["preemptions"] > 0 and cp2["all"]["preemptions"] == 0


def test_cp3_matches_one_process(tiny_model, prompts, tmp_path_factory, reference):
    got = world(tmp_path_factory, tiny_model, prompts, "cp3", 3, JOBS[:2], cp=3)
    for job in ("all", "chunked"):
        check(got[job], job, reference)


def test_cp2_x_tp2_matches_one_process(tiny_model, prompts, tmp_path_factory, reference):
    got = world(tmp_path_factory, tiny_model, prompts, "cp2tp2", 4, [CHUNKED], cp=2, tp=2)
    check(got["chunked"], "chunked", reference)


def test_cp2_x_pp2_matches_one_process(tiny_model, prompts, tmp_path_factory, reference):
    got = world(tmp_path_factory, tiny_model, prompts, "cp2pp2", 4, [CHUNKED], pp=2, cp=2)
    check(got["chunked"], "chunked", reference)


def test_cli_generate_cp2(tiny_model):
    """The front door: `generate --nproc 2 --cp 2` gives one process's greedy tokens."""
    args = ["generate", str(tiny_model), "--max-new-tokens", "8", "--kv-block-size", "4",
            "--json", "--prompt", "The quick brown fox jumps over the lazy dog. Once upon "
            "a time", "--prompt", "1 2"]
    one, two = llamadist(*args), llamadist(*args, "--nproc", "2", "--cp", "2")
    assert one.returncode == 0 and two.returncode == 0, two.stderr
    rows = [[json.loads(x)["token_ids"] for x in o.stdout.splitlines() if x.startswith("{")]
            for o in (one, two)]
    assert rows[0] == rows[1] and len(rows[0]) == 2


def test_cli_generate_cp2_x_dp2(tiny_model):
    """`--nproc 4 --cp 2 --dp 2`: two data-parallel replicas, each a CP group of 2 ranks
    (4-token stripes), give one process's greedy tokens for prompts shorter than a stripe
    and spanning many."""
    args = ["generate", str(tiny_model), "--max-new-tokens", "6", "--kv-block-size", "4",
            "--json", "--prompt", "The quick brown fox jumps over the lazy dog. Once upon "
            "a time", "--prompt", "1 2", "--prompt", "def main():\n    print('hello')"]
    one, four = llamadist(*args), llamadist(*args, "--nproc", "4", "--cp", "2", "--dp", "2")
    assert one.returncode == 0 and four.returncode == 0, four.stderr
    rows = [[json.loads(x)["token_ids"] for x in o.stdout.splitlines() if x.startswith("{")]
            for o in (one, four)]
    assert rows[0] == rows[1] and len(rows[0]) == 3
    assert "4 process(es)" in four.stderr + four.stdout
