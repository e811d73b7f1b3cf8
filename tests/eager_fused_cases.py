"""Cases for the fused eager kernels (llamadist.kernels.eager_fused) against the eager
PyTorch formula they replace and a float64 reference: run by tests/unit/test_eager_fused.py
as ``python -m tests.eager_fused_cases kernels|model`` with TRITON_INTERPRET=1 (it must be
set before triton is imported), and usable on a GPU (``--device cuda``).

Bounds: bf16 / fp16 outputs within 1 ulp of the eager formula's (each element, the ulp
at the eager value), float32 within 8 ulps, or else nearer the float64 value than eager;
and at most an ulp of the largest value further from the float64 reference than eager.
RoPE and SiLU * up repeat the eager roundings, so they usually match bitwise; RMSNorm
sums in another order."""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from llamadist.model.rope import apply_rotary

# float32: the sum's order and, compiled, the GPU's approximate exp / rsqrt
ULPS = {torch.bfloat16: 1, torch.float16: 1, torch.float32: 8}
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
FAILED: list[str] = []  # the cases that broke their bounds (every case runs; main reports)


def _spacing(t: torch.Tensor) -> torch.Tensor:
    """The ulp of each element of t (in t's dtype), as float64."""
    a = t.abs()
    return (torch.nextafter(a, torch.full_like(a, float("inf"))) - a).double()


def check(name: str, got: torch.Tensor, eager: torch.Tensor, ref: torch.Tensor) -> None:
    """Print one line; where got breaks the bounds of the module docstring, add the case
    to FAILED (main exits non-zero after every case)."""
    assert got.shape == eager.shape and got.dtype == eager.dtype, (got.shape, eager.shape)
    g, e, r = got.cpu().double(), eager.cpu().double(), ref.cpu().double()
    ulps = (g - e).abs() / _spacing(eager.cpu())
    # an element further from eager is fine where it is nearer the float64 value (torch's
    # CPU fp16 silu is not always rounded to nearest; CUDA's is)
    far = (ulps > ULPS[eager.dtype]) & ((g - r).abs() > (e - r).abs())
    err_k, err_e = (g - r).abs().max().item(), (e - r).abs().max().item()
    top = _spacing(r.abs().max().to(eager.dtype)).item()
    ok = not far.any() and err_k <= err_e + top
    print(f"{name}: max ulps {ulps.max().item():g} ({int((ulps > 0).sum())} of "
          f"{ulps.numel()} differ), |kernel-f64| {err_k:.3g}, |eager-f64| {err_e:.3g} "
          f"{'ok' if ok else 'FAIL'}")
    if not ok:
        FAILED.append(name)


def exact_bf16_casts() -> None:
    """Triton's interpreter casts float32 to bfloat16 by truncation (and its "rtne" mode
    carries no overflow into the exponent), where the GPU's cvt.rn rounds to nearest
    even, as torch does; make the interpreter's float32 -> bfloat16 cast torch's, so the
    interpreted bf16 results are the compiled kernel's."""
    import numpy as np
    import triton.language as tl
    import triton.runtime.interpreter as ti
    if getattr(ti, "_llamadist_bf16", False):
        return
    original = ti._convert_float

    def convert(data, src, dst, rounding_mode):
        if src == tl.float32 and dst == tl.bfloat16:
            f32 = np.ascontiguousarray(data).view(np.float32)
            out = torch.from_numpy(f32.copy()).to(torch.bfloat16).view(torch.int16)
            return out.numpy().view(np.uint16)
        return original(data, src, dst, rounding_mode)

    ti._convert_float = convert
    ti._llamadist_bf16 = True


