"""The static decode path (CUDA graphs on GPU) and projection fusion against the eager path.

GPU cases are marked ``gpu`` and skipped without CUDA; the same checks run on the CPU
(static shapes without capture, fusion) so CI covers the logic.
"""

import pytest
import torch

from llamadist.api import build_engine
from llamadist.config import RuntimeConfig
from llamadist.generation.generate import generate
from llamadist.generation.sampling import SamplingParams
from llamadist.model.fuse import fuse_projections, is_fused
from llamadist.planning.layout import resolve_layout
from llamadist.runtime.cuda_graph import DecodeGraphs, bucket_sizes
from llamadist.runtime.stage import build_stage
from llamadist.weights.checkpoint import open_checkpoint

HAS_CUDA = torch.cuda.is_available()
on_gpu = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")]

PROMPTS = ["The quick brown fox", "Distributed inference splits a model across devices and",
           "1 2 3", "Once upon a time there was a tiny language model that dreamed"]
PARAMS = SamplingParams(max_new_tokens=24, ignore_eos=True)


class Static:
    """The static-cache engine (what DecodeGraphs captures) with its tokenizer."""

    def __init__(self, path, devices: str, dtype: str | None = None):
        ckpt = open_checkpoint(path)
        rt = RuntimeConfig(max_seq_len=128, max_batch=4, dtype=dtype)
        layout = resolve_layout(ckpt.config, devices=devices, dtype=rt.dtype_for(devices),
                                max_batch=4, max_seq_len=128)
        self.engine = build_engine(ckpt, layout, rt)
        self.tokenizer = ckpt.tokenizer()

    def generate(self, prompts: list[str]) -> list[list[int]]:
        ids = [self.tokenizer.encode(p) for p in prompts]
        return [r.token_ids for r in generate(self.engine, self.tokenizer, ids, PARAMS)]


def _tokens(llm: Static) -> tuple[list[list[int]], list[int]]:
    batch = llm.generate(PROMPTS)  # padded batch of 4
    alone = llm.generate(PROMPTS[2:3])[0]  # bucket 1, no padding
    return batch, alone


def test_bucket_sizes():
    assert bucket_sizes(1) == [1]
    assert bucket_sizes(8) == [1, 2, 4, 8]
    assert bucket_sizes(12) == [1, 2, 4, 8, 12]


@pytest.mark.parametrize("devices", ["cpu", "cpu,cpu"])
def test_static_decode_equals_eager_on_cpu(tiny_model, devices):
    """The graph path's math (full-cache mask built from `valid`, tensor start, buckets)
    without capture, on the CPU."""
    llm = Static(tiny_model, devices)
    ref = _tokens(llm)
    llm.engine._graphs = DecodeGraphs(llm.engine.stages, compile_layers=False, static_cpu=True)
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
    from llamadist.kernels import decode_attention as split_kv
    llm = Static(tiny_models["llama3"], devices, dtype="float32")
    llm.engine.cuda_graphs = False
    ref = _tokens(llm)
    llm.engine.cuda_graphs = True
    llm.engine.compile_layers = compile_layers
    launches = split_kv.launches
    assert _tokens(llm) == ref
    assert split_kv.launches > launches  # head size 32: the split-KV kernel served
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


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("b,hk,g,s,d,start", [
    (1, 8, 4, 640, 128, 575),   # Llama-3-8B at batch 1
    (3, 2, 3, 4224, 64, 0),     # first slot only; SmolLM2's 3 query heads per KV head
    (2, 1, 1, 100, 16, 99),     # MHA, cache full, a partial tile
    (32, 8, 4, 640, 128, 300),  # batch 32: few splits
    (1, 2, 4, 64, 128, 40),     # one tile: one split, which writes the output itself
])
@pytest.mark.parametrize("masked,rope", [(False, False), (True, False), (True, True)])
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_split_kv_decode_attention_equals_sdpa(dtype, tol, b, hk, g, s, d, start, masked,
                                               rope):
    """The Triton kernel against SDPA in float64 over the live slots [0, start], with q
    rotated by the kernel (rope) or not."""
    import torch.nn.functional as F
    from llamadist.kernels import decode_attention as split_kv
    from llamadist.model.rope import apply_rotary
    torch.manual_seed(0)
    dev = "cuda:0"
    q = torch.randn(b, hk, g, d, device=dev, dtype=dtype)
    k, v = (torch.randn(b, hk, s, d, device=dev, dtype=dtype) for _ in range(2))
    visible = (torch.arange(s, device=dev) <= start).expand(b, s).clone()
    if masked:
        visible &= torch.rand(b, s, device=dev) < 0.7
    visible[:, start] = True
    additive = torch.zeros(b, 1, 1, s, device=dev, dtype=dtype).masked_fill(
        ~visible.view(b, 1, 1, s), float("-inf"))
    angle = torch.rand(b, 1, 1, d // 2, device=dev) * 100
    angle = torch.cat((angle, angle), dim=-1)
    cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)
    q_ref = apply_rotary(q.double(), cos.double(), sin.double()) if rope else q.double()
    ref = F.scaled_dot_product_attention(q_ref, k.double(), v.double(),
                                         attn_mask=additive.double())
    assert split_kv.usable(q, k, additive if masked else None)
    got = split_kv.decode_attention(q, k, v, additive if masked else None,
                                    torch.tensor(start, device=dev),
                                    cos if rope else None, sin if rope else None)
    assert got.dtype == dtype and got.shape == q.shape
    assert ((got.double() - ref).norm() / ref.norm()).item() < tol


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_one_split_over_many_tiles_equals_the_merged_splits(dtype, tol, monkeypatch):
    """MAX_SPLITS 1: one program a KV head reads every tile and writes the output with no
    merge kernel; the same attention as the rule's splits merged."""
    from llamadist.kernels import decode_attention as split_kv
    torch.manual_seed(1)
    dev = "cuda:0"
    q = torch.randn(1, 8, 4, 128, device=dev, dtype=dtype)
    k, v = (torch.randn(1, 8, 640, 128, device=dev, dtype=dtype) for _ in range(2))
    start = torch.tensor(520, device=dev)
    merged = split_kv.decode_attention(q, k, v, None, start, None, None)
    monkeypatch.setattr(split_kv, "MAX_SPLITS", 1)
    one = split_kv.decode_attention(q, k, v, None, start, None, None)
    assert ((one.double() - merged.double()).norm() / merged.double().norm()).item() < tol


