"""generate, chat and bench as one rank of a multi-process run (started by the launcher or
by torchrun): rank 0 builds the Job (the front process's layout when it started us) and
broadcasts what every rank must agree on; every rank loads its stage and runs the pipeline
loop; rank 0 prints."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import asdict, replace
from typing import Any

from llamadist.cli.args import USER_ERRORS, runtime_config
from llamadist.cli.chat import ChatSession
from llamadist.cli.jobs import (Job, bench_job, chat_job, generate_job, inherited_layout,
                                print_sequences)
from llamadist.config import RuntimeConfig
from llamadist.distributed.faults import EXIT_PEER_LOST, PeerError
from llamadist.generation.sampling import SamplingParams, request_seeds
from llamadist.runtime.pipeline import PipelineSpec, Request
from llamadist.runtime.worker import Session, setup_worker_logging

log = logging.getLogger(__name__)


def run_rank(kind: str, args: argparse.Namespace) -> int:
    rank = int(os.environ["RANK"])
    setup_worker_logging(rank, args.verbose)
    # The grid: the layout the front process decided (--auto included), else the flags.
    layout = inherited_layout()
    pp, tp, dp, devices = ((layout.pp, layout.tp, layout.dp, ",".join(layout.devices))
                           if layout else (args.pp, args.tp, args.dp, args.devices))
    try:
        # the timeout is needed before rank 0's Job exists: the flags' RuntimeConfig gives it
        session = Session.start(pp, tp, dp, runtime_config(args).timeout, devices)
        code = {"generate": _generate, "chat": _chat, "bench": _bench}[kind](session, args)
        session.close()
        return code
    except PeerError as e:
        _die(rank, str(e), EXIT_PEER_LOST)
    except KeyboardInterrupt:
        _die(rank, "interrupted", 130)
    except USER_ERRORS as e:
        if args.verbose:
            log.exception("rank %d failed", rank)
        _die(rank, str(e).strip().splitlines()[0] if str(e).strip() else repr(e), 2)
    except Exception:  # noqa: BLE001 - any other failure: say which rank, then leave
        log.exception("rank %d failed", rank)
        _die(rank, "see the traceback above", 1)
    return 1  # not reached


def _die(rank: int, message: str, code: int) -> None:
    """Report and leave at once: the interpreter's teardown could hang on a process group
    whose peers are gone, and the launcher is waiting for this exit to clean up."""
    sys.stdout.flush()
    sys.stderr.write(f"llamadist[rank {rank}]: error: {message}\n")
    sys.stderr.flush()
    os._exit(code)


def _spec(session: Session, job: Job) -> PipelineSpec:
    """What every rank must agree on before loading, from rank 0's Job."""
    g, layout = session.groups, job.layout
    if (layout.pp, layout.tp, layout.dp) != (g.pp_size, g.tp_size, g.dp_size):
        raise ValueError(f"the layout (pp={layout.pp} tp={layout.tp} dp={layout.dp}) does not "
                         f"match the process grid (pp={g.pp_size} tp={g.tp_size} "
                         f"dp={g.dp_size}): give the same --pp/--tp/--dp to every rank")
    per_replica = -(-max(1, len(job.encoded)) // g.dp_size)
    return PipelineSpec([(r.start, r.stop) for r in layout.layer_ranges],
                        job.runtime.dtype_for(list(layout.devices)), per_replica,
                        job.max_seq_len, job.runtime.micro_batches_for(g.pp_size, per_replica))


def _agree(session: Session, decide) -> Any:
    """Rank 0 runs ``decide()``; its result (or its user error) reaches every rank."""
    setup: Any = None
    if session.is_driver:
        try:
            setup = decide()
        except USER_ERRORS as e:
            setup = ("error", str(e).strip().splitlines()[0] if str(e).strip() else repr(e))
    setup = session.broadcast(setup, "the layout")
    if isinstance(setup, tuple) and setup and setup[0] == "error":
        if session.is_driver:
            print(f"llamadist: error: {setup[1]}", file=sys.stderr)
        return None
    return setup


def _open(args: argparse.Namespace):
    from llamadist.weights.checkpoint import open_checkpoint
    ckpt = open_checkpoint(args.model)
    return ckpt, ckpt.tokenizer()


def _report(session: Session) -> list[dict] | None:
    """Every rank's statistics (and, from each replica's first stage, its sequences)."""
    g, runner = session.groups, session.runner
    assert runner is not None
    st = runner.stage
    mine = {"rank": g.rank, "dp": g.dp_index, "pp": g.pp_index, "tp": g.tp_index,
            "layers": [st.layers.start, st.layers.stop], "device": str(st.device),
            **runner.stats.to_dict(), "wait_s": runner.p2p.stats.wait_s,
            "bytes_sent": runner.p2p.stats.bytes_sent}
    if g.pp.is_first and g.tp_index == 0:
        mine["sequences"] = [asdict(s) for s in runner.sequences]
    return session.gather(mine)


def _sequences(reports: list[dict]) -> list[dict]:
    """Results in prompt order: replica 0's sequences, then replica 1's, …"""
    firsts = sorted((r for r in reports if "sequences" in r), key=lambda r: r["dp"])
    return [s for r in firsts for s in r["sequences"]]


def _generate(session: Session, args: argparse.Namespace) -> int:
    ckpt, tok = _open(args)

    def decide() -> tuple[RuntimeConfig, PipelineSpec, Request, list[str]]:
        job = generate_job(args, ckpt, tok)
        spec = _spec(session, job)
        seeds = request_seeds([job.params] * len(job.encoded))  # rank 0 draws, every rank uses
        req = Request(job.encoded, job.params, spec.micro_batches, seeds=seeds)
        return job.runtime, spec, req, job.prompts

    setup = _agree(session, decide)
    if setup is None:
        return 2 if session.is_driver else 0
    runtime, spec, req, prompts = setup  # rank 0's RuntimeConfig: one for every rank
    runner = session.load(ckpt, spec, tok, progress=session.is_driver and sys.stderr.isatty(),
                          runtime=runtime)
    streaming = session.is_driver and len(req.prompts) == 1 and not args.json
    for step in runner.run(req):
        if streaming:
            sys.stdout.write("".join(e.text for e in step))
            sys.stdout.flush()
    reports = _report(session)
    if session.is_driver:
        _print_generate(args, prompts, _sequences(reports), reports, spec, streaming)
    return 0


def _print_generate(args: argparse.Namespace, prompts: list[str], seqs: list[dict],
                    reports: list[dict], spec: PipelineSpec, streaming: bool) -> None:
    r0 = reports[0]
    stats = {"prefill_s": r0["prefill_s"], "decode_s": r0["decode_s"],
             "prompt_tokens": sum(len(s["prompt_token_ids"]) for s in seqs),
             "decode_tokens_per_s": r0["decode_tokens"] / r0["decode_s"] if r0["decode_s"] else 0.0}
    print_sequences(args, prompts, seqs, stats, streaming)
    print(f"prefill {stats['prefill_s'] * 1e3:.1f} ms, decode {stats['decode_tokens_per_s']:.1f} "
          f"tokens/s ({len(spec.layer_ranges)} stage(s) x {len(reports)} process(es), "
          f"{spec.micro_batches} micro-batch(es), {spec.dtype})", file=sys.stderr)
    if args.stats:
        for r in reports:
            print(json.dumps({k: v for k, v in r.items() if k != "sequences"}), file=sys.stderr)


def _chat(session: Session, args: argparse.Namespace) -> int:
    ckpt, tok = _open(args)

    def decide() -> tuple[RuntimeConfig, PipelineSpec, SamplingParams]:
        job = chat_job(args, ckpt, tok)
        return job.runtime, _spec(session, job), job.params

    setup = _agree(session, decide)
    if setup is None:
        return 2 if session.is_driver else 0
    runtime, spec, params = setup
    runner = session.load(ckpt, spec, tok, progress=session.is_driver and sys.stderr.isatty(),
                          runtime=runtime)
    chat = ChatSession(args.system, tok.encode_chat, spec.max_seq_len) \
        if session.is_driver else None
    while True:
        ids = chat.next_prompt(params) if chat else None
        req = session.broadcast(Request([ids], params, 1, seeds=request_seeds([params]))
                                if ids else None)
        if req is None:
            return 0
        reply = []
        for step in runner.run(req):
            if chat:
                for e in step:
                    reply.append(e.text)
                    sys.stdout.write(e.text)
                sys.stdout.flush()
        if chat:
            print()
            chat.answered("".join(reply))


def _bench(session: Session, args: argparse.Namespace) -> int:
    ckpt, tok = _open(args)

    def decide() -> tuple[RuntimeConfig, PipelineSpec, Request]:
        job = bench_job(args, ckpt, tok)
        spec = _spec(session, job)
        return job.runtime, spec, Request(job.encoded, job.params, spec.micro_batches)

    setup = _agree(session, decide)
    if setup is None:
        return 2 if session.is_driver else 0
    runtime, spec, req = setup
    t0 = time.perf_counter()
    runner = session.load(ckpt, spec, tok, runtime=runtime)
    load_s = time.perf_counter() - t0
    # One short warm-up request: first calls allocate and pick kernels on every rank.
    for _ in runner.run(replace(req, params=replace(req.params, max_new_tokens=2))):
        pass
    session.gather(None)  # line every rank up before the timed run
    for _ in runner.run(req):
        pass
    reports = _report(session)
    if session.is_driver:
        _print_bench(args, req, spec, reports, load_s)
    return 0


def _print_bench(args: argparse.Namespace, req: Request, spec: PipelineSpec,
                 reports: list[dict], load_s: float) -> None:
    r0 = reports[0]
    wall = max(r["wall_s"] for r in reports)
    steps = max(1, args.gen_len - 1)
    busy = [(r["compute_s"] + r["sample_s"]) / r["wall_s"] if r["wall_s"] else 0.0
            for r in reports]
    report = {"batch": len(req.prompts), "prompt_tokens": sum(map(len, req.prompts)),
              "gen_len": args.gen_len, "processes": len(reports),
              "stages": len(spec.layer_ranges), "micro_batches": spec.micro_batches,
              "load_s": load_s, "prefill_s": r0["prefill_s"],
              "decode_ms_per_step": 1e3 * r0["decode_s"] / steps,
              "decode_tokens_per_s": r0["decode_tokens"] / r0["decode_s"] if r0["decode_s"] else 0,
              "tokens_per_s": len(req.prompts) * args.gen_len / wall if wall else 0.0,
              "wall_s": wall, "bubble": 1 - sum(busy) / len(busy),
              "ranks": [{k: v for k, v in r.items() if k != "sequences"} | {"busy": b}
                        for r, b in zip(reports, busy)]}
    if args.json:
        print(json.dumps(report))
        return
    print(f"batch {report['batch']}, {report['prompt_tokens']} prompt tokens, {args.gen_len} new "
          f"each; {report['processes']} processes, {report['stages']} stages, "
          f"{spec.micro_batches} micro-batches; load {load_s:.2f} s; prefill "
          f"{r0['prefill_s'] * 1e3:.1f} ms; decode {report['decode_ms_per_step']:.2f} ms/step, "
          f"{report['decode_tokens_per_s']:.1f} tokens/s; overall {report['tokens_per_s']:.1f} "
          f"tokens/s in {wall:.2f} s")
    print(f"{'rank':>4} {'stage':>5} {'layers':>9} {'device':>8} {'busy s':>8} {'wait s':>8} "
          f"{'wall s':>8} {'MB sent':>8} {'busy %':>7}")
    for r, b in zip(reports, busy):
        print(f"{r['rank']:>4} {r['pp']:>5} {r['layers'][0]:>4}:{r['layers'][1]:<4} "
              f"{r['device']:>8} {r['compute_s'] + r['sample_s']:>8.3f} {r['wait_s']:>8.3f} "
              f"{r['wall_s']:>8.3f} {r['bytes_sent'] / 1e6:>8.2f} {100 * b:>6.1f}%")
    print(f"pipeline bubble (idle share of the stages' time): {100 * report['bubble']:.1f}%")
