"""Command line: llamadist analyze | plan | generate | chat | convert | bench."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from functools import partial

from llamadist.config import default_dtype
from llamadist.distributed.cli_args import (add_distributed_args, add_grid_args, in_worker,
                                             launch_workers, wants_distributed)

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, KeyError,
                                                IndexError, TypeError)


def _add_placement(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("placement")
    g.add_argument("--devices", "--device", dest="devices",
                   help="comma list, e.g. cuda:0,cuda:1,cpu (default: cpu)")
    g.add_argument("--strategy", help="uniform | memory | compute | mixed | custom")
    g.add_argument("--max-memory", help="one budget per device, e.g. 20GiB,20GiB,64GiB")
    g.add_argument("--device-speed", help="relative speeds, e.g. 1,1,0.05")
    g.add_argument("--boundaries", help="custom half-open stages, e.g. 0:7,7:19,19:30")
    g.add_argument("--plan", help="a plan JSON file written by `llamadist plan --save`")
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="weights and activations (default: bfloat16 on CUDA, float32 on CPU)")
    g.add_argument("--max-seq-len", type=int, help="KV-cache length (default: what the request needs)")
    g.add_argument("--no-cuda-graphs", action="store_true",
                   help="decode eagerly on CUDA instead of replaying captured CUDA graphs")
    g.add_argument("--no-compile", action="store_true",
                   help="capture the eager decoder layers (skip torch.compile's fused kernels)")


def _add_sampling(p: argparse.ArgumentParser, max_new: int = 128) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=max_new)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _int_or_list(text: str) -> int | list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    return values[0] if len(values) == 1 else values


def _add_shape_bench(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("random-weight shapes (llamadist.bench_gpu)")
    g.add_argument("--shape", help="llama3-8b | llama2-7b | llama3-70b | smollm2-135m: random "
                   "weights built on the device, random token ids, no checkpoint")
    g.add_argument("--stages", default="1", help="pipeline stages on the one device, e.g. 1,2,4")
    g.add_argument("--compare", choices=["hf"], help="also run transformers on the same weights")
    g.add_argument("--graph-modes", help="decode paths to time: compiled,eager,off "
                   "(default: compiled, or what --no-compile/--no-cuda-graphs say)")
    g.add_argument("--hf-gen-len", type=int, default=32, help="tokens per transformers run")
    g.add_argument("--prefill-reps", type=int, default=3)
    g.add_argument("--stage-stats", action="store_true", help="also a timed run per stage")
    g.add_argument("--load-compare", action="store_true",
                   help="write a safetensors checkpoint and time loading it unsplit vs 2 stages")
    g.add_argument("--load-repeats", type=int, default=2)
    g.add_argument("--checkpoint-dir", help="where --load-compare writes (default: temp dir)")
    g.add_argument("--json-out", help="write every measurement as JSON to this file")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llamadist", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("analyze", help="per-layer parameters, bytes, FLOPs and KV bytes")
    p.add_argument("model")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--seq-len", type=int,
                   help="context for prefill FLOPs (default: min(model context, 4096))")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("plan", help="cut the model across devices and show the stages")
    p.add_argument("model")
    _add_placement(p)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--json", action="store_true")
    p.add_argument("--save", help="write the plan as JSON")
    p.add_argument("--plot", help="draw memory and predicted time per device to a PNG")
    add_grid_args(p)  # --pp/--tp/--dp: also show which rank runs which stage
    g = p.add_argument_group("automatic layout (tp x pp x dp)")
    g.add_argument("--auto", action="store_true", help="search tp, pp, dp and the layer split")
    g.add_argument("--gpus", type=int, help="GPUs in all (default: the --devices count)")
    g.add_argument("--nodes", type=int, default=1, help="hosts the GPUs are spread over")
    g.add_argument("--objective", choices=["latency", "throughput"], default="latency")
    g.add_argument("--gpu-memory", default="80GiB", help="memory per GPU when not discovered")
    g.add_argument("--intra-bw", type=float, default=300e9, help="bytes/s inside a node")
    g.add_argument("--inter-bw", type=float, default=25e9, help="bytes/s between nodes")

    for name, hlp in (("generate", "generate text for one or more prompts"),
                      ("chat", "interactive chat with the model's chat template")):
        p = sub.add_parser(name, help=hlp)
        p.add_argument("model", help="HF folder, .gguf file, or alias smollm2-135m")
        _add_placement(p)
        _add_sampling(p, 128 if name == "generate" else 512)
        add_distributed_args(p)
        p.add_argument("--auto", action="store_true",
                       help="let the planner choose --tp/--pp/--dp and the split for --devices")
        if name == "generate":
            p.add_argument("--prompt", action="append", help="prompt text (repeatable)")
            p.add_argument("--prompts-file", help="a file with one prompt per line")
            p.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
            p.add_argument("--json", action="store_true", help="one JSON object per prompt")
            p.add_argument("--stats", action="store_true", help="print per-stage statistics")
        else:
            p.add_argument("--system", help="system message")

    p = sub.add_parser("convert", help="write a Hugging Face folder from a GGUF file")
    p.add_argument("gguf")
    p.add_argument("out_dir")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])

    p = sub.add_parser("bench", help="latency and throughput of a batch through the split model")
    p.add_argument("model", nargs="?", help="a checkpoint (or give --shape for random weights)")
    _add_placement(p)
    p.add_argument("--prompts", help="file with one prompt per line")
    p.add_argument("--batch", type=_int_or_list, default=4,
                   help="number of prompts if no --prompts file (--shape: a list, e.g. 1,8,32)")
    _add_shape_bench(p)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--gen-len", type=int, default=32)
    add_distributed_args(p)
    p.add_argument("--json", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # workers rerun the command line
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    handler: Callable[[argparse.Namespace], int] = COMMANDS[args.command]
    if args.command != "plan" and getattr(args, "auto", False):
        try:
            apply_auto_layout(args)
        except USER_ERRORS as e:
            print(f"llamadist: error: {e}", file=sys.stderr)
            return 2
    if args.command in ("generate", "chat", "bench") and wants_distributed(args) and not in_worker():
        handler = partial(launch_workers, args.command)  # start workers before importing torch
    try:
        return handler(args) or 0
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        if args.verbose:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"llamadist: error: {msg}", file=sys.stderr)
        return 2


def _drop_options(argv: list[str], flags: set[str], valued: set[str]) -> list[str]:
    """argv without the given flags and valued options (``--opt V`` or ``--opt=V``)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in flags or a.split("=", 1)[0] in valued and "=" in a:
            continue
        elif a in valued:
            skip = True
        else:
            out.append(a)
    return out


