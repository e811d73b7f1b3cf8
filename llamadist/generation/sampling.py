"""Pure, per-request sampling on the device that holds the logits, with no host syncs.

A request's tokens depend on its prompt, its params and its seed only: never on which
other requests share the batch, the batch size, the micro-batching, the device or the
process count. Three things make that so:

* Every row is sampled by row-wise operations with its own knobs (temperature, top-k,
  top-p, min-p, repetition penalty held as (B, 1) tensors), so a row's result is the same
  whatever the other rows are.
* The randomness is counter-based: the uniform number for (request seed, step, token id)
  is a fixed integer hash of those three, computed on the logits' device with exact int64
  arithmetic. No generator state is shared between rows, and CPU and CUDA draw the same
  bits (``reference_uniform`` is the same stream in plain Python). Step k is the request's
  k-th sampled token, so where the request runs, or how its prompt was chunked, does not
  matter.
* An unseeded request gets a seed from the operating system (``new_seed``), recorded so
  the run can be repeated; the caller's global torch RNG is never read or reseeded.

A seed is folded into a 32-bit stream key (``seed_key``): two seeds with the same key draw
the same stream, a 2^-32 chance per pair that costs nothing but two alike requests.

The draw is the exponential race: argmax(p / E) with E = -log(U) ~ Exp(1) picks token i
with probability p_i, without renormalising and without a host sync. The trade against
``Tensor.exponential_``: about twenty elementwise integer passes over (B, V) per sampled
step instead of one, paid only when some row samples (greedy rows skip the noise).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from llamadist.config import to_device
from llamadist.generation.params import SamplingParams, new_seed  # noqa: F401 - re-exported


def request_seeds(params: Sequence[SamplingParams]) -> list[int]:
    """Each request's concrete seed: its own, or a fresh one from the OS."""
    return [p.seed if p.seed is not None else new_seed() for p in params]


# ---- the counter-based stream ------------------------------------------------------
# murmur3's 32-bit finaliser, on int64 tensors holding values in [0, 2^32). The products
# are split in 16-bit halves so nothing overflows int64 on any device.
_M32 = 0xFFFFFFFF
_FMIX = (0x85EBCA6B, 0xC2B2AE35)
_GOLDEN = 0x9E3779B9  # Weyl step between token ids
_STEP = 0x27D4EB2F  # mixes the step into the row key


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """x * c mod 2^32, for x in [0, 2^32): (x*lo + ((x*hi) mod 2^16) << 16) mod 2^32."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32


def _fmix(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, _FMIX[0])
    x = x ^ (x >> 13)
    x = _mul32(x, _FMIX[1])
    return x ^ (x >> 16)


def _fmix_int(x: int) -> int:
    x ^= x >> 16
    x = (x * _FMIX[0]) & _M32
    x ^= x >> 13
    x = (x * _FMIX[1]) & _M32
    return x ^ (x >> 16)


def seed_key(seed: int) -> int:
    """A request's 32-bit stream key from its (any-size) integer seed."""
    s = seed % 2**64
    return _fmix_int((s & _M32) ^ _fmix_int((s >> 32) ^ 0x6A09E667))