def test_split_kv_decode_attention_declines_what_it_cannot_run():
    from llamadist.kernels import decode_attention as split_kv
    q, k = torch.zeros(1, 2, 4, 64), torch.zeros(1, 2, 8, 64)
    assert not split_kv.usable(q, k, None)  # CPU
    if HAS_CUDA:
        qc, kc = q.cuda(), k.cuda()
        assert split_kv.usable(qc, kc, None)
        assert not split_kv.usable(qc[..., :48], kc[..., :48], None)  # head size 48
        assert not split_kv.usable(qc, kc, torch.ones(1, 1, 1, 8, dtype=torch.bool,
                                                      device="cuda"))  # bool mask


def test_deferred_residual_equals_plain_layers(tiny_model):
    """The layer_fn contract (each layer's last residual add left to the next layer) gives
    the plain forward's logits, on the static path the graphs use (tensor start)."""
    from llamadist.runtime.compiled_layer import _call_layer
    ckpt = open_checkpoint(tiny_model)
    stage = build_stage(ckpt, range(ckpt.config.num_layers), "cpu", torch.float32, 2, 32)
    torch.manual_seed(0)
    ids = torch.randint(3, ckpt.config.vocab_size, (2, 6))
    pos = torch.arange(6).expand(2, 6)
    stage.forward(ids, pos, 0, None)  # fill slots 0..5
    step = {}
    for name, fn in (("plain", None), ("deferred", _call_layer)):
        step[name] = stage.model(ids[:, :1], pos[:, :1] + 6, stage.caches[0],
                                 torch.tensor(6), None, layer_fn=fn)
    assert torch.equal(step["plain"], step["deferred"])
    cache = stage.caches[0].layer(0)
    assert cache.kv is not None and cache.k.data_ptr() == cache.kv[0].data_ptr()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_split_kv_decode_attention_broadcasts_batch_one_mask_and_rope():
    import torch.nn.functional as F
    from llamadist.kernels import decode_attention as split_kv
    from llamadist.model.rope import apply_rotary
    torch.manual_seed(0)
    b, hk, g, s, d, start, dev = 3, 2, 4, 100, 32, 60, "cuda:0"
    q = torch.randn(b, hk, g, d, device=dev)
    k, v = (torch.randn(b, hk, s, d, device=dev) for _ in range(2))
    angle = torch.rand(1, 1, 1, d // 2, device=dev) * 6
    angle = torch.cat((angle, angle), dim=-1)
    mask = torch.zeros(1, 1, 1, s, device=dev)
    mask[..., start + 1:] = float("-inf")
    mask[..., 3] = float("-inf")
    ref = F.scaled_dot_product_attention(apply_rotary(q, angle.cos(), angle.sin()).double(),
                                         k.double(), v.double(), attn_mask=mask.double())
    got = split_kv.decode_attention(q, k, v, mask, torch.tensor(start, device=dev),
                                    angle.cos(), angle.sin())
    assert ((got.double() - ref).norm() / ref.norm()).item() < 1e-5
