"""Model configuration: what the Llama math needs, read from a Hugging Face
``config.json`` or from GGUF metadata (see :mod:`llamadist.weights.gguf`)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MixtralForCausalLM")
SUPPORTED_MODEL_TYPES = ("llama", "mixtral")
# Mixture-of-experts families we know by name but do not run (their routing, shared
# experts or attention differ from Mixtral's): refused with this reason.
UNSUPPORTED_MOE = {
    "qwen2_moe": "Qwen2-MoE (shared expert with a sigmoid gate)",
    "qwen3_moe": "Qwen3-MoE", "deepseek_v2": "DeepSeek-V2 (MLA attention, grouped routing)",
    "deepseek_v3": "DeepSeek-V3 (MLA attention, sigmoid grouped routing)",
    "dbrx": "DBRX", "olmoe": "OLMoE", "jamba": "Jamba (Mamba layers)",
    "granitemoe": "GraniteMoE", "phimoe": "PhiMoE", "minimax": "MiniMax", "gpt_oss": "gpt-oss",
    "llama4": "Llama 4 (shared expert, chunked attention)",
}
# How a router turns its logits into top-k expert weights (llamadist.model.moe.ROUTINGS).
ROUTINGS = ("softmax_topk_norm",)


class ConfigError(ValueError):
    """A configuration that llamadist cannot run, with a message that says why."""


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    torch_dtype: str = "float32"
    # Mixture of experts (0 experts: a dense SwiGLU MLP in every layer). Each MoE layer
    # routes a token to num_experts_per_tok of num_experts SwiGLU experts of width
    # intermediate_size; ``routing`` names the top-k rule (ROUTINGS).
    num_experts: int = 0
    num_experts_per_tok: int = 0
    routing: str = "softmax_topk_norm"

    def __post_init__(self) -> None:
        sizes = {"vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
                 "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
                 "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
                 "head_dim": self.head_dim, "max_position_embeddings": self.max_position_embeddings}
        bad = [f"{k}={v}" for k, v in sizes.items() if v < 1]
        if bad:
            raise ConfigError(f"config sizes must be positive: {', '.join(bad)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ("llama3", "linear", "default"):
                raise ConfigError(
                    f"rope_scaling type {kind!r} is not supported; supported: llama3, linear")
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ConfigError(f"num_experts_per_tok={self.num_experts_per_tok} must be in "
                              f"1..num_local_experts={self.num_experts}")
        if self.num_experts < 0 or (not self.num_experts and self.num_experts_per_tok):
            raise ConfigError(f"num_experts_per_tok={self.num_experts_per_tok} needs "
                              f"num_local_experts >= 1, got {self.num_experts}")
        if self.routing not in ROUTINGS:
            raise ConfigError(f"routing {self.routing!r} is not supported; supported: "
                              f"{', '.join(ROUTINGS)}")

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def architecture(self) -> str:
        return "MixtralForCausalLM" if self.is_moe else "LlamaForCausalLM"

    # ---- derived sizes -------------------------------------------------
    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    # ---- Hugging Face config.json ---------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"config.json holds a {type(d).__name__}, not an object")
        _check_architecture(d)
        moe = _moe_fields(d)
        try:
            hidden = int(d["hidden_size"])
            heads = int(d["num_attention_heads"])
            eos = d.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
            rope_scaling = d.get("rope_scaling")
            rope_theta = d.get("rope_theta")
            # transformers >= 5 may store rope settings under rope_parameters
            rp = d.get("rope_parameters")
            if isinstance(rp, dict):
                rope_theta = rope_theta or rp.get("rope_theta")
                if rope_scaling is None and rp.get("rope_type", "default") != "default":
                    rope_scaling = {k: v for k, v in rp.items() if k != "rope_theta"}
            if rope_scaling is not None and rope_scaling.get(
                    "rope_type", rope_scaling.get("type")) == "default":
                rope_scaling = None
            return cls(
                vocab_size=int(d["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(d["intermediate_size"]),
                num_layers=int(d["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(d.get("num_key_value_heads") or heads),
                head_dim=int(d.get("head_dim") or hidden // heads),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope_theta or 10000.0),
                rope_scaling=dict(rope_scaling) if rope_scaling else None,
                max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                attention_bias=bool(d.get("attention_bias", False)),
                mlp_bias=bool(d.get("mlp_bias", False)),
                bos_token_id=d.get("bos_token_id"),
                eos_token_ids=eos_ids,
                torch_dtype=str(d.get("torch_dtype") or d.get("dtype") or "float32"),
                **moe,
            )
        except KeyError as e:
            raise ConfigError(f"config.json is missing the field {e.args[0]!r}") from None
        except (TypeError, ValueError, ZeroDivisionError, AttributeError) as e:
            # a field of the wrong type or value (null, a string, 0 heads): name it
            raise ConfigError(f"config.json has a field llamadist cannot read ({e}); check "
                              f"its sizes and head counts") from None

    @classmethod
    def from_json_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"no config.json at {path}")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        return cls.from_hf_dict(d)

    def to_hf_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": "mixtral" if self.is_moe else "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias,
            "hidden_act": "silu",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) != 1
            else self.eos_token_ids[0],
            "torch_dtype": self.torch_dtype,
        }
        if self.is_moe:
            d.update(num_local_experts=self.num_experts,
                     num_experts_per_tok=self.num_experts_per_tok, sliding_window=None)
        return d

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        return cls(**d)


def _check_architecture(d: dict[str, Any]) -> None:
    """Refuse by name what llamadist does not run: a known MoE family other than Mixtral,
    or any architecture that is neither Llama nor Mixtral."""
    archs = d.get("architectures") or []
    model_type = d.get("model_type")
    name = archs[0] if archs else model_type
    if model_type in UNSUPPORTED_MOE:
        raise ConfigError(
            f"unsupported mixture-of-experts architecture {name!r}: "
            f"{UNSUPPORTED_MOE[model_type]} is not implemented; llamadist runs the "
            f"Mixtral family (MixtralForCausalLM: softmax top-k routing, SwiGLU experts)")
    if model_type not in SUPPORTED_MODEL_TYPES and not set(archs) & set(SUPPORTED_ARCHITECTURES):
        raise ConfigError(
            f"unsupported architecture {name!r} (model_type={model_type!r}); "
            f"llamadist runs {', '.join(SUPPORTED_ARCHITECTURES)} "
            f"(model_type {' or '.join(map(repr, SUPPORTED_MODEL_TYPES))})")


def _moe_fields(d: dict[str, Any]) -> dict[str, Any]:
    """The MoE keywords of a Mixtral config.json ({} for a dense Llama). A sliding window
    shorter than the context would change attention, which we do not implement."""
    if d.get("model_type") != "mixtral" and "MixtralForCausalLM" not in (d.get("architectures") or []):
        return {}
    window, context = d.get("sliding_window"), d.get("max_position_embeddings", 2048)
    if isinstance(window, int) and isinstance(context, int) and window < context:
        raise ConfigError(f"sliding_window={window} is shorter than the context of {context} "
                          f"positions; llamadist's attention has no sliding window")
    if d.get("shared_expert_intermediate_size") or d.get("n_shared_experts"):
        raise ConfigError("a shared expert in a Mixtral config is not supported")
    experts, k = d.get("num_local_experts", 8), d.get("num_experts_per_tok", 2)
    if not (isinstance(experts, int) and isinstance(k, int)):
        raise ConfigError(f"config.json: num_local_experts={experts!r} and "
                          f"num_experts_per_tok={k!r} must be integers")
    return dict(num_experts=experts, num_experts_per_tok=k)


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A host tensor on ``device``; to a GPU through pinned memory without waiting, so
    the host does not stop for the work already queued on the device (a copy from
    pageable memory waits for it)."""
    import torch  # here: the rest of this module needs no torch
    device = torch.device(device)
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def gpu_flags(devices: str | list[str]) -> list[bool]:
    """Whether each device of "cuda:0,cpu" (or a list of names) is a GPU."""
    names = devices.split(",") if isinstance(devices, str) else devices
    return [d.strip().startswith("cuda") for d in names]


