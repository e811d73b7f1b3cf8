"""llamadist's command line: analyze | plan | generate | chat | bench | serve | convert |
perplexity.

The parser and the dispatch. Every run command checks the whole request (layout, memory,
context) before any process starts or any weight loads; a user error ends with one
`llamadist: error: ...` line and exit code 2, a bug keeps its traceback."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

from llamadist.cli.args import (DTYPE_CHOICES, USER_ERRORS, add_grid, add_placement,
                                add_processes, add_runtime, add_sampling, int_or_list,
                                positive_float, positive_int)
from llamadist.cli.perplexity import add_perplexity
from llamadist.config import DEFAULT_MAX_SEQ_LEN, NAMED_SHAPES

Handler = Callable[[argparse.Namespace], int]


class Parser(argparse.ArgumentParser):
    """argparse with llamadist's one-line errors (the usage is one --help away)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"llamadist: error: {self.prog}: {message} (see {self.prog} --help)\n")

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        """Unknown flags are named with their command (and the flag meant, when one is
        close), not as the top-level parser's."""
        ns, extra = self.parse_known_args(args, namespace)
        if not extra:
            return ns
        import difflib
        sub = self
        if getattr(ns, "command", None) and self._subparsers is not None:
            sub = self._subparsers._group_actions[0].choices[ns.command]
        flags = [f for a in sub._actions for f in a.option_strings if f.startswith("--")]
        hints = [m for x in extra if x.startswith("-")
                 for m in difflib.get_close_matches(x.replace("_", "-"), flags, n=1,
                                                    cutoff=0.8)]
        hint = f"; did you mean {', '.join(hints)}?" if hints else ""
        sub.error(f"unrecognized arguments: {' '.join(extra)}{hint}")


