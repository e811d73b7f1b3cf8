"""Context parallelism inside the engine: one scheduled step (``StepWork``) run by the
``cp`` ranks of a stage, each holding a stripe of every request's sequence in its own
paged KV blocks.

Layout. The scheduler runs unchanged over blocks of ``cp * bs`` tokens ("super-blocks";
``bs`` is each rank's block size): super-block ``B`` of a request is local block ``B`` on
every CP rank, and each rank stores one ``bs``-token stripe of it. Stripe ``i`` (positions
``[i*bs, (i+1)*bs)``) of a request belongs to rank ``(home + i) % cp``, ``home`` being the
request's first super-block id mod cp. So ownership is a function of the position alone:

* prefill, chunked prefill and prefill after a cached prefix need no other state, and
  requests sharing a cached prefix share its first block, hence its home and its owners;
* a long prompt is striped over the ranks block by block (striped attention: every rank
  gets early and late tokens, so the causal work is even, like the two-chunk split of
  ``llamadist.parallel.context.balanced_split``, which a chunked prefill could not keep);
* a request of at most ``bs`` tokens stays on one rank (its home), and rotating homes
  spread short requests over the ranks. Its super-block still reserves a block on every
  rank: under CP a short request costs ``cp`` blocks of memory.

Every rank gets the same ``StepWork`` and derives every rank's share from it
(``CPStep``), so collectives need no metadata. Each rank runs the tokens it owns through
the model, at their global positions (a rank may own none), and every *decode* (one token
after cached ones): a decode's linears are a GEMV per rank, cheaper than the collective
that would carry its query to the others and make them wait for its owner. Attention of
a rank's query rows, per layer (``CPLayer.attend``):

1. the K/V of the tokens it owns are written into its local blocks (a decode's only by
   its owner);
2. *new keys* (this step's tokens, decodes aside): its own rows first, causal, then, only
   when some sequence's step tokens live on several ranks, the K/V blocks of those tokens
   pass around the ring (isend/irecv posted before each step's compute), masked by
   (sequence, position) and attended per run of rows with the same key range;
3. *past keys* (stored before the step, all visible): the query rows of prefills with
   cached keys are all-gathered (only when there are some), the decodes need not be;
   each rank attends them against its local slots (a decode's owner: its own new slot
   too), and one ``merge_across`` (an all-gather of the packed partials) combines: a
   step of decodes costs one collective per layer;
4. the partials merge exactly (log-sum-exp).

The last stage gathers the logit rows (each sequence's last token, scored positions) from
their owners to CP rank 0, which samples (``gather_logits``); decodes' rows are computed
on CP rank 0 itself, so a step of decodes gathers nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from llamadist.parallel.context import (Group, RingExchange, all_gather, attend_runs,
                                        masked_runs, merge_across, merge_partials,
                                        partial_attention)
from llamadist.runtime.paged_attention import gather, gather_rows
from llamadist.runtime.paged_kv import PagedKVCache
from llamadist.runtime.step_work import StepWork

__all__ = ["CPStep", "CPStageKV", "forward_cp", "gather_logits", "stripe_owner"]


def stripe_owner(position: int, home: int, cp: int, bs: int) -> int:
    """The CP rank that stores a request's token at ``position``."""
    return (home + position // bs) % cp


def _groups(seq_of: np.ndarray) -> list[tuple[int, int, int]]:
    """(seq, lo, hi) runs of equal seq ids in an ascending array."""
    if not len(seq_of):
        return []
    cut = np.flatnonzero(np.diff(seq_of)) + 1
    lo = np.concatenate([[0], cut])
    hi = np.concatenate([cut, [len(seq_of)]])
    return [(int(seq_of[a]), int(a), int(b)) for a, b in zip(lo, hi)]


@dataclass
class CPStep:
    """Rank ``rank``'s share of one step (host data, numpy; ``tensors`` moves what the
    layers read to the device once). Flat indices refer to ``work.tokens()``."""
    cp: int
    rank: int
    bs: int
    mine: np.ndarray          # (N_r,) flat indices of the tokens this rank runs, ascending:
    # the ones it owns and every decode (replicated: see ``rep_rows``)
    own: np.ndarray           # (N_r,) bool: this rank stores the token's K/V
    positions: np.ndarray     # (N_r,) their global positions
    slots: np.ndarray         # (O_r,) the owned rows' local slots (block * bs + offset)
    seq_of: np.ndarray        # (N_r,) their sequence index
    tables: np.ndarray        # (S, MB) super-block ids = local block ids, padded with 0
    past_lens: np.ndarray     # (S,) this rank's slots of each sequence before the step
    ring: list | None         # per ring step i >= 1: (q rows, k count, mask) or None
    ring_rows: np.ndarray     # rows of mine whose sequence spans ranks (ring queries)
    ring_width: int
    past_rows: np.ndarray     # rows of mine, not decodes, whose sequence has past keys
    past_width: int           # P: every rank's past rows padded to this (0: none)
    rep_rows: np.ndarray      # (R,) rows of mine that are decodes (one token after cached
    # ones): run by every rank, so each attends its stored stripes without a gather
    past_seq: np.ndarray      # (cp * P + R,) sequence of each past query row (the gathered
    # rows, then the decodes), -1 = padding
    logits_local: np.ndarray  # rows of mine whose logits this rank computes, in order
    logits_from: list[tuple[int, int]]  # per logit row: (owner rank, index in its list)
    logits_max: int = 0       # the most logit rows any rank computes
    logits_gather: bool = True  # False: CP rank 0 computes every logit row itself

    @classmethod
    def build(cls, work: StepWork, cp: int, rank: int) -> "CPStep":
        if work.block_size % cp:
            raise ValueError(f"a CP step's block size {work.block_size} must be a multiple "
                             f"of cp={cp} (the scheduler's blocks are cp local blocks)")
        bs = work.block_size // cp
        c = work.columns  # flat arrays: no object per sequence on a receiving rank
        s = c.num_seqs
        starts, lens = c.starts, c.query_lens
        homes = c.block_ids[c.block_start[:-1]] % cp
        tables = c.tables()  # (S, MB) whole tables, padded with 0
        qstart = np.concatenate([[0], np.cumsum(lens)])
        seq_of = np.repeat(np.arange(s), lens)  # (N,)
        pos = np.arange(qstart[-1]) + (starts - qstart[:-1])[seq_of]
        owner = (homes[seq_of] + pos // bs) % cp
        rep = ((lens == 1) & (starts > 0))[seq_of]  # (N,) decodes: every rank runs them
        mine = np.flatnonzero((owner == rank) | rep)
        own = owner[mine] == rank
        held = mine[own]
        # local slot: the stripe's super-block is the local block, the offset its own
        slots = tables[seq_of[held], pos[held] // (cp * bs)] * bs + pos[held] % bs
        off = (rank - homes) % cp
        full, rem = starts // (cp * bs), starts % (cp * bs)
        past_lens = full * bs + np.clip(rem - off * bs, 0, bs)
        # sequences whose step tokens live on more than one rank need the ring: a
        # stripe boundary inside the step's tokens (a sequence's owner changes only there)
        first, last = pos[qstart[:-1]], starts + lens - 1
        spans = (lens > 1) & (last // bs > first // bs) & (cp > 1)
        has_past = (starts > 0)[seq_of] & ~rep  # (N,)
        step = cls(cp, rank, bs, mine, own, pos[mine], slots, seq_of[mine], tables,
                   past_lens, None, np.flatnonzero(spans[seq_of[mine]]), 0,
                   np.flatnonzero(has_past[mine]), 0, np.flatnonzero(rep[mine]),
                   np.zeros(0, np.int64), np.zeros(0, np.int64), [])
        step._plan_ring(owner, seq_of, pos, spans)
        step._plan_past(owner, seq_of, has_past, rep)
        step._plan_logits(np.where(rep, 0, owner), work, qstart)
        return step

    def _plan_ring(self, owner, seq_of, pos, spans) -> None:
        on_ring = spans[seq_of]
        share = [np.flatnonzero((owner == r) & on_ring) for r in range(self.cp)]
        self.ring_width = max(len(x) for x in share)
        if not self.ring_width:
            return
        mine = share[self.rank]
        qs, qp = seq_of[mine], pos[mine]
        self.ring = []
        for i in range(1, self.cp):
            keys = share[(self.rank - i) % self.cp]
            m = (seq_of[keys][None, :] == qs[:, None]) & (pos[keys][None, :] <= qp[:, None])
            self.ring.append((len(keys), m) if m.any() else None)

    def _plan_past(self, owner, seq_of, has_past, rep) -> None:
        share = [np.flatnonzero((owner == r) & has_past) for r in range(self.cp)]
        p = self.past_width = max(len(x) for x in share)
        gathered = np.full(self.cp * p, -1, np.int64)
        for r, rows in enumerate(share):
            gathered[r * p:r * p + len(rows)] = seq_of[rows]
        self.past_seq = np.concatenate([gathered, seq_of[np.flatnonzero(rep)]])

    @property
    def has_past(self) -> bool:
        """Some query row attends stored keys: the step has a cross-rank merge."""
        return len(self.past_seq) > 0

    def _plan_logits(self, owner, work: StepWork, qstart) -> None:
        # each sequence's last token, then scored positions
        rows = (qstart[1:] - 1).tolist() + work.columns.logits_extra(qstart).tolist()
        counts = [0] * self.cp
        local = []
        for f in rows:
            r = int(owner[f])
            self.logits_from.append((r, counts[r]))
            counts[r] += 1
            if r == self.rank:
                local.append(int(np.searchsorted(self.mine, f)))
        self.logits_local = np.array(local, np.int64)
        self.logits_max = max(counts)
        self.logits_gather = any(counts[1:])

    @property
    def num_tokens(self) -> int:
        return len(self.mine)


class CPStageKV:
    """The StageKV of one CP step on this rank: ``layer(i)`` over its paged cache. What
    every layer reads (indices, masks, their runs) is made here once per step."""

    def __init__(self, cache: PagedKVCache, step: CPStep, group: Group):
        if cache.block_size != step.bs:
            raise ValueError(f"step for local blocks of {step.bs}, cache has "
                             f"{cache.block_size}")
        dev = cache.device
        t = lambda a: torch.as_tensor(a, dtype=torch.long, device=dev)  # noqa: E731
        self.cache, self.step, self.group = cache, step, group
        self.slots = t(step.slots)
        self.own = None if step.own.all() else t(np.flatnonzero(step.own))
        self.ring_rows, self.past_rows = t(step.ring_rows), t(step.past_rows)
        self.rep_rows = t(step.rep_rows)
        self.ring = [None if x is None else self._ring_step(x, dev) for x in (step.ring or [])]
        # each sequence's own rows on this rank, causal; a decode's own key is one of
        # its owner's stored slots (written before attending), so none for decodes
        is_rep = np.zeros(len(step.mine), bool)
        is_rep[step.rep_rows] = True
        self.diag = [(a, b) for _, a, b in _groups(step.seq_of) if step.own[a] and not is_rep[a]]
        self.past_groups = self._past_groups(dev)
        self._write_rows: dict[int, torch.Tensor] = {}

    def write_rows(self, h_kv: int) -> torch.Tensor:
        """(O_r * H_kv,) rows of the owned tokens' K/V in a layer's cache viewed as
        (blocks * H_kv * bs, D), token-major; made once per step."""
        rows = self._write_rows.get(h_kv)
        if rows is None:
            bs = self.step.bs
            slots = self.slots.view(-1, 1)
            heads = torch.arange(h_kv, device=slots.device).view(1, -1)
            rows = self._write_rows[h_kv] = (((slots // bs) * h_kv + heads) * bs
                                             + slots % bs).view(-1)
        return rows

    @staticmethod
    def _ring_step(x, dev) -> tuple:
        width, mask = x
        mask = torch.as_tensor(mask)
        runs = masked_runs(mask)  # on the host: no device sync per layer
        return width, mask.to(dev), runs

    def _past_groups(self, dev) -> list[tuple]:
        """Past query rows (gathered, then decodes) by sequence: (row index (R,), table
        (1|R, MB), key count, mask (R, 1, L) or None) groups, sequences with one row
        batched together (decodes). A decode's keys on its owner include its own."""
        st = self.step
        first_rep = len(st.past_seq) - len(st.rep_rows)
        stored = st.past_lens.copy()
        for i in np.flatnonzero(st.own[st.rep_rows]):
            stored[st.past_seq[first_rep + i]] += 1
        rows_of: dict[int, list[int]] = {}
        for i, s in enumerate(st.past_seq.tolist()):
            if s >= 0 and stored[s]:  # a rank holding none of it adds nothing
                rows_of.setdefault(s, []).append(i)
        single = [(s, r[0]) for s, r in rows_of.items() if len(r) == 1]
        out = []
        if single:
            seqs = [s for s, _ in single]
            lens = stored[seqs]
            length, mask = int(lens.max()), None
            if int(lens.min()) < length:
                mask = torch.as_tensor(np.arange(length)[None, None, :] < lens[:, None, None],
                                       device=dev)
            out.append((torch.tensor([r for _, r in single], device=dev),
                        torch.as_tensor(st.tables[seqs], device=dev), length, mask))
        for s, r in rows_of.items():
            if len(r) > 1:
                out.append((torch.tensor(r, device=dev),
                            torch.as_tensor(st.tables[s:s + 1], device=dev), int(stored[s]), None))
        return out

    def layer(self, i: int) -> "CPLayer":
        return CPLayer(self.cache.kv(i), self)


class CPLayer:
    """One layer of a CP step (a FlatLayerKV): see the module docstring."""

    def __init__(self, kv: torch.Tensor, owner: CPStageKV):
        self.k, self.v = kv[0], kv[1]  # (num_blocks, H_kv, bs, D)
        self.o = owner

    def _write(self, k: torch.Tensor, v: torch.Tensor) -> None:
        if self.o.own is not None:  # decodes this rank runs but does not store
            k, v = k[self.o.own], v[self.o.own]
        if not len(k):
            return
        h_kv, d = self.k.shape[1], self.k.shape[3]
        rows = self.o.write_rows(h_kv)
        self.k.view(-1, d).index_copy_(0, rows, k.reshape(-1, d).to(self.k.dtype))
        self.v.view(-1, d).index_copy_(0, rows, v.reshape(-1, d).to(self.v.dtype))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (N_r, H, D), k/v (N_r, H_kv, D) rotated, this rank's tokens -> (N_r, H, D)."""
        self._write(k, v)
        out, lse = self._new_keys(q, k, v)
        if self.o.step.has_past:
            out, lse = self._past(q, out, lse)
        return out.to(q.dtype)

    def _diag(self, q, k, v, out, lse) -> None:
        """Each sequence's own rows on this rank, causal (positions ascend in a run)."""
        for a, b in self.o.diag:
            out[a:b], lse[a:b] = partial_attention(q[a:b], k[a:b], v[a:b], causal=b - a > 1)

    def _new_keys(self, q, k, v):
        st, o = self.o.step, self.o
        n, h, d = q.shape
        acc = torch.promote_types(q.dtype, torch.float32)
        out = q.new_zeros(n, h, d, dtype=acc)
        lse = q.new_full((n, h), float("-inf"), dtype=acc)
        if not st.ring_width:
            self._diag(q, k, v, out, lse)
            return out, lse
        cp, rank = st.cp, st.rank
        g = o.group
        nxt = _global(g, (rank + 1) % cp)
        prv = _global(g, (rank - 1) % cp)
        rows = o.ring_rows
        block = k.new_zeros(2, st.ring_width, k.shape[1], d)  # (2, W, H_kv, D)
        block[0, :len(rows)], block[1, :len(rows)] = k[rows], v[rows].to(k.dtype)
        qr = q[rows]
        for i in range(cp):
            # pass the block on while computing
            exchange = RingExchange(block, nxt, prv, g) if i + 1 < cp else None
            if i == 0:
                self._diag(q, k, v, out, lse)
            elif o.ring[i - 1] is not None:
                width, mask, runs = o.ring[i - 1]
                if runs is not None:
                    part = attend_runs(qr, block[0, :width], block[1, :width], runs)
                else:
                    part = partial_attention(qr, block[0, :width], block[1, :width], mask)
                out[rows], lse[rows] = merge_partials([(out[rows], lse[rows]), part])
            if exchange is not None:
                block = exchange.wait()
        return out, lse

    def _past(self, q, out, lse):
        """Past keys (stored before the step, on every rank): the query rows of prefills
        with past keys, all-gathered, and the decodes (every rank runs them) attend this
        rank's stored stripes; one merge_across combines both."""
        st, o = self.o.step, self.o
        p, cp = st.past_width, st.cp
        h, d = q.shape[1:]
        parts = []
        if p:
            mine = q.new_zeros(p, h, d)
            mine[:len(o.past_rows)] = q[o.past_rows]
            parts += all_gather(mine, o.group)
        qa = torch.cat(parts + [q[o.rep_rows]])  # (cp * P + R, H, D)
        acc = out.dtype
        pout = qa.new_zeros(len(qa), h, d, dtype=acc)
        plse = qa.new_full((len(qa), h), float("-inf"), dtype=acc)
        h_kv = self.k.shape[1]
        for rows, table, length, mask in o.past_groups:
            index = gather_rows(table, h_kv)  # (1|S1, H_kv, MB)
            keys = gather(self.k, index, length).transpose(1, 2)
            values = gather(self.v, index, length).transpose(1, 2)
            if len(table) > 1 or mask is not None or len(rows) == 1:
                # (S1, L, H_kv, D): one query row each, masked by length
                po, pl = partial_attention(qa[rows].unsqueeze(1), keys.to(qa.dtype),
                                           values.to(qa.dtype), mask)
                pout[rows], plse[rows] = po[:, 0], pl[:, 0]
            else:  # one sequence's rows against its (L, H_kv, D)
                pout[rows], plse[rows] = partial_attention(qa[rows], keys[0].to(qa.dtype),
                                                           values[0].to(qa.dtype))
        rep = o.rep_rows
        pout, plse = merge_across(pout, plse, o.group)
        if len(rep):
            out[rep], lse[rep] = pout[cp * p:], plse[cp * p:]
        if p:
            n, lo, rows = len(o.past_rows), st.rank * p, o.past_rows
            out[rows], lse[rows] = merge_partials([(out[rows], lse[rows]),
                                                   (pout[lo:lo + n], plse[lo:lo + n])])
        return out, lse


def _global(group: Group, index: int) -> int:
    return index if group is None else dist.get_global_rank(group, index)


def forward_cp(stage, x: torch.Tensor, step: CPStep, group: Group) -> torch.Tensor:
    """This rank's part of a step on ``stage`` (its paged cache holds its stripes): x
    token ids (N_r,) on the first stage, else hidden (1, N_r, D) -> hidden (1, N_r, D), or
    on the last stage the logits (R_r, V) of ``step.logits_local``."""
    dev = stage.device
    positions = torch.as_tensor(step.positions, dtype=torch.long, device=dev).view(1, -1)
    if x.dim() == 1:
        x = x.view(1, -1)
    index = torch.as_tensor(step.logits_local, dtype=torch.long, device=dev)
    with torch.inference_mode():
        return stage.model(x, positions, CPStageKV(stage.paged, step, group), 0, None, "last",
                           None, logits_index=index if stage.has_head else None)


def gather_logits(logits: torch.Tensor, step: CPStep, group: Group) -> torch.Tensor | None:
    """Every rank's logit rows (R_r, V) -> on CP rank 0 the step's (S [+ E], V) in
    ``StepWork`` order (``sample_step``'s input); None on the others."""
    if not step.logits_gather:  # CP rank 0 computed every row (decodes run everywhere)
        return logits if step.rank == 0 else None
    width = max(1, step.logits_max)
    padded = logits.new_zeros(width, logits.shape[-1])
    padded[:len(logits)] = logits
    everyone = all_gather(padded, group)
    if step.rank != 0:
        return None
    stacked = torch.stack(everyone)  # (cp, width, V)
    owners = torch.tensor([r for r, _ in step.logits_from], device=logits.device)
    index = torch.tensor([k for _, k in step.logits_from], device=logits.device)
    return stacked[owners, index]