def default_devices(processes: bool = False) -> str:
    """Where a run goes when --devices is not given: the first GPU when there is one (over
    processes "cuda": each rank its own cuda:LOCAL_RANK), else the CPU. A model larger than
    one GPU then says so and asks for --devices."""
    import torch
    if not torch.cuda.is_available():
        return "cpu"
    return "cuda" if processes else "cuda:0"


def default_dtype(devices: str | list[str]) -> str:
    """bfloat16 when every device is a GPU, else float32: one rule for planning and running."""
    return "bfloat16" if all(gpu_flags(devices)) else "float32"


# The KV-cache length when neither the user nor the request says: the model's context, capped.
DEFAULT_MAX_SEQ_LEN = 4096
# Seconds a rank waits for a silent peer before every process exits.
DEFAULT_TIMEOUT_S = 60.0
DECODE_ATTENTION_CHOICES = ("split", "sdpa")
EAGER_KERNELS_CHOICES = ("torch", "triton")  # --eager-kernels: a GPU's uncompiled layers
WEIGHTS_CHOICES = ("native", "float32", "bfloat16", "float16")
QUANT_ACTIVATIONS_CHOICES = ("float32", "int8")
WQUANT_CHOICES = ("torch", "triton")  # --wquant: the GPU product of --quantize weights
QUANTIZE_CHOICES = ("int8", "int4", "fp8")  # --quantize: a float weight's format at load
QUANTIZE_HEAD_ALONE = ("--quantize-head quantizes the head in the --quantize format: give "
                       "--quantize int8|int4|fp8 (or --fit-bits, or a plan file with "
                       "formats) with it")
