"""Perplexity over a text, as llama.cpp's llama-perplexity computes it.

The text's tokens are cut into non-overlapping windows of ``ctx`` tokens (a last partial
window is dropped); each window is evaluated from an empty cache, its first token
replaced by BOS where the tokenizer adds one, and only the second half of each window is
scored: the logits at positions ``ctx // 2 .. ctx - 2`` predict tokens ``ctx // 2 + 1 ..
ctx - 1``, so every scored token has at least ``ctx // 2`` tokens of context. The result
is ``exp(mean NLL)`` over every scored token, with llama.cpp's +/- estimate: the standard
error of the mean NLL (sample variance over count - 1), times the perplexity.

Pure: token ids and logits in, numbers out. The command (llamadist.cli.perplexity) runs
the windows through the stages.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


def make_windows(ids: list[int], ctx: int, bos: int | None) -> list[list[int]]:
    """Non-overlapping windows of ``ctx`` tokens; the first of each replaced by ``bos``
    (None: kept as is)."""
    if ctx < 4:
        raise ValueError(f"--ctx {ctx}: a window needs at least 4 tokens (half of it is "
                         f"scored); use --ctx 512 or so")
    out = []
    for s in range(0, len(ids) - ctx + 1, ctx):
        w = list(ids[s:s + ctx])
        if bos is not None:
            w[0] = bos
        out.append(w)
    if not out:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one window of --ctx "
                         f"{ctx}; give a longer text or a smaller --ctx")
    return out


def first_scored(ctx: int) -> int:
    """Index of the first logit row a window scores (it predicts token first + 1)."""
    return ctx // 2


@dataclass
class PerplexityResult:
    ppl: float
    ppl_err: float          # +/- : standard error of the mean NLL, times ppl
    nll: float              # mean negative log-likelihood per scored token (nats)
    tokens: int             # tokens scored
    windows: int
    ctx: int
    window_ppl: list[float] = field(default_factory=list)  # running ppl after each window

    def to_dict(self) -> dict:
        return {"ppl": self.ppl, "ppl_err": self.ppl_err, "nll": self.nll,
                "tokens_scored": self.tokens, "windows": self.windows, "ctx": self.ctx,
                "window_ppl": self.window_ppl}


class PerplexityMeter:
    """Accumulates the scored tokens' NLL window by window (sums in float64)."""

    def __init__(self, ctx: int) -> None:
        self.ctx = ctx
        self.first = first_scored(ctx)
        self.sum = 0.0
        self.sum_sq = 0.0
        self.count = 0
        self.windows = 0
        self.running: list[float] = []

    def add(self, logits: torch.Tensor, windows: torch.Tensor) -> None:
        """logits (B, ctx, V) of windows (B, ctx) token ids (any device, any float dtype)."""
        b, t, _ = logits.shape
        if t != self.ctx or tuple(windows.shape) != (b, t):
            raise ValueError(f"logits {tuple(logits.shape)} do not match windows "
                             f"{tuple(windows.shape)} of ctx {self.ctx}")
        rows = logits[:, self.first:t - 1].float()                  # (B, n, V)
        target = windows[:, self.first + 1:].to(rows.device)        # (B, n)
        logp = torch.log_softmax(rows, dim=-1)
        nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1).double().cpu()  # (B, n)
        for row in nll:
            self.sum += float(row.sum())
            self.sum_sq += float((row * row).sum())
            self.count += row.numel()
            self.windows += 1
            self.running.append(math.exp(self.sum / self.count))

    def result(self) -> PerplexityResult:
        if self.count == 0:
            raise ValueError("no window was scored")
        mean = self.sum / self.count
        var = self.sum_sq / self.count - mean * mean
        ppl = math.exp(mean)
        err = math.sqrt(var / (self.count - 1)) * ppl if var > 0 and self.count > 1 else 0.0
        return PerplexityResult(ppl, err, mean, self.count, self.windows, self.ctx,
                                list(self.running))
