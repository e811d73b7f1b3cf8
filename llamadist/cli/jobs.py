"""What a run command asks for, checked in full before any weight loads: the prompts,
their token ids, the sampling parameters, the RuntimeConfig and the Layout. The front
process builds a Job to refuse bad requests before starting workers; rank 0 of a
multi-process run builds the same Job and hands it to every rank."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, replace

from llamadist.cli.args import read_lines, read_prompts, runtime_config, sampling_params
from llamadist.cli.layout import LAYOUT_ENV, decide_layout
from llamadist.config import RuntimeConfig, parse_quantize
from llamadist.generation.generate import ContextLimitError, check_context
from llamadist.generation.sampling import SamplingParams
from llamadist.planning.layout import Layout, check_cpu_blocks, layout_quantize

BENCH_TEXT = "The history of distributed computing begins with "


@dataclass
class Job:
    prompts: list[str]            # what the user typed (generate), for the output
    encoded: list[list[int]]      # token ids per prompt
    params: SamplingParams
    runtime: RuntimeConfig        # max_seq_len resolved
    layout: Layout

    @property
    def max_seq_len(self) -> int:
        assert self.runtime.max_seq_len is not None
        return self.runtime.max_seq_len


def _finish(args: argparse.Namespace, ckpt, prompts: list[str], encoded: list[list[int]],
            params: SamplingParams, batch: int, needed: int | None) -> Job:
    """Resolve the runtime (KV length from what the request needs) and the layout."""
    context = ckpt.config.max_position_embeddings
    if encoded:
        check_context(encoded, params.max_new_tokens, context)
    runtime = runtime_config(args, max_batch=batch)
    runtime = replace(runtime, max_seq_len=runtime.seq_len_for(context, needed))
    if encoded:
        try:
            check_context(encoded, params.max_new_tokens, runtime.max_seq_len)
        except ContextLimitError as e:  # only a --max-seq-len below the context gets here
            raise ContextLimitError(f"{e}; or raise --max-seq-len (now "
                                    f"{runtime.max_seq_len}; the model's context is "
                                    f"{context})") from None
    layout = inherited_layout() or decide_layout(ckpt.config, args, runtime,
                                                 runtime.max_seq_len, batch, ckpt=ckpt)
    check_quantize_devices(runtime.quantize, layout.devices)
    # a plan file's per-stage weight formats (--fit-bits) are what the stages load with
    runtime = replace(runtime, quantize=layout_quantize(layout, runtime.quantize,
                                                        getattr(args, "plan", None)))
    check_cpu_blocks(ckpt.config, layout, runtime.quantize)
    return Job(prompts, encoded, params, runtime, layout)


def check_quantize_devices(spec: str | None, devices) -> None:
    """A per-device --quantize entry that names no device of the run would be ignored
    (a typo, or cuda=int4 on a CPU run): refuse it, naming the run's devices."""
    names = [str(d) for d in devices]
    kinds = {n.split(":")[0] for n in names}
    for key in parse_quantize(spec):
        if key == "*":
            continue
        kind = key.split(":")[0]
        # a bare kind over processes (cuda: each rank its own) leaves indices unchecked;
        # the CPU has none
        same = [n for n in names if n.split(":")[0] == kind]
        absent = ":" in key and key not in names and (kind == "cpu" or
                                                      all(":" in n for n in same))
        if kind not in kinds or absent:
            raise ValueError(f"--quantize {spec}: {key} is no device of this run "
                             f"({', '.join(names)}); name this run's devices or kinds "
                             f"(e.g. {names[0]}=int8), or give one format for all")


def inherited_layout() -> Layout | None:
    """The layout the front process chose, in a worker it started (None elsewhere)."""
    text = os.environ.get(LAYOUT_ENV)
    return Layout.from_json(text) if text else None


def generate_job(args: argparse.Namespace, ckpt, tok) -> Job:
    prompts = read_prompts(args)
    enc = [tok.encode_chat([{"role": "user", "content": p}]) if args.chat else tok.encode(p)
           for p in prompts]
    params = sampling_params(args)
    needed = max(map(len, enc)) + params.max_new_tokens
    return _finish(args, ckpt, prompts, enc, params, len(enc), needed)


