"""The torch-native weight-only products (llamadist.kernels.wquant_torch: tinygemm for int4,
(x @ q^T) * scale for int8 / fp8) on CUDA against the Triton kernels and against the
dequantized weight in bf16 (random weights, odd row counts), under torch.compile (inductor)
and CUDA-graph capture, and on whole tiny models' logits and greedy tokens.

Tolerance for bf16 x, with S = |x| @ |W|^T per output: |y - ref64| <= 2^-7 (S + |ref|)
(tinygemm's bf16 table rounds scale and zero by 2^-9; x, the products and y are bf16)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from llamadist.kernels import wquant as W
from llamadist.kernels import wquant_torch as WT
from llamadist.kernels.quant_ref import TYPE_IDS
from tests.quant_blocks import random_blocks

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
BF16 = torch.bfloat16


def _gguf(name: str, n: int, k: int) -> W.PackedWeight:
    b = random_blocks(TYPE_IDS[name], n, k, np.random.default_rng(n + k))
    return W.from_gguf(torch.from_numpy(b), TYPE_IDS[name], (n, k))


def _w(n: int, k: int) -> torch.Tensor:
    return torch.randn(n, k) * torch.logspace(-2, 0, n).view(-1, 1)


FORMATS = {"int4": (lambda: W.quantize_int4(_w(512, 1024)), "tinygemm"),
           "int4_g32": (lambda: W.quantize_int4(_w(256, 768), 32), "tinygemm"),
           "Q4_K": (lambda: _gguf("Q4_K", 256, 512), "tinygemm"),
           "int4_odd": (lambda: W.quantize_int4(_w(40, 300)), "triton"),
           "int8": (lambda: W.quantize_int8(_w(512, 1024)), "scaled"),
           "Q8_0": (lambda: _gguf("Q8_0", 256, 512), "scaled"),
           "fp8": (lambda: W.quantize_fp8(_w(512, 1000)), "scaled")}


def _linear(pw: W.PackedWeight, backend: str) -> nn.Linear:
    lin = nn.Linear(pw.shape[1], pw.shape[0], bias=False, device="meta")
    del lin.weight
    lin.weight = pw.to("cuda")
    return W.as_packed_linear(lin, backend, BF16)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_torch_backend_against_triton_and_dequantized(fmt):
    make, path = FORMATS[fmt]
    pw = make()
    wd = pw.dequantize(torch.float64)
    torch_lin, triton_lin = _linear(pw, "torch"), _linear(pw, "triton")
    assert torch_lin.path == path and triton_lin.path == "triton"
    if path == "tinygemm":  # one copy of the weight on the GPU
        assert torch_lin.weight.device.type == "cpu" and not hasattr(torch_lin, "qweight")
    for m in (1, 2, 5, 33, 130, 300):  # int4: tinygemm, tiles, dequant; int8 / fp8: the
        # Triton kernels up to TRITON_ROWS, then the scaled product (300)
        x = torch.randn(m, pw.shape[1], device="cuda").to(BF16)
        y, yt = torch_lin(x), triton_lin(x)
        yd = nn.functional.linear(x, wd.to("cuda", BF16))
        ref = x.double() @ wd.cuda().t()
        tol = 2.0 ** -7 * (x.double().abs() @ wd.abs().cuda().t() + ref.abs())
        for got in (y, yt, yd):
            assert got.dtype == BF16 and ((got.double() - ref).abs() <= tol + 1e-6).all()
        assert (y.double() - yt.double()).abs().max() <= 2 * tol.max()


@pytest.mark.parametrize("fmt", ["int4", "int8", "fp8", "Q8_0"])
def test_torch_backend_compiled_and_graphed(fmt):
    """Inductor (fullgraph) and a captured CUDA graph give the eager product."""
    lin = _linear(FORMATS[fmt][0](), "torch")
    x = torch.randn(1 if fmt != "int4" else 16, lin.in_features, device="cuda").to(BF16)
    eager = lin(x)
    fn = torch.compile(lin, fullgraph=True)
    compiled = fn(x)
    static_x = x.clone()
    fn(static_x)  # warm up outside the capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn(static_x)
    g.replay()
    torch.cuda.synchronize()
    scale = eager.abs().max().item()
    assert (compiled - eager).abs().max().item() <= 2 ** -6 * scale
    assert torch.equal(out, compiled)


def _stage(folder, kind: str, backend: str, dtype=BF16, head: bool = False):
    from llamadist.config import RuntimeConfig
    from llamadist.runtime.stage import build_stage
    from llamadist.weights.checkpoint import open_checkpoint
    rt = RuntimeConfig(quantize=kind, dtype="bfloat16", wquant=backend, quantize_head=head)
    ck = open_checkpoint(folder)
    return build_stage(ck, range(ck.config.num_layers), "cuda:0", dtype, 1, 32,
                       runtime=rt)


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory):
    from tests.tiny import make_tiny_model
    return make_tiny_model(tmp_path_factory.mktemp("wide") / "wide", "wide")


@pytest.mark.parametrize("kind", ["int8", "int4", "fp8"])
def test_wide_model_logits_torch_vs_triton_vs_dequantized(wide_model, kind):
    from llamadist.api import LLM
    from llamadist.config import RuntimeConfig
    a, b = _stage(wide_model, kind, "torch"), _stage(wide_model, kind, "triton")
    paths = {m.path for m in a.model.modules() if type(m) is W.PackedLinear}
    assert paths == {"tinygemm" if kind == "int4" else "scaled"}
    ref = _stage(wide_model, kind, "triton")
    for m in ref.model.modules():  # the same quantized weights, dequantized to bf16
        w = m.__dict__.get("weight")
        if isinstance(w, W.PackedWeight):
            m.__class__ = nn.Linear
            del m.weight
            m.weight = nn.Parameter(w.dequantize(BF16).cuda(), requires_grad=False)
    ids = torch.tensor([[5, 9, 33, 100, 7, 8, 250, 3]], device="cuda:0")
    pos = torch.arange(8, device="cuda:0").view(1, -1)
    la, lb, lr = (s.forward(ids, pos, 0, None, logits="all").float() for s in (a, b, ref))
    scale = lr.abs().max().item()
    assert (la - lr).abs().max().item() <= 0.03 * scale
    assert (lb - lr).abs().max().item() <= 0.03 * scale
    rt = RuntimeConfig(quantize=kind, dtype="bfloat16", wquant="torch", max_batch=2)
    prompts = ["The quick brown fox", "1 2 3 4 5"]
    graphs = LLM(wide_model, devices="cuda:0", runtime=rt)
    eager = LLM(wide_model, devices="cuda:0", runtime=rt.replace(cuda_graphs=False))
    _same_greedy_tokens(graphs, eager, prompts)


@pytest.mark.parametrize("kind", ["int8", "int4", "fp8"])
@pytest.mark.parametrize("tied", [False, True], ids=["wide", "tied"])
def test_quantized_head_on_cuda(wide_model, tiny_models, kind, tied):
    """--quantize-head on a GPU stage: the head a PackedWeight (a tied one its own copy, the
    embedding's rows bf16 as without it); the logits are those of the same head
    dequantized to bf16 (bf16 products' bound, as the layers'), and differ from the float
    head's (int4 g128 on a random head: ~10% of the largest logit)."""
    folder = tiny_models["gqa_tied"] if tied else wide_model
    if tied and kind == "int4":
        pytest.skip("tinygemm needs K a multiple of its 128-input group here; the tiny "
                    "tied model is 64 wide")
    q, plain = _stage(folder, kind, "torch", head=True), _stage(folder, kind, "torch")
    head = q.model.lm_head.__dict__.get("weight")
    assert isinstance(head, W.PackedWeight) and head.kind == kind[:4]
    embed = q.model.model.embed_tokens.weight
    assert isinstance(embed, nn.Parameter) and embed.dtype == BF16
    assert torch.equal(embed, plain.model.model.embed_tokens.weight)
    ids = torch.tensor([[5, 9, 33, 100, 7, 8, 250, 3]], device="cuda:0")
    pos = torch.arange(8, device="cuda:0").view(1, -1)
    ref = _stage(folder, kind, "torch", head=True)
    lin = ref.model.lm_head  # the same quantized head, dequantized to bf16
    w = lin.__dict__["weight"]
    lin.__class__ = nn.Linear
    del lin.weight
    lin.weight = nn.Parameter(w.dequantize(BF16).cuda(), requires_grad=False)
    a, b, r = (s.forward(ids, pos, 0, None, logits="all").float() for s in (q, plain, ref))
    scale = r.abs().max().item()
    assert (a - r).abs().max().item() <= 0.03 * scale
    assert (a - b).abs().max().item() > 0


def _greedy_with_logprobs(llm, prompts: list[str]) -> list[list]:
    """Each prompt's 12 greedy steps as TokenLogprob (the chosen token and the top 2)."""
    from llamadist.generation.sampling import SamplingParams
    steps: list[list] = [[] for _ in prompts]
    llm.run([llm.encode(p) for p in prompts],
            SamplingParams(max_new_tokens=12, ignore_eos=True, logprobs=2),
            on_output=lambda i, out: steps[i].append(out.logprobs))
    return steps


def _same_greedy_tokens(graphs, eager, prompts: list[str], tie: float = 0.15) -> None:
    """The captured decode's greedy tokens equal the eager decode's, each step's logprob
    within `tie`; the two may part only at a near-tie (in bf16 another batch shape sums in
    another order): where they part, each run's choice is within `tie` of the other's in
    the eager run, and the rest of that prompt is not compared (its history differs).
    `tie`: the logits are bf16, whose step is 1/16 at magnitudes 8-16 (fp8 on the H200
    moved a logprob by 0.057 between the two runs, the same tokens)."""
    _same_steps(_greedy_with_logprobs(graphs, prompts), _greedy_with_logprobs(eager, prompts),
                tie)


def _same_steps(a: list[list], b: list[list], tie: float = 0.15) -> None:
    """_same_greedy_tokens's comparison of two runs' steps (_greedy_with_logprobs)."""
    for g_steps, e_steps in zip(a, b):
        assert len(g_steps) == len(e_steps) == 12
        for g, e in zip(g_steps, e_steps):
            if g.token_id != e.token_id:
                eager_lp = dict(e.top)
                assert g.token_id in eager_lp, (g, e)
                assert e.logprob - eager_lp[g.token_id] <= tie, ("not a near-tie", g, e)
                break
            assert abs(g.logprob - e.logprob) <= tie, (g, e)


@pytest.mark.parametrize("folds", [("ROPE_EPILOGUE",), ("ROPE_EPILOGUE", "KV_EPILOGUE"),
                                   ("NORM_PROLOGUE",), ("ROPE_EPILOGUE", "NORM_PROLOGUE"),
                                   ("ROPE_EPILOGUE", "KV_EPILOGUE", "NORM_PROLOGUE")],
                         ids=lambda f: "+".join(x.split("_")[0].lower() for x in f))
def test_int4_folds_serve_the_same_greedy_tokens(wide_model, folds, monkeypatch):
    """The wide model in int4, served with CUDA graphs and the paged decode kernel, with
    int4_rows's folds switched on (wquant_torch: RoPE and the cache's K/V in q | k | v's
    epilogue, add + RMSNorm in q | k | v's and gate | up's prologue): their kernels run
    (counted at capture), and the greedy tokens are those of the kernels apart (near-ties
    aside: the norm's sums run in another order)."""
    from llamadist.api import LLM
    from llamadist.config import RuntimeConfig
    from llamadist.kernels import cuda_int4 as C
    rt = RuntimeConfig(quantize="int4", dtype="bfloat16", wquant="torch", max_batch=2)
    prompts = ["The quick brown fox", "1 2 3 4 5"]
    # the kernels apart: every switch off, run (its graphs captured) before any is on; the
    # norm's fold at both rows of the batch
    for name in ("ROPE_EPILOGUE", "KV_EPILOGUE", "NORM_PROLOGUE"):
        monkeypatch.setattr(WT, name, False)
    monkeypatch.setattr(WT, "NORM_ROWS", C.NORM_MAX_ROWS)
    apart = _greedy_with_logprobs(LLM(wide_model, devices="cuda:0", runtime=rt), prompts)
    for name in folds:
        monkeypatch.setattr(WT, name, True)
    dev = torch.device("cuda", 0)
    norm, rope, kv = ("NORM_PROLOGUE" in folds, "ROPE_EPILOGUE" in folds,
                      "KV_EPILOGUE" in folds)
    assert WT.variant_ok(dev, norm, rope, kv)  # (checked here, before any capture)
    assert not norm or WT.variant_ok(dev, norm=True)
    calls: dict = {}  # (the kernel, with the cache's K/V) -> calls
    for name in ("int4_rows_rope", "int4_rows_rope_kv", "launch_norm"):
        real = getattr(C, name)

        def counted(*a, _n=name, _f=real, **kw):
            key = (_n, _n == "int4_rows_rope_kv" or kw.get("kv") is not None)
            calls[key] = calls.get(key, 0) + 1
            return _f(*a, **kw)
        monkeypatch.setattr(C, name, counted)
    fused = LLM(wide_model, devices="cuda:0", runtime=rt)
    _same_steps(_greedy_with_logprobs(fused, prompts), apart)
    # q | k | v rotates (and stores the cache's K/V) where its switch is on: alone, or in
    # the norm's kernel (RoPE alone may serve rows the others do not take: a prompt's)
    assert ("int4_rows_rope", False) in calls or not (rope and not kv and not norm), calls
    assert (("int4_rows_rope_kv", True) in calls) == (kv and not norm), calls
    assert (("launch_norm", True) in calls) == (kv and norm), calls
    assert (("launch_norm", False) in calls) == norm, calls  # gate | up's (and q | k | v's)


def test_smollm2_gguf_torch_backend_bf16(smollm2):
    """The GGUF's Q4_1 (int4 group 32: tinygemm) and Q8_0 (int8 group 32: scaled) layers:
    torch and Triton backends' bf16 logits agree with each other."""
    from llamadist.config import RuntimeConfig
    from llamadist.runtime.stage import build_stage
    from llamadist.weights.checkpoint import open_checkpoint
    stages = [build_stage(open_checkpoint(smollm2), range(30), "cuda:0", BF16, 1, 64,
                          runtime=RuntimeConfig(dtype="bfloat16", wquant=b))
              for b in ("torch", "triton")]
    paths = {m.path for m in stages[0].model.modules() if type(m) is W.PackedLinear}
    assert paths == {"tinygemm", "scaled"}
    ids = open_checkpoint(smollm2).tokenizer().encode("The three primary colors are")
    x = torch.tensor([ids], device="cuda:0")
    pos = torch.arange(len(ids), device="cuda:0").view(1, -1)
    a, b = (s.forward(x, pos, 0, None, logits="all").float() for s in stages)
    assert (a - b).abs().max().item() <= 0.03 * b.abs().max().item()
    assert (a[0, -1].argmax() == b[0, -1].argmax()).item()


@pytest.mark.skipif(torch.cuda.get_device_capability(0)[0] < 9 if torch.cuda.is_available()
                    else True, reason="programmatic dependent launches need sm_90")
@pytest.mark.parametrize("kind,compile_layers,batch", [("int4", True, 2), ("int8", False, 2),
                                                       ("int8", False, 1), ("fp8", True, 2),
                                                       ("int4", True, WT.ROWS_MAX_M + 2),
                                                       ("int8", False, 4)])
def test_dependent_launches_change_no_bits(wide_model, kind, compile_layers, batch,
                                           monkeypatch):
    """Decode graphs captured as programmatic dependent launches (int4_rows, or past its
    rows, wquant_torch.ROWS_MAX_M, tinygemm's tensor-core tiles; int8_rows at 3-8 rows of
    int8; the Triton GEMV, attention and fused kernels, and
    Inductor's where compiled: each waits for the kernel before it before reading x; here
    the GEMV asks L2 for its rows' first 1 KiB of codes before that,
    ``wquant_triton.L2_EARLY``, and loads its first tile, ``FIRST_EARLY``) give
    the same greedy steps and log-probabilities, to the bit, as the same graphs without."""
    from llamadist.api import LLM
    from llamadist.config import RuntimeConfig
    from llamadist.kernels import cuda_int4, gpu, wquant_triton
    monkeypatch.setattr(wquant_triton, "L2_EARLY", 1024)
    monkeypatch.setattr(wquant_triton, "FIRST_EARLY", True)
    launched = []
    real = cuda_int4._launch_dependent
    monkeypatch.setattr(cuda_int4, "_launch_dependent",
                        lambda *a: launched.append(1) or real(*a))
    prompts = (["The quick brown fox", "1 2 3 4 5"] * 9)[:batch]
    steps = {}
    for on in (False, True):
        rt = RuntimeConfig(quantize=kind, dtype="bfloat16", wquant="torch", max_batch=batch,
                           compile=compile_layers, dependent_launches=on)
        llm = LLM(wide_model, devices="cuda:0", runtime=rt)
        assert all(s.dependent_launches == on for s in llm.engine.stages)
        steps[on] = _greedy_with_logprobs(llm, prompts)
    assert steps[True] == steps[False]
    # int4_rows (up to ROWS_MAX_M rows) and int8_rows (3-8) captured as dependent (they
    # share the launch); fp8 and int8 at 1-2 rows never go through it
    if kind == "int4" and batch <= WT.ROWS_MAX_M or kind == "int8" and 3 <= batch <= 8:
        assert launched
    if kind == "fp8" or kind == "int8" and batch < 3:
        assert not launched
    assert not gpu.launch_dependent(torch.device("cuda", 0))  # only inside the capture


def test_int4_buckets_compile_only_past_cuda_int4s_rows(wide_model, monkeypatch):
    """int4 on tinygemm's words with torch.compile left open: the buckets whose rows
    cuda_int4's kernel takes (up to wquant_torch.ROWS_MAX_M) capture the eager layers,
    larger ones the compiled layer, and a max batch within those rows compiles nothing;
    both kinds of bucket decode the eager (graph-free) run's greedy tokens."""
    from llamadist.api import LLM
    from llamadist.config import RuntimeConfig
    from llamadist.kernels import wquant_torch
    from llamadist.runtime import cuda_graph
    few = wquant_torch.ROWS_MAX_M
    if not wquant_torch.int4_rows_ok(torch.device("cuda:0")):
        pytest.skip("cuda_int4's kernel does not run on this GPU")
    rows = set()  # the buckets' rows whose steps called the compiled layer
    real = cuda_graph.compiled_layer_call  # GraphCapture's, the static and paged decoders'
    monkeypatch.setattr(cuda_graph, "compiled_layer_call", lambda pdl=False: (
        lambda layer, h, *a, fn=real(pdl): rows.add(h.shape[0]) or fn(layer, h, *a)))
    prompts = (["The quick brown fox", "1 2 3 4 5", "Once upon a time"] * 6)[:few + 2]

    def llm(max_batch: int, graphs: bool = True):
        return LLM(wide_model, devices="cuda:0", runtime=RuntimeConfig(
            quantize="int4", dtype="bfloat16", wquant="torch", max_batch=max_batch,
            cuda_graphs=graphs))
    small = llm(few)
    assert small.engine.compile_layers == (False,)
    assert not rows
    wide, eager = llm(few + 2), llm(few + 2, graphs=False)
    assert wide.engine.compile_layers == (True,) and wide.engine.compile_from == (few + 1,)
    # the warm-up captured buckets of up to few rows (eager layers) and few + 2 (compiled)
    assert rows == {few + 2}
    for n in (2, few + 2):
        _same_greedy_tokens(wide, eager, prompts[:n])
