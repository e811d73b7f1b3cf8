"""The pipeline across processes: every rank runs one loop, in lockstep, over a ring.

Design (chosen over wrapping a StepModel for the unchanged Generator, and why):

    rank pp0 ──hidden──► pp1 ──hidden──► … ──► pp(P-1): logits ─► sample
      ▲     (device group)                                         │
      └────────────── tokens (B_m,) of micro-batch m (CPU group) ◄─┘

* Each rank builds and loads only its own stage (``build_stage`` with its layer range,
  or ``build_tp_stage`` with its tensor-parallel shard).
* A batch is cut into M micro-batches ("lanes"), each left-padded on its own and owning
  one KV-cache lane of the stage. The first stage prefills every lane back to back; from
  then on, as soon as the tokens of lane m come back around the ring, lane m's next decode
  step starts on the first stage, while lanes m+1… are still on later stages. With M >= P
  every stage is busy in the steady state (round-robin; the only bubble is filling and
  draining), which a StepModel driven by ``Generator`` cannot do: it needs the whole
  batch's logits at each step, so each step would pay the full (P-1)/(M+P-1) bubble.
* The last stage samples with ``generation.sampling.Sampler``: each row with its own
  request's seed (``Request.seeds``, or the params' seed for all) and counter-based noise,
  so a request's tokens do not depend on how rows are grouped into micro-batches or
  replicas, nor on the process count: they equal the single-process Engine's, greedy or
  seeded (up to float rounding of the logits).
* The first stage owns the sequences: it checks EOS, stop strings and max tokens (the
  same ``Generator._advance`` bookkeeping as in-process generation), stops lanes that are
  done, and when every lane is done sends END down the pipeline, which every rank
  forwards and then leaves the loop. Only the first stage decides, so every rank agrees.
* Messages: ``distributed.p2p`` (header on the CPU gloo group, tensor on the device
  group, asynchronous sends, timeouts naming the silent peer).
* Tensor parallel: the TP ranks of a stage hold replicated hidden states and identical
  logits, so rank (stage s, tp t) talks to (s±1, t) and all TP ranks run the same loop.
* Data parallel: each replica runs its own ring over its share of the prompts.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from llamadist.config import ModelConfig, RuntimeConfig
from llamadist.distributed.faults import Watchdog, fault_hook
from llamadist.distributed.groups import ParallelGroups
from llamadist.distributed.p2p import P2P, Kind, LinkStats, Message
from llamadist.generation.generate import (Generator, Sequence, StreamEvent, left_pad,
                                           make_sampler, pad_id)
from llamadist.generation.sampling import Sampler, SamplingParams
from llamadist.generation.tokenizer import Tokenizer
from llamadist.runtime.mask import attention_mask
from llamadist.runtime.stage import Stage, build_stage, build_tp_stage, parse_dtype, sync
from llamadist.weights.checkpoint import Checkpoint

log = logging.getLogger(__name__)


@dataclass
class PipelineSpec:
    """What every rank must agree on before loading (rank 0 decides and broadcasts)."""
    layer_ranges: list[tuple[int, int]]  # half-open, one per pipeline stage
    dtype: str
    max_batch: int  # prompts per replica
    max_seq_len: int
    micro_batches: int  # KV-cache lanes: the most micro-batches a request may use
    lane_rows: int | None = None  # rows per lane (default: the largest micro-batch's)


@dataclass
class Request:
    """One batch of work: every rank gets the same object (broadcast by rank 0)."""
    prompts: list[list[int]]  # all replicas' prompts; each replica takes its share
    params: SamplingParams  # with a concrete seed, chosen by rank 0
    micro_batches: int
    record_logits: bool = False  # keep the last stage's logits (tests compare them)
    seeds: list[int] | None = None  # one per prompt (default: params.seed for every prompt)

    def __post_init__(self) -> None:
        if self.seeds is None and self.params.seed is None and not self.params.greedy:
            raise ValueError("a pipeline request needs concrete seeds (rank 0 chooses them), "
                             "so that every rank samples the same tokens")
        if self.seeds is not None and len(self.seeds) != len(self.prompts):
            raise ValueError(f"{len(self.prompts)} prompts but {len(self.seeds)} seeds")

    def seed(self, row: int) -> int:
        """Prompt ``row``'s seed: its own, never derived from its row."""
        if self.seeds is not None:
            return self.seeds[row]
        return self.params.seed if self.params.seed is not None else 0  # greedy: unused


def split_rows(n: int, parts: int) -> list[range]:
    """Cut n rows into at most ``parts`` contiguous, non-empty ranges differing by <= 1."""
    parts = max(1, min(parts, n))
    base, extra = divmod(n, parts)
    out, start = [], 0
    for i in range(parts):
        size = base + (i < extra)
        out.append(range(start, start + size))
        start += size
    return out


def replica_rows(n: int, dp: int, dp_index: int) -> range:
    """The prompts replica ``dp_index`` serves (empty when there are fewer prompts)."""
    shares = split_rows(n, dp)
    return shares[dp_index] if dp_index < len(shares) else range(n, n)


