"""A stage's whole decode step in one C call (llamadist.kernels.cpu_step) against the
per-layer path it replaces (one C call per decoder layer, the head in its own call):
same logits to float rounding and the same greedy tokens, over every weight format the
C layer reads, with 1 and 2 stages, batch 1 and 3, static and paged KV caches."""

from __future__ import annotations

import copy
import ctypes

import numpy as np
import pytest
import torch

from llamadist.config import ModelConfig
from llamadist.kernels import cpu_decode, cpu_step, huge_pages, weight_version
from llamadist.kernels.quant import QuantizedTensor
from llamadist.model.fuse import fuse_projections
from llamadist.model.llama import Llama
from llamadist.runtime.kernel_passes import step_weights, use_cpu_linear
from llamadist.runtime.mask import attention_mask
from llamadist.runtime.paged_kv import PagedBatch
from llamadist.runtime.stage import Stage
from tests.quant_blocks import random_blocks

pytestmark = pytest.mark.skipif(not cpu_decode.available(),
                                reason="no C compiler: the kernels cannot be built here")

# ggml type ids (cpu_quant.h): 0 is a plain float32 weight
TYPES = {"f32": 0, "f16": 1, "bf16": 30, "Q8_0": 8, "Q4_1": 3, "Q4_K": 12}
LAYERS, VOCAB = 3, 300


def config() -> ModelConfig:
    # every linear input a multiple of 256 (the K types' block); GQA with 2 KV heads
    return ModelConfig.from_hf_dict(dict(
        architectures=["LlamaForCausalLM"], vocab_size=VOCAB, num_hidden_layers=LAYERS,
        hidden_size=256, intermediate_size=512, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0))


def _quantize(module, qtype: int, rng: np.random.Generator) -> None:
    """Give a linear random GGUF blocks of ``qtype`` as its weight (scaled by the
    dequantized values' spread, so activations stay in range over the layers)."""
    n, k = module.weight.shape
    qt = QuantizedTensor(torch.from_numpy(random_blocks(qtype, n, k, rng)), qtype, (n, k))
    scale = 0.3 / qt.dequantize().std().item()
    if qtype in (1, 30):  # 16-bit floats: scale the values themselves
        w = qt.dequantize() * scale
        dt = torch.float16 if qtype == 1 else torch.bfloat16
        qt = QuantizedTensor(w.to(dt).view(torch.uint8).reshape(n, -1).contiguous(), qtype,
                             (n, k))
    else:  # block formats: scale every block's f16 scale (and min): bytes 0..4
        blocks = qt.blocks.numpy().reshape(n, -1).copy()
        _scale_blocks(blocks, qtype, scale)
        qt = QuantizedTensor(torch.from_numpy(blocks), qtype, (n, k))
    del module.weight
    module.weight = qt


def _scale_blocks(blocks: np.ndarray, qtype: int, scale: float) -> None:
    size = {8: 34, 3: 20, 12: 144}[qtype]
    b = blocks.reshape(blocks.shape[0], -1, size)
    heads = 2 if qtype == 8 else 4  # Q8_0: d; Q4_1: d, m; Q4_K: d, dmin
    f = b[..., :heads].copy().view(np.float16).astype(np.float32) * scale
    b[..., :heads] = f.astype(np.float16).view(np.uint8).reshape(b[..., :heads].shape)


def stage_models(kind: str, stages: int, seed: int = 0) -> list[Llama]:
    """The model cut in ``stages`` slices (random weights, projections fused, every
    linear of ``kind``), the CPU linear pass applied."""
    cfg, qtype = config(), TYPES[kind]
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    cuts = [range(0, 2), range(2, LAYERS)] if stages == 2 else [range(LAYERS)]
    out = []
    for i, layers in enumerate(cuts):
        model = Llama(cfg, layers, has_embed=i == 0, has_head=i == len(cuts) - 1)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.3)
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.uniform_(0.5, 1.5)
        model.setup_rope(64, "cpu")
        fuse_projections(model).eval()
        if qtype:
            for name, m in model.named_modules():
                if name.endswith(("_proj", "lm_head")):
                    _quantize(m, qtype, rng)
        out.append(use_cpu_linear(model))
    return out


