"""llamadist.kernels.l2_prefetch on the CPU: which bytes a decoder layer asks the L2 for,
and where the model asks (after a flat batch's attention, before o, once a layer a step,
the tokens unchanged). The kernel itself is PTX: tests/triton_compile_cases.py compiles it
for sm_90, tests/gpu/test_l2_prefetch_gpu.py runs it."""

from __future__ import annotations

import torch
from torch import nn

from llamadist.kernels import l2_prefetch as L
from llamadist.model.llama import Attention
from llamadist.runtime.kernel_passes import use_l2_prefetch


def _sizes(found):
    return [(t.data_ptr(), n) for t, n in found]


def test_o_whole_then_the_mlps_smaller_tensors_then_its_largest_ones_head():
    o = nn.Linear(64, 32, bias=False)       # 8 192 bytes
    gate_up = nn.Linear(32, 128, bias=True)  # 16 384 + 512 bytes
    w, b = o.weight.data_ptr(), gate_up.bias.data_ptr()
    found = L.ranges([o], [gate_up], 8192 + 512 + 1000, "cpu")
    assert _sizes(found) == [(w, 8192), (gate_up.weight.data_ptr(), 992), (b, 512)]
    assert _sizes(L.ranges([o], [gate_up], 100, "cpu")) == [(w, 96)]  # o's head, no more
    assert L.ranges([o], [gate_up], 0, "cpu") == []
    assert L.ranges([o], [gate_up], 1 << 20, "cuda") == []  # nothing of theirs on CUDA
    # more than the kernel's 4 ranges: the largest kept
    many = [nn.Linear(8, 8 * (i + 1), bias=False) for i in range(6)]
    found = L.ranges(many, [], 1 << 20, "cpu")
    assert [n for _, n in found] == [256 * i for i in (6, 5, 4, 3)]


def _engine_tokens(path, hook_of=None):
    """Greedy tokens of two requests through LLMEngine (the paged flat batches, PyTorch's
    kernels on the CPU), each Attention's l2_prefetch set by ``hook_of(layer index)``."""
    from llamadist.config import RuntimeConfig
    from llamadist.engine.engine import LLMEngine
    from llamadist.generation.sampling import SamplingParams
    from llamadist.runtime.engine import Engine
    runtime = RuntimeConfig(max_seq_len=64, max_batch=2, dtype="float32", cpu_kernels=False)
    model = Engine.load(str(path), devices=["cpu"], max_batch=2, max_seq_len=64,
                        runtime=runtime)
    attns = [m for s in model.stages for m in s.model.modules() if isinstance(m, Attention)]
    if hook_of is not None:
        for i, a in enumerate(attns):
            a.l2_prefetch = hook_of(i, a)
    engine = LLMEngine(model, None, runtime, block_size=4)
    reqs = [engine.add_request(p, SamplingParams(max_new_tokens=6, ignore_eos=True))
            for p in ([5, 9, 13, 2], [3] * 7)]
    while engine.has_unfinished:
        engine.step()
    return [r.output_ids for r in reqs], attns


def test_each_layer_asks_once_a_step_before_o_and_the_tokens_stay(tiny_model):
    want, _ = _engine_tokens(tiny_model)
    log = []

    def hook_of(i, attn):
        attn.o_proj.register_forward_pre_hook(lambda *_: log.append(("o", i)))
        return lambda: log.append(("ask", i))
    got, attns = _engine_tokens(tiny_model, hook_of)
    assert got == want
    asks = [e for e in log if e[0] == "ask"]
    assert asks and len(asks) == len([e for e in log if e[0] == "o"])
    assert all(log[j] == ("ask", i) and log[j + 1] == ("o", i)
               for j, (kind, i) in enumerate(log) if kind == "ask")
    assert len(asks) % len(attns) == 0  # every layer, every step


def test_the_pass_takes_the_hooks_away_where_the_kernel_does_not_run(tiny_model,
                                                                   monkeypatch):
    """On the CPU (no bulk prefetch) a budget sets no hook, and clears any set before."""
    monkeypatch.setattr(L, "BUDGET", 1 << 20)
    from llamadist.runtime.engine import Engine
    model = Engine.load(str(tiny_model), devices=["cpu"], max_batch=1, max_seq_len=32)
    layers = model.stages[0].model
    for m in layers.modules():
        if isinstance(m, Attention):
            m.l2_prefetch = lambda: None
    assert use_l2_prefetch(layers, torch.device("cpu")) is False
    assert all(m.l2_prefetch is None for m in layers.modules() if isinstance(m, Attention))
    assert not L.usable(torch.device("cpu"))
