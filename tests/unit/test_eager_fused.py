"""The fused eager kernels (llamadist/kernels/eager_fused.py: add + RMSNorm, SiLU * up,
q/k RoPE) through Triton's interpreter against the eager formula and float64
(tests/eager_fused_cases.py, in a subprocess: TRITON_INTERPRET must be set before triton
is imported), a tiny model with them on against off, and the switch in the model: the
kernels serve eager calls only, never code torch.compile traces."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from llamadist.kernels import eager_fused
from llamadist.runtime.kernel_passes import use_eager_fused
from tests.eager_fused_cases import count_calls, random_model
from tests.interpreted import start_all
no_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                               reason="triton not installed")


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """Both interpreted runs of this module started at once (tests/interpreted.py)."""
    runs = start_all(tmp_path_factory.mktemp("eager_fused_runs"), "eager_fused_cases",
                     {what: (what,) for what in ("kernels", "model")})
    yield runs
    for run in runs.values():
        run.stop()


@no_triton
def test_kernels_interpreted_match_the_eager_formula(interpreted):
    """bf16 / fp16 within an ulp of eager (RoPE bitwise), float32 within 8 ulps, for
    D = 576, 4096, 100; N = 1, 5, 37; F = 1536, 99, 7400; head sizes 64, 128, 10."""
    proc = interpreted["kernels"].result()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "ALL OK" in proc.stdout
    assert proc.stdout.count(" ok\n") == 11 + 12 + 18, proc.stdout[-2000:]
    rope = [line for line in proc.stdout.splitlines() if line.startswith("rope ")]
    assert len(rope) == 18 and all("max ulps 0 (0 of" in line for line in rope), rope


@no_triton
def test_tiny_model_interpreted_equals_eager(interpreted):
    """Logits with every fused kernel on equal those with all off: float32 within 1e-5
    of the largest, bf16 within 2e-2, on the flat (RoPE kernel) and contiguous paths."""
    proc = interpreted["model"].result()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert proc.stdout.count(" ok\n") == 8, proc.stdout[-2000:]


def test_not_offered_on_the_cpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not eager_fused.usable(torch.device("cpu"), torch.bfloat16)
    model = random_model(32, 48, 2, 1, 16, torch.float32)
    assert not use_eager_fused(model, torch.device("cpu"), torch.float32)
    assert all(getattr(m, "add_norm", None) is None for m in model.modules())


def _eager_formula_hooks(model) -> None:
    """Set the model's fused hooks to plain-PyTorch stand-ins (the formula itself), so the
    switch is tested without triton."""
    from llamadist.model.llama import MLP, Attention, RMSNorm
    from llamadist.model.rope import apply_rotary

    def add_norm(x, residual, weight, eps):
        s = x if residual is None else x + residual
        x32 = s.float()
        return s, weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(
            s.dtype)

    def silu_mul(gu):
        gate, up = gu.chunk(2, dim=-1)
        return torch.nn.functional.silu(gate) * up

    def rotary_qk(q, k, cos, sin):
        return apply_rotary(q, cos[:, None], sin[:, None]), apply_rotary(k, cos[:, None],
                                                                         sin[:, None])

    for m in model.modules():
        if isinstance(m, RMSNorm):
            m.add_norm = add_norm
        elif isinstance(m, MLP):
            m.silu_mul = silu_mul
        elif isinstance(m, Attention):
            m.rotary_qk = rotary_qk


def test_compiled_layer_runs_the_model_formula_not_the_kernels():
    """Eagerly a layer calls the hooks a pass set; under torch.compile (the decode graphs'
    compiled layer) it calls none and gives the same values."""
    from llamadist.runtime.kv_cache import KVCache
    model = random_model(32, 48, 2, 1, 16, torch.float32)
    _eager_formula_hooks(model)
    calls = count_calls(model)
    layer, cfg = model.model.layers["1"], model.config
    h, pending = torch.randn(2, 3, 32), torch.randn(2, 3, 32)
    cos, sin = model.rope.lookup(torch.arange(3).expand(2, 3), torch.float32)

    def run(layer, h, pending, cache):
        return layer.forward_deferred(h, pending, cos, sin, cache.layer(1), 0, None)

    with torch.no_grad():
        eager = run(layer, h, pending, KVCache(cfg, [1], 2, 8, "cpu", torch.float32))
        assert calls == {"add_norm": 2, "silu_mul": 1}
        compiled = torch.compile(run, backend="eager", fullgraph=True)(
            layer, h, pending, KVCache(cfg, [1], 2, 8, "cpu", torch.float32))
    assert calls == {"add_norm": 2, "silu_mul": 1}  # none more under compile
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


class RotatingProjection(torch.nn.Linear):
    """A stand-in for a q | k | v projection whose kernel rotates q and k (PackedLinear's
    rope_forward on int4's decode rows): the product, then the formula, with its calls
    recorded; ``offer`` False: it declines (None), as past the decode rows."""

    def __init__(self, linear: torch.nn.Linear, offer: bool, calls: list):
        super().__init__(linear.in_features, linear.out_features, bias=False)
        self.weight, self.offer, self.calls = linear.weight, offer, calls

    def rope_forward(self, x, rope, kv=None):
        from llamadist.model.rope import apply_rotary
        cos, sin, rot = rope
        assert kv is None  # (OneSequence offers no cache_slots)
        self.calls.append((tuple(x.shape), tuple(cos.shape), tuple(sin.shape), rot))
        if not self.offer:
            return None
        y = self(x).reshape(-1, self.out_features)
        d = cos.shape[-1]
        heads = y[:, :rot].view(y.shape[0], rot // d, d)
        y = torch.cat([apply_rotary(heads, cos[:, None], sin[:, None]).flatten(1),
                       y[:, rot:]], dim=1)
        return y.view(*x.shape[:-1], -1)


@pytest.mark.parametrize("offer", [True, False])
def test_a_projection_that_rotates_skips_the_rope_kernel(offer):
    """A flat batch's attention asks its fused q | k | v projection for q and k rotated
    (cos / sin one row a token, the first H + H_kv heads' columns): where it gives them,
    the RoPE kernel is not called; where it declines, the kernel rotates; the logits are
    the same either way, and under torch.compile the projection is not asked."""
    from tests.eager_fused_cases import OneSequence
    model = random_model(32, 48, 4, 2, 8, torch.float32)
    ids, pos = torch.tensor([[3, 1, 4, 1, 5]]), torch.arange(5)[None]
    with torch.no_grad():
        plain = model(ids, pos, OneSequence(), 0, logits="all")
        _eager_formula_hooks(model)
        calls, asked = count_calls(model), []
        for layer in model.model.layers.values():
            attn = layer.self_attn
            attn.qkv_proj = RotatingProjection(attn.qkv_proj, offer, asked)
        fused = model(ids, pos, OneSequence(), 0, logits="all")
        # two layers: (x (1, 5, 32), cos / sin (5, D 8), rot = (4 + 2) heads x 8)
        assert asked == [((1, 5, 32), (5, 8), (5, 8), 48)] * 2
        assert calls.get("rotary_qk", 0) == (0 if offer else 2)
        torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-6)
        compiled = torch.compile(lambda: model(ids, pos, OneSequence(), 0, logits="all"),
                                 backend="eager", fullgraph=True)()
    assert len(asked) == 2 and calls.get("rotary_qk", 0) == (0 if offer else 2)
    torch.testing.assert_close(compiled, plain, rtol=1e-6, atol=1e-6)


def test_eager_kernels_knob():
    """--eager-kernels: triton (the fused kernels, where Triton runs) by default since the
    H200 measured them (session 13), torch on request; a bad value is refused by name."""
    import argparse

    from llamadist.cli.args import runtime_config
    from llamadist.config import ConfigError, RuntimeConfig
    assert RuntimeConfig().eager_kernels == "triton"
    assert runtime_config(argparse.Namespace(eager_kernels="torch")).eager_kernels == "torch"
    with pytest.raises(ConfigError, match="--eager-kernels"):
        RuntimeConfig(eager_kernels="cuda")