def counting_step(monkeypatch) -> dict:
    """Wrap the C step: counts its calls and the layers they ran."""
    inner = cpu_step._bound()
    calls = {"steps": 0, "layers": 0, "head": 0}

    def step(args):
        s = ctypes.cast(args, ctypes.POINTER(cpu_step.StepArgs)).contents
        calls["steps"] += 1
        calls["layers"] += s.n_layers
        calls["head"] += bool(s.norm)
        calls["embed"] = calls.get("embed", 0) + bool(s.embed)
        return inner(args)
    monkeypatch.setattr(cpu_step, "_step_fn", step)
    return calls


def stages_of(models: list[Llama], batch: int, whole_step: bool) -> list[Stage]:
    out = []
    for m in models:
        st = Stage(m, torch.device("cpu"), torch.float32, batch, 64)
        assert st.step_fn is cpu_step.decode_step
        if not whole_step:
            st.step_fn = None  # the per-layer C path
        out.append(st)
    return out


def run_static(stages: list[Stage], prompt: torch.Tensor, steps: int,
               mask_rows: bool) -> tuple[list[torch.Tensor], list[list[int]]]:
    """Prefill ``prompt`` (B, T), then ``steps`` greedy decode steps; (logits, tokens)."""
    b, t = prompt.shape
    valid = None
    if mask_rows:  # left padding: row i's first i slots hold no token
        valid = torch.arange(64).view(1, -1) >= torch.arange(b).view(-1, 1)

    def forward(x, pos, start):
        m = attention_mask(valid, start, x.shape[1])
        for st in stages:
            x = st.forward(x, pos, start, m)
        return x

    logits, tokens = [], []
    with torch.inference_mode():
        out = forward(prompt, torch.arange(t).expand(b, t), 0)
        for i in range(steps):
            nxt = out[:, -1].argmax(-1)
            tokens.append(nxt.tolist())
            out = forward(nxt.view(b, 1), torch.full((b, 1), t + i), t + i)
            logits.append(out[:, -1])
    return logits, tokens


@pytest.mark.parametrize("kind", list(TYPES))
@pytest.mark.parametrize("stages", [1, 2])
@pytest.mark.parametrize("batch,masked", [(1, False), (3, True)])
def test_whole_step_equals_per_layer_static(kind, stages, batch, masked, monkeypatch):
    models = stage_models(kind, stages)
    prompt = torch.randint(0, VOCAB, (batch, 6), generator=torch.Generator().manual_seed(1))
    ref, ref_tokens = run_static(stages_of(models, batch, False), prompt, 5, masked)
    calls = counting_step(monkeypatch)
    got, tokens = run_static(stages_of(models, batch, True), prompt, 5, masked)
    # every decode step of every stage was one C call, the last stage's with the head
    assert calls == {"steps": 5 * stages, "layers": 5 * LAYERS, "head": 5, "embed": 5}
    assert tokens == ref_tokens
    for a, b in zip(got, ref):
        assert a.shape == b.shape == (batch, VOCAB)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


@pytest.mark.parametrize("kind", ["f32", "f16", "Q4_1"])
def test_whole_step_same_bits_at_every_team_size(kind):
    """The threads claim a layer's rows and heads chunk by chunk and take over each other's
    (cpu_decode.c's phases, no barriers): which thread computes a row must not change it.
    1, 2, 3 and 7 threads (more than this machine's cores: threads are preempted mid-phase
    and others take their rows) give the same logits bit for bit, and the float32 and f16
    ones equal a prefill of each step's whole sequence (PyTorch's layers) to float32
    rounding."""
    (model,) = stage_models(kind, 1, seed=4)
    prompt = torch.randint(0, VOCAB, (3, 6), generator=torch.Generator().manual_seed(5))
    threads, outs = torch.get_num_threads(), []
    try:
        for team in (1, 2, 3, 7):
            torch.set_num_threads(team)
            outs.append(run_static(stages_of([model], 3, True), prompt, 4, False))
    finally:
        torch.set_num_threads(threads)
    for logits, tokens in outs[1:]:
        assert tokens == outs[0][1]
        assert all(torch.equal(a, b) for a, b in zip(logits, outs[0][0]))
    if kind == "Q4_1":
        return
    # the reference: each step's whole sequence as one prefill (PyTorch's layers, no C step)
    ref_stage, tokens = stages_of([model], 3, False)[0], outs[0][1]
    for i, got in enumerate(outs[0][0]):
        seq = torch.cat([prompt, torch.tensor(tokens[:i + 1]).T], 1)
        with torch.inference_mode():
            ref = ref_stage.forward(seq, torch.arange(seq.shape[1]).expand(3, -1), 0, None)
        torch.testing.assert_close(got, ref[:, -1], rtol=1e-4,
                                   atol=1e-4 * ref.abs().max().item())