def _add_shape_bench(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("random-weight shapes (no checkpoint)")
    g.add_argument("--shape", help=" | ".join(NAMED_SHAPES) + ": random weights built on "
                   "the device, random token ids")
    g.add_argument("--stages", default="1", help="pipeline stages on the one device, e.g. 1,2,4")
    g.add_argument("--graph-modes", help="decode paths to time: compiled,eager,auto,off "
                   "(default: auto, compiled where it pays, or what --compile/--no-compile/"
                   "--no-cuda-graphs say)")
    g.add_argument("--prefill-reps", type=positive_int, default=3)
    g.add_argument("--stage-stats", action="store_true", help="also a timed run per stage")
    g.add_argument("--json-out", help="write every measurement as JSON to this file")


def _add_plan(sub) -> None:
    p = sub.add_parser("plan", help="cut the model across devices and show the stages")
    p.add_argument("model", help="HF folder, .gguf file, alias, or a shape name (llama3-8b ...)")
    add_placement(p)
    p.add_argument("--batch-size", type=positive_int, default=1)
    p.add_argument("--json", action="store_true")
    p.add_argument("--save", help="write the plan as JSON")
    p.add_argument("--plot", help="draw memory and predicted time per device to a PNG")
    add_grid(p)  # --pp/--tp/--dp: also show which rank runs which stage
    g = p.add_argument_group("automatic layout (tp x pp x dp)")
    g.add_argument("--auto", action="store_true", help="search tp, pp, dp and the layer split")
    g.add_argument("--gpus", type=positive_int, help="GPUs in all (default: the --devices count)")
    g.add_argument("--nodes", type=positive_int, default=1, help="hosts the GPUs are spread over")
    g.add_argument("--objective", choices=["latency", "throughput"], default="latency")
    g.add_argument("--gpu-memory", default="80GiB", help="memory per GPU when not discovered")
    links = ["nvlink", "pcie", "infiniband", "ethernet"]
    g.add_argument("--intra-link", choices=links, default="nvlink",
                   help="the link between GPUs of a node (default nvlink)")
    g.add_argument("--inter-link", choices=links, default="infiniband",
                   help="the link between nodes (default infiniband)")
    g.add_argument("--intra-bw", type=positive_float, help="bytes/s inside a node "
                   "(overrides the link's)")
    g.add_argument("--inter-bw", type=positive_float, help="bytes/s between nodes "
                   "(overrides the link's)")
    g.add_argument("--intra-latency", type=positive_float, help="seconds per message inside "
                   "a node (overrides the link's)")
    g.add_argument("--inter-latency", type=positive_float, help="seconds per message between "
                   "nodes (overrides the link's)")


def _add_run(sub, name: str, hlp: str, max_new: int) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=hlp)
    p.add_argument("model", help="HF folder, .gguf file, or alias smollm2-135m")
    add_placement(p)
    add_runtime(p)
    add_sampling(p, max_new)
    add_processes(p)
    return p


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with metrics and a "
                       "web chat page")
    p.add_argument("model", help="HF folder, .gguf file, or alias smollm2-135m")
    add_placement(p)
    add_runtime(p)
    add_processes(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: "
                   "this host only; 0.0.0.0 for every interface)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/*")
    g.add_argument("--served-model-name", help="the model's name in the API (default: the "
                   "folder's name or the alias)")
    g.add_argument("--max-queue", type=positive_int, default=256, help="requests queued or "
                   "running at most; more are answered 429 (default 256)")
    g.add_argument("--stats", action="store_true", help="time each stage (per-stage busy "
                   "seconds in /metrics; on GPUs from CUDA events, without a sync)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="llamadist", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("analyze", help="per-layer parameters, bytes, FLOPs and KV bytes")
    p.add_argument("model")
    p.add_argument("--dtype", default="bfloat16", choices=DTYPE_CHOICES)
    p.add_argument("--seq-len", type=positive_int,
                   help="context for prefill FLOPs (default: the model's context, at most "
                   f"{DEFAULT_MAX_SEQ_LEN})")
    p.add_argument("--json", action="store_true")
    _add_plan(sub)

    p = _add_run(sub, "generate", "generate text for one or more prompts", 128)
    p.add_argument("--prompt", action="append", help="prompt text (repeatable)")
    p.add_argument("--prompts-file", help="a text file with one prompt per line")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt")
    p.add_argument("--stats", action="store_true", help="print per-stage statistics")
    p = _add_run(sub, "chat", "interactive chat with the model's chat template", 512)
    p.add_argument("--system", help="system message")

    _add_serve(sub)

    p = sub.add_parser("convert", help="write a Hugging Face folder from a GGUF file")
    p.add_argument("gguf", help="a .gguf file (or the alias smollm2-135m)")
    p.add_argument("out_dir", help="the folder to write (created if missing)")
    p.add_argument("--dtype", default="float32", choices=DTYPE_CHOICES)

    p = sub.add_parser("bench", help="latency and throughput of a batch through the split model")
    p.add_argument("model", nargs="?", help="a checkpoint (or give --shape for random weights)")
    add_placement(p)
    add_runtime(p)
    p.add_argument("--prompts", help="a text file with one prompt per line")
    p.add_argument("--batch", type=int_or_list, default=4,
                   help="number of prompts if no --prompts file (--shape: a list, e.g. 1,8,32)")
    _add_shape_bench(p)
    p.add_argument("--prompt-len", type=positive_int, default=64)
    p.add_argument("--gen-len", type=positive_int, default=32)
    add_processes(p)
    p.add_argument("--json", action="store_true")
    add_perplexity(sub)
    return parser


def _run(kind: str) -> Handler:
    def handler(args: argparse.Namespace) -> int:
        from llamadist.cli.run import run_command
        return run_command(kind, args)
    return handler


def _serve(args: argparse.Namespace) -> int:
    # Before torch (and its OpenMP runtime) loads: OpenMP workers that spin after each
    # parallel region starve the server's other threads and its HTTP process on a busy
    # CPU: SmolLM2-sized steps measured 10-100x slower on 2 cores (with the event loop
    # then next to the engine thread). Sleeping workers cost a wake-up per region
    # instead. The user's setting wins (the HTTP process inherits it).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return _run("serve")(args)


def _perplexity(args: argparse.Namespace) -> int:
    from llamadist.cli.perplexity import perplexity_cmd
    return perplexity_cmd(args)


def _planning(name: str) -> Handler:
    def handler(args: argparse.Namespace) -> int:
        import llamadist.cli.plan as planning_commands
        return getattr(planning_commands, name)(args)
    return handler


COMMANDS: dict[str, Handler] = {
    "analyze": _planning("analyze_cmd"),
    "plan": _planning("plan_cmd"),
    "convert": _planning("convert_cmd"),
    "generate": _run("generate"),
    "chat": _run("chat"),
    "bench": _run("bench"),
    "serve": _serve,
    "perplexity": _perplexity,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # workers rerun the command line
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return _dispatch(args)
    finally:
        # The command is done (its output written, its workers joined): Inductor's compile
        # workers, if this process started any, are killed now instead of being waited
        # for at exit (seconds when they were still starting: issue 13).
        from llamadist.runtime.compile_workers import stop_compile_workers
        try:
            stop_compile_workers()
        except Exception as e:  # noqa: BLE001 - the command's own result stands
            logging.getLogger(__name__).info("compile workers not stopped: %s: %s",
                                             type(e).__name__, e)


def _dispatch(args: argparse.Namespace) -> int:
    try:
        return COMMANDS[args.command](args) or 0
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader left (`... | head`): no error of the user's or ours, so nothing to say;
        # stdout now points at /dev/null so that flushing it at exit cannot fail again
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 141   # what a shell reports for a writer killed by SIGPIPE
    except USER_ERRORS as e:
        if args.verbose:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"llamadist: error: {msg}", file=sys.stderr)
        return 2