def rms_eager(x, w, eps):
    x32 = x.float()
    return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rms_f64(x, w, eps):
    x = x.double()
    return w.double() * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def norm_cases(device: str) -> None:
    from llamadist.kernels.eager_fused import add_rms_norm
    g = torch.Generator().manual_seed(0)
    # D: SmolLM2's 576 (not a power of two), Llama-3-8B's 4096, a short odd tail
    for i, (n, d) in enumerate(((37, 576), (1, 4096), (5, 100))):
        for j, dtype in enumerate(DTYPES):
            x = (torch.randn(n, d, generator=g) * 3).to(device, dtype)
            r = torch.randn(n, d, generator=g).to(device, dtype)
            w = (1 + 0.1 * torch.randn(d, generator=g)).to(device, dtype)
            residual = None if (i + j) % 3 == 2 else r
            s, y = add_rms_norm(x, residual, w, 1e-5)
            s_eager = x if residual is None else x + residual
            assert torch.equal(s, s_eager), "the residual sum differs"
            check(f"add_rms_norm n={n} d={d} {dtype} residual={residual is not None}",
                  y, rms_eager(s_eager, w, 1e-5), rms_f64(s_eager, w, 1e-5))
    x = torch.randn(2, 3, 64, generator=g).to(device, torch.bfloat16)  # (B, T, D), fp32 w
    w = torch.randn(64, generator=g).to(device)
    s, y = add_rms_norm(x, x, w, 1e-6)
    check("add_rms_norm (2, 3, 64) bf16 x float32 weight", y, rms_eager(x + x, w, 1e-6),
          rms_f64(x + x, w, 1e-6))
    r32 = torch.randn(2, 3, 64, generator=g).to(device)  # a float32 residual: the sum promotes
    s, y = add_rms_norm(x, r32, w, 1e-6)
    assert s.dtype == torch.float32 and torch.equal(s, x + r32)
    check("add_rms_norm (2, 3, 64) bf16 x + float32 residual", y, rms_eager(x + r32, w, 1e-6),
          rms_f64(x + r32, w, 1e-6))


def silu_cases(device: str) -> None:
    from llamadist.kernels.eager_fused import silu_mul
    g = torch.Generator().manual_seed(1)
    # F: SmolLM2's 1536 (six column blocks of 256), a short odd width (one block of 128
    # with a tail), and enough columns for blocks of 1024 (the last a tail)
    for i, (n, f) in enumerate(((37, 1536), (1, 1536), (3, 99), (37, 7400))):
        for dtype in DTYPES:
            gu = (torch.randn(n, 2 * f, generator=g) * 4).to(device, dtype)
            gate, up = gu.chunk(2, dim=-1)
            # float64 arithmetic with the formula's one stored intermediate, silu(gate)
            ref = F.silu(gate.double()).to(dtype).double() * up.double()
            check(f"silu_mul n={n} f={f} {dtype}", silu_mul(gu), F.silu(gate) * up, ref)


def rope_cases(device: str) -> None:
    from llamadist.kernels.eager_fused import rope
    from llamadist.model.rope import rotate_half
    g = torch.Generator().manual_seed(2)
    # (N, H, H_kv, D): SmolLM2 (9 heads over 3, D 64), Llama-3-8B at one token, D = 10
    for n, h, h_kv, d in ((37, 9, 3, 64), (1, 32, 8, 128), (4, 3, 1, 10)):
        for dtype in DTYPES:
            # q and k as views of one (N, (H + 2 H_kv) D) projection output, as forward_flat
            qkv = torch.randn(n, (h + 2 * h_kv) * d, generator=g).to(device, dtype)
            q, k, _ = qkv.split([h * d, h_kv * d, h_kv * d], dim=-1)
            q, k = q.view(n, h, d), k.view(n, h_kv, d)
            ang = torch.rand(n, d // 2, generator=g) * 100
            ang = torch.cat((ang, ang), dim=-1)
            cos, sin = ang.cos().to(device, dtype), ang.sin().to(device, dtype)
            qo, ko = rope(q, k, cos, sin)
            for name, x, got in (("q", q, qo), ("k", k, ko)):
                c, s = cos[:, None], sin[:, None]  # (N, 1, D) over the heads
                ref = x.double() * c.double() + rotate_half(x.double()) * s.double()
                check(f"rope {name} n={n} h={x.shape[1]} d={d} {dtype}", got,
                      apply_rotary(x, c, s), ref)


def random_model(hidden, inter, heads, kv_heads, head_dim, dtype, seed=0):
    from tests.tiny import random_fused_llama
    return random_fused_llama(seed, hidden_size=hidden, intermediate_size=inter,
                              num_attention_heads=heads, num_key_value_heads=kv_heads,
                              head_dim=head_dim).to(dtype)


class OneSequence:
    """A FlatLayerKV for one sequence whose N tokens are all in the step (positions 0..N-1):
    causal attention over them, nothing stored."""

    def layer(self, i: int) -> "OneSequence":
        return self

    def attend(self, q, k, v):  # (N, H, D), (N, H_kv, D) -> (N, H, D)
        out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1),
                                             v.transpose(0, 1), is_causal=True,
                                             enable_gqa=q.shape[1] != k.shape[1])
        return out.transpose(0, 1)


