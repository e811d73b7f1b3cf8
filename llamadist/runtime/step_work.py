"""One scheduled step as every stage sees it: host data only, so the front process can
send it to worker ranks (``StepWork.pack``: a few flat arrays, llamadist.runtime.step_columns)
and each stage builds its own ``PagedBatch`` from it. The stage with the head samples with ``sample_step``, the one
sampling function of the paged engine, in-process or in a worker.

    work = StepWork([SeqWork("a", [5, 6, 7], [1], 0, SampleSpec(params, seed, 0))], 16)
    logits = model.forward_paged(work.tokens(device), work.batch())      # (S, V)
    tokens = sample_step(logits, work)                                    # (sampled,)
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from llamadist.generation.generate import make_sampler
from llamadist.config import to_device
from llamadist.generation.params import TokenLogprob  # noqa: F401 - re-exported
from llamadist.generation.sampling import SamplingParams, greedy_tokens, plain_argmax
from llamadist.runtime.paged_kv import PagedBatch
from llamadist.runtime.step_columns import SampleColumns, StepColumns


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


class StepWork:
    """One step: S sequences' work (``seqs``, the front's per-sequence view) and the same
    as flat arrays (``columns``, see llamadist.runtime.step_columns), each made from the
    other on first use. A step read from a message has only columns: ``tokens``,
    ``pending``, ``batch``, ``pack`` and ``sample_step`` read them without building one
    object per sequence."""

    def __init__(self, seqs: list[SeqWork] | None, block_size: int,
                 reset_stats: bool = False):
        self._seqs = seqs
        self.block_size = block_size
        # the first step after a warm-up: stages zero their counters
        self.reset_stats = reset_stats
        self._cols: StepColumns | None = None
        self._batch: PagedBatch | None = None

    @classmethod
    def of_rows(cls, rows: list[tuple], block_size: int) -> "StepWork":
        """A step from one plain tuple per sequence, as the engine gathers them each step
        (no SeqWork or SampleSpec object per sequence: at a few hundred sequences per
        step those were a fifth of the engine's host time): ``(request_id, token_ids,
        block_ids, start, prev_index, score, score_top, spec)`` with ``spec`` None or
        ``(params, seed, step, seen, outputs)``, SampleSpec's fields. The columns are
        the ones ``StepColumns.from_seqs`` makes of the same SeqWorks."""
        return cls.of_columns(_columns_of_rows(rows, block_size))

    @classmethod
    def of_columns(cls, cols: StepColumns, reset_stats: bool = False) -> "StepWork":
        work = cls(None, cols.block_size, reset_stats)
        work._cols = cols
        return work

    def __repr__(self) -> str:
        return f"StepWork({self.num_seqs} seqs, block_size={self.block_size})"

    @property
    def columns(self) -> StepColumns:
        if self._cols is None:
            self._cols = StepColumns.from_seqs(self._seqs, self.block_size)
        return self._cols

    @property
    def num_seqs(self) -> int:
        return len(self._seqs) if self._seqs is not None else self._cols.num_seqs

    @property
    def seqs(self) -> list[SeqWork]:
        """The per-sequence view (built from the columns on first use)."""
        if self._seqs is None:
            self._seqs = _seqs_of(self._cols)
        return self._seqs

    def tokens(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """(N,) every sequence's tokens, sequence after sequence (a tensor of its own)."""
        return to_device(torch.from_numpy(self.columns.token_ids.copy()), device)

    def pending(self) -> tuple[list[int], list[int]]:
        """(flat token indices, indices into the previous step's sampled tokens) of the
        tokens to take from that step's output."""
        c = self.columns
        take = c.prev_index >= 0
        if not take.any():
            return [], []
        return c.query_start[:-1][take].tolist(), c.prev_index[take].tolist()

    def batch(self) -> PagedBatch:
        """The host PagedBatch of this step (built once, from the columns)."""
        if self._batch is None:
            c = self.columns
            b = PagedBatch.from_arrays(c.starts, c.query_lens, c.block_start, c.block_ids,
                                       self.block_size)
            if len(c.score_ids):  # the scored positions' rows follow the S last-token rows
                extra = c.logits_extra(c.query_start)
                b.logits_index = torch.cat([b.last_token_index, torch.from_numpy(extra)])
            self._batch = b
        return self._batch

    @property
    def sampled_ids(self) -> list[str]:
        """The requests that get a token from this step, in the order ``sample_step``
        returns them."""
        if self._seqs is not None:
            return [s.request_id for s in self._seqs if s.sample is not None]
        ids = self._cols.tail().request_ids
        return [ids[i] for i in np.flatnonzero(self._cols.samples)]

    def pack(self) -> torch.Tensor:
        """(bytes,) uint8: this step for another process (``unpack`` reverses it)."""
        data = self.columns.encode(self.reset_stats)
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)

    @classmethod
    def unpack(cls, packed: torch.Tensor) -> "StepWork":
        return cls.of_columns(*StepColumns.decode(packed.numpy()))