# int4's inputs per scale and offset: "int4" is INT4_GROUP on a GPU (GGUF Q4_1, 32, on a
# CPU); "int4-g32" etc. choose (the groups torch's tinygemm takes; Triton takes any even one)
INT4_GROUP = 128
INT4_GROUPS = (32, 64, 128, 256)
QUANTIZE_FORMATS = QUANTIZE_CHOICES + tuple(f"int4-g{g}" for g in INT4_GROUPS)
CPU_QUANTIZE_FORMATS = ("int8", "int4", "int4-g32")  # GGUF Q8_0 / Q4_1 blocks of 32
# --ep-dispatch: how tokens meet experts spread over data-parallel replicas (parallel.expert)
EP_DISPATCH_CHOICES = ("auto", "gather", "all_to_all")
QUANTIZE_HELP = ("int8 | int4 | fp8, or per device: cuda:0=int4,cpu=int8 (a kind, cuda or "
                 "cpu, names all its devices; native or none: no quantization there); int4 "
                 "takes groups of 128 inputs on a GPU, int4-g32 / -g64 / -g256 choose (a "
                 "small model loses less with 32; a CPU stage's int4 is always 32)")


def parse_quantize(spec: str | None) -> dict[str, str | None]:
    """--quantize "int4" -> {"*": "int4"}; "cuda:0=int4,cpu=native" -> {"cuda:0": "int4",
    "cpu": None}. Refuses an unknown format or a malformed entry, naming it."""
    if spec is None:
        return {}
    out: dict[str, str | None] = {}
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        device, _, fmt = part.rpartition("=")
        device = device.strip() or "*"
        fmt = fmt.strip()
        if fmt not in QUANTIZE_FORMATS + ("native", "none"):
            raise ConfigError(f"--quantize {spec}: unknown format {fmt!r}; give "
                              f"{', '.join(QUANTIZE_FORMATS)} (or native / none), for every "
                              f"device or per device as cuda:0=int4,cpu=int8")
        if device in out:
            raise ConfigError(f"--quantize {spec}: {device} is given twice")
        out[device] = None if fmt in ("native", "none") else fmt
    if not out:
        raise ConfigError(f"--quantize {spec!r}: give a format ({', '.join(QUANTIZE_FORMATS)})")
    return out


def quantize_group(fmt: str) -> tuple[str, int | None]:
    """A --quantize format -> (its kind, its int4 group, None for the kind's default):
    "int4-g32" -> ("int4", 32), "int4" -> ("int4", None), "fp8" -> ("fp8", None)."""
    if fmt not in QUANTIZE_FORMATS:
        raise ConfigError(f"unknown weight format {fmt!r}; give one of "
                          f"{', '.join(QUANTIZE_FORMATS)}")
    kind, _, group = fmt.partition("-g")
    return kind, int(group) if group else None


