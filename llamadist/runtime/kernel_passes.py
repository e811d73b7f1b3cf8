"""Kernel passes: swap the faster kernels into a built, loaded model (DESIGN principle 1).

The model (llamadist.model) is plain PyTorch: nn.Linear and SDPA. The kernels
(llamadist.kernels) know nothing of the model. This module, above both, decides which
kernel serves which module, from a ``RuntimeConfig`` and the stage's device:

* ``use_cpu_linear``: every plain nn.Linear becomes a ``CpuLinear`` (a few float32 rows
  on the CPU go to the C GEMV), and the tensor-parallel linears' ``linear_fn`` becomes
  ``cpu_decode.linear``. The C decoder layer, ``cpu_decode.decode_layer``, is a
  ``layer_fn`` rather than a module swap: ``decode_layer_fn`` says when a stage uses it.
  ``decode_step_fn`` likewise gives a CPU stage ``cpu_step.decode_step``, a whole decode
  step (every layer, the final norm and the head) in one C call, tried before the model's
  forward. ``use_huge_pages`` then moves the weights such a step streams into memory
  backed by 2 MiB transparent huge pages (Linux; fewer TLB misses).
* ``set_decode_attention``: each Attention's one-token attention, on CUDA the split-KV
  Triton kernel where it applies (a tensor start: the graph path) or SDPA, as
  ``RuntimeConfig.decode_attention`` says.
* ``paged_decode_fn``: the paged cache's decode-only attention (every sequence one token),
  on CUDA with ``decode_attention == "split"`` the Triton paged kernel
  (llamadist.kernels.paged_attention), which also writes the step's K/V; None keeps the
  PyTorch paged path (gather + SDPA). Like ``decode_layer_fn`` it is a function the stage
  holds, not a module swap: the paged attention lives in the runtime's cache object.

* ``use_grouped_experts``: on CUDA (bf16, Hopper or newer), each mixture-of-experts
  block's experts stacked into two (G, ., .) tensors and computed as two grouped GEMMs
  (llamadist.kernels.moe_grouped) instead of the loop over experts: static shapes, no
  host sync, so MoE decode steps are captured in CUDA graphs like dense ones. Below as
  many assignments (tokens x top-k) as held experts, the routed expert GEMV in Triton
  (llamadist.kernels.moe_routed) serves instead, reading only the experts routed to
  (``moe_grouped.expert_path``: Mixtral decode at batch 1-3).

* ``set_quant_activations``: whether the CPU GEMV over quantized (GGUF block) weights
  quantizes x to int8 first (``RuntimeConfig.quant_activations``); a flag on each
  ``QuantizedTensor`` (llamadist.kernels.quant), read by its F.linear and the C layer.

* ``use_packed_linear``: every nn.Linear holding a GPU-quantized weight
  (llamadist.kernels.wquant.PackedWeight: ``--quantize``, or GGUF blocks on a GPU stage)
  becomes a ``PackedLinear``, whose product ``RuntimeConfig.wquant`` chooses: "torch"
  (torch's tinygemm for int4 with bf16 activations, (x @ q^T) * scale for int8 / fp8,
  which torch.compile fuses) or "triton" (the Triton kernels behind a torch custom op that
  torch.compile and the CUDA-graph capture take as one opaque kernel).

* ``use_eager_fused``: on CUDA, the fused Triton kernels of llamadist.kernels.eager_fused
  for the steps that run eagerly (prefill and mixed steps; decode graphs of eager layers):
  residual add + RMSNorm (each RMSNorm's ``add_norm``), SiLU * up (each MLP's
  ``silu_mul``; where it is set, an int8 / fp8 gate_up_proj on the Triton GEMV writes
  it itself: PackedLinear.silu_mul, wquant_triton.launch_glu) and q/k RoPE of the flat
  batches (each Attention's ``rotary_qk``). The model runs its own formula under
  torch.compile, which Inductor fuses.

* ``use_l2_prefetch``: on CUDA sm_90+, where llamadist.kernels.l2_prefetch.BUDGET is set,
  each Attention's ``l2_prefetch``: o's weights and the MLP's first bytes asked into the
  L2 after a flat batch's attention (eager layers), while the attention's kernels leave
  the DRAM idle.

Run them after loading and fusion, as ``apply_kernel_passes`` does in ``build_stage``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from llamadist.config import RuntimeConfig
from llamadist.kernels import cpu_decode, cpu_step, gpu, huge_pages
from llamadist.kernels import decode_attention as split_kv
from llamadist.kernels import eager_fused, l2_prefetch
from llamadist.kernels import moe_grouped, moe_routed, wquant_torch
from llamadist.kernels import paged_attention as paged_kernel
from llamadist.kernels.quant import QuantizedTensor, RowStack
from llamadist.kernels.wquant import as_packed_linear
from llamadist.model.cache import Start
from llamadist.model.llama import (MLP, Attention, DecodeAttention, DecoderLayer, RMSNorm,
                                   sdpa_decode_attention)
from llamadist.model.moe import SparseMoE

LayerFn = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]
# (q (S, H, D), k (S, H_kv, D), v, kv (2, NB, H_kv, bs, D), slot_mapping (S,),
#  block_tables (S, MB) int32, seq_lens (S,) int32, splits) -> (S, H, D); writes k/v.
PagedDecode = Callable[..., torch.Tensor]
# (model, x, positions, cache, start, mask, logits) -> the stage's output, or None where
# the step is not one it takes (see cpu_step.decode_step)
StepFn = Callable[..., torch.Tensor | None]


def use_cpu_linear(model: nn.Module) -> nn.Module:
    """Route ``model``'s linear layers through ``cpu_decode.linear`` (in place; returns it).

    A plain nn.Linear changes class to CpuLinear, which adds no state: its Parameter
    objects stay, so a tied head stays tied and nothing is copied. Modules with their
    own matmul hook (the tensor-parallel linears' ``linear_fn = F.linear``) get the
    kernel through it. Subclasses of nn.Linear other than CpuLinear are left alone."""
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = cpu_decode.CpuLinear
        elif getattr(module, "linear_fn", None) is F.linear:
            module.linear_fn = cpu_decode.linear
    return model


def use_packed_linear(model: nn.Module, backend: str = "torch",
                      act_dtype: torch.dtype | None = None) -> nn.Module:
    """Swap PackedLinear into every plain nn.Linear of ``model`` that holds a PackedWeight
    (in place; returns it), its product from ``backend`` ("torch" or "triton") for
    activations of ``act_dtype`` (None: bfloat16)."""
    for module in model.modules():
        if type(module) is nn.Linear:
            as_packed_linear(module, backend, act_dtype)
    return model


def set_quant_activations(model: nn.Module, int8: bool) -> nn.Module:
    """Make every quantized weight of ``model`` meet int8 (``int8``) or float32 x in the
    CPU GEMV (in place; returns it). Tied weights are one object, set once."""
    for module in model.modules():
        w = module.__dict__.get("weight")
        for part in w.parts if isinstance(w, RowStack) else [w]:
            if isinstance(part, QuantizedTensor):
                part.int8_x = int8
    return model


def split_kv_decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                              mask: torch.Tensor | None, start: Start, cos: torch.Tensor,
                              sin: torch.Tensor) -> torch.Tensor:
    """``Attention.decode_attention`` through the split-KV kernel where it serves: a device
    start (the static-cache graph path: the kernel reads the live length from it) and
    ``split_kv.usable``; SDPA over the given keys otherwise. Shapes as in
    llamadist.model.llama.sdpa_decode_attention."""
    if isinstance(start, torch.Tensor) and split_kv.usable(q, keys, mask):
        return split_kv.decode_attention(q, keys, values, mask, start, cos, sin)
    return sdpa_decode_attention(q, keys, values, mask, start, cos, sin)


DECODE_ATTENTIONS: dict[str, DecodeAttention] = {"split": split_kv_decode_attention,
                                                 "sdpa": sdpa_decode_attention}


def set_decode_attention(model: nn.Module, name: str) -> nn.Module:
    """Give every Attention of ``model`` the one-token attention ``name`` (a key of
    DECODE_ATTENTIONS; in place). Setting both ways lets a benchmark compare them on
    one shared model."""
    fn = DECODE_ATTENTIONS[name]
    for module in model.modules():
        if isinstance(module, Attention):
            module.decode_attention = fn
    return model


def use_eager_fused(model: nn.Module, device: torch.device,
                    dtype: torch.dtype | None = None, on: bool = True) -> bool:
    """Give ``model``'s RMSNorms, MLPs and Attentions the fused eager kernels (``on``, and
    ``eager_fused.usable`` on ``device`` for activations of ``dtype``, None: bfloat16), or
    take them away (in place). Returns whether they are set."""
    on = on and eager_fused.usable(device, dtype or torch.bfloat16)
    for module in model.modules():
        if isinstance(module, RMSNorm):
            module.add_norm = eager_fused.add_rms_norm if on else None
        elif isinstance(module, MLP):
            module.silu_mul = eager_fused.silu_mul if on else None
        elif isinstance(module, Attention):
            module.rotary_qk = eager_fused.rope if on else None
    return on


def use_l2_prefetch(model: nn.Module, device: torch.device,
                    budget: int | None = None) -> bool:
    """Give each decoder layer's Attention an ``l2_prefetch`` that asks the L2 for o's
    weights and the MLP's first bytes, ``budget`` bytes in all (None: l2_prefetch.BUDGET;
    0: none), after its attention (llamadist.kernels.l2_prefetch), where that runs on
    ``device``; or take it away. Returns whether they are set."""
    budget = l2_prefetch.BUDGET if budget is None else budget
    on = budget > 0 and l2_prefetch.usable(device)
    for module in model.modules():
        if isinstance(module, DecoderLayer):
            attn, mlp = module.self_attn, module.mlp
            head = [] if mlp is None else (
                [mlp.gate_up_proj] if mlp.gate_up_proj is not None
                else [mlp.gate_proj, mlp.up_proj])
            found = l2_prefetch.ranges([attn.o_proj], head, budget) if on else []
            attn.l2_prefetch = functools.partial(l2_prefetch.prefetch, found) if found else None
    return on


def compile_pays(model: nn.Module, rows: int | None = None) -> bool:
    """Whether torch.compile should make the decode layers of ``model`` (a built CUDA
    stage) for steps of ``rows`` rows (None: of any rows) when the run leaves it open
    (RuntimeConfig.compile None): where they hold what the fused eager kernels do not
    cover, GPU-quantized weights on torch's products (tinygemm, and the scaled matmul where
    Triton does not take decode's rows: compile fuses their casts and scales) or
    mixture-of-experts blocks (routing), or where those kernels are off (--eager-kernels
    torch, no Triton: graphs of PyTorch's eager ops decode a batch-1 step in 5.98 ms
    against 4.50 compiled on the H200). A dense float layer with the fused kernels decodes
    as fast in CUDA graphs of its eager layers (4.46 ms) and starts without torch._dynamo;
    so do int8 / fp8 whose decode rows (up to wquant_torch.TRITON_ROWS, past any usual
    --max-batch) take the Triton kernels, and int4 on tinygemm's words in steps of at
    most wquant_torch.ROWS_MAX_M rows where cuda_int4.int4_rows takes them (``tg_rows``):
    Llama-3-8B int4 + head on an H200 stepped batch 1 / 4 / 8 in 1.952 / 2.040 / 2.438
    ms through the eager layers against 1.964 / 2.164 / 2.578 compiled (RESULTS.md,
    session 31); past those rows tinygemm and the tensor-core tiles take them, and
    compiling pays (batch 16, when ROWS_MAX_M was 8: 7.606 against 7.717; since session
    37 int4_rows takes 16 rows, 4.948 ms)."""
    from llamadist.kernels.wquant import PackedLinear

    def tinygemm_pays(m: PackedLinear) -> bool:
        return not (m.tg_rows and rows is not None and rows <= wquant_torch.ROWS_MAX_M)

    return any(isinstance(m, SparseMoE)
               or (isinstance(m, PackedLinear) and (
                   (m.path == "tinygemm" and tinygemm_pays(m))
                   or (m.path == "scaled" and not m.triton_rows)))
               or (isinstance(m, RMSNorm) and m.add_norm is None)
               for m in model.modules())


def compile_rows(model: nn.Module) -> int | None:
    """The fewest rows of a decode step whose layers torch.compile should make when the
    run leaves it open (compile_pays; it pays from some row count on, never less past
    it), or None where it never pays."""
    if not compile_pays(model):
        return None
    few = wquant_torch.ROWS_MAX_M
    return few + 1 if not compile_pays(model, few) else 1


def compile_expected(config, runtime: RuntimeConfig, device: torch.device,
                     max_batch: int | None = None) -> bool:
    """compile_pays predicted before a stage on ``device`` for steps of up to
    ``max_batch`` rows (None: any) loads (to import the compiler beside the load):
    ``runtime.compile``, or with None a mixture-of-experts model, weights that --quantize
    quantizes for torch's products (int4's tinygemm past the rows cuda_int4 takes; int8 /
    fp8 only without Triton, which the last term covers), or the fused eager kernels off.
    (Not foreseen: a GGUF's own blocks on a GPU, whose compile then imports the
    compiler at the first decode, as does int4 at few rows on a GPU where cuda_int4 does
    not run; int4 whose product falls back to Triton, and MoE blocks without the grouped
    kernel, which decode without graphs: an import for nothing.)"""
    if device.type != "cuda" or not runtime.cuda_graphs or runtime.compile is False:
        return False
    tinygemm = runtime.wquant == "torch" and (runtime.quantize_for(str(device)) or "") \
        .startswith("int4") and (max_batch is None or max_batch > wquant_torch.ROWS_MAX_M)
    return bool(runtime.compile or config.num_experts or tinygemm
                or runtime.eager_kernels != "triton" or not gpu.INSTALLED)


def step_weights(model: nn.Module) -> list[torch.Tensor]:
    """The tensors holding the linears' and embeddings' weights of ``model`` (a
    QuantizedTensor's blocks, a RowStack's parts): what a CPU decode step streams."""
    out = []
    for module in model.modules():
        w = module._parameters.get("weight")
        w = module.__dict__.get("weight") if w is None else w
        for part in w.parts if isinstance(w, RowStack) else [w]:
            if isinstance(part, QuantizedTensor):
                out.append(part.blocks)
            elif isinstance(part, torch.Tensor):
                out.append(part)
    return out


def use_huge_pages(model: nn.Module, min_bytes: int = huge_pages.MIN_BYTES) -> int:
    """Move the weights a CPU decode step streams into memory backed by 2 MiB transparent
    huge pages (``huge_pages.move``: fewer TLB misses on the ~270 MB a SmolLM2-135M F16
    step reads; nothing where the kernel has no THP or outside Linux). A step plan made
    before sees the new addresses (``cpu_step.StepPlan.holds``). Returns the bytes moved."""
    return huge_pages.move(step_weights(model), min_bytes=min_bytes)


def decode_layer_fn(device: torch.device, runtime: RuntimeConfig) -> LayerFn | None:
    """The ``layer_fn`` of a stage's eager steps: on the CPU with ``cpu_kernels``, the C
    decoder layer (it falls back to the layer's own forward where it does not apply);
    None (each layer's forward) elsewhere."""
    if device.type == "cpu" and runtime.cpu_kernels:
        return cpu_decode.decode_layer
    return None


def decode_step_fn(device: torch.device, runtime: RuntimeConfig) -> StepFn | None:
    """What a stage tries first for a decode step: on the CPU with ``cpu_kernels``, the
    whole step in one C call (``cpu_step.decode_step``: it returns None where it does not
    apply, and the stage runs its model's forward with ``decode_layer_fn``); None
    elsewhere."""
    if device.type == "cpu" and runtime.cpu_kernels:
        return cpu_step.decode_step
    return None


def paged_decode_fn(device: torch.device, runtime: RuntimeConfig) -> PagedDecode | None:
    """The paged cache's decode-only attention on ``device``: the Triton paged kernel on
    CUDA when ``runtime.decode_attention`` is "split" and Triton is present, else None
    (the PyTorch paged path)."""
    if device.type == "cuda" and runtime.decode_attention == "split" and gpu.ready():
        return paged_kernel.paged_decode
    return None


def dependent_launches(device: torch.device, runtime: RuntimeConfig) -> bool:
    """Whether a stage on ``device`` captures its decode graphs as programmatic dependent
    launches: ``runtime.dependent_launches`` on a CUDA device that has them
    (llamadist.kernels.gpu.pdl_supported: sm_90+, driver 12.3+)."""
    return (runtime.dependent_launches and runtime.cuda_graphs and device.type == "cuda"
            and gpu.pdl_supported(device.index if device.index is not None
                                  else torch.cuda.current_device()))


def use_grouped_experts(model: nn.Module, force: bool = False) -> int:
    """Give every SparseMoE of ``model`` whose experts are fused (w13) and plain float
    tensors the grouped-GEMM ``expert_fn``, where ``moe_grouped.available`` (``force``:
    on any device ``torch._grouped_mm`` runs on; tests); where the routed Triton kernel
    runs (``moe_routed.usable``), small batches go to it (``moe_grouped.expert_sum``). The experts' weights are stacked
    one block at a time, each expert's Linear then holding a view of the stack, so the
    memory is not doubled (at most one block's experts more while stacking). Returns how
    many blocks changed."""
    changed = 0
    for moe in [m for m in model.modules() if isinstance(m, SparseMoE)]:
        held = sorted(int(e) for e in moe.experts)
        experts = [moe.experts[str(e)] for e in held]
        if not experts or moe.expert_fn is not None or any(x.w13 is None for x in experts):
            continue
        w = experts[0].w13.weight
        if type(w.data) is not torch.Tensor or not (
                force or moe_grouped.available(w.device, w.dtype)):
            continue
        stacks = []
        for name in ("w13", "w2"):
            stack = torch.stack([getattr(x, name).weight.detach() for x in experts])
            for i, x in enumerate(experts):  # the old per-expert tensors are freed here
                getattr(x, name).weight = nn.Parameter(stack[i], requires_grad=False)
            stacks.append(stack)
        slot = None
        if held != list(range(moe.num_experts)):
            slot = torch.full((moe.num_experts,), -1, dtype=torch.long, device=w.device)
            slot[held] = torch.arange(len(held), device=w.device)
        moe.expert_fn = functools.partial(moe_grouped.expert_sum, w13=stacks[0],
                                          w2=stacks[1], slot=slot,
                                          routed=moe_routed.usable(w.device))
        changed += 1
    return changed


def apply_kernel_passes(model: nn.Module, device: torch.device, runtime: RuntimeConfig,
                        dtype: torch.dtype | None = None) -> nn.Module:
    """The passes ``runtime`` asks for that can serve on ``device`` (in place), for
    activations of ``dtype`` (None: bfloat16)."""
    use_packed_linear(model, runtime.wquant, dtype)  # before use_cpu_linear claims the plain Linears
    if device.type == "cpu" and runtime.cpu_kernels:
        use_cpu_linear(model)
        use_huge_pages(model)
    set_quant_activations(model, runtime.quant_activations == "int8")
    if device.type == "cuda":  # the split-KV kernel runs on CUDA only
        set_decode_attention(model, runtime.decode_attention)
        use_grouped_experts(model)
        use_eager_fused(model, device, dtype, on=runtime.eager_kernels == "triton")
        use_l2_prefetch(model, device)
    return model