def _counts(lists: tuple) -> np.ndarray:
    return np.fromiter(map(len, lists), np.int64, len(lists))


def _offsets(counts: np.ndarray) -> np.ndarray:
    out = np.zeros(len(counts) + 1, np.int64)
    np.cumsum(counts, out=out[1:])
    return out


def _flat(lists: tuple, total: int) -> np.ndarray:
    return np.fromiter(itertools.chain.from_iterable(lists), np.int64, total)


def _columns_of_rows(rows: list[tuple], block_size: int) -> StepColumns:
    """StepWork.of_rows' columns: one zip over the rows, then numpy per column."""
    if not rows:
        return StepColumns.from_seqs([], block_size)
    rids, toks, blocks, starts, prev, scores, tops, specs = zip(*rows)
    s = len(rows)
    qlens, nblocks, nscore = _counts(toks), _counts(blocks), _counts(scores)
    sampled = [p for p in specs if p is not None]
    params, seeds, steps, seen, outs = (map(list, zip(*sampled)) if sampled
                                        else ([], [], [], [], []))
    tail = SampleColumns(list(rids), params, seeds, steps, seen, outs)
    samples = np.array([p is not None for p in specs], bool)
    logprobs = np.full(s, -1, np.int64)  # -1: not asked (most steps: nobody asks)
    if any(p.logprobs is not None for p in params):
        logprobs[samples] = [-1 if p.logprobs is None else p.logprobs for p in params]
    return StepColumns(
        block_size, _flat(toks, int(qlens.sum())), np.array(starts, np.int64), qlens,
        _offsets(nblocks), _flat(blocks, int(nblocks.sum())), np.array(prev, np.int64),
        samples, logprobs, np.array(tops, np.int64), _offsets(nscore),
        _flat(scores, int(nscore.sum())), tail)


def _seqs_of(c: StepColumns) -> list[SeqWork]:
    """The per-sequence view of columns read from a message."""
    tail = c.tail()
    qs = c.query_start.tolist()
    bs, ss = c.block_start.tolist(), c.score_start.tolist()
    toks, blocks, scores = c.token_ids.tolist(), c.block_ids.tolist(), c.score_ids.tolist()
    specs = iter([SampleSpec(*x) for x in zip(tail.params, tail.seeds, tail.steps,
                                              tail.seen, tail.outputs)])
    return [SeqWork(rid, tuple(toks[qs[i]:qs[i + 1]]), tuple(blocks[bs[i]:bs[i + 1]]), start,
                    next(specs) if samples else None, tuple(scores[ss[i]:ss[i + 1]]), top,
                    prev)
            for i, (rid, start, samples, top, prev) in enumerate(zip(
                tail.request_ids, c.starts.tolist(), c.samples.tolist(),
                c.score_top.tolist(), c.prev_index.tolist()))]


def take_pending(tokens: torch.Tensor, work: StepWork, prev: torch.Tensor | None) -> None:
    """Write into ``tokens`` (N,) (the step's inputs, on its device) the tokens of its
    decodes scheduled ahead: the previous step's samples ``prev``, still on the device."""
    at, src = work.pending()
    if at:
        assert prev is not None, "a pending token needs a step launched before"
        tokens[to_device(torch.tensor(at), tokens.device)] = \
            prev[to_device(torch.tensor(src), prev.device)].to(tokens.device)