def run_paged(stages: list[Stage], prompts: list[list[int]], steps: int
              ) -> tuple[list[torch.Tensor], list[list[int]]]:
    """Each prompt prefilled in one paged step (its own scrambled blocks), then ``steps``
    decode steps of all of them together; (logits (S, V) per step, tokens per step)."""
    bs, tables = 4, [[9, 2, 5, 0], [7, 1, 11, 3], [4, 10, 6, 8]][:len(prompts)]
    for st in stages:
        st.init_paged(12, bs)

    def step(ids, chunks):
        batch = PagedBatch.build(chunks, bs)
        x = torch.tensor(ids)
        for st in stages:
            x = st.forward_paged(x, batch)
        return x

    with torch.inference_mode():
        out = step([t for p in prompts for t in p],
                   [(tb, 0, len(p)) for tb, p in zip(tables, prompts)])
        lens = [len(p) for p in prompts]
        logits, tokens = [], []
        for _ in range(steps):
            nxt = out.argmax(-1).tolist()
            tokens.append(nxt)
            out = step(nxt, [(tb, n, 1) for tb, n in zip(tables, lens)])
            logits.append(out)
            lens = [n + 1 for n in lens]
    return logits, tokens


@pytest.mark.parametrize("kind", ["f32", "bf16", "Q8_0", "Q4_1", "Q4_K"])
@pytest.mark.parametrize("stages", [1, 2])
@pytest.mark.parametrize("seqs", [1, 3])
def test_whole_step_equals_per_layer_paged(kind, stages, seqs, monkeypatch):
    """Sequences of different lengths over scrambled blocks of 4 slots."""
    models = stage_models(kind, stages, seed=2)
    prompts = [[5, 17, 42, 8, 99, 3, 250], [11, 4], [60, 61, 62, 63, 64]][:seqs]
    ref, ref_tokens = run_paged(stages_of(models, seqs, False), prompts, 4)
    calls = counting_step(monkeypatch)
    got, tokens = run_paged(stages_of(models, seqs, True), prompts, 4)
    assert calls == {"steps": 4 * stages, "layers": 4 * LAYERS, "head": 4,
                     "embed": 4}  # decodes only; the first stage embeds in C
    assert tokens == ref_tokens
    for a, b in zip(got, ref):
        assert a.shape == b.shape == (seqs, VOCAB)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


def test_many_rows_run_the_head_in_pytorch(monkeypatch):
    """Past cpu_decode.MAX_ROWS rows the C step runs the layers, PyTorch the final norm
    and the head (its GEMM); the logits still equal the per-layer path's."""
    models = stage_models("Q8_0", 1)
    batch = cpu_decode.MAX_ROWS + 1
    prompt = torch.randint(0, VOCAB, (batch, 3), generator=torch.Generator().manual_seed(3))
    ref, ref_tokens = run_static(stages_of(models, batch, False), prompt, 2, False)
    calls = counting_step(monkeypatch)
    got, tokens = run_static(stages_of(models, batch, True), prompt, 2, False)
    assert calls == {"steps": 2, "layers": 2 * LAYERS, "head": 0, "embed": 2}
    assert tokens == ref_tokens
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


