"""One scheduled step as a few flat arrays: the form a step crosses processes in, and the
form every rank reads it in (``StepWork`` keeps its per-sequence view for the front).

A step message is bytes (a uint8 tensor, as ``distributed.link`` carries any tensor):

    header   int64[8]    MAGIC, block_size, reset_stats, S, N, B, E, len(tail)
    per_seq  int32[S, 8] start, query_len, num_blocks, prev_index, samples, logprobs
                         (-1: not asked), score_top, num_scored
    flat     int32[N + B + E]  token ids, then every block table back to back, then the
                         scored positions' target tokens
    tail     pickle      request ids and the sampling specs of the sampling sequences

Reading one is a few numpy views and casts, whatever S is: no object per sequence. The
tail (SamplingParams, seeds, penalties' token lists, request ids) is unpickled only where
it is read (``StepColumns.tail``): on the rank that samples, never on the others, which
forward the bytes they got. Equal SamplingParams are sent once.
"""

from __future__ import annotations

import itertools
import pickle
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from llamadist.runtime.paged_kv import gather_tables

MAGIC = 0x57455453  # "STEW": refuses bytes of another format (a peer of another version)
_HEADER = 8
_PER_SEQ = 8
_chain = itertools.chain.from_iterable


@dataclass
class SampleColumns:
    """The sampling sequences' specs, one entry per sampling sequence in step order (the
    lists ``generation.generate.make_sampler`` takes)."""
    request_ids: list[str]   # every sequence's, in step order
    params: list[Any]        # SamplingParams per sampling sequence
    seeds: list[int]
    steps: list[int]
    seen: list[tuple[int, ...]]
    outputs: list[tuple[int, ...]]