def lane_batch(spec_batch: int, micro_batches: int) -> int:
    """Rows of the largest micro-batch: the KV cache's batch dimension."""
    return max(len(r) for r in split_rows(max(1, spec_batch), micro_batches))


class Lane:
    """One micro-batch on this rank: its rows, left-padded on their own."""

    def __init__(self, index: int, rows: range, prompts: list[list[int]], pad_id: int,
                 max_seq_len: int, device: torch.device):
        self.index, self.rows, self.prompts = index, rows, prompts
        # tokens/positions (B_m, L); valid (B_m, S) or None when nothing is padded
        self.tokens, self.positions, self.valid = left_pad(prompts, pad_id, max_seq_len, device)
        self.prompt_len = self.tokens.shape[1]

    def inputs(self, step: int) -> tuple[torch.Tensor, int, torch.Tensor | None]:
        """-> positions (B_m, T), cache slot of the first position, mask (B_m, 1, T, end)."""
        if step == 0:
            return self.positions, 0, attention_mask(self.valid, 0, self.prompt_len)
        slot = self.prompt_len + step - 1  # step k feeds the token sampled at step k-1
        return self.positions[:, -1:] + step, slot, attention_mask(self.valid, slot, 1)


def lane_sampler(req: Request, rows: range, vocab: int, device: torch.device) -> Sampler:
    """Sampling for one lane on the last stage: every row with its own request's seed, so
    its draw does not depend on which rows share its micro-batch."""
    return make_sampler([req.prompts[r] for r in rows], [req.params] * len(rows),
                        [req.seed(r) for r in rows], vocab, device)


