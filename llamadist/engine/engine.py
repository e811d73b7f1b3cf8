"""The engine loop: requests enter at any time, each step the scheduler picks the work
(decodes, prefill chunks) within the KV blocks and the token budget, the model runs it as
one flat batch over the paged cache, the sampler draws each request's next token, and
every request's new text streams out. Continuous batching: a request joins at the next
step after it arrives and leaves (freeing its blocks) the step it finishes.

    engine = LLMEngine(model, tokenizer, runtime)
    engine.add_request(prompt_ids, SamplingParams(max_new_tokens=32), "a")
    while engine.has_unfinished:
        for out in engine.step():
            print(out.request_id, out.text, end="")
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from llamadist.config import RuntimeConfig
from llamadist.engine.kv_blocks import BlockPool
from llamadist.engine.request import Request
from llamadist.engine.scheduler import Scheduler, SchedulerStep
from llamadist.generation.generate import make_sampler, text_delta
from llamadist.generation.sampling import SamplingParams, new_seed
from llamadist.generation.tokenizer import Tokenizer
from llamadist.runtime.engine import Engine
from llamadist.runtime.paged_kv import PagedBatch

@dataclass
class RequestOutput:
    """What one step produced for one request."""
    request_id: str
    token_id: int | None     # the sampled token (None when the step only cut text)
    text: str                # text newly safe to show (stop strings and UTF-8 held back)
    finished: bool
    finish_reason: str | None


@dataclass
class EngineStats:
    steps: int = 0
    prompt_tokens: int = 0           # computed this run (prefix-cache hits excluded)
    cached_prompt_tokens: int = 0    # reused from the prefix cache
    generated_tokens: int = 0
    busy_s: float = 0.0              # time inside step()

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def run_stats(requests: Sequence[Request], wall_s: float) -> dict:
    """What a run of ``requests`` submitted together cost: prefill_s until every request
    had its first token (as a static batch's prefill), decode tokens/s (tokens after each
    request's first, from the first token on), output tokens/s over the whole run, and
    the p50 time to first token and per output token."""
    generated = sum(len(r.output_ids) for r in requests)
    ttft = sorted(r.ttft_s for r in requests if r.ttft_s is not None)
    tpot = sorted(r.tpot_s for r in requests if r.tpot_s is not None)
    prefill_s = ttft[-1] if ttft else 0.0
    # decode: every token after a request's first, over the time since the first token
    decode_s = max(0.0, wall_s - (ttft[0] if ttft else 0.0))
    decode_tokens = sum(max(0, len(r.output_ids) - 1) for r in requests)
    return {"prefill_s": prefill_s, "decode_s": decode_s,
            "prompt_tokens": sum(len(r.prompt_ids) for r in requests),
            "generated_tokens": generated, "wall_s": wall_s,
            "decode_tokens_per_s": decode_tokens / decode_s if decode_s else 0.0,
            "tokens_per_s": generated / wall_s if wall_s else 0.0,
            "ttft_p50_s": ttft[len(ttft) // 2] if ttft else None,
            "tpot_p50_s": tpot[len(tpot) // 2] if tpot else None}


class LLMEngine:
    """Continuous batching over an in-process ``runtime.engine.Engine`` (one or more stages
    on local devices) with a paged KV cache sized from ``num_blocks`` (or, when None, from
    ``runtime.max_batch`` sequences of ``runtime.max_seq_len`` tokens)."""

    def __init__(self, model: Engine, tokenizer: Tokenizer | None, runtime: RuntimeConfig,
                 num_blocks: int | None = None, block_size: int | None = None,
                 prefix_caching: bool = True):
        assert runtime.max_seq_len is not None, "resolve runtime.max_seq_len first"
        self.model, self.tokenizer, self.runtime = model, tokenizer, runtime
        devices = [str(s.device) for s in model.stages]
        block_size = block_size or runtime.block_size_for(devices)
        self.block_size = block_size
        # The KV memory the plan checked: max_batch sequences of max_seq_len tokens (+1:
        # block 0 is the null block padding rows point at). Fewer blocks than max_batch
        # full sequences need is fine: the scheduler preempts and recomputes.
        num_blocks = num_blocks or -(-runtime.max_batch * runtime.max_seq_len // block_size) + 1
        model.init_paged(num_blocks, block_size)
        self.pool = BlockPool(num_blocks, block_size, prefix_caching)
        budget = runtime.batch_tokens_for(devices)
        self.scheduler = Scheduler(self.pool, runtime.max_batch, budget, runtime.max_seq_len)
        self.eos = set(model.config.eos_token_ids) | set(tokenizer.eos_token_ids
                                                        if tokenizer else ())
        self.stats = EngineStats()
        self._queues: dict[str, list[RequestOutput]] = {}  # outputs held for submit()'s iterators
        self._ids = itertools.count()
        self._first_device = model.stages[0].device

    # ---- requests --------------------------------------------------------------------
    def add_request(self, prompt_ids: Sequence[int], params: SamplingParams,
                    request_id: str | None = None) -> Request:
        """Queue a request (refused at once, with the numbers, if it alone cannot fit)."""
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        seed = params.seed if params.seed is not None else new_seed()
        req = Request(rid, list(prompt_ids), params, seed, arrival_s=time.monotonic())
        self.scheduler.add(req)  # refuses an id already queued or running
        return req

    def cancel(self, request_id: str) -> bool:
        """Stop a request and free its blocks now; False if it is unknown or done."""
        return self.scheduler.cancel(request_id)

    def get(self, request_id: str) -> Request | None:
        return self.scheduler.get(request_id)

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    def gauges(self) -> dict:
        s = self.scheduler
        return {"running": s.num_running, "waiting": s.num_waiting,
                "kv_blocks_used": s.blocks_used, "kv_blocks_free": s.blocks_free,
                "preemptions": s.preemptions}

    # ---- one step ----------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule, run and sample one step; the outputs of the requests it advanced.
        Not thread-safe: one caller steps the engine (add and cancel between steps)."""
        t0 = time.perf_counter()
        step = self.scheduler.schedule()
        if not step:
            return []
        try:
            sampled = self._run(step)
        except BaseException:  # Ctrl-C, out of memory: the step never happened
            self.scheduler.abort(step)
            raise
        finished = {r.id for r in self.scheduler.update(step, sampled)}
        by_id = {c.request.id: c.request for c in step.chunks}
        outputs = []
        for rid, tok in sampled.items():
            req = by_id[rid]
            if req.finish_reason == "cancelled":  # cancelled during the step: no token
                continue
            out = self._output(req, tok, rid in finished)
            outputs.append(out)
            if rid in self._queues:
                self._queues[rid].append(out)
        self.stats.steps += 1
        self.stats.busy_s += time.perf_counter() - t0
        return outputs

    @torch.inference_mode()
    def _run(self, step: SchedulerStep) -> dict[str, int]:
        """The model over the step's chunks; the sampled token of each chunk that ends at
        its request's last token."""
        chunks = step.chunks
        tokens = torch.tensor([t for c in chunks for t in c.token_ids], dtype=torch.long)
        batch = PagedBatch.build([(c.request.block_ids, c.start, c.num_tokens) for c in chunks],
                                 self.block_size)
        logits = self.model.forward_paged(tokens.to(self._first_device), batch)  # (S, V)
        for c in chunks:
            if c.start < len(c.request.prompt_ids):
                prompt_part = min(c.end, len(c.request.prompt_ids)) - c.start
                self.stats.prompt_tokens += prompt_part
        rows = [i for i, c in enumerate(chunks) if c.sample]
        if not rows:
            return {}
        reqs = [chunks[i].request for i in rows]
        # the tokens seen so far matter only to a repetition penalty: build them only then
        seen = [r.all_ids if r.params.repetition_penalty != 1.0 else [] for r in reqs]
        sampler = make_sampler(seen, [r.params for r in reqs], [r.seed for r in reqs],
                               logits.shape[-1], logits.device)
        # Step k of a request is its k-th sampled token, wherever and however it ran.
        sampler.steps = torch.tensor([len(r.output_ids) for r in reqs], device=logits.device)
        ids = sampler.sample(logits[rows]).tolist()
        return {r.id: t for r, t in zip(reqs, ids)}

    def _output(self, req: Request, tok: int, finished_by_length: bool) -> RequestOutput:
        """EOS and stop strings (the engine's to decide: it has the tokenizer), the text
        delta, the per-request timings."""
        self.stats.generated_tokens += 1
        now = time.monotonic()
        if len(req.output_ids) == 1:  # its first token (the scheduler timed it)
            self.stats.cached_prompt_tokens += req.num_cached_prompt
        reason = req.finish_reason if finished_by_length else None
        if tok in self.eos and not req.params.ignore_eos:
            req.output_ids.pop()  # EOS ends the request and is not part of its text
            reason = "stop"
        done = reason is not None
        delta = ""
        if self.tokenizer is not None:
            req.text, delta, stopped = text_delta(self.tokenizer, req.output_ids,
                                                  tuple(req.params.stop), req.emitted, done)
            req.emitted += len(delta)
            if stopped:
                reason, done = "stop", True
        if done:
            if reason == "stop":
                self.scheduler.finish(req.id, "stop")
            req.finish_reason, req.finished_s = reason, now
        return RequestOutput(req.id, tok, delta, done, reason)

    # ---- drive to completion -----------------------------------------------------------
    def submit(self, prompts: Sequence[Sequence[int]],
               params: SamplingParams | Sequence[SamplingParams]
               ) -> tuple[list[Request], Iterator[list[tuple[int, RequestOutput]]]]:
        """Queue every prompt now (all refused before any is queued if one cannot fit);
        the requests, and an iterator that steps the engine and yields, after each step,
        the (prompt index, output) pairs of these requests. Several iterators may be
        consumed in turn: each keeps its own requests' outputs, whoever stepped. Closing
        an iterator (or dropping it after it started) cancels what it has not finished."""
        per = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(per) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(per)} sampling params")
        for p, sp in zip(prompts, per):
            self.scheduler.check(len(p), sp)
        reqs = [self.add_request(p, sp) for p, sp in zip(prompts, per)]
        for r in reqs:
            self._queues[r.id] = []
        return reqs, self._drain(reqs)

    def _drain(self, reqs: list[Request]) -> Iterator[list[tuple[int, RequestOutput]]]:
        index = {r.id: i for i, r in enumerate(reqs)}
        try:
            while True:
                mine = [(index[rid], out) for rid in index for out in self._queues[rid]]
                for rid in index:
                    self._queues[rid].clear()
                if mine:  # drained before the end check: another caller may have stepped
                    yield sorted(mine, key=lambda pair: pair[0])
                elif all(r.finished for r in reqs):
                    return
                else:
                    self.step()
        finally:  # abandoned (an error, Ctrl-C, a closed stream): free the blocks
            for r in reqs:
                if not r.finished:
                    self.cancel(r.id)
                self._queues.pop(r.id, None)