def apply_auto_layout(args: argparse.Namespace) -> None:
    """`--auto` on generate/chat/bench: let the planner pick tp x pp x dp and the layer split
    for the given devices, then run as if those flags had been typed (workers rerun argv)."""
    from llamadist.planning.auto import auto_plan
    from llamadist.planning.devices import parse_devices
    from llamadist.planning.profile import profile
    config = model_config(args.model)
    devices = args.devices or "cpu"
    dtype = args.dtype or default_dtype(devices)
    max_seq = args.max_seq_len or min(config.max_position_embeddings, 4096)
    specs = parse_devices(devices, args.max_memory, args.device_speed)
    best = auto_plan(profile(config, dtype=dtype, seq_len=max_seq), specs, objective="latency",
                     max_seq_len=max_seq, config=config, top=1)[0]
    bounds = ",".join(f"{s.start}:{s.end}" for s in best.stages)
    nproc = best.tp * best.pp * best.dp
    used = [s.devices[0] for s in best.stages]
    kinds = {d.split(":")[0] for d in used}
    # One process: the stage's own device. Over processes: one kind means each rank takes
    # its own device of that kind (cuda:LOCAL_RANK); mixed kinds are named per stage.
    devs = used[0] if nproc == 1 else (kinds.pop() if len(kinds) == 1 else ",".join(used))
    flags = ["--tp", str(best.tp), "--pp", str(best.pp), "--dp", str(best.dp), "--nproc",
             str(nproc), "--boundaries", bounds, "--devices", devs]
    args.tp, args.pp, args.dp, args.nproc = best.tp, best.pp, best.dp, nproc
    args.boundaries, args.strategy, args.auto, args.devices = bounds, "custom", False, devs
    args.max_memory = args.device_speed = None  # budgets were for the planner's device list
    args.argv = _drop_options(args.argv, {"--auto"}, {"--devices", "--device", "--max-memory",
                                                       "--device-speed", "--strategy"}) + flags
    print(f"auto layout: {best.label} with stages {bounds} ({best.why})", file=sys.stderr)