@dataclass
class RunStats:
    compute_s: float = 0.0  # inside the stage's forward (synced when timed)
    sample_s: float = 0.0
    wall_s: float = 0.0  # from the request's start to this rank leaving the loop
    prefill_s: float = 0.0  # first stage: until every lane's first token is back
    decode_s: float = 0.0
    decode_tokens: int = 0
    steps: int = 0  # stage forwards

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class PipelineRunner:
    """This rank's part of the ring. ``run`` is called by every rank with the same request;
    it yields events only on first-stage ranks."""
    groups: ParallelGroups
    stage: Stage
    config: ModelConfig
    tokenizer: Tokenizer | None
    timeout: float
    watchdog: Watchdog | None = None
    timed: bool = False  # sync after each forward so compute_s is device time
    stats: RunStats = field(default_factory=RunStats)
    logits: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)  # (row, step)
    sequences: list[Sequence] = field(default_factory=list)  # this replica's, on first stage

    def __post_init__(self) -> None:
        self.pp = self.groups.pp
        self.p2p = P2P(self.pp, self.stage.device, self.timeout, self.watchdog)
        self._inbox: deque[Message] = deque()  # tokens when one rank is first and last

    # ---- the loop ------------------------------------------------------------
    def run(self, req: Request) -> Iterator[list[StreamEvent]]:
        g = self.groups
        rows = replica_rows(len(req.prompts), g.dp_size, g.dp_index)
        prompts = [req.prompts[i] for i in rows]
        self.stats, self.logits, self.sequences = RunStats(), {}, []
        self.p2p.stats = LinkStats()
        self._record = req.record_logits
        t0 = time.perf_counter()
        # max_new_tokens 0: nothing to run; END still travels so every rank leaves the loop.
        lanes = self._make_lanes(rows, prompts, req.micro_batches) \
            if req.params.max_new_tokens > 0 else []
        if self.stage.has_head:
            self._samplers = {ln.index: lane_sampler(req, ln.rows, self.config.vocab_size,
                                                     self.stage.device) for ln in lanes}
        if self.pp.is_first:
            yield from self._drive(lanes, req, rows.start, t0)
            if not lanes:
                self.sequences = [Sequence(list(req.prompts[r]), seed=req.seed(r)) for r in rows]
        else:
            self._serve(lanes)
        self.p2p.flush()
        self.stats.wall_s = time.perf_counter() - t0

    def _make_lanes(self, rows: range, prompts: list[list[int]], m: int) -> list[Lane]:
        pad = pad_id(self.tokenizer)
        lanes = []
        for i, part in enumerate(split_rows(len(rows), m) if len(rows) else []):
            if i >= len(self.stage.caches) or len(part) > self.stage.batch_size:
                raise ValueError(f"{len(rows)} prompts in {m} micro-batches do not fit the "
                                 f"stage built for {len(self.stage.caches)} lanes of "
                                 f"{self.stage.batch_size}")
            lanes.append(Lane(i, range(rows.start + part.start, rows.start + part.stop),
                              prompts[part.start:part.stop], pad, self.stage.max_seq_len,
                              self.stage.device))
        return lanes

    def _drive(self, lanes: list[Lane], req: Request, row0: int,
               t0: float) -> Iterator[list[StreamEvent]]:
        """First stage: inject prefills, then turn each lane's returning tokens into its
        next decode step until every sequence has stopped."""
        params, trackers = req.params, {}
        for ln in lanes:
            trackers[ln.index] = tracker = Generator(None, self.tokenizer, params,
                                                     self.config.eos_token_ids)
            tracker.sequences = [Sequence(list(p), seed=req.seed(r))
                                 for r, p in zip(ln.rows, ln.prompts)]
            self._step(ln, 0, ln.tokens)
        active, first_back = len(lanes), 0
        while active:
            msg = self._inbox.popleft() if self._inbox else self.p2p.recv(self.pp.last_rank)
            ln, step = lanes[msg.lane], msg.step
            if step == 0:
                first_back += 1
                if first_back == len(lanes):
                    self.stats.prefill_s = time.perf_counter() - t0
            else:
                self.stats.decode_tokens += len(ln.rows)
            tracker = trackers[ln.index]
            # Generator's own bookkeeping: EOS, stop strings, max tokens, streamable text.
            events = tracker._advance(msg.tensor.tolist(), step)  # the one host sync per step
            if all(s.done for s in tracker.sequences) or step == params.max_new_tokens - 1:
                active -= 1
            else:
                if not self.pp.is_last:
                    self.p2p.post(self.pp.last_rank)  # the next tokens land while we compute
                self._step(ln, step + 1, msg.tensor.view(-1, 1).to(self.stage.device))
            # The caller prints while the step just sent runs on the later stages.
            yield [StreamEvent(ln.rows.start - row0 + e.index, e.token_id, e.text, e.finished)
                   for e in events]
        self.stats.decode_s = time.perf_counter() - t0 - self.stats.prefill_s
        if not self.pp.is_last:
            self.p2p.send(self.pp.next_rank, Message(Kind.END))
        self.sequences = [s for ln in lanes for s in trackers[ln.index].sequences]

    def _serve(self, lanes: list[Lane]) -> None:
        """Later stages: compute whatever arrives, in order, until END."""
        prev = self.pp.prev_rank
        while True:
            msg = self.p2p.recv(prev)
            if msg.kind == Kind.END:
                if not self.pp.is_last:
                    self.p2p.send(self.pp.next_rank, msg)
                return
            self.p2p.post(prev)  # END always follows, so a header is always coming
            self._step(lanes[msg.lane], msg.step, msg.tensor.to(self.stage.device))

    def _step(self, ln: Lane, step: int, x: torch.Tensor) -> None:
        """Run this stage on lane ``ln`` at ``step`` and pass the result on.
        x: token ids (B_m, T) on the first stage, hidden (B_m, T, D) elsewhere."""
        fault_hook(self.groups.rank, step)
        positions, start, mask = ln.inputs(step)
        t0 = time.perf_counter()
        out = self.stage.forward(x, positions, start, mask, lane=ln.index, logits="last")
        if self.timed:
            sync(self.stage.device)
        self.stats.compute_s += time.perf_counter() - t0
        self.stats.steps += 1
        if not self.stage.has_head:
            self.p2p.send(self.pp.next_rank, Message(Kind.HIDDEN, step, ln.index, start, out))
            return
        t1 = time.perf_counter()
        logits = out[:, -1]  # (B_m, V)
        if self._record:
            for i, row in enumerate(ln.rows):
                self.logits[(row, step)] = logits[i].float().cpu()  # (V,)
        tokens = self._samplers[ln.index](logits)  # (B_m,)
        self.stats.sample_s += time.perf_counter() - t1
        if self.pp.is_first:
            self._inbox.append(Message(Kind.TOKENS, step, ln.index, start, tokens))
        else:  # on the CPU group: see distributed.p2p on why not the device group
            self.p2p.send(self.pp.first_rank, Message(Kind.TOKENS, step, ln.index, start,
                                                      tokens.cpu()))


def build_pipeline_stage(ckpt: Checkpoint, spec: PipelineSpec, groups: ParallelGroups,
                         progress: bool = False, runtime: RuntimeConfig | None = None) -> Stage:
    """Build and load only this rank's stage (and only its TP shard of it), with the
    kernels ``runtime`` asks for (None: RuntimeConfig())."""
    start, stop = spec.layer_ranges[groups.pp_index]
    n_stages = len(spec.layer_ranges)
    kw = dict(has_embed=groups.pp_index == 0, has_head=groups.pp_index == n_stages - 1,
              lanes=spec.micro_batches, progress=progress, runtime=runtime)
    batch = spec.lane_rows or lane_batch(spec.max_batch, spec.micro_batches)
    dtype, device = parse_dtype(spec.dtype), groups.ctx.device
    if groups.tp_size > 1:
        return build_tp_stage(ckpt, range(start, stop), device, dtype, batch, spec.max_seq_len,
                              groups.tp.device_group, groups.tp_index, groups.tp_size, **kw)
    return build_stage(ckpt, range(start, stop), device, dtype, batch, spec.max_seq_len, **kw)
