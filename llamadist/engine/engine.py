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
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from llamadist.config import RuntimeConfig
from llamadist.engine.executor import Executor, LocalExecutor
from llamadist.engine.kv_blocks import NULL_BLOCK
from llamadist.distributed.faults import PeerError
from llamadist.engine.replicas import Replica, ReplicaSet
from llamadist.engine.request import Request
from llamadist.engine.scheduler import Scheduler, SchedulerStep
from llamadist.engine.step_trace import StepTrace

__all__ = ["LLMEngine", "Replica", "RequestOutput", "EngineStats", "run_stats"]
from llamadist.generation.generate import text_delta
from llamadist.generation.sampling import SamplingParams, new_seed
from llamadist.generation.tokenizer import IncrementalDecoder, Tokenizer
from llamadist.runtime.cuda_graph import bucket_sizes
from llamadist.runtime.engine import Engine
from llamadist.runtime.step_work import SeqWork, StepWork, TokenLogprob, unpack_sampled

log = logging.getLogger(__name__)


@dataclass(slots=True)  # one per sequence per step: no __dict__ to allocate
class RequestOutput:
    """What one step produced for one request."""
    request_id: str
    token_id: int | None     # the sampled token (None when the step only cut text)
    text: str                # text newly safe to show (stop strings and UTF-8 held back)
    finished: bool
    finish_reason: str | None
    logprobs: TokenLogprob | None = None  # when the request's params ask for them


@dataclass
class EngineStats:
    steps: int = 0
    prompt_tokens: int = 0           # computed this run (prefix-cache hits excluded)
    cached_prompt_tokens: int = 0    # reused from the prefix cache
    generated_tokens: int = 0
    busy_s: float = 0.0              # time inside step()
    recoveries: int = 0              # executors replaced after a failure
    replayed_requests: int = 0       # requests recomputed by them
    migrated_requests: int = 0       # moved to another replica with their KV (a drain)
    migrated_blocks: int = 0         # KV blocks they took
    migrated_bytes: int = 0          # bytes of those blocks (every layer's K and V)
    kv_relayed_bytes: int = 0        # of them, through this process (the front relayed)
    kv_direct_bytes: int = 0         # of them, rank to rank (distributed.kv_direct)
    migration_s: float = 0.0         # export + transfer + import
    drain_replayed: int = 0          # running requests of a drained replica recomputed instead

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