def _cmd_analyze(args: argparse.Namespace) -> int:
    from llamadist.planning.commands import analyze_command
    config = model_config(args.model)
    print(analyze_command(config, args.dtype, args.seq_len, args.json))
    return 0


def model_config(model: str):
    """A checkpoint's config, or a named shape's (planning needs no weights)."""
    from llamadist.config import NAMED_SHAPES, named_shape
    from llamadist.weights.checkpoint import open_checkpoint
    return named_shape(model) if model in NAMED_SHAPES else open_checkpoint(model).config


def _cmd_auto_plan(args: argparse.Namespace, config, dtype: str, max_seq: int) -> int:
    from llamadist.planning.auto import auto_plan, format_auto_plans
    from llamadist.planning.devices import parse_devices
    from llamadist.planning.profile import profile
    prof = profile(config, dtype=dtype, seq_len=max_seq)
    devices = None if args.gpus else parse_devices(args.devices, args.max_memory, args.device_speed)
    cands = auto_plan(prof, devices, gpus=args.gpus, nodes=args.nodes,
                      gpu_memory=args.gpu_memory, intra_bw=args.intra_bw, inter_bw=args.inter_bw,
                      objective=args.objective, batch_size=args.batch_size, max_seq_len=max_seq,
                      config=config)
    if args.json:
        print(json.dumps([c.to_dict() for c in cands], indent=2))
    else:
        print(format_auto_plans(cands))
    if args.save:
        cands[0].to_plan(prof.model, config.num_layers, prof.dtype).save(args.save)
        print(f"saved the winning layout's plan to {args.save}", file=sys.stderr)
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from llamadist.planning.commands import plan_command
    config = model_config(args.model)
    dtype = args.dtype or default_dtype(args.devices or "cpu")
    max_seq = args.max_seq_len or min(config.max_position_embeddings, 4096)
    if args.auto:
        return _cmd_auto_plan(args, config, dtype, max_seq)
    if args.pp or args.tp > 1 or args.dp > 1:
        from llamadist.distributed.layout import plan_ranks_command
        print(plan_ranks_command(config, args, dtype, max_seq))
        return 0
    strategy = args.strategy or ("custom" if args.boundaries else "uniform")
    # devices None with --plan: the plan file's own devices
    devices = args.devices or (None if args.plan else "cpu")
    print(plan_command(config, devices, args.max_memory, args.device_speed, strategy,
                       args.boundaries, args.plan, args.batch_size, max_seq, dtype, args.json,
                       args.save, args.plot))
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from llamadist.weights.checkpoint import resolve_model_path
    from llamadist.weights.gguf import convert_gguf_to_hf
    out = convert_gguf_to_hf(resolve_model_path(args.gguf), args.out_dir, dtype=args.dtype)
    print(f"wrote {out}")
    return 0


def _lazy(module: str, name: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        import importlib
        return getattr(importlib.import_module(module), name)(args)
    return run


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "analyze": _cmd_analyze,
    "plan": _cmd_plan,
    "convert": _cmd_convert,
    "generate": _lazy("llamadist.commands", "generate_cmd"),
    "chat": _lazy("llamadist.commands", "chat_cmd"),
    "bench": _lazy("llamadist.commands", "bench_cmd"),
}

if __name__ == "__main__":
    sys.exit(main())