@pytest.mark.parametrize("kind", ["f16", "bf16", "Q8_0", "Q4_K"])
def test_step_reads_a_quantized_embedding_itself(kind, monkeypatch):
    """A first stage's embedding kept in 16 bits or GGUF blocks: the C step writes h from
    its rows itself (StepArgs.embed), the same floats as the module's own forward (the
    per-layer path), so the same tokens and logits; a token outside the table makes the
    step decline (None) and the model's forward raise as it would."""
    models = stage_models("f32", 1)
    emb = models[0].model.embed_tokens
    w = emb.weight.detach()
    dt = {"f16": torch.float16, "bf16": torch.bfloat16}.get(kind)
    if dt is not None:
        blocks = w.to(dt).view(torch.uint8).reshape(VOCAB, -1).contiguous()
    else:
        blocks = torch.from_numpy(random_blocks(TYPES[kind], VOCAB, 256,
                                                np.random.default_rng(5)))
    del emb.weight
    emb.weight = QuantizedTensor(blocks, TYPES[kind], (VOCAB, 256))
    prompt = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(4))
    ref, ref_tokens = run_static(stages_of(models, 2, False), prompt, 4, False)
    calls = counting_step(monkeypatch)
    got, tokens = run_static(stages_of(models, 2, True), prompt, 4, False)
    assert calls["embed"] == calls["steps"] == 4
    assert tokens == ref_tokens
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())
    (model,) = models
    cache = Stage(model, torch.device("cpu"), torch.float32, 1, 64).caches[0]
    with torch.inference_mode():
        assert cpu_step.decode_step(model, torch.tensor([[VOCAB]]), torch.tensor([[0]]),
                                    cache, 0, None) is None
        with pytest.raises(IndexError):
            model(torch.tensor([[VOCAB]]), torch.tensor([[0]]), cache, 0, None)


def test_plan_is_rebuilt_when_the_model_changes():
    """The plan is made once and reused; a replaced weight, a changed int8_x flag or a
    replaced head make a new one (the old pointers would read freed or stale memory)."""
    (model,) = stage_models("Q4_1", 1)
    first = cpu_step.plan_for(model)
    assert first is not None and cpu_step.plan_for(model) is first
    layer = model.model.layers["1"]
    w = layer.mlp.down_proj.weight
    del layer.mlp.down_proj.weight
    layer.mlp.down_proj.weight = QuantizedTensor(w.blocks.clone(), w.qtype, tuple(w.shape))
    second = cpu_step.plan_for(model)
    assert second is not None and second is not first
    assert cpu_step.plan_for(model) is second
    layer.self_attn.o_proj.weight.int8_x = True
    third = cpu_step.plan_for(model)
    assert third is not second and third.protos[1].int8_x and not third.protos[0].int8_x
    model.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, 256), requires_grad=False)
    fourth = cpu_step.plan_for(model)
    assert fourth is not third and fourth.head["t_head"] == 0


