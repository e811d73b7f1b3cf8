"""The paged decode path on CUDA: the Triton paged kernel against the PyTorch paged path,
and the decode-only CUDA graphs (llamadist.runtime.paged_graphs) against eager paged
steps and the static decode path, on tiny random models; the L2 prefetch after the
attention in those graphs. Marked ``gpu``, skipped
without CUDA (the kernel's CPU check: tests/unit/test_paged_kernel.py)."""

from __future__ import annotations

import pytest
import torch

from llamadist.config import RuntimeConfig
from llamadist.engine.engine import LLMEngine
from llamadist.generation.generate import generate
from llamadist.generation.sampling import SamplingParams
from llamadist.runtime.engine import Engine
from llamadist.weights.checkpoint import open_checkpoint

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

MAX_SEQ = 128
PROMPTS = ["The quick brown fox", "1 2 3 4 5 6 7", "def main():", "Once upon a time, in a",
           "hello", "A B C D E F G H I J K L M N O P Q R S T U V W X Y Z"]
GREEDY = SamplingParams(max_new_tokens=40, ignore_eos=True)


def test_kernel_matches_pytorch_paged_path():
    from tests.paged_kernel_cases import main
    assert main("cuda", ("float32", "bfloat16", "float16")) == 0


def test_kernel_compiles_once_whatever_the_step():
    """A mixed step's decodes come in any number, with block tables of any width and any
    split count: none of it may compile another specialization of the kernels in the
    middle of a step (0.4-0.6 s each on the H200)."""
    from llamadist.kernels import gpu
    from tests.paged_kernel_cases import TOL, run_case
    kernels = gpu.load("paged_attention")

    def compiled() -> tuple[int, int]:
        return tuple(sum(len(c[0]) for c in k.device_caches.values())
                     for k in (kernels._split_kernel, kernels._merge_kernel))

    run_case(8, 2, 80, 16, [5], torch.bfloat16, "cuda", 1)  # D=80: no other test's shape
    run_case(8, 2, 80, 16, [5, 40], torch.bfloat16, "cuda", 2)
    before = compiled()
    for i, splits in enumerate((1, 2, 4, 8, 16, 32, 64, 3)):
        lens = [1 + (7 * i + 13 * j) % (70 * (i + 1)) for j in range(1 + 5 * i)]
        lens[-1] = 16 * 64 + i  # a long one: every split has slots
        err, kv_err = run_case(8, 2, 80, 16, lens, torch.bfloat16, "cuda", splits, seed=i)
        assert err < TOL[torch.bfloat16] and kv_err == 0, (splits, err, kv_err)
    assert compiled() == before, (before, compiled())


def _model(path, dtype: str, stages: int, max_batch: int, graphs: bool, compile_layers: bool):
    ckpt = open_checkpoint(path)
    n = ckpt.config.num_layers
    cuts = [round(i * n / stages) for i in range(stages + 1)]
    runtime = RuntimeConfig(max_seq_len=MAX_SEQ, max_batch=max_batch, dtype=dtype,
                            cuda_graphs=graphs, compile=compile_layers)
    model = Engine.build(ckpt, [range(a, b) for a, b in zip(cuts, cuts[1:])],
                         ["cuda:0"] * stages, getattr(torch, dtype), max_batch, MAX_SEQ,
                         runtime=runtime)
    return model, runtime, ckpt.tokenizer()


def _engine_tokens(path, dtype, stages=1, max_batch=3, graphs=True, compile_layers=False,
                   block_size=16) -> tuple[dict[str, list[int]], Engine]:
    model, runtime, tok = _model(path, dtype, stages, max_batch, graphs, compile_layers)
    engine = LLMEngine(model, tok, runtime, block_size=block_size)
    reqs = {}
    step = 0
    while step < 3 or engine.has_unfinished:  # arrivals at steps 0, 1 and 2
        for i in range(step * 2, min(step * 2 + 2, len(PROMPTS))) if step < 3 else ():
            reqs[str(i)] = engine.add_request(tok.encode(PROMPTS[i]), GREEDY, str(i))
        engine.step()
        step += 1
        assert step < 2000
    return {rid: r.output_ids for rid, r in reqs.items()}, model


