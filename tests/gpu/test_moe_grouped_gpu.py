"""Mixture-of-experts on CUDA through the grouped-GEMM experts (torch._grouped_mm's
CUTLASS kernel: bf16, Hopper or newer) and, below one assignment per expert, the routed
Triton GEMV (llamadist.kernels.moe_routed) against the expert loop, and MoE decode steps
captured in the paged CUDA graphs. Marked ``gpu``, skipped without such a GPU (the
math's CPU check: tests/unit/test_moe_grouped.py, tests/unit/test_moe_routed.py)."""

from __future__ import annotations

import pytest
import torch

from llamadist.config import ModelConfig, RuntimeConfig
from llamadist.engine.engine import LLMEngine
from llamadist.generation.sampling import SamplingParams
from llamadist.kernels import moe_grouped, moe_routed
from llamadist.kernels.moe_grouped import ROUTED, expert_path
from llamadist.model.fuse import fuse_projections
from llamadist.model.moe import SparseMoE
from llamadist.runtime.cuda_graph import WARMUP_STEPS
from llamadist.runtime.engine import Engine
from llamadist.runtime.kernel_passes import use_grouped_experts
from llamadist.weights.checkpoint import open_checkpoint
from tests.moe_routed_cases import block_cases, config_cases, shape_cases

HOPPER = torch.cuda.is_available() and moe_grouped.available(torch.device("cuda:0"),
                                                             torch.bfloat16)
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not HOPPER, reason="needs CUDA (bf16 grouped GEMM: sm90+)")]
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [40, 41, 300], [7, 7, 7, 7], [100, 3, 77, 200, 9]]


def _installed_vs_loop(folder, batch: int, seed: int):
    """A random bf16 block on CUDA with its experts installed (use_grouped_experts) and
    the float32 loop on the same (bf16-rounded) weights: the block, the installed output,
    the loop's, and which tokens both routed alike (a near-tied router logit may pick
    other experts in bf16 than in float32: one token of 64 on the H200; such tokens are
    not comparable)."""
    cfg = ModelConfig.from_json_file(folder / "config.json")
    torch.manual_seed(seed)
    moe = SparseMoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, 0, 0.1)
    fuse_projections(moe)
    moe = moe.to("cuda", torch.bfloat16)
    # fused first, so that every name matches (an unfused block took none of the fused
    # w13 and kept its own)
    ref = fuse_projections(SparseMoE(cfg))
    ref.load_state_dict({k: v.float() for k, v in moe.state_dict().items()})
    ref = ref.cuda()
    x = torch.randn(batch, cfg.hidden_size, device="cuda").bfloat16()
    with torch.no_grad():
        want = ref(x.float())
        assert use_grouped_experts(moe) == 1
        got = moe(x).float()
        same = (moe.route(x)[1].sort(-1).values == ref.route(x.float())[1].sort(-1).values)
    return moe, got, want, same.all(-1)


def _close_where_routed_alike(got, want, same) -> None:
    scale = want.abs().max().item()
    assert (got - want)[same].abs().max().item() < 0.02 * scale + 1e-3


@pytest.mark.parametrize("batch", [1, 5, 64])
def test_block_grouped_equals_loop_bf16(tiny_mixtrals, batch):
    _, got, want, same = _installed_vs_loop(tiny_mixtrals["moe_top2_gqa"], batch, 0)
    assert same.float().mean().item() >= 0.9, f"{int((~same).sum())} tokens routed otherwise"
    _close_where_routed_alike(got, want, same)


@pytest.fixture
def routed_calls(monkeypatch):
    """The row counts N of every call of the routed kernel (made through
    moe_grouped.expert_sum, which calls it by its module's name)."""
    calls, kernel = [], moe_routed.routed_expert_sum

    def counted(x, *args, **kw):
        calls.append(x.shape[0])
        return kernel(x, *args, **kw)
    monkeypatch.setattr(moe_routed, "routed_expert_sum", counted)
    return calls


@pytest.mark.parametrize("kind,batch", [("moe_top2_gqa", 1), ("moe_top1", 1),
                                        ("moe_top1", 2), ("moe_top1", 3)])
def test_block_routed_equals_loop_bf16(tiny_mixtrals, kind, batch, routed_calls):
    """The installed experts at batches where expert_path picks the routed kernel (4
    experts top-2: batch 1; 8 experts top-1: batch 1-3), bf16 against the float32 loop
    on the same weights, on the tokens routed alike in both."""
    cfg = ModelConfig.from_json_file(tiny_mixtrals[kind] / "config.json")
    assert expert_path(batch, cfg.num_experts_per_tok, cfg.num_experts) == ROUTED
    moe, got, want, same = _installed_vs_loop(tiny_mixtrals[kind], batch, batch)
    assert moe.expert_fn.keywords["routed"]
    assert routed_calls == [batch]
    assert same.any(), "every token routed otherwise in bf16"
    _close_where_routed_alike(got, want, same)