def count_calls(model) -> dict[str, int]:
    """Wrap the fused kernels set on ``model``'s modules to count their calls (in the
    returned dict, by attribute)."""
    calls: dict[str, int] = {}

    def counted(name, fn):
        def call(*args):
            calls[name] = calls.get(name, 0) + 1
            return fn(*args)
        return call

    for m in model.modules():
        for name in ("add_norm", "silu_mul", "rotary_qk"):
            fn = getattr(m, name, None)
            if fn is not None:
                setattr(m, name, counted(name, fn))
    return calls


def model_cases() -> None:
    """A 2-layer random model's logits over 13 tokens, every fused kernel on (through the
    interpreter) against all off: the flat path (RoPE kernel) and the contiguous cache
    path. float32 within 1e-5 of the largest logit; bf16 within 2e-2 of it (a bf16 ulp of
    the hidden state, carried through two layers and the head)."""
    from llamadist.runtime.kernel_passes import use_eager_fused
    from llamadist.runtime.kv_cache import KVCache
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
    # SmolLM2-like heads (GQA 4 over 2, D 16), and odd widths (D = 10, hidden 36)
    for shape in ((64, 128, 4, 2, 16), (36, 44, 3, 1, 10)):
        for dtype in tol:
            model = random_model(*shape, dtype=dtype)
            ids = torch.randint(0, 50, (1, 13), generator=torch.Generator().manual_seed(3))
            pos = torch.arange(13)[None]
            outs = []
            for on in (False, True):
                assert use_eager_fused(model, torch.device("cpu"), dtype, on=on) == on
                calls = count_calls(model)
                with torch.no_grad():
                    flat = model(ids, pos, OneSequence(), 0, logits="all")
                    cache = KVCache(model.config, range(2), 1, 16, "cpu", dtype)
                    contiguous = model(ids, pos, cache, 0, logits="all")
                outs.append((flat.float(), contiguous.float()))
            # per forward: 2 norms a layer and the final one, an MLP a layer, RoPE a
            # layer on the flat path only
            assert calls == {"add_norm": 10, "silu_mul": 4, "rotary_qk": 2}, calls
            scale = outs[0][0].abs().max().item()
            for k, path in enumerate(("flat", "contiguous")):
                diff = (outs[1][k] - outs[0][k]).abs().max().item()
                ok = diff <= tol[dtype] * scale
                print(f"model {shape} {dtype} {path}: max |fused - eager| {diff:.3g} "
                      f"(largest logit {scale:.3g}) {'ok' if ok else 'FAIL'}")
                assert ok


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["kernels", "model"])
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    if a.device == "cpu":
        from tests.paged_kernel_cases import patch_interpreter
        patch_interpreter()  # (its speed-up: the kernels call tl.cdiv and other jit helpers)
        exact_bf16_casts()
    if a.what == "kernels":
        norm_cases(a.device)
        silu_cases(a.device)
        rope_cases(a.device)
    else:
        model_cases()
    if FAILED:
        sys.exit(f"{len(FAILED)} FAILED: " + ", ".join(FAILED))
    print("ALL OK")


if __name__ == "__main__":
    main()