def sample_step(logits: torch.Tensor, work: StepWork) -> torch.Tensor:
    """logits (S [+ E], V) of each sequence's last token (then its scored positions') ->
    (sampled [+ packed],) int64: the token ids of the sequences that sample, in their
    order, then, if any sequence asked for log-probabilities, their float64 values
    bit-cast to int64 (``unpack_sampled`` reads them back), on the logits' device. One
    int64 tensor, so every executor carries it as it carries tokens."""
    c = work.columns
    rows = np.flatnonzero(c.samples).tolist()
    if not rows:
        tokens = torch.empty(0, dtype=torch.long, device=logits.device)
    else:
        t = c.tail()
        # every sequence samples (a decode step): its rows as they are, not gathered (a
        # gather of a (S, V) tensor may start a parallel region: on a busy CPU, a wait
        # for a preempted thread, milliseconds)
        mine = logits[:len(rows)] if rows[-1] == len(rows) - 1 else logits[rows]
        if plain_argmax(t.params):  # the common greedy step: no Sampler to build
            tokens = greedy_tokens(mine)
        else:
            sampler = make_sampler([list(x) for x in t.seen], t.params, t.seeds,
                                   logits.shape[-1], logits.device,
                                   [list(x) for x in t.outputs])
            if not sampler.all_greedy:  # an argmax draws nothing: its step does not matter
                sampler.steps = to_device(torch.tensor(t.steps), logits.device)
            tokens = sampler.sample(mine)
    packed = _logprobs(logits, work, tokens, rows)
    return tokens if packed is None else torch.cat([tokens, packed.view(torch.int64)])


def _logprob_rows(work: StepWork) -> list[tuple[int, int | None, int]]:
    """(logits row, target token id or None for the sampled one, top k) of every row
    whose log-probabilities are asked for: the sampled rows first, then scored ones."""
    c = work.columns
    if not len(c.score_ids) and (not c.num_seqs or c.logprobs.max() < 0):
        return []  # most steps: nobody asks
    asked = np.flatnonzero(c.logprobs >= 0)
    out = [(i, None, k) for i, k in zip(asked.tolist(), c.logprobs[asked].tolist())]
    if len(c.score_ids):
        tops = np.repeat(c.score_top, c.num_scored).tolist()
        out += [(c.num_seqs + j, t, k) for j, (t, k) in enumerate(zip(c.score_ids.tolist(),
                                                                         tops))]
    return out


def _logprob_owners(work: StepWork) -> list[int]:
    """The sequence of each of ``_logprob_rows``' rows."""
    c = work.columns
    return np.flatnonzero(c.logprobs >= 0).tolist() + \
        np.repeat(np.arange(c.num_seqs), c.num_scored).tolist()


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
    rows = np.flatnonzero(work.columns.samples).tolist()
    tokens = values[:len(rows)]
    asked = _logprob_rows(work)
    if not asked:
        return tokens, {}, {}
    floats = torch.tensor(values[len(rows):], dtype=torch.int64).view(torch.float64).tolist()
    sampled = dict(zip(rows, tokens))
    owner = _logprob_owners(work)
    rids = work.columns.tail().request_ids
    chosen: dict[str, TokenLogprob] = {}
    scored: dict[str, list[TokenLogprob]] = {}
    at = 0
    for (row, target, k), seq in zip(asked, owner):
        lp, ids, lps = floats[at], floats[at + 1:at + 1 + k], floats[at + 1 + k:at + 1 + 2 * k]
        at += 1 + 2 * k
        rid = rids[seq]
        entry = TokenLogprob(sampled[row] if target is None else target, lp,
                             tuple(zip(map(int, ids), lps)))
        if target is None:
            chosen[rid] = entry
        else:
            scored.setdefault(rid, []).append(entry)
    return tokens, chosen, scored