def quantize_for(spec: str | None, device: str) -> str | None:
    """The weight format --quantize ``spec`` gives the stage on ``device`` (None: as the
    checkpoint stores it): the exact device's entry, else its kind's, else the bare one.
    A CPU stage takes CPU_QUANTIZE_FORMATS only (its kernels take GGUF blocks of 32: int8
    or int4, no fp8, no other int4 group)."""
    table = parse_quantize(spec)
    device = str(device)
    kind = device.split(":")[0]
    fmt = table.get(device, table.get(kind, table.get("*")))
    if fmt is not None and kind == "cpu" and fmt not in CPU_QUANTIZE_FORMATS:
        raise ConfigError(f"--quantize {spec}: {fmt} on the CPU stage ({device}) is not "
                          f"supported: a CPU stage takes {' or '.join(CPU_QUANTIZE_FORMATS)} "
                          f"(GGUF Q8_0 / Q4_1 blocks, groups of 32); give one of them "
                          f"(--quantize int4), or per device where the run has GPUs "
                          f"(cuda={fmt},cpu=int4)")
    return fmt


def _one_of(name: str, value: object, choices) -> None:
    """Refuse ``value`` for ``name`` unless it is one of ``choices``, naming them."""
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


@dataclass(frozen=True)
class RuntimeConfig:
    """How to run a model, decided once (from flags or the Python API) and passed down.

    Every default lives here. ``None`` means "decide from the model and the request" and is
    resolved by the methods below, never by the code that receives the config.

    max_seq_len      KV-cache length per sequence (None: what the request needs, rounded
                     up to 256, or min(context, DEFAULT_MAX_SEQ_LEN) when unknown)
    max_batch        sequences decoded together (the engine's running requests at most)
    max_batch_tokens tokens one engine step computes at most (decodes plus prefill chunks;
                     at least max_batch, so every running sequence can always decode; None:
                     8192 with GPUs, whose matmuls want long chunks, 2048 on CPUs only)
    dtype            activations, and float weights (None: a float ``weights``, else
                     bfloat16 on all-GPU layouts, else float32)
    weights          a quantized checkpoint's weights: "native" keeps its blocks (GGUF
                     Q4_0/Q4_1/Q8_0/Q4_K/Q5_K/Q6_K, and F16/BF16 tensors as stored, on CPU
                     stages: llamadist.kernels.quant),
                     a float dtype dequantizes at load (it must then match ``dtype``)
    quantize         the decoder layers' linear weights quantized at load (None: as stored):
                     "int8" | "int4" | "fp8" (or int4 with its group: "int4-g32", see
                     INT4_GROUPS) for every stage, or per device
                     ("cuda:0=int4,cpu=int8"); GPU stages run them as ``wquant`` says
                     (llamadist.kernels.wquant), CPU stages as GGUF Q8_0 / Q4_1 blocks
    quantize_head    the output head in its stage's ``quantize`` format too (a tied head
                     gets its own quantized copy; the embedding stays as it is): the
                     head is 1.05 of Llama-3-8B's 16.1 GB in bf16
    wquant           the product of GPU-quantized weights (--quantize, GGUF blocks on a GPU
                     stage): "torch" (tinygemm for int4, (x @ q^T) * scale for int8 / fp8,
                     fused by torch.compile) or "triton" (llamadist's Triton kernels);
                     default $LLAMADIST_WQUANT, else "torch"
    quant_activations  what native Q4_0/Q4_1/Q8_0 weights meet in the CPU GEMV: "float32"
                     (x as it is: the dequantized model's values) or "int8" (x quantized
                     per 32, as llama.cpp does: faster, ~1% perplexity on SmolLM2)
    cuda_graphs      decode through captured CUDA graphs on CUDA devices
    compile          torch.compile the decoder layers inside the graphs: True, False, or
                     None (the default): where it pays, stage by stage
                     (kernel_passes.compile_pays: layers with GPU-quantized weights on
                     torch's products (int4: where cuda_int4's kernel runs, in steps of
                     more rows than it takes), mixture-of-experts blocks, or the fused eager
                     kernels off); a dense float model's graphs capture its eager layers with the
                     fused kernels (eager_kernels): as fast on the H200 (batch-1 decode
                     4.46 ms against 4.50 compiled; 256 requests 7 782 / 8 337 tokens/s
                     against 7 584 / 7 971 in one lease, within the spread between leases)
                     and no torch._dynamo / Inductor at all (first token of an 8B generate
                     10.0 s after the command against 15.8 s compiled with warm caches)
    compile_cache    a folder where each stage keeps torch.compile's artifacts of its layer
                     (llamadist.runtime.compile_cache): loaded before its first compile,
                     written after each compiled batch bucket's first step, so a restarted worker or
                     the next start on a fresh host loads instead of compiling (None: off;
                     Inductor's own cache in /tmp already serves one host)
    cpu_kernels      the C decode kernels on CPU devices (llamadist.kernels.cpu_decode)
    decode_attention "split" (the split-KV Triton kernel where it applies) or "sdpa"
    eager_kernels    what a CUDA stage's uncompiled layers (prefill and mixed steps, graphs
                     of eager layers) run for residual add + RMSNorm, SiLU x up and q/k
                     RoPE: "torch" (PyTorch's ops) or "triton" (the default where Triton
                     runs: llamadist.kernels.eager_fused, one kernel each; the eager formula's
                     values, its roundings included; batch-1 decode through graphs of the
                     eager layers 4.46 ms against torch's 5.98 on the H200)
    timeout          seconds a rank waits for a silent peer
    kv_block_size    tokens per paged KV block (None: 16 with GPUs, 128 on CPUs only, where
                     the C attention pays a fixed cost per block)
    timed            time each stage's compute and transfers on its device (per-stage
                     statistics; on CUDA events read without a host sync, so a timed
                     run steps as fast as an untimed one: llamadist.runtime.work_timer)
    schedule_ahead   on a GPU in one process (or a world of one rank under torchrun),
                     schedule and launch the next step before the current one's tokens
                     are back (decodes read them on the device),
                     so the host's work hides behind the device's (on by default: 1.28x
                     the output tokens/s of 256 requests on one H200; ignored on CPUs,
                     where the host is the device)
    dependent_launches  on a CUDA device of sm_90 or later (driver 12.3+), capture the
                     decode graphs' kernels as programmatic dependent launches: each of
                     llamadist's kernels (and Inductor's, where layers are compiled) may
                     start while the one before it ends, issuing what it does not read
                     from it (int4_rows: its weights) before it waits (kernels.gpu; on by
                     default: Llama-3-8B batch-1 decode on the H200 1.06x faster in bf16,
                     1.07-1.09x in int4 / int8 / fp8)
    ep_dispatch      experts spread over data-parallel replicas (--ep > tp): "gather" (all
                     tokens to every rank), "all_to_all" (only the routed rows travel) or
                     "auto" (per step by its token count: planning.cost.ep_dispatch_crossover)
    hot_experts      with ep_dispatch all_to_all or auto: copies of each layer's this many
                     most-loaded experts on every rank (parallel.expert replicas), by the
                     per-expert token counts in the JSON file ``expert_load`` ({layer:
                     [tokens per expert]}: a run's ``expert_load``, e.g. from --stats)
    """
    max_seq_len: int | None = None
    max_batch: int = 8
    max_batch_tokens: int | None = None
    dtype: str | None = None
    cuda_graphs: bool = True
    compile: bool | None = None
    compile_cache: str | None = None
    cpu_kernels: bool = True
    decode_attention: str = "split"
    eager_kernels: str = "triton"
    timeout: float = DEFAULT_TIMEOUT_S
    kv_block_size: int | None = None
    timed: bool = False
    schedule_ahead: bool = True
    dependent_launches: bool = True
    weights: str = "native"
    quant_activations: str = "float32"
    quantize: str | None = None
    quantize_head: bool = False
    wquant: str = field(default_factory=lambda: os.environ.get("LLAMADIST_WQUANT", "torch"))
    ep_dispatch: str = "auto"
    hot_experts: int = 0
    expert_load: str | None = None

    def __post_init__(self) -> None:
        parse_quantize(self.quantize)  # refuses a malformed --quantize here, before any load
        _one_of("--wquant (or LLAMADIST_WQUANT)", self.wquant, WQUANT_CHOICES)
        _one_of("--quant-activations", self.quant_activations, QUANT_ACTIVATIONS_CHOICES)
        _one_of("--weights", self.weights, WEIGHTS_CHOICES)
        _one_of("--ep-dispatch", self.ep_dispatch, EP_DISPATCH_CHOICES)
        if self.hot_experts < 0:
            raise ConfigError(f"--hot-experts must be >= 0, got {self.hot_experts}")
        if bool(self.hot_experts) != bool(self.expert_load):
            raise ConfigError("--hot-experts N and --expert-load FILE go together: N "
                              "replicated experts per layer, chosen by FILE's token counts")
        if self.hot_experts and self.ep_dispatch == "gather":
            raise ConfigError("--hot-experts needs --ep-dispatch all_to_all or auto (the "
                              "gather computes every expert at its owner)")
        if self.weights != "native" and self.dtype not in (None, self.weights):
            raise ConfigError(f"--weights {self.weights} with --dtype {self.dtype}: float "
                              f"weights run in the activation dtype; give one of the two")
        if self.max_seq_len is not None and self.max_seq_len < 1:
            raise ConfigError(f"--max-seq-len must be >= 1, got {self.max_seq_len}")
        if self.max_batch < 1:
            raise ConfigError(f"--max-batch must be >= 1, got {self.max_batch}")
        if self.max_batch_tokens is not None and self.max_batch_tokens < 1:
            raise ConfigError(f"--max-batch-tokens must be >= 1, got {self.max_batch_tokens}")
        if self.dtype is not None and self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"unknown dtype {self.dtype!r}; choose float32, bfloat16 or "
                              f"float16")
        _one_of("decode_attention", self.decode_attention, DECODE_ATTENTION_CHOICES)
        _one_of("--eager-kernels", self.eager_kernels, EAGER_KERNELS_CHOICES)
        if self.kv_block_size is not None and self.kv_block_size < 1:
            raise ConfigError(f"kv_block_size must be >= 1, got {self.kv_block_size}")
        if not self.timeout > 0:
            raise ConfigError(f"--timeout must be > 0 seconds, got {self.timeout}")

    def dtype_for(self, devices: str | list[str]) -> str:
        if self.dtype is None and self.weights != "native":
            return self.weights
        return self.dtype or default_dtype(devices)

    def quantize_for(self, device: str) -> str | None:
        """This run's weight format for the stage on ``device`` (module quantize_for)."""
        return quantize_for(self.quantize, device)

    def batch_tokens_for(self, devices: str | list[str]) -> int:
        if self.max_batch_tokens is not None:
            return max(self.max_batch, self.max_batch_tokens)
        return max(self.max_batch, 8192 if any(gpu_flags(devices)) else 2048)

    def block_size_for(self, devices: str | list[str]) -> int:
        if self.kv_block_size is not None:
            return self.kv_block_size
        return 16 if any(gpu_flags(devices)) else 128

    def seq_len_for(self, context: int, needed: int | None = None) -> int:
        """The KV-cache length for a model of ``context`` positions serving requests that
        need ``needed`` slots (prompt + new tokens; None: unknown). An explicit max_seq_len
        above the context is refused here, with the numbers."""
        if self.max_seq_len is not None:
            if self.max_seq_len > context:
                raise ConfigError(f"--max-seq-len {self.max_seq_len} is above the model's "
                                  f"context of {context} positions; use at most {context}")
            return self.max_seq_len
        if needed is not None:
            return min(context, (needed + 255) // 256 * 256)
        return min(context, DEFAULT_MAX_SEQ_LEN)

    def replace(self, **changes: Any) -> "RuntimeConfig":
        from dataclasses import replace
        return replace(self, **changes)


# Named shapes for benchmarks and planning without weights (random init).
NAMED_SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                         num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=100000.0,
                         max_position_embeddings=8192, tie_word_embeddings=True),
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
                      num_heads=32, num_kv_heads=32, head_dim=128, max_position_embeddings=4096),
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                      num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500000.0,
                      max_position_embeddings=8192),
    # Llama 3.1 8B: 128k context through llama3 RoPE scaling (the long-context baseline)
    "llama3.1-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                        num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                        rope_theta=500000.0, max_position_embeddings=131072,
                        rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 8192}),
    "llama3-70b": dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                       num_layers=80, num_heads=64, num_kv_heads=8, head_dim=128,
                       rope_theta=500000.0, max_position_embeddings=8192),
    "mixtral-8x7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                         num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                         rope_theta=1e6, max_position_embeddings=32768, num_experts=8,
                         num_experts_per_tok=2),
}


def named_shape(name: str) -> ModelConfig:
    if name not in NAMED_SHAPES:
        raise ConfigError(f"unknown shape {name!r}; known shapes: {', '.join(NAMED_SHAPES)}")
    return ModelConfig(**NAMED_SHAPES[name], rms_norm_eps=1e-5, torch_dtype="bfloat16")
