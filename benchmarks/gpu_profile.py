"""Where one decode step's time goes on the GPU (a companion to ``llamadist bench --shape``).

1. Each weight matrix of a layer (fused shapes) alone through F.linear at M = batch rows:
   the bandwidth cuBLAS reaches, and the sum over the model (the matmul-only floor).
2. The captured decode graph replayed back to back (no host work between steps).
3. The kernels of one compiled decode step under torch.profiler (not captured, so each
   kernel shows with its own time).
4. One layer's decode attention alone, replayed in a CUDA graph: SDPA over the whole
   static cache (masked), SDPA over the live slots only, and the split-KV kernel.
5. One replay of the captured step under torch.profiler (CUPTI reports a graph's
   kernels): its span, the kernels' own time, how much of it overlaps (programmatic
   dependent launches; ``--no-dependent-launches`` captures without) and the idle gaps.

    PYTHONPATH=. python3 benchmarks/gpu_profile.py --shape llama3-8b --batch 1,32

``--quantize int8|int4|fp8`` (and ``--quantize-head``) builds the decoder's linears in that
format (as ``llamadist bench --shape``), so 2-3 show a quantized step's kernels.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys

import torch
import torch.nn.functional as F

from llamadist.cli.bench_shape import (copy_bandwidth, int_list, make_engine, random_model,
                                       run_ours, sync_all)
from llamadist.config import RuntimeConfig, named_shape
from llamadist.model.fuse import fuse_projections
from wquant_sweep import model_shapes  # (this folder: the script's own sys.path entry)


def linear_table(config, dev, dtype, m: int, copy_bps: float) -> float:
    shapes = [(name, n, k) for name, (n, k) in model_shapes(config).items()]
    shapes.append(("head", config.vocab_size, config.hidden_size))
    total = 0.0
    for name, out_f, in_f in shapes:
        nbytes = out_f * in_f * 2
        copies = max(1, -(-256 * 2 ** 20 // nbytes))  # rotate through > L2 worth of weights
        ws = [torch.randn(out_f, in_f, dtype=dtype, device=dev) for _ in range(copies)]
        x = torch.randn(m, in_f, dtype=dtype, device=dev)
        for w in ws:
            F.linear(x, w)
        reps = 20 * copies
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(3):
            a.record()
            for i in range(reps):
                F.linear(x, ws[i % copies])
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3 / reps)
        t = statistics.median(times)
        count = 1 if name == "head" else config.num_layers
        total += count * t
        print(f"  M={m:<3} {name:<8} {out_f:>6}x{in_f:<6} {t * 1e6:8.1f} us "
              f"{nbytes / t / 1e12:6.2f} TB/s {nbytes / t / copy_bps:6.1%} of copy")
        del ws
    print(f"  M={m}: matmuls alone {total * 1e3:.2f} ms per step")
    return total


def replay_ms(graph: torch.cuda.CUDAGraph, reps: int) -> float:
    """Mean ms per replay of ``graph``, back to back, after 3 warm-up replays."""
    for _ in range(3):
        graph.replay()
    a, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        graph.replay()
    e.record()
    e.synchronize()
    return a.elapsed_time(e) / reps


def graph_replay_ms(engine, b: int) -> float:
    return replay_ms(engine._graphs.decoders[0].buckets[b].graph, 20)


def kernel_profile(engine, b: int, rows: int) -> None:
    from torch.profiler import ProfilerActivity, profile
    dec = engine._graphs.decoders[0]
    bk = dec.buckets[b]
    with torch.inference_mode():
        for _ in range(2):
            dec._forward(bk)
        sync_all()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                dec._forward(bk)
            sync_all()
    events = prof.key_averages()
    key = "self_device_time_total"
    if not hasattr(events[0], key):
        key = "self_cuda_time_total"
    total_us = sum(getattr(e, key) for e in events) / 5
    print(f"  kernels of one step (uncaptured): {total_us / 1e3:.2f} ms, "
          f"{sum(e.count for e in events if getattr(e, key) > 0) / 5:.0f} launches")
    print(events.table(sort_by=key, row_limit=rows, max_name_column_width=70))


def replay_spans(graph: torch.cuda.CUDAGraph) -> list[tuple[float, float, str]]:
    """(start, end, name) in us of each kernel of one replay of ``graph``, by start."""
    from torch.profiler import ProfilerActivity, profile
    for _ in range(3):
        graph.replay()
    sync_all()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        graph.replay()
        sync_all()
    return sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                  if e.device_type == torch.autograd.DeviceType.CUDA)


def span_summary(spans: list[tuple[float, float, str]]) -> tuple[float, float, float, float]:
    """(span, own, overlapped, idle) us of one replay's kernels ``spans``."""
    busy, reach = 0.0, spans[0][0]
    for start, end, _ in spans:  # the union of the kernels' intervals
        busy += max(0.0, end - max(start, reach))
        reach = max(reach, end)
    own = sum(end - start for start, end, _ in spans)
    span = reach - spans[0][0]
    return span, own, own - busy, span - busy


def advances(spans: list[tuple[float, float, str]]) -> list[float]:
    """What each kernel of ``spans`` (by start) adds to the replay's span, us: how far its
    end moves the latest end so far (0 for a kernel that ends under another). With
    programmatic dependent launches a kernel starts before the one before it ends, so its
    own time overstates its cost; these add up to the span exactly."""
    reach, out = spans[0][0], []
    for _, end, _ in spans:
        out.append(max(0.0, end - reach))
        reach = max(reach, end)
    return out


