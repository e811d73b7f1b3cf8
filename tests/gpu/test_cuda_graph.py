"""The static decode path (CUDA graphs on GPU) and projection fusion against the eager path.

GPU cases are marked ``gpu`` and skipped without CUDA; the same checks run on the CPU
(static shapes without capture, fusion) so CI covers the logic.
"""

import pytest
import torch

from llamadist.api import LLM
from llamadist.generation.sampling import SamplingParams
from llamadist.model.fuse import fuse_projections, is_fused
from llamadist.runtime.cuda_graph import DecodeGraphs, bucket_sizes
from llamadist.runtime.stage import build_stage
from llamadist.weights.checkpoint import open_checkpoint

HAS_CUDA = torch.cuda.is_available()
on_gpu = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")]

PROMPTS = ["The quick brown fox", "Distributed inference splits a model across devices and",
           "1 2 3", "Once upon a time there was a tiny language model that dreamed"]
PARAMS = SamplingParams(max_new_tokens=24, ignore_eos=True)


def _tokens(llm: LLM) -> tuple[list[list[int]], list[int]]:
    batch = [r.token_ids for r in llm.generate(PROMPTS, PARAMS)]  # padded batch of 4
    alone = llm.generate(PROMPTS[2], PARAMS)[0].token_ids  # bucket 1, no padding
    return batch, alone


def test_bucket_sizes():
    assert bucket_sizes(1) == [1]
    assert bucket_sizes(8) == [1, 2, 4, 8]
    assert bucket_sizes(12) == [1, 2, 4, 8, 12]


@pytest.mark.parametrize("devices", ["cpu", "cpu,cpu"])
def test_static_decode_equals_eager_on_cpu(tiny_model, devices):
    """The graph path's math (full-cache mask built from `valid`, tensor start, buckets)
    without capture, on the CPU."""
    llm = LLM(str(tiny_model), devices=devices, max_batch=4, max_seq_len=128)
    ref = _tokens(llm)
    llm.engine._graphs = DecodeGraphs(llm.engine, compile_layers=False, static_cpu=True)
    llm.engine.cuda_graphs = True
    assert _tokens(llm) == ref
    assert sorted(llm.engine._graphs.decoders[0].buckets) == [1, 4]


@pytest.mark.parametrize("devices,compile_layers", [
    pytest.param("cuda:0", False, marks=on_gpu),
    pytest.param("cuda:0", True, marks=on_gpu),
    pytest.param("cuda:0,cuda:0", False, marks=on_gpu),
    pytest.param("cuda:0,cuda:0", True, marks=on_gpu),
    pytest.param("cuda:0,cpu", False, marks=on_gpu),
])
def test_graph_greedy_tokens_equal_eager(tiny_models, devices, compile_layers):
    llm = LLM(str(tiny_models["llama3"]), devices=devices, dtype="float32", max_batch=4,
              max_seq_len=128)
    llm.engine.cuda_graphs = False
    ref = _tokens(llm)
    llm.engine.cuda_graphs = True
    llm.engine.compile_layers = compile_layers
    assert _tokens(llm) == ref
    graphs = llm.engine._graphs
    cuda_stages = [d for d in graphs.decoders if d is not None]
    assert cuda_stages and all(d.buckets[4].graph is not None for d in cuda_stages)
    # A second generation replays the captured graphs and still agrees.
    assert _tokens(llm) == ref


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda:0", marks=on_gpu)])
def test_fused_equals_unfused(tiny_models, device):
    ckpt = open_checkpoint(tiny_models["gqa_tied"])
    n = ckpt.config.num_layers
    stages = {fuse: build_stage(ckpt, range(n), device, torch.float32, 2, 64, fuse=fuse)
              for fuse in (False, True)}
    assert is_fused(stages[True].model) and not is_fused(stages[False].model)
    attn = stages[True].model.model.layers["0"].self_attn
    assert not hasattr(attn, "q_proj") and attn.qkv_proj is not None
    count = {f: sum(p.numel() for p in s.model.parameters()) for f, s in stages.items()}
    assert count[True] == count[False]
    torch.manual_seed(0)
    ids = torch.randint(3, ckpt.config.vocab_size, (2, 20), device=device)
    pos = torch.arange(20, device=device).expand(2, 20)
    out = {f: s.forward(ids, pos, 0, None, logits="all") for f, s in stages.items()}
    assert (out[True] - out[False]).abs().max().item() <= 1e-5
    step = {f: s.forward(ids[:, :1], pos[:, :1] + 20, 20, None) for f, s in stages.items()}
    assert (step[True] - step[False]).abs().max().item() <= 1e-5


def test_fuse_is_idempotent(tiny_model):
    ckpt = open_checkpoint(tiny_model)
    stage = build_stage(ckpt, range(2), "cpu", torch.float32, 1, 32, has_head=False, fuse=True)
    before = {n: p.data_ptr() for n, p in stage.model.named_parameters()}
    fuse_projections(stage.model)
    assert {n: p.data_ptr() for n, p in stage.model.named_parameters()} == before


@pytest.mark.parametrize("masked", ["none", "bool", "additive"])
def test_decode_attention_reduce_equals_sdpa(masked):
    import torch.nn.functional as F
    from llamadist.model.llama import decode_attention_reduce
    torch.manual_seed(0)
    b, hk, g, s, d = 3, 2, 4, 40, 16
    q, k, v = (torch.randn(b, hk, n, d, dtype=torch.float64) for n in (g, s, s))
    visible = torch.rand(b, 1, 1, s) < 0.6
    visible[..., 0] = True
    mask = {"none": None, "bool": visible,
            "additive": torch.zeros(b, 1, 1, s, dtype=torch.float64).masked_fill(
                ~visible, float("-inf"))}[masked]
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    got = decode_attention_reduce(q, k, v, mask).double()
    assert ((got - ref).norm() / ref.norm()).item() < 1e-6
