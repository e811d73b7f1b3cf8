"""generate, chat, bench and serve: the request is checked in full (Job), then run in this process
or over worker processes (cli.front starts and watches them from this process, which runs
the engine; cli.ranks is what each worker runs)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace

from llamadist.cli.args import in_worker
from llamadist.cli.jobs import JOBS, Job, print_sequences, release_ports, reserved_socket


def run_command(kind: str, args: argparse.Namespace) -> int:
    """Entry point of the four run commands."""
    if kind == "bench" and getattr(args, "shape", None):
        from llamadist.cli.bench_shape import bench_shape_cmd
        refuse_with_shape(args)
        return bench_shape_cmd(args)
    if kind == "bench" and not args.model:
        raise ValueError("give a model (checkpoint folder, .gguf or alias) or --shape NAME")
    if in_worker():
        from llamadist.cli.ranks import run_rank
        return run_rank(kind, args, COMMANDS[kind])
    from llamadist.weights.checkpoint import open_checkpoint
    ckpt = open_checkpoint(args.model)
    tok = ckpt.tokenizer()
    job = JOBS[kind](args, ckpt, tok)
    if job.layout.lockstep:
        release_ports()  # rank 0 binds the server's port again, and serves
        return launch_ranks(kind, args, job)
    if job.layout.processes > 1:
        from llamadist.cli.front import run_front
        return run_front(kind, args, job, ckpt, tok, COMMANDS[kind])
    # an interactive command's first token should not wait for every bucket's capture
    tty = sys.stderr.isatty()
    if not tty:  # no progress bar in a log: say what the wait is for
        print(f"loading {ckpt.path} ...", file=sys.stderr, flush=True)
    llm = load_llm(job, ckpt, tok, progress=tty, warmup=kind not in INTERACTIVE)
    return COMMANDS[kind](args, job, llm)


def refuse_with_shape(args: argparse.Namespace) -> None:
    """bench --shape runs random weights in this process: process and plan flags would be
    ignored, so they are refused."""
    given = [flag for flag, on in (("--nproc", args.nproc), ("--pp", args.pp),
                                   ("--tp", args.tp > 1), ("--dp", args.dp),
                                   ("--cp", getattr(args, "cp", 1) > 1), ("--ep", args.ep),
                                   ("--auto", args.auto), ("--plan", args.plan),
                                   ("--fit-bits", getattr(args, "fit_bits", False)),
                                   ("--timeout", args.timeout), ("a model", args.model)) if on]
    if given:
        raise ValueError(f"bench --shape runs random weights in one process; drop "
                         f"{', '.join(given)} (or bench a checkpoint instead of --shape)")


def launch_ranks(kind: str, args: argparse.Namespace, job: Job) -> int:
    """Experts spread over data-parallel replicas (--ep tp x dp) need every replica in one
    world, stepping together: rank 0 is then the front (as under torchrun) and a lost rank
    ends the run (the front of cli.front gives each replica a world of its own)."""
    from llamadist.cli.layout import LAYOUT_ENV
    from llamadist.distributed.launch import Launcher
    env = {**os.environ, LAYOUT_ENV: job.layout.to_json()}
    return Launcher(["-m", "llamadist", *args.argv], job.layout.processes, env=env,
                    stdin_to_rank0=kind == "chat", term_to_rank0=kind == "serve").run()


def load_llm(job: Job, ckpt, tok, progress: bool = False, warmup: bool = True):
    from llamadist.api import LLM
    return LLM(ckpt, tokenizer=tok, layout=job.layout, runtime=job.runtime, progress=progress,
               warmup=warmup)


def since_start(t: float) -> float | None:
    """``t`` (time.monotonic) as seconds since this process started, interpreter start-up
    included (Linux: /proc's start time, in clock ticks since boot, against the boot-time
    clock; 10 ms grained; not /proc/uptime, which a container's lxcfs may rewrite) -> None
    where the system cannot say."""
    try:
        with open("/proc/self/stat", "rb") as f:
            stat = f.read()
        uptime = time.clock_gettime(time.CLOCK_BOOTTIME)
        ticks = int(stat[stat.rfind(b")") + 2:].split()[19])  # field 22: starttime
        age = uptime - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):  # AttributeError: no
        return None                                            # CLOCK_BOOTTIME here
    return round(t - (time.monotonic() - age), 3)


def _echo(_: int, out) -> None:
    sys.stdout.write(out.text)
    sys.stdout.flush()


def _generate(args: argparse.Namespace, job: Job, llm) -> int:
    streaming = len(job.prompts) == 1 and not args.json
    reqs, stats = llm.run(job.encoded, job.params, _echo if streaming else None)
    first = min((r.first_token_s for r in reqs if r.first_token_s is not None), default=None)
    # what a user of the command waits: from the process's start, imports and load included
    stats["first_token_since_start_s"] = None if first is None else since_start(first)
    stats["done_since_start_s"] = since_start(time.monotonic())
    seqs = [{"prompt_token_ids": r.prompt_ids, "token_ids": r.output_ids, "text": r.text,
             "finish_reason": r.finish_reason, "seed": r.seed} for r in reqs]
    print_sequences(args, job.prompts, seqs, stats, streaming)
    print(f"prefill {stats['prefill_s'] * 1e3:.1f} ms, decode {stats['decode_tokens_per_s']:.1f} "
          f"tokens/s, {stats['tokens_per_s']:.1f} output tokens/s overall "
          f"({job.layout.pp} stage(s) x {job.layout.processes} process(es), {llm.dtype}, "
          f"at most {job.runtime.max_batch} sequences at once)", file=sys.stderr)
    if args.stats:
        print(json.dumps({k: stats[k] for k in ("first_token_since_start_s",
                                                "done_since_start_s")}), file=sys.stderr)
        for s in llm.final_stage_stats():
            print(json.dumps(s), file=sys.stderr)
        print(json.dumps(llm.llm_engine.stats.to_dict() | llm.llm_engine.gauges()),
              file=sys.stderr)
    return 0


def _chat(args: argparse.Namespace, job: Job, llm) -> int:
    from llamadist.cli.chat import ChatSession
    chat = ChatSession(args.system, llm.tokenizer.encode_chat, job.max_seq_len)
    while (ids := chat.next_prompt(job.params)) is not None:
        reply = []
        try:
            for piece in llm.stream_ids(ids, job.params):
                reply.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            print("\n(interrupted)", file=sys.stderr)
        print()
        chat.answered("".join(reply))
    return 0


def _bench(args: argparse.Namespace, job: Job, llm) -> int:
    # A warm-up of the whole batch's shapes (first calls allocate, pick kernels, capture
    # graph buckets) on other tokens, so the timed run finds nothing in the prefix cache.
    vocab = llm.config.vocab_size
    warm = replace(job, encoded=[[(t + 1) % vocab for t in p] for p in job.encoded],
                   params=replace(job.params, max_new_tokens=3))
    llm.run(warm.encoded, warm.params)
    llm.llm_engine.reset_stats()  # the engine's counters now, every stage's at the next step
    _, st = llm.run(job.encoded, job.params)
    wall = st["wall_s"]
    stages = llm.final_stage_stats()
    for s in stages:  # compute time is device time (bench runs timed: CUDA events, no sync)
        s["busy"] = s["compute_s"] / wall if wall else 0.0
    loads = [s.get("load_s", 0.0) for s in stages]  # one after another in one process
    load_s = sum(loads) if job.layout.processes == 1 else max(loads, default=0.0)
    report = {"batch": len(job.encoded), "prompt_tokens": st["prompt_tokens"],
              "gen_len": args.gen_len, "generated_tokens": st["generated_tokens"],
              "load_s": load_s, "prefill_s": st["prefill_s"],
              # --gen-len 1: the prefill samples the only token, no decode step runs
              "decode_ms_per_step": (1e3 * st["decode_s"] / (args.gen_len - 1)
                                     if args.gen_len > 1 else 0.0),
              "decode_tokens_per_s": st["decode_tokens_per_s"],
              "tokens_per_s": st["tokens_per_s"], "ttft_p50_s": st["ttft_p50_s"],
              "tpot_p50_s": st["tpot_p50_s"], "wall_s": wall,
              "engine": llm.llm_engine.stats.to_dict() | llm.llm_engine.gauges(),
              "processes": job.layout.processes, "stages": stages}
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"batch {report['batch']}, {report['prompt_tokens']} prompt tokens, {args.gen_len} new "
          f"each; load {load_s:.2f} s; prefill {st['prefill_s'] * 1e3:.1f} ms; decode "
          f"{report['decode_ms_per_step']:.2f} ms/step, {st['decode_tokens_per_s']:.1f} tokens/s;"
          f" overall {st['tokens_per_s']:.1f} output tokens/s")
    print(f"{'stage':>5} {'layers':>9} {'device':>8} {'compute s':>10} {'transfer s':>10} "
          f"{'MB in':>8} {'busy %':>7}")
    for s in report["stages"]:
        busy = 100 * s["busy"]
        print(f"{s['stage']:>5} {s['layers'][0]:>4}:{s['layers'][1]:<4} {s['device']:>8} "
              f"{s['compute_s']:>10.3f} {s['transfer_s']:>10.4f} {s['bytes_in'] / 1e6:>8.2f} "
              f"{busy:>6.1f}%")
    loads = [v for s in report["stages"] for v in s.get("expert_load", {}).values()]
    if loads:  # routing balance: each expert's share of the routed tokens, over all layers
        shares = [c / max(1, sum(layer)) for layer in loads for c in layer]
        worst = max(max(layer) * len(layer) / max(1, sum(layer)) for layer in loads)
        print(f"routing over {len(loads)} MoE layers: an expert's share of a layer's routed "
              f"tokens ranges {min(shares):.1%}-{max(shares):.1%} (uniform "
              f"{1 / len(loads[0]):.1%}; busiest expert {worst:.2f}x the mean); per layer in "
              f"--json (stages[].expert_load)")
    return 0


def _serve(args: argparse.Namespace, job: Job, llm) -> int:
    from llamadist.serve.server import serve
    return serve(args, job, llm, reserved_socket(args.host, args.port))


COMMANDS = {"generate": _generate, "chat": _chat, "bench": _bench, "serve": _serve}
INTERACTIVE = ("generate", "chat")  # no warm-up: graphs are captured as buckets first run
