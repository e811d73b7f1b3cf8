"""The fused eager kernels (llamadist.kernels.eager_fused) against the eager PyTorch
formula they replace, on one GPU, interleaved in one process:

1. each op alone at Llama-3-8B's widths (D 4096, F 14336, 32 q / 8 KV heads of 128) over
   N tokens: add + RMSNorm, SiLU * up, q/k RoPE; the median of CUDA-event timings, and
   the largest difference from the eager output in ulps of bf16;
2. a prefill step's decoder layers (random Llama-3-8B-shaped weights, fused projections,
   a flat batch of N tokens of one sequence attending causally through SDPA): the layers'
   time with the kernels off and on, alternating.

    PYTHONPATH=. python3 benchmarks/eager_fused_gpu.py [--tokens 1,256,2048,8192] [--layers 4]
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from llamadist.cli.bench_shape import int_list, random_model
from llamadist.config import named_shape
from llamadist.kernels import eager_fused
from llamadist.model.fuse import fuse_projections
from llamadist.model.rope import apply_rotary
from llamadist.runtime.kernel_passes import use_eager_fused


def timed(fn, reps: int) -> float:
    """Median ms of ``fn`` over ``reps`` CUDA-event-timed calls (after one warm-up)."""
    fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def ulps(got: torch.Tensor, eager: torch.Tensor) -> str:
    """The largest difference in ulps of eager's value (at least eps times the tensor's
    largest magnitude: near an exact zero a subnormal's spacing would make any difference
    look like 1e37 ulps), and how many elements differ."""
    a = eager.abs()
    spacing = (torch.nextafter(a, torch.full_like(a, float("inf"))) - a).double()
    spacing = spacing.clamp_min(torch.finfo(eager.dtype).eps * a.max().double().item())
    diff = (got.double() - eager.double()).abs()
    return f"{(diff / spacing).max().item():g} ({int((diff > 0).sum())} differ)"


def rms_eager(x, r, w, eps=1e-5):
    s = x + r
    x32 = s.float()
    return s, w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(s.dtype)


def op_table(cfg, tokens: list[int], reps: int, dev: torch.device) -> None:
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    h, h_kv = cfg.num_heads, cfg.num_kv_heads
    dt = torch.bfloat16
    print("op           N   eager ms  fused ms  speedup  max ulps")
    for n in tokens:
        x, r = torch.randn(n, d, device=dev, dtype=dt), torch.randn(n, d, device=dev, dtype=dt)
        w = torch.randn(d, device=dev, dtype=dt)
        gu = torch.randn(n, 2 * f, device=dev, dtype=dt)
        qkv = torch.randn(n, (h + 2 * h_kv) * hd, device=dev, dtype=dt)
        q, k, _ = qkv.split([h * hd, h_kv * hd, h_kv * hd], dim=-1)
        q, k = q.view(n, h, hd), k.view(n, h_kv, hd)
        ang = torch.rand(n, hd, device=dev) * 100
        cos, sin = ang.cos().to(dt), ang.sin().to(dt)

        def silu_eager():
            gate, up = gu.chunk(2, dim=-1)
            return F.silu(gate) * up

        def rope_eager():
            return (apply_rotary(q, cos[:, None], sin[:, None]),
                    apply_rotary(k, cos[:, None], sin[:, None]))

        cases = [("add_rms_norm", lambda: rms_eager(x, r, w),
                  lambda: eager_fused.add_rms_norm(x, r, w, 1e-5)),
                 ("silu_mul", silu_eager, lambda: eager_fused.silu_mul(gu)),
                 ("rope_qk", rope_eager, lambda: eager_fused.rope(q, k, cos, sin))]
        for name, eager, fused in cases:
            diff = ", ".join(ulps(g, e) for g, e in zip(_tuple(fused()), _tuple(eager())))
            te, tf = [], []
            for _ in range(3):  # alternate, so drift hits both alike
                te.append(timed(eager, reps))
                tf.append(timed(fused, reps))
            te, tf = min(te), min(tf)
            print(f"{name:12s} {n:5d} {te:9.4f} {tf:9.4f} {te / tf:7.2f}x {diff}",
                  flush=True)


def _tuple(x):
    return x if isinstance(x, tuple) else (x,)


class OneSequence:
    """A FlatLayerKV: the step's N tokens are one whole sequence, attending causally."""

    def layer(self, i: int) -> "OneSequence":
        return self

    def attend(self, q, k, v):  # (N, H, D), (N, H_kv, D) -> (N, H, D)
        g = q.shape[1] // k.shape[1]  # K/V repeated per query head: SDPA's flash kernel
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
        out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1),
                                             v.transpose(0, 1), is_causal=True)
        return out.transpose(0, 1)


def layer_table(cfg, tokens: list[int], layers: int, reps: int, dev: torch.device) -> None:
    model = fuse_projections(random_model(cfg, dev, torch.bfloat16, range(layers),
                                          has_embed=False, has_head=False))
    model.setup_rope(max(tokens) + 1, dev)
    print(f"\n{layers} layers, one flat prefill of N tokens: ms off / on (alternating)")
    for n in tokens:
        hidden = torch.randn(1, n, cfg.hidden_size, device=dev, dtype=torch.bfloat16)
        pos = torch.arange(n, device=dev)[None]

        def step():
            with torch.no_grad():
                return model(hidden, pos, OneSequence(), 0, logits="none")

        outs, times = {}, {False: [], True: []}
        for _ in range(3):
            for on in (False, True):
                use_eager_fused(model, dev, torch.bfloat16, on=on)
                times[on].append(timed(step, reps))
                outs[on] = step()
        off, on = min(times[False]), min(times[True])
        diff = (outs[True].float() - outs[False].float()).abs().max().item()
        print(f"N {n:5d}: off {off:8.3f} ms  on {on:8.3f} ms  {off / on:5.2f}x  "
              f"({(off - on) / layers:.3f} ms a layer; max |on - off| {diff:.3g})", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama3-8b")
    p.add_argument("--tokens", type=int_list, default=[1, 256, 2048, 8192])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--reps", type=int, default=20)
    a = p.parse_args()
    dev = torch.device("cuda")
    cfg = named_shape(a.shape)
    assert eager_fused.usable(dev, torch.bfloat16), "needs CUDA and triton"
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    op_table(cfg, a.tokens, a.reps, dev)
    layer_table(cfg, a.tokens, a.layers, a.reps, dev)


if __name__ == "__main__":
    main()
