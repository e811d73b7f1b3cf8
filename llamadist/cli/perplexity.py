"""`llamadist perplexity MODEL --text FILE [--ctx N]`: the quality check of a (quantized)
model, as llama.cpp's llama-perplexity (llamadist.generation.perplexity says how it is
counted). It places and loads the model with the same flags and the same stage code as
generate (one process: the stages of --devices in order), and runs each batch of windows
as one prefill from an empty cache through the stages."""

from __future__ import annotations

import argparse
import json
import sys
import time

from llamadist.cli.args import add_placement, add_runtime, positive_int, runtime_config


def add_perplexity(sub) -> None:
    p = sub.add_parser("perplexity", help="perplexity of the model over a text file (as "
                       "llama.cpp's llama-perplexity), in one process")
    p.add_argument("model", help="HF folder, .gguf file, or alias smollm2-135m")
    p.add_argument("--text", required=True, help="a UTF-8 text file to score")
    p.add_argument("--ctx", type=positive_int, default=512, help="tokens per window; the "
                   "second half of each is scored (default 512)")
    p.add_argument("--batch", type=positive_int, default=1, help="windows per forward pass "
                   "(default 1)")
    p.add_argument("--chunks", type=positive_int, help="score only the first N windows")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    add_placement(p)
    add_runtime(p)


def read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"--text {path}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"--text {path} is a directory; give a text file") from None
    except UnicodeDecodeError:
        raise ValueError(f"--text {path} is not UTF-8 text") from None


def perplexity_cmd(args: argparse.Namespace) -> int:
    import torch

    from llamadist.api import build_engine
    from llamadist.cli.jobs import check_quantize_devices
    from llamadist.cli.layout import decide_layout
    from llamadist.generation.perplexity import PerplexityMeter, make_windows
    from llamadist.planning.layout import check_cpu_blocks, layout_quantize
    from llamadist.weights.checkpoint import open_checkpoint

    ckpt = open_checkpoint(args.model)
    tok = ckpt.tokenizer()
    ids = tok.encode(read_text(args.text), add_special_tokens=False)
    context = ckpt.config.max_position_embeddings
    if args.ctx > context:
        raise ValueError(f"--ctx {args.ctx} is above the model's context of {context} "
                         f"positions; use at most {context}")
    windows = make_windows(ids, args.ctx, tok.bos_token_id if tok.add_bos else None)
    windows = windows[:args.chunks] if args.chunks else windows
    batch = min(args.batch, len(windows))
    runtime = runtime_config(args, max_batch=batch).replace(max_seq_len=args.ctx,
                                                            max_batch=batch)
    layout = decide_layout(ckpt.config, args, runtime, args.ctx, batch)
    # the formats --fit-bits (or a plan file) chose per stage are what the stages load in
    runtime = runtime.replace(quantize=layout_quantize(layout, runtime.quantize, args.plan))
    check_quantize_devices(runtime.quantize, layout.devices)
    check_cpu_blocks(ckpt.config, layout, runtime.quantize)
    t0 = time.perf_counter()
    engine = build_engine(ckpt, layout, runtime, progress=sys.stderr.isatty())
    load_s = time.perf_counter() - t0
    meter = PerplexityMeter(args.ctx)
    first = engine.stages[0].device
    positions = torch.arange(args.ctx, device=first).expand(batch, -1)
    t0 = time.perf_counter()
    for i in range(0, len(windows), batch):
        x = torch.tensor(windows[i:i + batch], device=first)  # (B, ctx)
        logits = engine.forward(x, positions[:x.shape[0]], 0, None, logits="all")
        meter.add(logits, x)
        if not args.json:
            print(f"[{meter.windows}] {meter.running[-1]:.4f}", file=sys.stderr)
    res = meter.result()
    report = res.to_dict() | {"load_s": load_s, "eval_s": time.perf_counter() - t0,
                              "dtype": runtime.dtype_for(list(layout.devices)),
                              "weights": runtime.weights, "quantize": runtime.quantize,
                              "devices": list(layout.devices)}
    if args.json:
        print(json.dumps(report))
    else:
        print(f"Final estimate: PPL = {res.ppl:.4f} +/- {res.ppl_err:.5f} ({res.tokens} tokens "
              f"scored in {res.windows} windows of {res.ctx})")
    return 0
