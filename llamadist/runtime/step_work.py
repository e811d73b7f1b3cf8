"""One scheduled step as every stage sees it: host data only, small and picklable, so the
front process can send it to worker ranks (``StepWork.pack``) and each stage builds its
own ``PagedBatch`` from it. The stage with the head samples with ``sample_step``, the one
sampling function of the paged engine, in-process or in a worker.

    work = StepWork([SeqWork("a", [5, 6, 7], [1], 0, SampleSpec(params, seed, 0))], 16)
    logits = model.forward_paged(work.tokens(device), work.batch())      # (S, V)
    tokens = sample_step(logits, work)                                    # (sampled,)
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field

import torch

from llamadist.generation.generate import make_sampler
from llamadist.config import to_device
from llamadist.generation.sampling import SamplingParams
from llamadist.runtime.paged_kv import PagedBatch


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model (log-softmax of the raw logits: before
    temperature, penalty and filters) and the ``k`` most likely tokens' (id, logprob)."""
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class SampleSpec:
    """How to draw a sequence's next token: its request's params and seed, and which of
    its tokens this is (``step``: the count already sampled), so a draw depends on the
    request alone, never on the batch, the layout or the process."""
    params: SamplingParams
    seed: int
    step: int
    seen: tuple[int, ...] = ()  # prompt + outputs, only when a repetition penalty needs them
    outputs: tuple[int, ...] = ()  # outputs, only when a presence/frequency penalty needs them


@dataclass(frozen=True)
class SeqWork:
    """Compute ``token_ids`` at positions [start, start + len) of request ``request_id``,
    whose KV blocks are ``block_ids``; sample after the last one when ``sample`` is set."""
    request_id: str
    token_ids: tuple[int, ...]
    block_ids: tuple[int, ...]
    start: int
    sample: SampleSpec | None
    # prompt scoring: the logits at this chunk's first len(score) positions are wanted,
    # as the log-probabilities of these next tokens (and the top ``score_top`` others')
    score: tuple[int, ...] = ()
    score_top: int = 0
    # >= 0: the one token is not known on the host yet: it is the ``prev_index``-th token
    # sampled by the step launched just before this one (scheduled ahead, on a GPU)
    prev_index: int = -1

    @property
    def num_logprobs(self) -> int | None:
        """The top-k of its sampled token's logprobs (None: not asked)."""
        return None if self.sample is None else self.sample.params.logprobs


@dataclass
class StepWork:
    seqs: list[SeqWork]
    block_size: int
    reset_stats: bool = False  # the first step after a warm-up: stages zero their counters
    _batch: PagedBatch | None = field(default=None, repr=False, compare=False)

    def tokens(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """(N,) every sequence's tokens, sequence after sequence."""
        flat = [t for s in self.seqs for t in s.token_ids]
        return to_device(torch.tensor(flat, dtype=torch.long), device)

    def pending(self) -> tuple[list[int], list[int]]:
        """(flat token indices, indices into the previous step's sampled tokens) of the
        tokens to take from that step's output."""
        at, src, pos = [], [], 0
        for s in self.seqs:
            if s.prev_index >= 0:
                at.append(pos)
                src.append(s.prev_index)
            pos += len(s.token_ids)
        return at, src

    def batch(self) -> PagedBatch:
        """The host PagedBatch of this step (built once)."""
        if self._batch is None:
            b = PagedBatch.build([(s.block_ids, s.start, len(s.token_ids))
                                  for s in self.seqs], self.block_size)
            first = b.query_start.tolist()
            extra = [first[i] + j for i, s in enumerate(self.seqs) for j in range(len(s.score))]
            if extra:  # the scored positions' rows follow the S last-token rows
                b.logits_index = torch.cat([b.last_token_index, torch.tensor(extra)])
            self._batch = b
        return self._batch

    @property
    def sampled_ids(self) -> list[str]:
        """The requests that get a token from this step, in the order ``sample_step``
        returns them."""
        return [s.request_id for s in self.seqs if s.sample is not None]

    def pack(self) -> torch.Tensor:
        """(bytes,) uint8: this step for another process (``unpack`` reverses it)."""
        data = pickle.dumps((self.seqs, self.block_size, self.reset_stats),
                            protocol=pickle.HIGHEST_PROTOCOL)
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)

    @classmethod
    def unpack(cls, packed: torch.Tensor) -> "StepWork":
        return cls(*pickle.loads(packed.numpy().tobytes()))


