"""Context parallelism on CUDA.

Kernel level: ``partial_attention`` on CUDA goes through PyTorch's fused flash /
memory-efficient kernels (llamadist.parallel.context_cuda), never the materialised
reference; its (out, lse) equal the float64 reference on the same (rounded) inputs, and
partials over key shards (odd lengths, GQA, an empty shard, causal, striped and random
masks, a batch of decodes of different lengths, short and long enough to be split
along the keys) merged equal full attention.
Tolerances: fp32 2e-5 on out and lse (fp32 accumulation); bf16 2e-2 on
out (the kernels round the probabilities to bf16 before P @ V) and 1e-2 on lse (fp32).
Seen on an H200 (torch 2.11): fp32 about 3e-6 on both, bf16 about 8e-3 on out, 2e-6 on
lse.

End to end: ``--nproc 2 --cp 2 --devices cuda`` on one GPU (the two ranks share it;
their collectives go through host memory over gloo, as ``--pp 2`` does there), float32,
greedy tokens equal the single-process engine's on the same GPU.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llamadist.parallel import context
from llamadist.parallel.context import fusable, merge_partials, partial_attention

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="needs CUDA")]
ROOT = Path(__file__).resolve().parents[2]
REFERENCE = context.reference_partial  # before fused_only replaces it
TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (2e-2, 1e-2)}  # (out, lse)


@pytest.fixture
def fused_only(monkeypatch):
    """Fail if partial_attention falls back to the materialised scores."""
    def refuse(*a, **k):
        raise AssertionError("reference_partial used on CUDA: no fused kernel was taken")
    monkeypatch.setattr(context, "reference_partial", refuse)


def _qkv(t, s, h, h_kv, d, dtype, seed=0, batch=()):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *shape: torch.randn(*batch, *shape, generator=g).to(dtype)  # noqa: E731
    return mk(t, h, d), mk(s, h_kv, d) * 2, mk(s, h_kv, d)


def _reference(q, k, v, mask=None, causal=False):
    """float64 on the CPU, of the same rounded inputs."""
    if causal:
        mask = torch.ones(q.shape[-3], k.shape[-3], dtype=torch.bool).tril()
    return REFERENCE(q.double(), k.double(), v.double(),
                                     None if mask is None else mask.cpu())


def _check(got, want, dtype):
    out_tol, lse_tol = TOL[dtype]
    out, lse = got[0].cpu().double(), got[1].cpu().double()
    assert got[0].is_cuda and got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    assert torch.equal(torch.isinf(lse), torch.isinf(want[1]))
    fin = torch.isfinite(want[1])
    assert (out - want[0]).abs().max() <= out_tol, (out - want[0]).abs().max()
    assert (lse[fin] - want[1][fin]).abs().max() <= lse_tol


def _mask(kind, t, s):
    if kind == "stripes":  # a striped ring block: query stripe i sees key stripes <= i
        return (torch.arange(s).view(1, -1) // 5) <= (torch.arange(t).view(-1, 1) // 5)
    g = torch.Generator().manual_seed(7)
    m = torch.rand(t, s, generator=g) > 0.4
    m[[0, t // 2]] = False  # rows that see no key: out 0, lse -inf
    return m


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["none", "causal", "stripes", "random"])
@pytest.mark.parametrize("h,h_kv,d", [(8, 2, 64), (4, 4, 128)])
def test_fused_partial_equals_float64_reference(fused_only, dtype, kind, h, h_kv, d):
    t, s = (37, 37) if kind == "causal" else (37, 53)
    q, k, v = _qkv(t, s, h, h_kv, d, dtype, seed=1)
    mask = _mask(kind, t, s) if kind in ("stripes", "random") else None
    assert fusable(q.cuda())
    got = partial_attention(q.cuda(), k.cuda(), v.cuda(),
                            None if mask is None else mask.cuda(), causal=kind == "causal")
    _check(got, _reference(q, k, v, mask, kind == "causal"), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shards_merged_on_cuda_equal_full_attention(fused_only, dtype):
    """Keys split at odd points with an empty shard; the query chunk's own shard causal
    (the diagonal of a ring step), the earlier ones unmasked."""
    h, h_kv, d = 8, 2, 64
    q, k, v = _qkv(13, 60, h, h_kv, d, dtype, seed=2)
    qc, kc, vc = q.cuda(), k.cuda(), v.cuda()
    # the queries are the last 13 positions: keys [0, 47) earlier, [47, 60) their own
    bounds = [0, 19, 19, 47]
    parts = [partial_attention(qc, kc[a:b], vc[a:b]) for a, b in zip(bounds, bounds[1:])]
    parts.append(partial_attention(qc, kc[47:], vc[47:], causal=True))
    mask = torch.arange(60).view(1, -1) <= torch.arange(47, 60).view(-1, 1)
    _check(merge_partials(parts), _reference(q, k, v, mask), dtype)
    assert torch.isneginf(parts[1][1]).all() and not parts[1][0].any()  # the empty shard


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("length", [33, 4096, 4099])  # the long ones: keys split in chunks
def test_batched_decodes_masked_by_length(fused_only, dtype, length):
    """A CP decode step's shape: one query per sequence against its stored slots, padded
    to the longest (S1, 1, L) with a length mask; one sequence holds none here."""
    h, h_kv, d = 8, 2, 128
    q, k, v = _qkv(1, length, h, h_kv, d, dtype, seed=3, batch=(4,))
    lens = torch.tensor([length, 5, 0, length // 2 + 3])
    mask = (torch.arange(length).view(1, 1, -1) < lens.view(-1, 1, 1))  # (4, 1, L)
    got = partial_attention(q.cuda(), k.cuda(), v.cuda(), mask.cuda())
    _check(got, _reference(q, k, v, mask), dtype)
    assert not got[0][2].any() and torch.isneginf(got[1][2]).all()


def test_float64_on_cuda_takes_the_reference():
    q, k, v = _qkv(5, 9, 4, 2, 64, torch.float64)
    assert not fusable(q.cuda())
    out, lse = partial_attention(q.cuda(), k.cuda(), v.cuda())
    want = _reference(q, k, v)
    assert torch.allclose(out.cpu(), want[0], atol=1e-12)
    assert torch.allclose(lse.cpu(), want[1], atol=1e-12)
    assert math.isfinite(float(lse.max()))


def test_cp2_sharing_one_gpu_matches_engine(tiny_model):
    """Two CP ranks on cuda:0 (gloo through host memory), 4-token stripes: prompts shorter
    than a stripe, spanning both ranks and many stripes long; decodes over both shards."""
    from llamadist.generation.generate import generate
    from llamadist.generation.sampling import SamplingParams
    from llamadist.runtime.engine import Engine
    prompts = ["1 2 3", "The quick brown fox jumps over the lazy dog.",
               " ".join(["Once upon a time there was a tiny language model"] * 4)]
    engine = Engine.load(str(tiny_model), devices=["cuda:0"], max_batch=4, max_seq_len=128)
    tok = engine.ckpt.tokenizer()
    ids = [tok.encode(p) for p in prompts]
    assert len(ids[0]) < 4 < 8 < len(ids[2])
    ref = generate(engine, tok, ids, SamplingParams(max_new_tokens=10))
    env = dict(os.environ, NCCL_NVLS_ENABLE="0")
    out = subprocess.run([sys.executable, "-m", "llamadist", "generate", str(tiny_model),
                          "--nproc", "2", "--cp", "2", "--devices", "cuda", "--dtype",
                          "float32", "--kv-block-size", "4", "--max-batch", "4",
                          "--max-new-tokens", "10", "--max-seq-len", "128", "--json",
                          *[a for p in prompts for a in ("--prompt", p)]],
                         cwd=ROOT, env=env, text=True, capture_output=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    got = [json.loads(line)["token_ids"] for line in out.stdout.splitlines()
           if line.startswith("{")]
    assert got == [r.token_ids for r in ref]
