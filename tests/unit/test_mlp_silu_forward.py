"""MLP.forward hands SiLU-mul to a down projection that takes it into its own kernel
(``silu_forward``: PackedLinear's, for int4 decode rows on CUDA), and runs it itself where
that returns None or the down projection has none."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llamadist.config import ModelConfig
from llamadist.model.fuse import fuse_mlp
from llamadist.model.llama import MLP


class _Down(nn.Linear):
    def __init__(self, f: int, d: int, serve: bool):
        super().__init__(f, d, bias=False)
        self.serve, self.seen = serve, []

    def silu_forward(self, gate_up):
        self.seen.append(tuple(gate_up.shape))
        if not self.serve:
            return None
        gate, up = gate_up.chunk(2, dim=-1)
        return 2 * super().forward(F.silu(gate) * up)  # tells the two paths apart


def _mlp(serve: bool | None) -> tuple[MLP, torch.Tensor]:
    cfg = ModelConfig(vocab_size=8, hidden_size=16, intermediate_size=24, num_layers=1,
                      num_heads=2, num_kv_heads=2, head_dim=8)
    torch.manual_seed(0)
    mlp = MLP(cfg)
    ref = mlp.down_proj.weight.detach().clone()
    if serve is not None:
        mlp.down_proj = _Down(24, 16, serve)
        mlp.down_proj.weight.data.copy_(ref)
    fuse_mlp(mlp)
    return mlp, torch.randn(3, 16)


def test_down_takes_silu_mul_when_it_serves():
    mlp, x = _mlp(serve=True)
    plain, _ = _mlp(serve=None)
    out = mlp(x)
    assert mlp.down_proj.seen == [(3, 48)]
    torch.testing.assert_close(out / 2, plain(x))


def test_mlp_runs_silu_mul_where_the_down_projection_declines():
    mlp, x = _mlp(serve=False)
    plain, _ = _mlp(serve=None)
    out = mlp(x)
    assert mlp.down_proj.seen == [(3, 48)]
    torch.testing.assert_close(out, plain(x))