def test_routed_kernel_cases_on_cuda(tiny_mixtrals):
    """tests/moe_routed_cases.py compiled: the tiny blocks (float32 within 1e-5, bf16,
    shares, two tokens on one expert) and Mixtral-8x7B's D = 4096, F = 14336 (3 experts,
    top-2, batch 1-3) against a float64 reference."""
    dtypes = (torch.float32, torch.bfloat16)
    assert block_cases([str(p) for p in tiny_mixtrals.values()], "cuda", dtypes) == 0
    assert shape_cases("cuda", dtypes, ((4, 600, 1100, 2), (3, 4096, 14336, 2))) == 0


def test_routed_kernel_config_kinds_on_cuda():
    """Each kind of RoutedConfig (prefetch, split-K, x in the tile's layout, tiles, warps)
    compiled, on odd shapes (tails in D and F, top-1 and top-2, shares) and on Mixtral's
    D = 4096, F = 14336 against a float64 reference."""
    assert config_cases("cuda") == 0
    assert config_cases("cuda", g=3, d=4096, f=14336) == 0


def _engine(path, graphs: bool, grouped: bool, dependent: bool = True):
    ckpt = open_checkpoint(path)
    rt = RuntimeConfig(max_seq_len=128, max_batch=4, dtype="bfloat16", cuda_graphs=graphs,
                       compile=False, dependent_launches=dependent)
    model = Engine.build(ckpt, [range(ckpt.config.num_layers)], ["cuda:0"], torch.bfloat16,
                         4, 128, runtime=rt)
    if not grouped:
        for m in model.stages[0].model.modules():
            if isinstance(m, SparseMoE):
                m.expert_fn = None
    model = Engine(model.config, model.stages, ckpt, rt)  # decide the decode path again
    return LLMEngine(model, None, rt), model


def _graphs_vs_loop(path, on_graphed=None):
    """The engine with installed experts in CUDA graphs, then with the expert loop eagerly,
    on PROMPTS: each prompt's first 8 greedy tokens agree (bf16 sums in another order may
    flip a near-tie later on; one prompt of four may part). ``on_graphed(model)`` checks
    the graphed run before the loop's starts. -> the graphed model."""
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    graphed, model = _engine(path, graphs=True, grouped=True)
    assert model.cuda_graphs and model.paged_graphs() is not None
    reqs, it = graphed.submit(PROMPTS, params)
    for _ in it:
        pass
    if on_graphed is not None:
        on_graphed(model)
    eager, model2 = _engine(path, graphs=True, grouped=False)
    assert not model2.cuda_graphs  # the loop cannot be captured: eager decode
    reqs2, it2 = eager.submit(PROMPTS, params)
    for _ in it2:
        pass
    same = sum(a.output_ids[:8] == b.output_ids[:8] for a, b in zip(reqs, reqs2))
    assert same >= len(PROMPTS) - 1, [(a.output_ids, b.output_ids) for a, b in zip(reqs, reqs2)]
    return model


def test_moe_decode_is_captured_and_equals_eager(tiny_mixtrals):
    model = _graphs_vs_loop(tiny_mixtrals["moe_top2_gqa"])
    # the captured steps counted their routing on the device: k per computed token
    load = model.stages[0].expert_load()
    assert all(sum(v) >= 2 * sum(len(p) for p in PROMPTS) for v in load.values())


def test_routed_decode_is_captured_and_equals_eager(tiny_mixtrals, routed_calls):
    """8 experts top-1: every decode bucket (1, 2, 4 rows) has fewer assignments than
    experts, so the captured steps run the routed kernel; their tokens equal the eager
    loop's (up to a near-tie, as above)."""
    def replayed(model):
        # the 4-row bucket's step ran the routed kernel in each warm-up and in the
        # capture, in every layer; then the graph replayed it (eager, each of the ~23
        # steps would call it)
        layers = model.config.num_layers
        assert 4 in model.paged_graphs().decoders[0].buckets
        assert (WARMUP_STEPS + 1) * layers <= routed_calls.count(4) \
            <= 2 * (WARMUP_STEPS + 1) * layers
    model = _graphs_vs_loop(tiny_mixtrals["moe_top1"], replayed)
    load = model.stages[0].expert_load()
    assert all(sum(v) >= sum(len(p) for p in PROMPTS) for v in load.values())


def test_routed_decode_as_dependent_launches_changes_no_bits(tiny_mixtrals):
    """The routed kernels and the rest of the captured step as programmatic dependent
    launches (the default on sm_90+): the same greedy tokens, to the bit, as the same
    graphs captured without."""
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    outs = []
    for on in (False, True):
        graphed, model = _engine(tiny_mixtrals["moe_top1"], graphs=True, grouped=True,
                                 dependent=on)
        assert model.stages[0].dependent_launches == on
        reqs, it = graphed.submit(PROMPTS, params)
        for _ in it:
            pass
        outs.append([r.output_ids for r in reqs])
    assert outs[0] == outs[1]
