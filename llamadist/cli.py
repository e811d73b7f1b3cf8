"""Command line: llamadist analyze | plan | generate | chat | convert | bench."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, KeyError,
                                                IndexError, TypeError)


def _add_placement(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("placement")
    g.add_argument("--devices", help="comma list, e.g. cuda:0,cuda:1,cpu (default: cpu)")
    g.add_argument("--strategy", help="uniform | memory | compute | mixed | custom")
    g.add_argument("--max-memory", help="one budget per device, e.g. 20GiB,20GiB,64GiB")
    g.add_argument("--device-speed", help="relative speeds, e.g. 1,1,0.05")
    g.add_argument("--boundaries", help="custom half-open stages, e.g. 0:7,7:19,19:30")
    g.add_argument("--plan", help="a plan JSON file written by `llamadist plan --save`")
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="weights and activations (default: bfloat16 on CUDA, float32 on CPU)")
    g.add_argument("--max-seq-len", type=int, help="KV-cache length (default: what the request needs)")


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llamadist", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("analyze", help="per-layer parameters, bytes, FLOPs and KV bytes")
    p.add_argument("model")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("plan", help="cut the model across devices and show the stages")
    p.add_argument("model")
    _add_placement(p)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--json", action="store_true")
    p.add_argument("--save", help="write the plan as JSON")
    p.add_argument("--plot", help="draw memory and predicted time per device to a PNG")

    for name, hlp in (("generate", "generate text for one or more prompts"),
                      ("chat", "interactive chat with the model's chat template")):
        p = sub.add_parser(name, help=hlp)
        p.add_argument("model", help="HF folder, .gguf file, or alias smollm2-135m")
        _add_placement(p)
        _add_sampling(p, 128 if name == "generate" else 512)
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
    p.add_argument("model")
    _add_placement(p)
    p.add_argument("--prompts", help="file with one prompt per line")
    p.add_argument("--batch", type=int, default=4, help="number of prompts if no --prompts file")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--gen-len", type=int, default=32)
    p.add_argument("--json", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    handler: Callable[[argparse.Namespace], int] = COMMANDS[args.command]
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


def _cmd_analyze(args: argparse.Namespace) -> int:
    from llamadist.planning.commands import analyze_command
    from llamadist.weights.checkpoint import open_checkpoint
    config = open_checkpoint(args.model).config
    print(analyze_command(config, args.dtype, args.seq_len, args.json))
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from llamadist.planning.commands import plan_command
    from llamadist.weights.checkpoint import open_checkpoint
    config = open_checkpoint(args.model).config
    devices = args.devices or "cpu"
    dtype = args.dtype or ("bfloat16" if devices.startswith("cuda") else "float32")
    max_seq = args.max_seq_len or min(config.max_position_embeddings, 4096)
    print(plan_command(config, devices, args.max_memory, args.device_speed, args.strategy,
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