def _static_alone(path, dtype) -> dict[str, list[int]]:
    """Each prompt alone through the static path (DecodeGraphs, split-KV kernel)."""
    model, _, tok = _model(path, dtype, 1, 1, True, False)
    return {str(i): generate(model, tok, [tok.encode(p)], GREEDY)[0].token_ids
            for i, p in enumerate(PROMPTS)}


@pytest.mark.parametrize("kind", ["llama3", "gqa_tied"])  # head size 32 (G=2), 8 (G=4)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_graph_tokens_equal_eager_and_static(tiny_models, kind, dtype):
    path = tiny_models[kind]
    import llamadist.kernels.paged_attention  # noqa: F401 (registers the op)
    eager, _ = _engine_tokens(path, dtype, graphs=False)
    graph, model = _engine_tokens(path, dtype, graphs=True)
    assert graph == eager
    graphs = model._paged_graphs
    assert graphs is not None and any(b.graph is not None
                                      for b in graphs.decoders[0].buckets.values())
    if dtype == "float32":  # bf16 prefill rounds differently in the static path
        assert graph == _static_alone(path, dtype)  # each request equal to it alone


# float32 only: torch.compile fuses RMSNorm, RoPE and the residual adds, which in bfloat16
# round differently from eager, and on this random tiny model greedy tokens then part after
# a few steps (seen on the H200, 2026-12-01); the uncompiled bf16 graphs are checked above.
@pytest.mark.parametrize("dtype", ["float32"])
def test_graph_compiled_two_stages_equal_eager(tiny_models, dtype):
    path = tiny_models["llama3"]
    eager, _ = _engine_tokens(path, dtype, stages=1, graphs=False)
    graph, model = _engine_tokens(path, dtype, stages=2, graphs=True, compile_layers=True)
    assert graph == eager
    assert all(any(b.graph is not None for b in d.buckets.values())
               for d in model._paged_graphs.decoders)


def test_engine_block_size_4_long_outputs(tiny_models):
    """Small blocks: tables of many blocks per sequence, tiles spanning blocks."""
    path = tiny_models["llama3"]
    eager, _ = _engine_tokens(path, "float32", graphs=False, block_size=4)
    graph, _ = _engine_tokens(path, "float32", graphs=True, block_size=4)
    assert graph == eager == _static_alone(path, "float32")


@pytest.mark.skipif(not torch.cuda.is_available()
                    or torch.cuda.get_device_capability(0)[0] < 9,
                    reason="the L2 bulk prefetch needs sm_90")
@pytest.mark.parametrize("trigger_first", [False, True])
def test_l2_prefetch_in_the_graphs_keeps_the_tokens(tiny_models, trigger_first, monkeypatch):
    """kernels.l2_prefetch after each layer's attention (o's weights, the MLP's first
    bytes), in the decode graphs' chain of dependent launches (and with every Triton kernel
    letting the next launch first, gpu.TRIGGER_FIRST): a hint, so the served tokens are the
    same as without it, and the hooks were set."""
    from llamadist.kernels import gpu, l2_prefetch
    from llamadist.model.llama import Attention
    path = tiny_models["llama3"]
    want, _ = _engine_tokens(path, "bfloat16", graphs=True)
    monkeypatch.setattr(l2_prefetch, "BUDGET", 1 << 20)
    monkeypatch.setattr(gpu, "TRIGGER_FIRST", trigger_first)
    got, model = _engine_tokens(path, "bfloat16", graphs=True)
    assert got == want
    attns = [m for s in model.stages for m in s.model.modules() if isinstance(m, Attention)]
    assert attns and all(a.l2_prefetch is not None for a in attns)
