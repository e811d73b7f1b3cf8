"""The grouped-GEMM experts (llamadist.kernels.moe_grouped) against the expert loop, on
the CPU through torch._grouped_mm's reference implementation (the CUDA kernel is
tests/gpu/test_moe_grouped_gpu.py's): one block with every expert and with a share of
them, and a whole tiny Mixtral's logits after the kernel pass."""

from __future__ import annotations

import pytest
import torch

from llamadist.config import ModelConfig
from llamadist.generation.generate import generate
from llamadist.generation.sampling import SamplingParams
from llamadist.kernels import moe_grouped
from llamadist.model.fuse import fuse_projections
from llamadist.model.moe import SparseMoE
from llamadist.runtime.engine import Engine
from llamadist.runtime.kernel_passes import use_grouped_experts

pytestmark = pytest.mark.skipif(not hasattr(torch, "_grouped_mm"),
                                reason="torch._grouped_mm needs PyTorch >= 2.8")


def _block(folder, experts=None) -> SparseMoE:
    cfg = ModelConfig.from_json_file(folder / "config.json")
    torch.manual_seed(0)
    full = SparseMoE(cfg)
    for p in full.parameters():
        torch.nn.init.normal_(p, 0, 0.1)
    part = SparseMoE(cfg, experts)
    part.load_state_dict(full.state_dict(), strict=False)
    fuse_projections(part)
    return part


@pytest.mark.parametrize("kind,experts", [("moe_top2_gqa", None), ("moe_top1", None),
                                          ("moe_top2_gqa", [1, 3]), ("moe_e3_tied", [2])])
def test_grouped_equals_the_loop(tiny_mixtrals, kind, experts):
    moe = _block(tiny_mixtrals[kind], experts)
    x = torch.randn(2, 7, moe.gate.in_features)  # 14 tokens, some experts get none
    with torch.no_grad():
        want = moe(x)
        assert use_grouped_experts(moe, force=True) == 1 and moe.graph_safe
        got = moe(x)
    assert want.abs().max() > 0.01  # a share of the experts still contributes
    assert (got - want).abs().max().item() < 1e-5
    w13 = moe.expert_fn.keywords["w13"]
    held = sorted(int(e) for e in moe.experts)
    # each expert's Linear now views the stack: one copy of the weights, not two
    assert moe.experts[str(held[-1])].w13.weight.data_ptr() == w13[-1].data_ptr()


def test_the_kernel_is_offered_only_where_it_runs():
    assert not moe_grouped.available(torch.device("cpu"), torch.bfloat16)
    if torch.cuda.is_available():
        dev = torch.device("cuda")
        assert not moe_grouped.available(dev, torch.float32)


def test_whole_model_logits_with_grouped_experts(tiny_mixtrals):
    folder = tiny_mixtrals["moe_top2_gqa"]
    prompts = [[5, 6, 7, 8, 9, 10], [40, 41, 300]]
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)

    def run(grouped: bool):
        eng = Engine.load(str(folder), max_batch=2, max_seq_len=64)
        if grouped:
            assert sum(use_grouped_experts(s.model, force=True) for s in eng.stages) == 3
        steps = []
        orig = eng.forward

        def forward(*a, **k):
            out = orig(*a, **k)
            steps.append(out[:, -1].float().clone())
            return out
        eng.forward = forward
        tokens = [r.token_ids for r in generate(eng, None, prompts, params)]
        return tokens, torch.stack(steps)
    (want, ref), (got, logits) = run(False), run(True)
    assert got == want
    assert (logits - ref).abs().max().item() < 1e-4