def chat_job(args: argparse.Namespace, ckpt, tok) -> Job:
    if not tok.chat_template:
        raise ValueError("this model has no chat template; use `llamadist generate` instead")
    job = _finish(args, ckpt, [], [], sampling_params(args), 1, None)
    limit, new = job.max_seq_len, job.params.max_new_tokens
    if new < limit:
        return job
    if flag_given(args, "--max-new-tokens"):   # every message would be refused
        context = ckpt.config.max_position_embeddings
        more = (f" (or a larger --max-seq-len, up to the model's context of {context})"
                if limit < context else "")
        raise ValueError(f"--max-new-tokens {new} leaves no room for a message in the KV "
                         f"cache of {limit} tokens; give --max-new-tokens below {limit}, "
                         f"e.g. {limit // 2}{more}")
    # chat's default reply length does not fit a short context: replies of half of it
    print(f"chat: replies of at most {limit // 2} tokens (the default {new} does not fit "
          f"the KV cache of {limit}; --max-new-tokens sets it)", file=sys.stderr)
    return replace(job, params=replace(job.params, max_new_tokens=limit // 2))


def flag_given(args: argparse.Namespace, flag: str) -> bool:
    """Whether the command line gave ``flag`` (or a prefix argparse takes for it)."""
    for arg in getattr(args, "argv", []):
        name = arg.split("=", 1)[0]
        if name == "--":
            break
        if len(name) > 2 and name.startswith("--") and flag.startswith(name):
            return True  # an ambiguous prefix never gets here: argparse refused it
    return False


def serve_job(args: argparse.Namespace, ckpt, tok) -> Job:
    """The server's engine: --max-batch sequences at once (default RuntimeConfig's), each
    up to --max-seq-len (default: the model's context, at most DEFAULT_MAX_SEQ_LEN)."""
    check_port(args.host, args.port)
    batch = args.max_batch or RuntimeConfig.max_batch
    return _finish(args, ckpt, [], [], SamplingParams(), batch, None)


_RESERVED: dict = {}  # (host, port) -> the socket bound by check_port, until serve takes it


def check_port(host: str, port: int) -> None:
    """Refuse, before any weight loads, an address the server could not listen on, and
    keep it bound (not listening: a client is refused, as by no server) until the
    server's HTTP process listens on it (``reserved_socket``): nothing else takes the
    port while the weights load."""
    import socket
    if not 0 <= port <= 65535:
        raise ValueError(f"--port {port}: a port is 0-65535")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ValueError(f"--host {host}: {e.strerror}") from None
    family, _, _, _, addr = infos[0]
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(addr)
    except OSError as e:
        s.close()
        raise ValueError(f"--host {host} --port {port}: cannot listen there "
                         f"({e.strerror}); choose another port or stop what holds "
                         f"it") from None
    release_ports()
    if len({info[4] for info in infos}) == 1:
        _RESERVED[(host, port)] = s
    else:  # a name of several addresses (localhost: ::1 and 127.0.0.1): uvicorn binds each
        s.close()


def reserved_socket(host: str, port: int):
    """The socket check_port bound for (host, port), now the caller's; None if none."""
    return _RESERVED.pop((host, port), None)


def release_ports() -> None:
    """Let the reserved ports go (a launcher whose rank 0 will serve)."""
    while _RESERVED:
        _RESERVED.popitem()[1].close()


def bench_job(args: argparse.Namespace, ckpt, tok) -> Job:
    if isinstance(args.batch, list):
        raise ValueError(f"--batch {','.join(map(str, args.batch))}: a list of batch sizes "
                         f"needs --shape")
    if args.prompts:
        enc = [tok.encode(t) for t in read_lines(args.prompts, "--prompts")]
        if not enc:
            raise ValueError(f"--prompts {args.prompts} has no prompt (no non-empty line)")
    else:
        # Prompt i is the text's tokens [i, i + prompt_len): distinct rows of equal length.
        need, repeats, base = args.prompt_len + args.batch, 8, []
        while len(base) < need:
            repeats *= 2
            base = tok.encode(BENCH_TEXT * repeats)
        enc = [base[i:i + args.prompt_len] for i in range(args.batch)]
    params = SamplingParams(max_new_tokens=args.gen_len, ignore_eos=True, seed=0)
    needed = max(map(len, enc)) + args.gen_len
    return _finish(args, ckpt, [], enc, params, len(enc), needed)


JOBS = {"generate": generate_job, "chat": chat_job, "bench": bench_job, "serve": serve_job}


def print_sequences(args: argparse.Namespace, prompts: list[str], seqs: list[dict],
                    stats: dict, streamed: bool) -> None:
    """generate's output: JSON rows, the streamed text's newline, or one block per prompt."""
    if args.json:
        for prompt, s in zip(prompts, seqs):
            print(json.dumps({"prompt": prompt, "prompt_token_ids": s["prompt_token_ids"],
                              "token_ids": s["token_ids"], "text": s["text"],
                              "finish_reason": s["finish_reason"], "seed": s["seed"],
                              "stats": stats}))
    elif streamed:
        print()
    else:
        for i, (prompt, s) in enumerate(zip(prompts, seqs)):
            print(f"--- [{i}] {prompt}\n{s['text']}")
    sys.stdout.flush()  # the text before the statistics that follow on stderr
