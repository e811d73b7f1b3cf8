"""The generate, chat and bench commands (argparse namespaces in, exit codes out)."""

from __future__ import annotations

import argparse
import json
import sys
import time

from llamadist.api import LLM
from llamadist.distributed.cli_args import wants_distributed
from llamadist.generation.generate import check_context, fit_history
from llamadist.generation.sampling import SamplingParams
from llamadist.weights.checkpoint import open_checkpoint


def _distributed(kind: str, args: argparse.Namespace) -> int:
    # Over processes (--nproc/--pp/--tp/--dp, or under torchrun): llamadist.distributed.
    from llamadist.distributed.commands import run_distributed
    return run_distributed(kind, args)


def sampling_from_args(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                          top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                          repetition_penalty=args.repetition_penalty, seed=args.seed,
                          stop=tuple(args.stop))


def _cache_len(needed: int, limit: int) -> int:
    # Round up so small changes in prompt length reuse the same shapes.
    return min(limit, (needed + 255) // 256 * 256)


def load_llm(args: argparse.Namespace, max_batch: int, needed_len: int | None = None,
             ckpt=None, tokenizer=None) -> LLM:
    ckpt = ckpt or open_checkpoint(args.model)
    limit = ckpt.config.max_position_embeddings
    max_seq = args.max_seq_len or (_cache_len(needed_len, limit) if needed_len else min(limit, 4096))
    llm = LLM(ckpt, tokenizer=tokenizer, devices=args.devices, strategy=args.strategy,
              max_memory=args.max_memory, device_speed=args.device_speed,
              boundaries=args.boundaries, plan=args.plan, dtype=args.dtype, max_batch=max_batch,
              max_seq_len=max_seq, progress=sys.stderr.isatty())
    llm.engine.cuda_graphs = llm.engine.cuda_graphs and not getattr(args, "no_cuda_graphs", False)
    llm.engine.compile_layers = not getattr(args, "no_compile", False)
    return llm


def _read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        with open(args.prompts_file) as f:
            prompts += [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        raise ValueError("no prompt given: pass --prompt TEXT (repeatable) or --prompts-file FILE")
    return prompts


def generate_cmd(args: argparse.Namespace) -> int:
    if wants_distributed(args):
        return _distributed("generate", args)
    params = sampling_from_args(args)
    prompts = _read_prompts(args)
    ckpt = open_checkpoint(args.model)
    tok = ckpt.tokenizer()
    encoded = [tok.encode_chat([{"role": "user", "content": p}]) if args.chat else tok.encode(p)
               for p in prompts]
    # Refuse an over-long request before any weight is loaded.
    check_context(encoded, params.max_new_tokens, ckpt.config.max_position_embeddings)
    needed = max(map(len, encoded)) + params.max_new_tokens
    llm = load_llm(args, max_batch=len(prompts), needed_len=needed, ckpt=ckpt, tokenizer=tok)
    llm.engine.timed = bool(args.stats)
    gen, events = llm.stream_tokens(encoded, params)
    streaming = len(prompts) == 1 and not args.json
    for step in events:
        if streaming:
            for e in step:
                sys.stdout.write(e.text)
            sys.stdout.flush()
    stats = gen.stats.to_dict()
    if args.json:
        for prompt, seq in zip(prompts, gen.sequences):
            print(json.dumps({"prompt": prompt, "prompt_token_ids": seq.prompt_token_ids,
                              "token_ids": seq.token_ids, "text": seq.text,
                              "finish_reason": seq.finish_reason, "stats": stats}))
    elif streaming:
        print()
    else:
        for i, (prompt, seq) in enumerate(zip(prompts, gen.sequences)):
            print(f"--- [{i}] {prompt}\n{seq.text}")
    print(f"prefill {stats['prefill_s'] * 1e3:.1f} ms, decode {stats['decode_tokens_per_s']:.1f} "
          f"tokens/s ({len(llm.engine.stages)} stage(s), {llm.dtype})", file=sys.stderr)
    if args.stats:
        for s in llm.engine.stage_stats():
            print(json.dumps(s), file=sys.stderr)
    return 0


def chat_cmd(args: argparse.Namespace) -> int:
    if wants_distributed(args):
        return _distributed("chat", args)
    params = sampling_from_args(args)
    llm = load_llm(args, max_batch=1)
    if not llm.tokenizer.chat_template:
        raise ValueError("this model has no chat template; use `llamadist generate` instead")
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = []
    print("chat with the model; /reset clears the history, /quit or Ctrl-D exits", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        cmd = line.strip()
        if cmd in ("/quit", "/exit"):
            return 0
        if cmd == "/reset":
            history = []
            print("(history cleared)", file=sys.stderr)
            continue
        if not cmd:
            continue
        history.append({"role": "user", "content": line})
        history = fit_history(llm.encode, system, history, params.max_new_tokens,
                              llm.max_seq_len)
        reply = []
        try:
            for piece in llm.stream(system + history, params):
                reply.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            print("\n(interrupted)", file=sys.stderr)
        print()
        history.append({"role": "assistant", "content": "".join(reply)})


def bench_cmd(args: argparse.Namespace) -> int:
    if getattr(args, "shape", None):
        from llamadist.bench_gpu import bench_shape_cmd
        return bench_shape_cmd(args)
    if not args.model:
        raise ValueError("give a model (checkpoint folder, .gguf or alias) or --shape NAME")
    if isinstance(args.batch, list):
        raise ValueError(f"--batch {args.batch}: a list of batch sizes needs --shape")
    if not args.prompts and args.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {args.batch}")
    if wants_distributed(args):
        return _distributed("bench", args)
    ckpt = open_checkpoint(args.model)
    tok = ckpt.tokenizer()
    if args.prompts:
        with open(args.prompts) as f:
            texts = [line.rstrip("\n") for line in f if line.strip()]
        encoded = [tok.encode(t) for t in texts]
    else:
        base = tok.encode("The history of distributed computing begins with " * 64)
        encoded = [base[i:i + args.prompt_len] for i in range(args.batch)]
    params = SamplingParams(max_new_tokens=args.gen_len, ignore_eos=True)
    needed = max(map(len, encoded)) + args.gen_len
    llm = load_llm(args, max_batch=len(encoded), needed_len=needed, ckpt=ckpt, tokenizer=tok)
    load_s = sum(s.stats.load.seconds for s in llm.engine.stages if s.stats.load)
    llm.engine.timed = True
    t0 = time.perf_counter()
    gen, events = llm.stream_tokens(encoded, params)
    for _ in events:
        pass
    wall = time.perf_counter() - t0
    st = gen.stats.to_dict()
    report = {"batch": len(encoded), "prompt_tokens": st["prompt_tokens"], "gen_len": args.gen_len,
              "load_s": load_s, "prefill_s": st["prefill_s"],
              "decode_ms_per_step": 1e3 * st["decode_s"] / max(1, st["decode_steps"]),
              "decode_tokens_per_s": st["decode_tokens_per_s"], "wall_s": wall,
              "stages": llm.engine.stage_stats()}
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"batch {report['batch']}, {report['prompt_tokens']} prompt tokens, {args.gen_len} new "
          f"each; load {load_s:.2f} s; prefill {st['prefill_s'] * 1e3:.1f} ms; decode "
          f"{report['decode_ms_per_step']:.2f} ms/step, {st['decode_tokens_per_s']:.1f} tokens/s")
    print(f"{'stage':>5} {'layers':>9} {'device':>8} {'compute s':>10} {'transfer s':>10} "
          f"{'MB in':>8} {'busy %':>7}")
    for s in report["stages"]:
        busy = 100 * s["compute_s"] / wall if wall else 0
        print(f"{s['stage']:>5} {s['layers'][0]:>4}:{s['layers'][1]:<4} {s['device']:>8} "
              f"{s['compute_s']:>10.3f} {s['transfer_s']:>10.4f} {s['bytes_in'] / 1e6:>8.2f} "
              f"{busy:>6.1f}%")
    return 0