def sample_step(logits: torch.Tensor, work: StepWork) -> torch.Tensor:
    """logits (S [+ E], V) of each sequence's last token (then its scored positions') ->
    (sampled [+ packed],) int64: the token ids of the sequences that sample, in their
    order, then, if any sequence asked for log-probabilities, their float64 values
    bit-cast to int64 (``unpack_sampled`` reads them back), on the logits' device. One
    int64 tensor, so every executor carries it as it carries tokens."""
    rows = [i for i, s in enumerate(work.seqs) if s.sample is not None]
    if not rows:
        tokens = torch.empty(0, dtype=torch.long, device=logits.device)
    else:
        specs = [work.seqs[i].sample for i in rows]
        sampler = make_sampler([list(s.seen) for s in specs], [s.params for s in specs],
                               [s.seed for s in specs], logits.shape[-1], logits.device,
                               [list(s.outputs) for s in specs])
        if not sampler.all_greedy:  # an argmax draws nothing: its step does not matter
            sampler.steps = to_device(torch.tensor([s.step for s in specs]), logits.device)
        tokens = sampler.sample(logits[rows])
    packed = _logprobs(logits, work, tokens, rows)
    return tokens if packed is None else torch.cat([tokens, packed.view(torch.int64)])


def _logprob_rows(work: StepWork) -> list[tuple[int, int | None, int]]:
    """(logits row, target token id or None for the sampled one, top k) of every row
    whose log-probabilities are asked for: the sampled rows first, then scored ones."""
    out = [(i, None, s.num_logprobs) for i, s in enumerate(work.seqs)
           if s.num_logprobs is not None]
    extra = len(work.seqs)
    for s in work.seqs:
        out += [(extra + j, t, s.score_top) for j, t in enumerate(s.score)]
        extra += len(s.score)
    return out


def _logprobs(logits: torch.Tensor, work: StepWork, tokens: torch.Tensor,
              rows: list[int]) -> torch.Tensor | None:
    """(R x (1 + 2k),) float64: per asked row its target's logprob, then its top k ids
    and logprobs (log-softmax of the raw logits, in float32)."""
    asked = _logprob_rows(work)
    if not asked:
        return None
    dev = logits.device
    sampled = dict(zip(rows, tokens))
    idx = torch.tensor([r for r, _, _ in asked], device=dev)
    targets = torch.stack([sampled[r] if t is None else torch.tensor(t, device=dev)
                           for r, t, _ in asked]).view(-1, 1)  # (R, 1)
    ls = torch.log_softmax(logits[idx].float(), dim=-1)  # (R, V)
    chosen = ls.gather(1, targets)  # (R, 1)
    kmax = max(k for _, _, k in asked)
    top_lp, top_id = ls.topk(kmax, dim=-1) if kmax else (ls[:, :0], ls[:, :0])  # (R, kmax)
    parts = [torch.cat([chosen[i], top_id[i, :k].double(), top_lp[i, :k].double()])
             if k else chosen[i] for i, (_, _, k) in enumerate(asked)]
    return torch.cat([p.double() for p in parts])


def unpack_sampled(values: list[int], work: StepWork
                   ) -> tuple[list[int], dict[str, TokenLogprob], dict[str, list[TokenLogprob]]]:
    """``sample_step``'s result as a list -> the sampled tokens, each asking sequence's
    TokenLogprob of its token, and each scoring sequence's TokenLogprobs of its scored
    positions' next tokens."""
    n = len(work.sampled_ids)
    tokens = values[:n]
    asked = _logprob_rows(work)
    if not asked:
        return tokens, {}, {}
    floats = torch.tensor(values[n:], dtype=torch.int64).view(torch.float64).tolist()
    sampled = dict(zip([i for i, s in enumerate(work.seqs) if s.sample is not None], tokens))
    owner = [i for i, s in enumerate(work.seqs) if s.num_logprobs is not None]
    owner += [i for i, s in enumerate(work.seqs) for _ in s.score]
    chosen: dict[str, TokenLogprob] = {}
    scored: dict[str, list[TokenLogprob]] = {}
    at = 0
    for (row, target, k), seq in zip(asked, owner):
        lp, ids, lps = floats[at], floats[at + 1:at + 1 + k], floats[at + 1 + k:at + 1 + 2 * k]
        at += 1 + 2 * k
        rid = work.seqs[seq].request_id
        entry = TokenLogprob(sampled[row] if target is None else target, lp,
                             tuple(zip(map(int, ids), lps)))
        if target is None:
            chosen[rid] = entry
        else:
            scored.setdefault(rid, []).append(entry)
    return tokens, chosen, scored
