"""The command line's flags, grouped as the commands share them, and the one place they turn
into a RuntimeConfig and SamplingParams. No torch import here: the parser must be fast."""

from __future__ import annotations

import argparse
import os

from llamadist.config import (DECODE_ATTENTION_CHOICES, DEFAULT_TIMEOUT_S, EP_DISPATCH_CHOICES,
                              QUANT_ACTIVATIONS_CHOICES, QUANTIZE_HELP, WEIGHTS_CHOICES,
                              WQUANT_CHOICES, EAGER_KERNELS_CHOICES, RuntimeConfig)
from llamadist.planning.devices import DEVICE_SPEED_HELP

DTYPE_CHOICES = ["float32", "bfloat16", "float16"]
# config.default_devices, in words (and `plan`, which plans for every device here)
DEVICES_DEFAULT = ("cuda:0 when a GPU is present, over processes each rank's own "
                   "cuda:LOCAL_RANK, else cpu; `plan`: every device here")
# What a user's input can cause, reported as one line; anything else (KeyError, TypeError,
# ...) is a bug in llamadist and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def int_or_list(text: str) -> int | list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or a comma list of integers, "
                                         f"got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be >= 1, got {text!r}")
    return values[0] if len(values) == 1 else values


def add_placement(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("placement")
    g.add_argument("--devices", "--device", dest="devices",
                   help="comma list, e.g. cuda:0,cuda:1,cpu (default: " + DEVICES_DEFAULT
                   + ")")
    g.add_argument("--strategy", choices=["uniform", "memory", "compute", "mixed", "custom"],
                   help="how to cut the layers over the devices (default: custom with "
                   "--boundaries, else uniform when it fits, else mixed)")
    g.add_argument("--max-memory", help="one budget per device, e.g. 20GiB,20GiB,64GiB "
                   "(default: the free memory of devices that are here)")
    g.add_argument("--device-speed", help=DEVICE_SPEED_HELP)
    g.add_argument("--boundaries", help="custom half-open stages, e.g. 0:7,7:19,19:30")
    g.add_argument("--plan", help="a plan JSON file written by `llamadist plan --save`")
    g.add_argument("--dtype", choices=DTYPE_CHOICES,
                   help="activations and float weights (default: bfloat16 on CUDA, float32 on CPU)")
    g.add_argument("--weights", choices=list(WEIGHTS_CHOICES),
                   help="a GGUF checkpoint's weights: native keeps Q4_0/Q4_1/Q8_0/Q4_K/Q5_K/"
                   "Q6_K blocks and F16/BF16 tensors as stored on CPU stages (default); a "
                   "float type dequantizes")
    g.add_argument("--max-seq-len", type=positive_int,
                   help="KV-cache length (default: what the request needs, at most the "
                   "model's context)")
    g.add_argument("--quantize", help="quantize the decoder layers' linear weights at load: "
                   + QUANTIZE_HELP + "; GPU stages run Triton kernels, CPU stages GGUF "
                   "Q8_0 / Q4_1 blocks")
    g.add_argument("--quantize-head", action="store_true",
                   help="quantize the output head too, in its stage's --quantize format (a "
                   "tied head gets its own quantized copy; a GGUF's head is quantized again "
                   "from its dequantized values, as the layers are; default: the head stays "
                   "as stored)")
    g.add_argument("--fit-bits", action="store_true",
                   help="when the model does not fit in its dtype, quantize the fewest "
                   "devices' weights (none -> int8 -> int4, slow devices first) until it "
                   "does; reports the bytes each stage saves (with --auto, or stages over "
                   "processes: one format for every device); not with --quantize")


def add_runtime(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("runtime")
    g.add_argument("--no-cuda-graphs", action="store_true",
                   help="decode eagerly on CUDA instead of replaying captured CUDA graphs")
    g.add_argument("--compile", dest="compile", action="store_const", const=True,
                   help="torch.compile the decoder layers inside the CUDA graphs (default: only "
                   "where it pays, quantized weights on torch's products (int4 where its "
                   "CUDA kernel runs: in batch buckets past its 16 rows) or MoE blocks)")
    g.add_argument("--no-compile", dest="compile", action="store_const", const=False,
                   help="never torch.compile: graphs capture the eager decoder layers")
    g.add_argument("--compile-cache", metavar="DIR",
                   help="keep each stage's torch.compile artifacts in DIR: a restarted worker "
                   "and the next start (even on a fresh host) find Inductor's compiled graphs "
                   "there instead of compiling them (dynamo still traces; llamadist's Triton "
                   "kernels compile into TRITON_CACHE_DIR)")
    g.add_argument("--max-batch", type=positive_int, help="sequences decoded at once (default: "
                   "every prompt of the request; more wait and join as others finish)")
    g.add_argument("--max-batch-tokens", type=positive_int, help="tokens one step computes at "
                   "most: decodes plus chunks of long prompts (default 8192 with GPUs, 2048 on CPUs)")
    g.add_argument("--kv-block-size", type=positive_int, help="tokens per paged KV block "
                   "(default 16 with GPUs, 128 on CPUs); under --cp, each rank's stripe")
    g.add_argument("--no-cpu-kernels", action="store_true",
                   help="decode on the CPU through PyTorch instead of llamadist's C kernels")
    g.add_argument("--quant-activations", choices=list(QUANT_ACTIVATIONS_CHOICES),
                   help="what native Q4_0/Q4_1/Q8_0 weights meet in the CPU GEMV: float32 "
                   "(default, exact) or int8 (x quantized per 32 as llama.cpp does: faster)")
    g.add_argument("--no-schedule-ahead", dest="schedule_ahead", action="store_false",
                   default=None, help="on a GPU: wait for each step's tokens before "
                   "scheduling the next (default: schedule ahead, hiding the host's work)")
    g.add_argument("--no-dependent-launches", dest="dependent_launches", action="store_false",
                   default=None, help="on an sm_90+ GPU: capture the decode step's kernels "
                   "as plain launches (default: programmatic dependent launches, each "
                   "kernel starting while the one before it ends; 1.06-1.09x faster decode)")
    g.add_argument("--decode-attention", choices=list(DECODE_ATTENTION_CHOICES),
                   help="one-token attention under CUDA graphs: split (the split-KV kernel, "
                   "default where it applies) or sdpa")
    g.add_argument("--eager-kernels", choices=list(EAGER_KERNELS_CHOICES),
                   help="a GPU's uncompiled layers (prefill, mixed steps, graphs of eager "
                   "layers): triton (fused add+RMSNorm, SiLU x up and RoPE kernels; default "
                   "where Triton runs) or torch (PyTorch's ops)")
    g.add_argument("--wquant", choices=list(WQUANT_CHOICES),
                   help="product of GPU-quantized weights (--quantize, GGUF on a GPU): torch "
                   "(tinygemm int4, scaled int8/fp8 matmul; default, or $LLAMADIST_WQUANT) or "
                   "triton (llamadist's Triton kernels)")


def add_grid(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("processes (tp x cp x pp x dp over torch.distributed)")
    g.add_argument("--pp", type=positive_int, help="pipeline stages, one process each "
                   "(default: nproc / (tp x cp x dp))")
    g.add_argument("--tp", type=positive_int, default=1, help="tensor-parallel ranks per stage")
    g.add_argument("--cp", type=positive_int, default=1, help="context-parallel ranks per "
                   "stage: each holds a stripe of every request's KV cache (long contexts)")
    g.add_argument("--dp", type=positive_int, help="data-parallel replicas (default: ep / tp, "
                   "else 1)")
    g.add_argument("--ep", type=positive_int, help="mixture-of-experts models: ranks each "
                   "stage's experts are spread over, tp or tp x dp (the replicas then step "
                   "together; default: tp)")
    g.add_argument("--ep-dispatch", choices=list(EP_DISPATCH_CHOICES),
                   help="with --ep over replicas: how tokens reach their experts: gather "
                   "(every rank's tokens to every rank), all_to_all (only the routed rows) "
                   "or auto (per step by its token count; default)")
    g.add_argument("--hot-experts", type=int, help="with --ep over replicas: copy each "
                   "layer's N most-loaded experts to every rank, which then computes them "
                   "for its own tokens (needs --expert-load)")
    g.add_argument("--expert-split", choices=["even", "memory"],
                   help="with --ep over replicas: each EP rank's share of the experts, even "
                   "or in proportion to its --max-memory budget (one per EP rank of each "
                   "stage: pp x ep entries); default: memory when those budgets differ, "
                   "else even")
    g.add_argument("--expert-load", metavar="FILE", help="JSON {layer: [tokens per "
                   "expert]} (a run's expert_load, as --stats prints it) for --hot-experts")


def grid_flags(args: argparse.Namespace) -> tuple[int | None, int, int, int | None]:
    """(pp, tp, dp, ep) as the flags give them, --dp filled in (planning.checks.grid_dp)."""
    from llamadist.planning.checks import grid_dp
    tp, ep = getattr(args, "tp", 1), getattr(args, "ep", None)
    return getattr(args, "pp", None), tp, grid_dp(tp, getattr(args, "dp", None), ep), ep


def add_processes(p: argparse.ArgumentParser) -> None:
    add_grid(p)
    g = p.add_argument_group("process control")
    g.add_argument("--nproc", type=positive_int, help="start this many local worker processes "
                   "(default: pp x tp x cp x dp); not needed under torchrun")
    g.add_argument("--timeout", type=positive_float, help="seconds before a silent or "
                   "stuck rank counts as lost; --on-failure then says what happens (default "
                   f"{DEFAULT_TIMEOUT_S:.0f})")
    g.add_argument("--on-failure", choices=("restart", "replan", "fail"), default="restart",
                   help="with --nproc, when a worker dies or hangs: restart it (on CPU the "
                   "replica's other workers keep their stages, TP and CP too; on GPUs the "
                   "whole replica) and replay its requests (default), plan its replica "
                   "again over the devices left (one stage fewer; with --dp in the "
                   "background) and replay, or fail the run")
    g.add_argument("--max-restarts", type=count, default=3,
                   help="worker restarts a run may use before it fails (default 3)")
    g.add_argument("--auto", action="store_true",
                   help="let the planner choose tp x pp x dp and the layer split for --devices")


def add_sampling(p: argparse.ArgumentParser, max_new: int) -> None:
    g = p.add_argument_group("sampling")
    # chat halves its default to fit a short KV cache (cli.jobs.chat_job)
    chat = p.prog.split()[-1] == "chat"
    g.add_argument("--max-new-tokens", type=positive_int, default=max_new,
                   help="tokens generated at most per " + (
                       f"reply (default {max_new}, or half the KV cache (--max-seq-len) "
                       f"when {max_new} does not fit it)" if chat else
                       f"prompt (default {max_new})"))
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k most likely "
                   "tokens only (default 0: all)")
    g.add_argument("--top-p", type=float, default=1.0, help="sample among the fewest most "
                   "likely tokens whose probabilities reach p (default 1.0: all)")
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens less likely than "
                   "min-p times the most likely one (default 0.0: none)")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="divide the "
                   "positive logits of tokens already in the prompt or reply by this, "
                   "multiply the negative ones (default 1.0: off)")
    g.add_argument("--seed", type=int, help="the request's sampling seed: the same seed, "
                   "prompt and flags give the same tokens (default: a fresh seed each run)")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def runtime_config(args: argparse.Namespace, max_batch: int = 1) -> RuntimeConfig:
    """The one RuntimeConfig of a run, from its flags (a flag not given keeps the default)."""
    given = {"max_seq_len": getattr(args, "max_seq_len", None),
             "dtype": getattr(args, "dtype", None),
             "timeout": getattr(args, "timeout", None),
             "decode_attention": getattr(args, "decode_attention", None),
             "eager_kernels": getattr(args, "eager_kernels", None),
             "weights": getattr(args, "weights", None),
             "quant_activations": getattr(args, "quant_activations", None),
             "schedule_ahead": getattr(args, "schedule_ahead", None),
             "dependent_launches": getattr(args, "dependent_launches", None),
             "quantize": getattr(args, "quantize", None),
             "wquant": getattr(args, "wquant", None),
             "quantize_head": getattr(args, "quantize_head", None) or None,
             "kv_block_size": getattr(args, "kv_block_size", None),
             "ep_dispatch": getattr(args, "ep_dispatch", None),
             "hot_experts": getattr(args, "hot_experts", None),
             "expert_load": getattr(args, "expert_load", None),
             "compile_cache": getattr(args, "compile_cache", None)}
    given["max_batch_tokens"] = getattr(args, "max_batch_tokens", None)
    asked = getattr(args, "max_batch", None)
    # at most the request's own sequences: the KV memory is planned for max_batch of them
    return RuntimeConfig(max_batch=min(asked, max_batch) if asked else max_batch,
                         cuda_graphs=not getattr(args, "no_cuda_graphs", False),
                         compile=getattr(args, "compile", None),
                         cpu_kernels=not getattr(args, "no_cpu_kernels", False),
                         timed=getattr(args, "command", None) == "bench"
                         or bool(getattr(args, "stats", False)),
                         **{k: v for k, v in given.items() if v is not None})


def sampling_params(args: argparse.Namespace):
    from llamadist.generation.sampling import SamplingParams
    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                          top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                          repetition_penalty=args.repetition_penalty, seed=args.seed,
                          stop=tuple(args.stop))


def in_worker() -> bool:
    """True inside a process started by torchrun or by the local launcher."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def read_lines(path: str, what: str) -> list[str]:
    """Non-empty lines of a text file, or a clear error naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            return [line.rstrip("\n") for line in f if line.strip()]
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"{what} {path} is a directory; give a text file, one prompt per "
                         f"line") from None
    except UnicodeDecodeError:
        raise ValueError(f"{what} {path} is not UTF-8 text; give a text file, one prompt per "
                         f"line") from None


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        prompts += read_lines(args.prompts_file, "--prompts-file")
    if not prompts:
        raise ValueError("no prompt given: pass --prompt TEXT (repeatable) or --prompts-file FILE")
    return prompts
