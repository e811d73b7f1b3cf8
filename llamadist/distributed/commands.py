"""generate, chat and bench over processes.

Outside a worker these commands launch ``nproc`` local workers running the same command
line (``distributed.launch``); inside one (started by torchrun or by the launcher) they
run the session: rank 0 plans, tokenizes and broadcasts; every rank loads its stage and
runs the pipeline loop; rank 0 prints. Single-process runs never come here.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import asdict, replace
from typing import Any

from llamadist.distributed.faults import EXIT_PEER_LOST, PeerError
from llamadist.distributed.cli_args import in_worker, launch_workers
from llamadist.distributed.layout import plan_layout, stage_devices
from llamadist.distributed.session import Session, setup_worker_logging
from llamadist.generation.generate import check_context, fit_history
from llamadist.generation.sampling import SamplingParams
from llamadist.runtime.pipeline import PipelineSpec, Request

log = logging.getLogger(__name__)

USER_ERRORS = (ValueError, FileNotFoundError, KeyError, IndexError, TypeError)


def run_distributed(kind: str, args: argparse.Namespace) -> int:
    """Entry point from llamadist.commands for "generate", "chat" and "bench"."""
    if not in_worker():
        return launch_workers(kind, args)
    world = int(os.environ["WORLD_SIZE"])
    if args.nproc is not None and args.nproc != world:
        raise ValueError(f"--nproc {args.nproc} but torchrun started {world} processes")
    rank = int(os.environ["RANK"])
    setup_worker_logging(rank, args.verbose)
    try:
        session = Session.start(args.pp, args.tp, args.dp, args.timeout, args.devices)
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


# ---- shared pieces -----------------------------------------------------------
def _sampling(args: argparse.Namespace, **over: Any) -> SamplingParams:
    from llamadist.commands import sampling_from_args
    params = sampling_from_args(args)
    seed = params.seed if params.seed is not None else random.randrange(2**31)
    return replace(params, seed=seed, **over)


def _spec(session: Session, args: argparse.Namespace, config, batch: int, max_seq: int
          ) -> PipelineSpec:
    """Rank 0's decision: layout, dtype, per-replica batch and micro-batches."""
    from llamadist.config import default_dtype
    g = session.groups
    dtype = args.dtype or default_dtype(stage_devices(args.devices, g.pp_size))
    per_replica = math.ceil(batch / g.dp_size)
    micro = args.micro_batches or g.pp_size
    if micro < 1:
        raise ValueError(f"--micro-batches must be >= 1, got {micro}")
    layout = plan_layout(config, g.pp_size, args.devices, strategy=args.strategy,
                         max_memory=args.max_memory, device_speed=args.device_speed,
                         boundaries=args.boundaries, plan=args.plan, dtype=dtype,
                         max_batch=per_replica, max_seq_len=max_seq)
    return PipelineSpec([(r.start, r.stop) for r in layout.layer_ranges], dtype, per_replica,
                        max_seq, min(micro, per_replica))


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


# ---- generate ------------------------------------------------------------------
def _generate(session: Session, args: argparse.Namespace) -> int:
    from llamadist.commands import _cache_len, _read_prompts
    from llamadist.weights.checkpoint import open_checkpoint
    ckpt = open_checkpoint(args.model)
    tok = ckpt.tokenizer()

    def decide() -> tuple[PipelineSpec, Request, list[str]]:
        prompts = _read_prompts(args)
        enc = [tok.encode_chat([{"role": "user", "content": p}]) if args.chat else tok.encode(p)
               for p in prompts]
        params = _sampling(args)
        check_context(enc, params.max_new_tokens, ckpt.config.max_position_embeddings)
        limit = ckpt.config.max_position_embeddings
        max_seq = args.max_seq_len or _cache_len(max(map(len, enc)) + params.max_new_tokens, limit)
        check_context(enc, params.max_new_tokens, max_seq)
        spec = _spec(session, args, ckpt.config, len(enc), max_seq)
        return spec, Request(enc, params, spec.micro_batches), prompts

    setup = _agree(session, decide)
    if setup is None:
        return 2 if session.is_driver else 0
    spec, req, prompts = setup
    runner = session.load(ckpt, spec, tok, progress=session.is_driver and sys.stderr.isatty())
    runner.timed = bool(args.stats)
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
    if args.json:
        for prompt, s in zip(prompts, seqs):
            print(json.dumps({"prompt": prompt, "prompt_token_ids": s["prompt_token_ids"],
                              "token_ids": s["token_ids"], "text": s["text"],
                              "finish_reason": s["finish_reason"], "stats": stats}))
    elif streaming:
        print()
    else:
        for i, (prompt, s) in enumerate(zip(prompts, seqs)):
            print(f"--- [{i}] {prompt}\n{s['text']}")
    print(f"prefill {stats['prefill_s'] * 1e3:.1f} ms, decode {stats['decode_tokens_per_s']:.1f} "
          f"tokens/s ({len(spec.layer_ranges)} stage(s) x {len(reports)} process(es), "
          f"{spec.micro_batches} micro-batch(es), {spec.dtype})", file=sys.stderr)
    if args.stats:
        for r in reports:
            print(json.dumps({k: v for k, v in r.items() if k != "sequences"}), file=sys.stderr)