@dataclass
class StepColumns:
    """One step's per-sequence fields as arrays (int64, host): S sequences of N tokens."""
    block_size: int
    token_ids: np.ndarray    # (N,) sequence after sequence
    starts: np.ndarray       # (S,) first position each sequence computes
    query_lens: np.ndarray   # (S,) its tokens in this step
    block_start: np.ndarray  # (S + 1,) its block table is block_ids[block_start[s]:...[s+1]]
    block_ids: np.ndarray    # (B,) every sequence's whole block table, back to back
    prev_index: np.ndarray   # (S,) >= 0: its token is that sample of the previous step
    samples: np.ndarray      # (S,) bool: samples after its last token
    logprobs: np.ndarray     # (S,) top-k of its sampled token's logprobs, -1: not asked
    score_top: np.ndarray    # (S,)
    score_start: np.ndarray  # (S + 1,) its scored targets: score_ids[score_start[s]:...]
    score_ids: np.ndarray    # (E,)
    _tail: bytes | SampleColumns = field(default=b"", repr=False)

    @property
    def num_seqs(self) -> int:
        return len(self.starts)

    @property
    def query_start(self) -> np.ndarray:
        """(S + 1,) flat index of each sequence's first token."""
        out = np.zeros(len(self.query_lens) + 1, np.int64)
        np.cumsum(self.query_lens, out=out[1:])
        return out

    @property
    def num_scored(self) -> np.ndarray:
        return np.diff(self.score_start)

    def tail(self) -> SampleColumns:
        """The request ids and sampling specs (unpickled on first use)."""
        if isinstance(self._tail, bytes):
            ids, uniq, pidx, seeds, steps, seen, outs = pickle.loads(self._tail)
            self._tail = SampleColumns(ids, [uniq[i] for i in pidx], seeds, steps, seen, outs)
        return self._tail

    # ---- from the front's per-sequence objects ------------------------------------------
    @classmethod
    def from_seqs(cls, seqs: Sequence[Any], block_size: int) -> "StepColumns":
        """``seqs``: SeqWork-like objects (request_id, token_ids, block_ids, start, sample,
        score, score_top, prev_index)."""
        s = len(seqs)
        fi = np.fromiter
        toks = [q.token_ids for q in seqs]
        blocks = [q.block_ids for q in seqs]
        scores = [q.score for q in seqs]
        specs = [q.sample for q in seqs]
        qlens = fi(map(len, toks), np.int64, s)
        nblocks = fi(map(len, blocks), np.int64, s)
        nscore = fi(map(len, scores), np.int64, s)
        sampled = [p for p in specs if p is not None]
        tail = SampleColumns([q.request_id for q in seqs], [p.params for p in sampled],
                             [p.seed for p in sampled], [p.step for p in sampled],
                             [p.seen for p in sampled], [p.outputs for p in sampled])
        return cls(block_size, fi(_chain(toks), np.int64, int(qlens.sum())),
                   fi((q.start for q in seqs), np.int64, s), qlens, _offsets(nblocks),
                   fi(_chain(blocks), np.int64, int(nblocks.sum())),
                   fi((q.prev_index for q in seqs), np.int64, s),
                   fi((p is not None for p in specs), bool, s),
                   fi((-1 if p is None or p.params.logprobs is None else p.params.logprobs
                       for p in specs), np.int64, s),
                   fi((q.score_top for q in seqs), np.int64, s), _offsets(nscore),
                   fi(_chain(scores), np.int64, int(nscore.sum())), tail)

    # ---- bytes ----------------------------------------------------------------------------
    def encode(self, reset_stats: bool) -> bytes:
        tail = self._tail
        if isinstance(tail, SampleColumns):  # the front's: pickle it (params once each)
            uniq: dict = {}  # id of the canonical params -> (index, params)
            pidx = [uniq.setdefault(id(c), (len(uniq), c))[0]
                    for c in map(_canonical, tail.params)]
            tail = pickle.dumps((tail.request_ids, [c for _, c in uniq.values()], pidx,
                                 tail.seeds, tail.steps, tail.seen, tail.outputs),
                                protocol=pickle.HIGHEST_PROTOCOL)
        s = self.num_seqs
        header = np.array([MAGIC, self.block_size, int(reset_stats), s, len(self.token_ids),
                           len(self.block_ids), len(self.score_ids), len(tail)], np.int64)
        per_seq = np.empty((s, _PER_SEQ), np.int32)
        for j, col in enumerate((self.starts, self.query_lens, np.diff(self.block_start),
                                 self.prev_index, self.samples, self.logprobs,
                                 self.score_top, self.num_scored)):
            per_seq[:, j] = col
        flat = np.concatenate([self.token_ids, self.block_ids, self.score_ids]).astype(np.int32)
        return b"".join([header.tobytes(), per_seq.tobytes(), flat.tobytes(), tail])

    @classmethod
    def decode(cls, data: np.ndarray) -> tuple["StepColumns", bool]:
        """``data``: uint8 bytes of ``encode`` -> (columns, reset_stats)."""
        head = data[:8 * _HEADER].view(np.int64)
        magic, bs, reset, s, n, b, e, _ = head.tolist()
        if magic != MAGIC:
            raise ValueError(f"not a step message (magic {magic:#x})")
        at = 8 * _HEADER
        per_seq = data[at:at + 4 * _PER_SEQ * s].view(np.int32).reshape(s, _PER_SEQ)
        per_seq = per_seq.astype(np.int64).T  # (8, S), each row contiguous
        at += 4 * _PER_SEQ * s
        flat = data[at:at + 4 * (n + b + e)].view(np.int32).astype(np.int64)
        at += 4 * (n + b + e)
        starts, qlens, nblocks, prev, samples, logprobs, score_top, nscore = per_seq
        cols = cls(bs, flat[:n], starts, qlens, _offsets(nblocks), flat[n:n + b], prev,
                   samples.astype(bool), logprobs, score_top, _offsets(nscore),
                   flat[n + b:], data[at:].tobytes())
        return cols, bool(reset)

    # ---- derived --------------------------------------------------------------------------
    def tables(self, width: int | None = None) -> np.ndarray:
        """(S, MB) each sequence's first ``width`` blocks (None: its whole table), padded
        with block 0."""
        have = np.diff(self.block_start)
        take = have if width is None else np.minimum(have, width)
        return gather_tables(self.block_ids, self.block_start, take)

    def logits_extra(self, query_start: np.ndarray) -> np.ndarray:
        """(E,) flat indices of the scored positions (each sequence's first ones)."""
        nscore = self.num_scored
        first = np.repeat(query_start[:-1], nscore)
        return first + np.arange(len(first)) - np.repeat(self.score_start[:-1], nscore)


# params object (by id, kept alive so the id stays its own) -> the first equal one seen:
# a request's params are hashed once, not every step; equal ones are pickled once
_CANON: dict[int, tuple[Any, Any]] = {}
_BY_VALUE: dict = {}


def _canonical(params: Any) -> Any:
    hit = _CANON.get(id(params))
    if hit is not None:
        return hit[1]
    if len(_CANON) > 4096:  # bounded: finished requests' params go
        _CANON.clear()
        _BY_VALUE.clear()
    canon = _BY_VALUE.setdefault(params, params)
    _CANON[id(params)] = (params, canon)
    return canon


def _offsets(counts: np.ndarray) -> np.ndarray:
    out = np.zeros(len(counts) + 1, np.int64)
    np.cumsum(counts, out=out[1:])
    return out