def _step_keys(keys: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """keys, steps (B,) int64 -> (B,) the key of each row's current step."""
    return _fmix(keys ^ _fmix((steps * _STEP) & _M32))


def uniform(keys: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """(B,) keys and (B,) steps -> (B, V) float32 uniforms in (0, 1), a pure function of
    (key, step, token id) and the same bits on every device."""
    ids = torch.arange(vocab, device=keys.device, dtype=torch.int64)  # (V,)
    x = _fmix((_step_keys(keys, steps).view(-1, 1) + ids * _GOLDEN) & _M32)  # (B, V)
    return ((x >> 8).to(torch.float32) + 0.5) * (1.0 / 2**24)  # 24 bits: exact in float32


def reference_uniform(seed: int, step: int, token: int) -> float:
    """The same stream in plain Python, for other implementations and tests."""
    ks = _fmix_int(seed_key(seed) ^ _fmix_int((step * _STEP) & _M32))
    x = _fmix_int((ks + token * _GOLDEN) & _M32)
    return ((x >> 8) + 0.5) / 2**24


# ---- the sampler ---------------------------------------------------------------------
def plain_argmax(params: Sequence[SamplingParams]) -> bool:
    """Whether every request's token is the argmax of its raw logits (greedy, and no
    penalty that changes them): no Sampler is needed, ``greedy_tokens`` is the draw."""
    return all(p.greedy and p.repetition_penalty == 1.0 and not p.counts_outputs
               for p in params)


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """(B, V) -> (B,) int64: each row's argmax, the first of equal maxima (a NaN counts
    as the maximum). Float32 logits on the CPU go through numpy's argmax, which is
    vectorized: ~4 us over a 49152-token vocabulary against ~45 for ``Tensor.argmax``
    (benchmarks/RESULTS.md), the same index by the same rule."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.dim() == 2:
        return torch.from_numpy(logits.detach().numpy().argmax(axis=-1).astype("int64", copy=False))
    return logits.argmax(dim=-1)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor,
                             penalty: torch.Tensor | float) -> torch.Tensor:
    """logits (B, V) float32; seen (B, V) bool; penalty a float or (B, 1)."""
    if isinstance(penalty, float) and penalty == 1.0:
        return logits
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


class Sampler:
    """Samples one token per row for a batch of requests, each with its own params and
    seed; ``steps`` counts each row's sampled tokens (on the device, so no host sync)."""

    def __init__(self, params: Sequence[SamplingParams], seeds: Sequence[int],
                 device: torch.device | str, seen: torch.Tensor | None = None,
                 counts: torch.Tensor | None = None):
        """``seen`` (B, V) bool: the tokens a repetition penalty applies to; ``counts``
        (B, V) float32: how often each token was generated (presence and frequency
        penalties); each needed only when some row asks for its penalty."""
        if len(params) != len(seeds):
            raise ValueError(f"{len(params)} params but {len(seeds)} seeds")
        dev = torch.device(device)
        self.params, self.seeds = list(params), list(seeds)
        self.all_greedy = all(p.greedy for p in params)
        penalised = any(p.repetition_penalty != 1.0 for p in params)
        self.seen = seen if penalised else None
        self.any_top_k = any(p.top_k > 0 and not p.greedy for p in params)
        self.any_top_p = any(p.top_p < 1.0 and not p.greedy for p in params)
        self.any_min_p = any(p.min_p > 0 and not p.greedy for p in params)
        self.counts = counts if any(p.counts_outputs for p in params) else None
        self.steps = torch.zeros(len(seeds), dtype=torch.int64, device=dev)  # (B,)
        if self.all_greedy and not penalised and self.counts is None:
            return  # an argmax needs no per-row knobs (and no host-to-device copies)
        # Every per-row knob in two host tensors, each copied to the device once (a copy
        # from pageable memory waits for the GPU; eight of them per step did).
        floats = torch.tensor([[p.temperature if not p.greedy else 1.0, p.top_p, p.min_p,
                                p.repetition_penalty, float(p.greedy), p.presence_penalty,
                                p.frequency_penalty] for p in params],
                              dtype=torch.float32)
        floats = to_device(floats, dev)  # (B, 7)
        ints = to_device(torch.tensor([[p.top_k, seed_key(s)] for p, s in zip(params, seeds)],
                                      dtype=torch.int64), dev)  # (B, 2)
        self.temperature, self.top_p, self.min_p, self.penalty = (
            floats[:, i:i + 1] for i in range(4))  # (B, 1) each
        self.greedy = floats[:, 4:5] > 0.5
        self.presence, self.frequency = floats[:, 5:6], floats[:, 6:7]  # (B, 1) each
        self.top_k = ints[:, 0:1]
        self.keys = ints[:, 1].contiguous()  # (B,)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (B, V) -> tokens (B,) long, on the logits' device; advances every row's
        step and marks the tokens seen."""
        tok = self.sample(logits)
        self.steps += 1
        if self.seen is None and self.counts is None:
            return tok
        rows = torch.arange(len(tok), device=tok.device)
        if self.seen is not None:
            self.seen[rows, tok] = True
        if self.counts is not None:
            self.counts[rows, tok] += 1
        return tok

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        """The draw for the rows' current steps, without advancing them."""
        logits = logits.float()
        if self.seen is not None:
            logits = apply_repetition_penalty(logits, self.seen, self.penalty)
        if self.counts is not None:
            logits = (logits - self.frequency * self.counts
                      - self.presence * (self.counts > 0).float())
        best = greedy_tokens(logits)
        if self.all_greedy:
            return best
        probs = self.filtered_probs(logits)
        noise = -torch.log(uniform(self.keys, self.steps, probs.shape[-1]))  # (B, V) ~ Exp(1)
        drawn = (probs / noise).argmax(dim=-1)
        return torch.where(self.greedy.view(-1), best, drawn)

    def filtered_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, V) logits -> (B, V) unnormalised probabilities after temperature, top-k,
        min-p and top-p, each row with its own knobs (an off knob changes nothing)."""
        logits = logits / self.temperature
        if self.any_top_k:
            v = logits.shape[-1]
            k = torch.where(self.top_k > 0, self.top_k.clamp(max=v), v)  # (B, 1)
            kth = logits.sort(dim=-1, descending=True).values.gather(-1, k - 1)  # (B, 1)
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if self.any_min_p:
            floor = self.min_p * probs.max(dim=-1, keepdim=True).values
            probs = probs.masked_fill(probs < floor, 0.0)
        if self.any_top_p:
            sorted_p, order = probs.sort(dim=-1, descending=True)
            # Drop a token when the mass before it already reaches top_p (keep at least one);
            # rows with top_p 1 drop nothing (rounding could push their sum past 1).
            drop = ((sorted_p.cumsum(dim=-1) - sorted_p) >= self.top_p) & (self.top_p < 1.0)
            probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p.masked_fill(drop, 0.0))
        return probs


def sample(logits: torch.Tensor, params: SamplingParams, seed: int = 0, step: int = 0,
           seen: torch.Tensor | None = None) -> torch.Tensor:
    """Pick one token per row, every row as a request with ``params`` and ``seed`` at its
    ``step``-th token. logits (B, V) -> (B,) long, on the logits' device."""
    b = logits.shape[0]
    s = Sampler([params] * b, [seed] * b, logits.device, seen)
    if step:
        s.steps += step
    return s.sample(logits)