def test_plan_check_is_o1_and_sees_replaced_weights():
    """The per-step check is weight_version's count; a weight replaced by assignment (a
    Parameter, a new QuantizedTensor), a new module in a layer's place, or anything
    after ``invalidate`` makes the next step's plan read the new object; an unrelated
    change (a module built elsewhere) costs a full check but keeps the plan."""
    (model,) = stage_models("f32", 1)
    plan = cpu_step.plan_for(model)
    assert plan is not None and plan.version == weight_version.current()
    torch.nn.Linear(4, 4)  # registers parameters: the count moves, nothing of ours changed
    assert plan.version != weight_version.current()
    assert cpu_step.plan_for(model) is plan and plan.version == weight_version.current()

    layer = model.model.layers["2"]
    new = torch.randn_like(layer.mlp.down_proj.weight)
    layer.mlp.down_proj.weight = torch.nn.Parameter(new, requires_grad=False)
    second = cpu_step.plan_for(model)
    assert second is not plan and second.protos[2].w_down == new.data_ptr()

    new_mlp = copy.deepcopy(layer.mlp)
    layer.mlp = new_mlp
    third = cpu_step.plan_for(model)
    assert third is not second
    assert third.protos[2].w_gu == new_mlp.gate_up_proj.weight.data_ptr()

    # a write into a module's dict by hand is not seen until invalidate() says so
    raw = torch.randn_like(layer.self_attn.o_proj.weight)
    layer.self_attn.o_proj._parameters["weight"] = torch.nn.Parameter(raw, requires_grad=False)
    assert cpu_step.plan_for(model) is third
    cpu_step.invalidate()
    fourth = cpu_step.plan_for(model)
    assert fourth is not third and fourth.protos[2].w_o == raw.data_ptr()

    # the steps give the forward's logits with the replaced weights
    (ref,) = stage_models("f32", 1)
    ref.load_state_dict(model.state_dict())
    cache = Stage(model, torch.device("cpu"), torch.float32, 1, 64).caches[0]
    ref_cache = Stage(ref, torch.device("cpu"), torch.float32, 1, 64).caches[0]
    with torch.inference_mode():
        got = cpu_step.decode_step(model, torch.tensor([[3]]), torch.tensor([[0]]), cache,
                                   0, None)
        want = ref(torch.tensor([[3]]), torch.tensor([[0]]), ref_cache, 0, None)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not huge_pages.available(), reason="no transparent huge pages here")
@pytest.mark.parametrize("fmt", ["Q4_1", "f32"])
def test_weights_moved_after_a_step_give_the_same_logits(fmt):
    """The same weight objects moved to new addresses after a step (huge_pages.move, as
    use_huge_pages does, without anything told): the plan and the per-layer caches see
    the pointers changed and the next step reads the moved weights (same logits; a plan
    kept over the old addresses read freed memory: a crash or other logits)."""
    (model,) = stage_models(fmt, 1)
    cache = Stage(model, torch.device("cpu"), torch.float32, 1, 64).caches[0]
    gate_up = model.model.layers["0"].mlp.gate_up_proj
    with torch.inference_mode():
        first = cpu_step.decode_step(model, torch.tensor([[3]]), torch.tensor([[0]]), cache,
                                     0, None)
        old = cpu_step.plan_for(model)
        old_ptr = old.protos[0].w_gu
        assert huge_pages.move(step_weights(model), min_bytes=0) > 0
        again = cpu_step.decode_step(model, torch.tensor([[3]]), torch.tensor([[0]]), cache,
                                     0, None)
    plan = cpu_step.plan_for(model)
    assert plan is not old and plan.protos[0].w_gu != old_ptr
    assert plan.protos[0].w_gu == cpu_decode._ptr(cpu_decode._weight(gate_up))
    torch.testing.assert_close(again, first, rtol=0, atol=0)


def test_steps_it_does_not_take_return_none():
    """A prefill, a tensor start, a bfloat16 layer, a mixture-of-experts layer: None (the
    stage then runs the model's forward)."""
    (model,) = stage_models("f32", 1)
    cache = Stage(model, torch.device("cpu"), torch.float32, 1, 64).caches[0]
    with torch.inference_mode():
        assert cpu_step.decode_step(model, torch.tensor([[1, 2]]), torch.tensor([[0, 1]]),
                                    cache, 0, None) is None
        assert cpu_step.decode_step(model, torch.tensor([[1]]), torch.tensor([[0]]), cache,
                                    torch.tensor(0), None) is None
        assert cpu_step.decode_step(model, torch.tensor([[1]]), torch.tensor([[0]]), cache,
                                    0, None) is not None
    layer = model.model.layers["2"]
    layer.mlp.down_proj.weight = torch.nn.Parameter(
        layer.mlp.down_proj.weight.bfloat16(), requires_grad=False)
    assert cpu_step.plan_for(model) is None
    moe = Llama(ModelConfig.from_hf_dict(dict(
        architectures=["MixtralForCausalLM"], vocab_size=VOCAB, num_hidden_layers=1,
        hidden_size=64, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
        num_local_experts=2, num_experts_per_tok=1)))
    assert cpu_step.build_plan(moe) is None