# ---- chat ----------------------------------------------------------------------
def _chat(session: Session, args: argparse.Namespace) -> int:
    from llamadist.weights.checkpoint import open_checkpoint
    ckpt = open_checkpoint(args.model)
    tok = ckpt.tokenizer()

    def decide() -> PipelineSpec:
        if not tok.chat_template:
            raise ValueError("this model has no chat template; use `llamadist generate` instead")
        limit = ckpt.config.max_position_embeddings
        return _spec(session, args, ckpt.config, 1, args.max_seq_len or min(limit, 4096))

    spec = _agree(session, decide)
    if spec is None:
        return 2 if session.is_driver else 0
    runner = session.load(ckpt, spec, tok, progress=session.is_driver and sys.stderr.isatty())
    chat = _ChatState(args, tok, spec.max_seq_len) if session.is_driver else None
    while True:
        req = session.broadcast(chat.next_request() if chat else None)
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
            chat.history.append({"role": "assistant", "content": "".join(reply)})


class _ChatState:
    """Rank 0's side of the chat: reads stdin, keeps the history, builds requests."""

    def __init__(self, args: argparse.Namespace, tok, max_seq_len: int):
        self.args, self.tok, self.max_seq_len = args, tok, max_seq_len
        self.system = [{"role": "system", "content": args.system}] if args.system else []
        self.history: list[dict[str, str]] = []
        print("chat with the model; /reset clears the history, /quit or Ctrl-D exits",
              file=sys.stderr)

    def next_request(self) -> Request | None:
        while True:
            try:
                line = input("> ")
            except (EOFError, KeyboardInterrupt):
                print(file=sys.stderr)
                return None
            cmd = line.strip()
            if cmd in ("/quit", "/exit"):
                return None
            if cmd == "/reset":
                self.history = []
                print("(history cleared)", file=sys.stderr)
                continue
            if cmd:
                break
        params = _sampling(self.args)
        self.history.append({"role": "user", "content": line})
        self.history = fit_history(self.tok.encode_chat, self.system, self.history,
                                   params.max_new_tokens, self.max_seq_len)
        ids = self.tok.encode_chat(self.system + self.history)
        check_context([ids], params.max_new_tokens, self.max_seq_len)
        return Request([ids], params, 1)


# ---- bench ---------------------------------------------------------------------
def _bench(session: Session, args: argparse.Namespace) -> int:
    from llamadist.commands import _cache_len
    from llamadist.weights.checkpoint import open_checkpoint
    ckpt = open_checkpoint(args.model)
    tok = ckpt.tokenizer()

    def decide() -> tuple[PipelineSpec, Request]:
        if args.prompts:
            with open(args.prompts) as f:
                enc = [tok.encode(t.rstrip("\n")) for t in f if t.strip()]
        else:
            base = tok.encode("The history of distributed computing begins with " * 64)
            enc = [base[i:i + args.prompt_len] for i in range(args.batch)]
        params = SamplingParams(max_new_tokens=args.gen_len, ignore_eos=True, seed=0)
        max_seq = args.max_seq_len or _cache_len(max(map(len, enc)) + args.gen_len,
                                                 ckpt.config.max_position_embeddings)
        check_context(enc, args.gen_len, max_seq)
        spec = _spec(session, args, ckpt.config, len(enc), max_seq)
        return spec, Request(enc, params, spec.micro_batches)

    setup = _agree(session, decide)
    if setup is None:
        return 2 if session.is_driver else 0
    spec, req = setup
    t0 = time.perf_counter()
    runner = session.load(ckpt, spec, tok)
    load_s = time.perf_counter() - t0
    runner.timed = True
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