class LLMEngine(ReplicaSet):
    """Continuous batching over one executor, or several data-parallel replicas behind
    one queue (a new request goes to the least loaded). ``model``: an executor, a list of
    them, or an in-process ``runtime.engine.Engine`` (wrapped in a LocalExecutor). Each
    replica's paged KV cache has ``num_blocks`` blocks (None: ``runtime.max_batch``
    sequences of ``runtime.max_seq_len`` tokens). ``lockstep``: the replicas share
    collectives inside a step (experts spread over them: parallel.expert's gather
    dispatch), so every replica launches in every round, an empty step when it has no
    work, and the replicas are told they are idle only together."""

    def __init__(self, model: Engine | Executor | Sequence[Executor],
                 tokenizer: Tokenizer | None, runtime: RuntimeConfig,
                 num_blocks: int | None = None, block_size: int | None = None,
                 prefix_caching: bool = True, lockstep: bool = False):
        assert runtime.max_seq_len is not None, "resolve runtime.max_seq_len first"
        if isinstance(model, Engine):
            on_gpu = model.stages[0].device.type == "cuda"
            executors = [LocalExecutor(model, ahead=runtime.schedule_ahead and on_gpu)]
        else:
            executors = list(model) if isinstance(model, (list, tuple)) else [model]
        self.tokenizer, self.runtime, self.lockstep = tokenizer, runtime, lockstep
        self.config = executors[0].config
        devices = executors[0].devices
        self.block_size = block_size = block_size or runtime.block_size_for(devices)
        # The KV memory the plan checked: max_batch sequences of max_seq_len tokens (+1:
        # block 0 is the null block padding rows point at). Fewer blocks than max_batch
        # full sequences need is fine: the scheduler preempts and recomputes.
        self.num_blocks = num_blocks = num_blocks or self.default_blocks(runtime, block_size)
        self._budget = runtime.batch_tokens_for(devices)
        self._prefix_caching = prefix_caching
        self.replicas: list[Replica] = []
        self.drained: set[int] = set()  # replicas drained for maintenance (replicas.py)
        for ex in executors:
            self.add_replica(ex)
        # recovery from a lost worker (cli.front.Front): ``poll(engine)`` between steps,
        # ``recover(engine, failure) -> bool`` when a step fails with a PeerError
        self.guard = None
        self.eos = set(self.config.eos_token_ids) | set(tokenizer.eos_token_ids
                                                        if tokenizer else ())
        self.stats = EngineStats()
        self._queues: dict[str, list[RequestOutput]] = {}  # outputs held for submit()'s iterators
        self._ids = itertools.count()
        self._held_back: set[tuple] = set()  # (replica, bucket): see _hold_back
        self._launches = itertools.count()
        self._where: dict[str, Replica] = {}  # unfinished requests' replicas
        self.warmup_s = 0.0  # set by warmup()
        self.trace: StepTrace | None = None  # a per-step trace when set (not in lockstep)

    def poll(self) -> None:
        """Between steps (an idle server calls it too): move a drained replica's requests
        once its steps are collected; let the guard notice a lost worker or bring a
        restarted replica back."""
        if self.drained:
            self.move_drained()
        if self.guard is not None:
            self.guard.poll(self)

    def warmup(self, force: bool = False, executors: Sequence[Executor] | None = None) -> float:
        """Run one decode step of every batch bucket through each executor on a GPU (on
        any device when ``force``), so its CUDA graphs are captured (and layers compiled)
        now, not while requests wait. The steps' rows all read and write the null block's
        slot 0 and sample nothing. ``executors``: these instead of the engine's (a
        restarted replica's, before it takes requests again). Seconds spent (0.0 when
        nothing needed it)."""
        t0, ran = time.perf_counter(), False
        # (lockstep replicas: all on one kind of device)
        exes = [r.executor for r in self._round()] if executors is None else list(executors)
        exes = [e for e in exes if force or any(d.startswith("cuda") for d in e.devices)]
        for size in bucket_sizes(self.runtime.max_batch):
            seqs = [SeqWork(f"warmup-{i}", (0,), (NULL_BLOCK,), 0, None) for i in range(size)]
            for ex in exes:  # every replica's step launched before any is collected
                ex.launch(StepWork(seqs, self.block_size))
            for ex in exes:
                ex.collect()
                ran = True
        for ex in exes:  # nothing in flight now: the ranks may wait without a deadline
            ex.idle()
        spent = time.perf_counter() - t0 if ran else 0.0
        if executors is None:
            self.warmup_s += spent
        if spent:
            log.info("warm-up (graph capture of %s-sequence buckets): %.1f s",
                     bucket_sizes(self.runtime.max_batch), spent)
        return spent

    @staticmethod
    def default_blocks(runtime: RuntimeConfig, block_size: int) -> int:
        """runtime.max_batch sequences of runtime.max_seq_len tokens, plus the null block."""
        return -(-runtime.max_batch * runtime.max_seq_len // block_size) + 1

    @property
    def scheduler(self) -> Scheduler:
        """The first replica's scheduler (every replica's has the same limits)."""
        return self.replicas[0].scheduler

    # ---- requests --------------------------------------------------------------------
    def check(self, num_prompt_tokens: int, params: SamplingParams) -> None:
        """Refuse (RequestTooLarge, with the numbers) a request that alone cannot fit."""
        self.scheduler.check(num_prompt_tokens, params)

    def add_request(self, prompt_ids: Sequence[int], params: SamplingParams,
                    request_id: str | None = None, stream_text: bool = True) -> Request:
        """Queue a request (refused at once, with the numbers, if it alone cannot fit) on
        the least loaded replica. ``stream_text=False``: nobody reads its outputs' text
        while it runs, so it is detokenized once, at its end (its last output carries the
        whole text), unless stop strings need the text every step."""
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        vocab = self.config.vocab_size
        if prompt_ids and not 0 <= min(prompt_ids) <= max(prompt_ids) < vocab:
            bad = next(t for t in prompt_ids if not 0 <= t < vocab)
            raise ValueError(f"prompt token id {bad} is outside the model's vocabulary "
                             f"(ids 0..{vocab - 1})")
        if rid in self._where:
            raise ValueError(f"request id {rid!r} is already queued or running")
        seed = params.seed if params.seed is not None else new_seed()
        req = Request(rid, list(prompt_ids), params, seed, arrival_s=time.monotonic(),
                      stream_text=stream_text)
        if params.prompt_logprobs is not None:
            req.prompt_logprobs = [None] * len(req.prompt_ids)
        rep = min(self.serving(), key=lambda r: r.load)
        rep.scheduler.add(req)
        if not req.finished:
            self._where[rid] = rep
        return req

    def cancel(self, request_id: str) -> bool:
        """Stop a request and free its blocks now; False if it is unknown or done."""
        rep = self._where.pop(request_id, None)
        req = rep.scheduler.get(request_id) if rep is not None else None
        if rep is None or not rep.scheduler.cancel(request_id):
            return False
        if req is not None and req.decoder is None and req.output_ids and self.tokenizer:
            # its text was left for the end (stream_text=False): the text so far, as a
            # streamed request's would be
            req.text = text_delta(self.tokenizer, req.output_ids, tuple(req.params.stop), 0,
                                  False, IncrementalDecoder(self.tokenizer))[0]
        self._settle(rep)
        return True

    def _settle(self, rep: Replica) -> None:
        """Tell an executor whose replica ran out of work that nothing is in flight (in
        lockstep: every replica, once none has work)."""
        if self.lockstep:
            if not self.has_unfinished:
                for r in self.replicas:
                    if r.busy:
                        r.busy = False
                        r.executor.idle()
            return
        if rep.busy and not rep.in_flight and not rep.scheduler.has_unfinished:
            rep.busy = False
            rep.executor.idle()

    def get(self, request_id: str) -> Request | None:
        rep = self._where.get(request_id)
        return rep.scheduler.get(request_id) if rep else None

    @property
    def has_unfinished(self) -> bool:
        return any(r.scheduler.has_unfinished or r.in_flight for r in self.replicas)

    def gauges(self) -> dict:
        ss = [r.scheduler for r in self.replicas]
        return {"running": sum(s.num_running for s in ss),
                "waiting": sum(s.num_waiting for s in ss),
                "kv_blocks_used": sum(s.blocks_used for s in ss),
                "kv_blocks_free": sum(s.blocks_free for s in ss),
                "preemptions": sum(s.preemptions for s in ss)}

    def reset_stats(self) -> None:
        """Zero the counters (after a warm-up run)."""
        self.stats = EngineStats()
        for r in self.replicas:
            r.scheduler.preemptions = 0
            r.reset_pending = True  # the stages zero theirs at the next step

    def close(self) -> None:
        """Let the executors go (worker ranks leave their loops)."""
        for r in self.replicas:
            r.executor.close()

    # ---- one step ----------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Launch steps until every executor has ``depth`` in flight, then finish the
        oldest: sample, advance, stream. The outputs of the requests it advanced. Not
        thread-safe: one caller steps the engine (add and cancel between steps)."""
        self.poll()
        t0 = time.perf_counter()
        try:
            self._launch()
            live = [r for r in self.replicas if r.in_flight]
            if not live:
                return []
            rep = min(live, key=lambda r: r.in_flight[0][0])
            key, step, work = rep.in_flight[0]
            t_wait = self.trace.clock() if self.trace is not None else 0.0
            tokens = rep.executor.collect()
            rep.in_flight.popleft()
            if self.trace is not None:
                self.trace.collected(key, t_wait)
        except BaseException as failure:  # Ctrl-C, out of memory, a lost rank: the steps
            for r in self.replicas:           # never happened
                while r.in_flight:
                    aborted = r.in_flight.popleft()[1]
                    if aborted is not None:  # None: an empty lockstep step
                        r.scheduler.abort(aborted)
                if isinstance(failure, PeerError):
                    continue  # nothing to drain from a lost rank: replace_executor
                try:
                    r.executor.reset()  # its results of those steps are dropped
                except Exception as e:  # noqa: BLE001 - reported; the failure is raised
                    log.warning("could not reset the executor of a failed step: %s", e)
            if self.trace is not None:
                self.trace.aborted()
            if (isinstance(failure, PeerError) and self.guard is not None
                    and self.guard.recover(self, failure)):
                return []  # the requests replay on the new executors from the next step
            raise
        if step is None:  # an empty lockstep step: nothing was sampled
            self._settle(rep)
            self.stats.busy_s += time.perf_counter() - t0
            return []
        tokens, logprobs, scored = unpack_sampled(tokens, work)
        self._record_scores(work, scored)
        sampled = dict(zip(work.sampled_ids, tokens))
        # requests that finished while the step ran (cancelled; stopped, with a decode
        # scheduled ahead) get nothing from it
        live = {c.request.id for c in step.chunks if not c.request.finished}
        finished = {r.id for r in rep.scheduler.update(step, sampled)}
        outputs = []
        for c in step.chunks:
            req = c.request
            if req.id not in sampled or req.id not in live:
                continue  # a prefill chunk, or a request that finished meanwhile
            out = self._output(rep, req, sampled[req.id], req.id in finished)
            out.logprobs = logprobs.get(req.id)
            outputs.append(out)
            if req.id in self._queues:
                self._queues[req.id].append(out)
            if out.finished:
                self._where.pop(req.id, None)
        self._settle(rep)
        self.stats.steps += 1
        self.stats.busy_s += time.perf_counter() - t0
        return outputs

    def _record_scores(self, work: StepWork, scored: dict[str, list[TokenLogprob]]) -> None:
        """Prompt tokens' logprobs into their requests, by position (a recomputed chunk
        writes the same values again)."""
        if not scored:
            return
        for s in work.seqs:
            req = self.get(s.request_id)
            if s.request_id in scored and req is not None and req.prompt_logprobs is not None:
                for j, entry in enumerate(scored[s.request_id]):
                    req.prompt_logprobs[s.start + 1 + j] = entry

    def _round(self) -> list[Replica]:
        """The replicas in launch order: in lockstep, an executor that computes at launch
        (the front's own replica) goes last, so it meets the others' steps in the
        collectives instead of waiting for steps not yet sent."""
        if not self.lockstep:
            return list(self.replicas)
        return sorted(self.replicas, key=lambda r: r.executor.blocking)

    def _launch_lockstep(self) -> None:
        """Rounds of one step per replica (empty where its scheduler has nothing) while
        any replica has work and fewer than ``depth`` rounds are in flight."""
        order = self._round()
        depth = order[0].executor.depth
        per_step = -(-self.runtime.max_batch // depth)
        while all(len(r.in_flight) < depth for r in order):
            steps = [r.scheduler.schedule(per_step) for r in order]
            if not any(steps):
                break
            for i, (rep, step) in enumerate(zip(order, steps)):
                work = self._work(step, None) if step else StepWork([], self.block_size)
                work.reset_stats, rep.reset_pending = rep.reset_pending, False
                try:
                    rep.executor.launch(work)
                except BaseException:  # this round's unlaunched steps never happened
                    for r, s in zip(order[i:], steps[i:]):
                        if s:
                            r.scheduler.abort(s)
                    raise
                rep.busy = True
                rep.in_flight.append((next(self._launches), step or None, work))

    def _launch(self) -> None:
        if self.lockstep:
            return self._launch_lockstep()
        for rep in self.replicas:
            if rep.key in self.drained:
                continue  # draining: its steps in flight are collected, no new one
            depth = rep.executor.depth
            per_step = -(-self.runtime.max_batch // depth)
            # an executor that takes decodes scheduled ahead keeps one more step in flight
            ahead, trace = rep.executor.ahead, self.trace
            while len(rep.in_flight) < depth + ahead:
                t0 = trace.clock() if trace is not None else 0.0
                early = ahead and bool(rep.in_flight)
                step = rep.scheduler.schedule(per_step, ahead=early)
                if not step:
                    break
                if early and self._hold_back(rep, step):
                    # its launch would first capture its batch size's CUDA graphs (seconds,
                    # once): the step in flight hands out its tokens (a request's first,
                    # often) before that, not after; this one is scheduled again next
                    rep.scheduler.abort(step)
                    break
                work = self._work(step, rep.in_flight[-1][2] if rep.in_flight else None)
                t1 = trace.clock() if trace is not None else 0.0
                work.reset_stats, rep.reset_pending = rep.reset_pending, False
                try:
                    mark = trace.mark() if trace is not None else None
                    rep.executor.launch(work)
                except BaseException:  # never launched: step() aborts the ones that were
                    rep.scheduler.abort(step)
                    raise
                rep.busy, rep.steps = True, rep.steps + 1
                rep.in_flight.append((key := next(self._launches), step, work))
                if trace is not None:
                    trace.launched(key, step.chunks, t0, t1,
                                   getattr(rep.executor, "graphed", None), (mark, trace.mark()))

    def _hold_back(self, rep: Replica, step: SchedulerStep) -> bool:
        """Whether to hold back ``step``, scheduled ahead on ``rep``: its launch would first
        capture a bucket's CUDA graphs (a decode-only step, on an executor that says which
        bucket), and no step of that bucket was held back before. Once per bucket: a step
        scheduled without going ahead need not be of the same size (a request with
        penalties never goes ahead), so that bucket might otherwise never be captured and
        every step ahead be held back."""
        captures = getattr(rep.executor, "captures", None)
        if captures is None:
            return False
        bucket = captures(len(step.chunks))  # None once captured: the steady state's test
        if (bucket is None or (rep.key, bucket) in self._held_back
                or step.num_tokens != len(step.chunks)):  # not decode-only
            return False
        self._held_back.add((rep.key, bucket))
        return True

    def _work(self, step: SchedulerStep, prev: StepWork | None) -> StepWork:
        """The step as the executor sees it (host data; see runtime.step_work); ``prev``:
        the step launched just before it, whose samples its pending chunks read. One
        plain tuple per sequence (StepWork.of_rows), no object."""
        rows = []
        prev_rows = None
        prompt_tokens = 0
        for c in step.chunks:
            req = c.request
            p, start, end = req.params, c.start, c.start + c.num_tokens
            if start < len(req.prompt_ids):
                prompt_tokens += min(end, len(req.prompt_ids)) - start
            spec = None
            if c.sample:
                # the tokens seen so far matter only to the penalties that ask for them;
                # a pending chunk samples the token after the one still in flight
                spec = (p, req.seed, len(req.output_ids) + c.pending,
                        tuple(req.all_ids) if p.repetition_penalty != 1.0 else (),
                        tuple(req.output_ids) if p.counts_outputs else ())
            if c.pending:
                if prev_rows is None:
                    prev_rows = {rid: i for i, rid in enumerate(prev.sampled_ids)}
                toks, at = (0,), prev_rows[req.id]  # 0: a placeholder (Chunk.pending)
            else:
                toks, at = req.tokens(start, end), -1
            score = ((), 0) if p.prompt_logprobs is None else self._score(req, start, end)
            rows.append((req.id, toks, req.block_ids, start, at, score[0], score[1], spec))
        self.stats.prompt_tokens += prompt_tokens
        return StepWork.of_rows(rows, self.block_size)

    @staticmethod
    def _score(req: Request, start: int, end: int) -> tuple[tuple[int, ...], int]:
        """A request asking for its prompt's logprobs: the logits at positions [start,
        min(end, P - 1)) score the prompt tokens after them."""
        k = req.params.prompt_logprobs
        p = len(req.prompt_ids)
        if k is None or start >= p - 1:
            return (), 0
        return tuple(req.prompt_ids[start + 1:min(end, p - 1) + 1]), k

    def _output(self, rep: Replica, req: Request, tok: int,
                finished_by_length: bool) -> RequestOutput:
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
        # text every step where it is read or searched for stop strings; else only at the
        # end (text_delta decodes the whole list then, whatever was decoded before)
        if self.tokenizer is not None and (done or req.stream_text or req.params.stop):
            if req.decoder is None and not done:
                req.decoder = IncrementalDecoder(self.tokenizer)
            req.text, delta, stopped = text_delta(self.tokenizer, req.output_ids,
                                                  tuple(req.params.stop), req.emitted, done,
                                                  req.decoder)
            req.emitted += len(delta)
            if stopped:
                reason, done = "stop", True
        if done:
            if reason == "stop":
                rep.scheduler.finish(req.id, "stop")
            req.finish_reason, req.finished_s = reason, now
        return RequestOutput(req.id, tok, delta, done, reason)

    # ---- drive to completion -----------------------------------------------------------
    def submit(self, prompts: Sequence[Sequence[int]],
               params: SamplingParams | Sequence[SamplingParams], stream_text: bool = True
               ) -> tuple[list[Request], Iterator[list[tuple[int, RequestOutput]]]]:
        """Queue every prompt now (all refused before any is queued if one cannot fit);
        the requests, and an iterator that steps the engine and yields, after each step,
        the (prompt index, output) pairs of these requests. Several iterators may be
        consumed in turn: each keeps its own requests' outputs, whoever stepped. Closing
        an iterator (or dropping it after it started) cancels what it has not finished.
        ``stream_text``: as add_request's (False: each request's text comes whole in its
        last output)."""
        per = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(per) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(per)} sampling params")
        for p, sp in zip(prompts, per):
            self.check(len(p), sp)
        reqs = [self.add_request(p, sp, stream_text=stream_text) for p, sp in zip(prompts, per)]
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