def by_name(spans: list[tuple[float, float, str]], rows: int) -> None:
    """The ``rows`` kernel names of most time in ``spans``: us in all, count x median."""
    times: dict[str, list[float]] = {}
    for start, end, name in spans:
        times.setdefault(name, []).append(end - start)
    for name, ts in sorted(times.items(), key=lambda kv: -sum(kv[1]))[:rows]:
        print(f"    {sum(ts):9.1f} us  {len(ts):4d} x {statistics.median(ts):7.2f} us"
              f"  {name[:90]}")


def replay_timeline(engine, b: int, rows: int) -> None:
    """Section 5: the kernels of one replay of bucket ``b``'s graph, in time order."""
    spans = replay_spans(engine._graphs.decoders[0].buckets[b].graph)
    if not spans:
        print("  replay timeline: no kernels recorded (this profiler does not see a graph's)")
        return
    span, own, over, idle = span_summary(spans)
    print(f"  replay timeline, batch {b}: {len(spans)} kernels over {span / 1e3:.3f} ms; "
          f"their own time {own / 1e3:.3f} ms, overlapped {over / 1e3:.3f} ms, "
          f"idle {idle / 1e3:.3f} ms")
    by_name(spans, rows)


def attention_table(config, dev, dtype, batches: list[int], lengths: list[int],
                    copy_bps: float) -> None:
    from llamadist.kernels import decode_attention as split_kv
    hk, g, d = config.num_kv_heads, config.num_heads // config.num_kv_heads, config.head_dim

    def graph_us(fn) -> float:
        for _ in range(2):
            fn()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return replay_ms(graph, 200) * 1e3

    for b in batches:
        for cache in lengths:
            q = torch.randn(b, hk, g, d, device=dev, dtype=dtype)
            k, v = (torch.randn(b, hk, cache, d, device=dev, dtype=dtype) for _ in range(2))
            for live in sorted({576, cache // 2, cache}):
                if live > cache:
                    continue
                start = torch.tensor(live - 1, device=dev)
                mask = torch.zeros(b, 1, 1, cache, device=dev, dtype=dtype)
                mask[..., live:] = float("-inf")
                kl, vl = k[:, :, :live], v[:, :, :live]
                t = {"sdpa whole cache": graph_us(lambda: F.scaled_dot_product_attention(
                         q, k, v, attn_mask=mask)),
                     "sdpa live slots": graph_us(lambda: F.scaled_dot_product_attention(q, kl, vl)),
                     "split-kv": graph_us(lambda: split_kv.decode_attention(q, k, v, mask, start))}
                kv_bytes = 2 * b * hk * live * d * k.element_size()
                print(f"  attention b={b:<3} cache={cache:<5} live={live:<5} " + "  ".join(
                    f"{name} {us:6.1f} us ({kv_bytes / (us * 1e-6) / copy_bps:4.0%})"
                    for name, us in t.items()))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--batch", default="1,32")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--rows", type=int, default=30)
    ap.add_argument("--blas", default="")
    ap.add_argument("--attention", default="split,sdpa",
                    help="decode attention modes to compare (RuntimeConfig.decode_attention)")
    ap.add_argument("--max-seq-len", type=int, default=0, help="cache slots (default: fit)")
    ap.add_argument("--attention-table", default="640,4224",
                    help="cache lengths for the attention-alone table ('' to skip)")
    ap.add_argument("--quantize", default=None, help="int8 | int4 | fp8 decoder linears")
    ap.add_argument("--quantize-head", action="store_true", help="the head in that format too")
    ap.add_argument("--no-dependent-launches", dest="dependent_launches",
                    action="store_false", help="capture plain launches (section 5)")
    args = ap.parse_args()
    config, dev, dtype = named_shape(args.shape), torch.device("cuda:0"), torch.bfloat16
    copy_bps = copy_bandwidth(dev, 4 << 30)
    print(f"copy {copy_bps / 1e12:.2f} TB/s")
    for lib in filter(None, args.blas.split(",")):
        if lib != "default":
            torch.backends.cuda.preferred_blas_library(lib)
        print(f"linear alone, blas={lib}")
        for m in int_list(args.batch):
            linear_table(config, dev, dtype, m, copy_bps)
    torch.backends.cuda.preferred_blas_library("cublas")
    if args.attention_table:
        attention_table(config, dev, dtype, int_list(args.batch), int_list(args.attention_table),
                        copy_bps)
    quant = {"quantize": args.quantize, "quantize_head": args.quantize_head}
    full = fuse_projections(random_model(config, dev, dtype, **quant))
    max_seq = args.max_seq_len or (args.prompt_len + 128 + 127) // 128 * 128
    ms: dict[str, dict[int, float]] = {}
    for attn in args.attention.split(","):
        ms[attn] = {}
        gen = torch.Generator().manual_seed(0)
        for b in int_list(args.batch):
            prompts = torch.randint(0, config.vocab_size, (b, args.prompt_len), generator=gen)
            engine = make_engine(config, full, [range(config.num_layers)], [str(dev)], dtype, b,
                                 max_seq, RuntimeConfig(
                                     decode_attention=attn,
                                     dependent_launches=args.dependent_launches, **quant))
            r = run_ours(engine, prompts, 64, 1)
            ms[attn][b] = r["decode_ms"]
            print(f"attention {attn}, batch {b}: generator {r['decode_ms']:.2f} ms/step, graph "
                  f"replay {graph_replay_ms(engine, b):.2f} ms/step")
            kernel_profile(engine, b, args.rows)
            replay_timeline(engine, b, args.rows)
            del engine
            gc.collect()
            torch.cuda.empty_cache()
    best = {b: min(v[b] for v in ms.values()) for b in next(iter(ms.values()))}
    score = {a: sum(v[b] / best[b] for b in v) for a, v in ms.items()}
    print(f"decode ms/step by attention: {ms}")
    print(f"best-decode-attention={min(score, key=score.get)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
