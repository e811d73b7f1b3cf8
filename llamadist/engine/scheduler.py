"""Continuous batching over a paged KV cache: which tokens of which requests each step
computes. Pure Python over request states and block counts; it never knows how the model
is laid out.

Policy (first come, first served):

1. Running requests first, in admission order: each computes its next token (a decode)
   or the next chunk of its prompt (chunked prefill), within the step's token budget
   ``max_batch_tokens``. A prefill chunk leaves one token of the budget for every
   decode after it, so decodes never stall behind a long prompt (``max_batch_tokens >=
   max_batch`` makes room for all of them).
2. When a running request cannot get a block, the most recently admitted running
   request is preempted (blocks freed, back to the front of the waiting queue, computed
   tokens forgotten, outputs kept) and the allocation retried; if the request itself is
   the most recent, it is the one preempted. The earliest admitted request therefore
   always progresses, and since ``add`` refuses any request that could not fit the
   whole pool alone, no request ever fails because others hold blocks.
3. Then waiting requests are admitted in order while fewer than ``max_batch`` run, budget
   is left and blocks allow; a prompt gets what is left of the budget and continues next
   step. Admission stops at the first request that does not fit (no overtaking). No
   admission happens in a step that preempted: memory is tight, admitting would thrash.
4. A (re)admitted request first reuses the longest cached prefix of prompt + outputs; a
   preempted request thus resumes by recomputing prompt + outputs so far, mostly from
   the prefix cache.

Who finishes a request: ``update`` marks "length" when a request has its
``max_new_tokens`` (the one place that rule lives). The engine calls ``finish`` for
"stop" (EOS, stop strings: it alone detokenizes) after ``update``; a token that is both
a stop and the last allowed one is reported "stop", as vLLM and OpenAI do. ``cancel``
finishes with "cancelled". Every finish frees the request's blocks at once.

Steps in flight: ``schedule`` may be called again before ``update`` of earlier steps
(a pipeline keeps one step per stage in flight); a request with a chunk in flight is
neither scheduled again nor preempted until its step is updated, except with ``ahead``:
a decode whose input is the token its step in flight samples (a ``pending`` chunk, so an
executor on a GPU can take it from that step's output on the device while the host
schedules the next step). ``update`` calls for a request must come in the order its steps
were scheduled. A request that stops (EOS, a stop string) while a pending chunk is in
flight wastes that chunk: ``update`` ignores chunks of finished requests. A request cancelled while in
flight frees its blocks at once and the next step may reuse them: safe because every
stage runs steps in the order they were scheduled, so the old step's writes come first.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from llamadist.engine.kv_blocks import BlockPool
from llamadist.engine.request import FINISH_REASONS, Request, RequestStatus
from llamadist.generation.sampling import SamplingParams


class RequestTooLarge(ValueError):
    """A request that alone can never fit (context length or KV blocks)."""


@dataclass(eq=False, slots=True)  # slots, not frozen: one is made per sequence per step
class Chunk:
    """Compute ``request.all_ids[start:start + num_tokens]`` this step (``start`` is the
    request's ``num_computed``); ``sample``: the chunk reaches the request's last token,
    so its last position's logits are sampled."""
    request: Request
    start: int
    num_tokens: int
    sample: bool
    # scheduled ahead: its one token is the one the request's step in flight samples,
    # unknown on the host until then (the executor takes it from that step's output)
    pending: bool = False
    # scheduled ahead: the request's chunk in flight before it (the one it reads), which
    # is its latest in flight again if this one's step is aborted
    prev: "Chunk | None" = None

    @property
    def end(self) -> int:
        return self.start + self.num_tokens

    @property
    def token_ids(self) -> list[int]:
        if self.pending:
            return [0]  # a placeholder: see ``pending``
        return self.request.tokens(self.start, self.end)

    def __repr__(self) -> str:
        return (f"Chunk({self.request.id!r}, start={self.start}, "
                f"num_tokens={self.num_tokens}, sample={self.sample}"
                f"{', pending' if self.pending else ''})")


@dataclass
class SchedulerStep:
    chunks: list[Chunk] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)  # while building this step

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    def __bool__(self) -> bool:
        return bool(self.chunks)


class Scheduler:
    def __init__(self, pool: BlockPool, max_batch: int, max_batch_tokens: int,
                 max_seq_len: int, clock: Callable[[], float] = time.monotonic) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_batch_tokens < max_batch:
            raise ValueError(f"max_batch_tokens ({max_batch_tokens}) must be >= max_batch "
                             f"({max_batch}): every running sequence needs one token of the "
                             f"step's budget to decode")
        if max_seq_len < 1:
            raise ValueError(f"max_seq_len must be >= 1, got {max_seq_len}")
        self.pool = pool
        self.max_batch = max_batch
        self.max_batch_tokens = max_batch_tokens
        self.max_seq_len = max_seq_len
        self.clock = clock
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # admission order
        self.preemptions = 0
        self._requests: dict[str, Request] = {}  # unfinished, by id
        # chunks in flight per request (two when a decode was scheduled ahead), and the
        # latest of them
        self._in_flight: dict[Request, int] = {}
        self._flying: dict[Request, Chunk] = {}
        self._length_finished: dict[str, Request] = {}  # by the latest update

    # ---- gauges ----------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def blocks_used(self) -> int:
        return self.pool.num_used

    @property
    def blocks_free(self) -> int:
        return self.pool.num_free

    @property
    def has_unfinished(self) -> bool:
        return bool(self._requests)

    def get(self, request_id: str) -> Request | None:
        """An unfinished request by id."""
        return self._requests.get(request_id)

    # ---- requests in and out -----------------------------------------------------------
    def add(self, req: Request) -> None:
        """Queue a request (refused with ``RequestTooLarge`` if it alone can never fit). A
        request asking for 0 new tokens is finished ("length") at once."""
        if req.id in self._requests:
            raise ValueError(f"request id {req.id!r} is already queued or running")
        self._check_fits(req)
        if req.arrival_s is None:
            req.arrival_s = self.clock()
        req.status = RequestStatus.WAITING
        self._requests[req.id] = req
        self.waiting.append(req)
        if req.remaining_new <= 0:
            self._finish(req, "length")

    def check(self, num_prompt_tokens: int, params: SamplingParams,
              request_id: str = "(new)") -> None:
        """Refuse, before anything is queued, a request that alone could never fit."""
        self._check_fits(Request(request_id, [0] * num_prompt_tokens, params, 0))

    def _check_fits(self, req: Request) -> None:
        p, m, s = len(req.prompt_ids), req.params.max_new_tokens, self.max_seq_len
        if p + m > s:
            fix = (f"lower max_new_tokens to {s - p} or less, shorten the prompt"
                   if p < s else "shorten the prompt")
            raise RequestTooLarge(
                f"request {req.id!r} needs {p + m} positions (prompt {p} + max_new_tokens "
                f"{m}) but max_seq_len is {s}: {fix}, or raise --max-seq-len (up to the "
                f"model's context)")
        # The last sampled token is never fed back, so its K/V are never stored.
        kv_tokens = p + max(m, 1) - 1
        blocks, usable = self.pool.blocks_for(kv_tokens), self.pool.num_usable
        if blocks > usable:
            bs = self.pool.block_size
            raise RequestTooLarge(
                f"request {req.id!r} needs {blocks} KV blocks of {bs} tokens ({kv_tokens} "
                f"cached tokens: prompt {p} + max_new_tokens {m} - 1) but the KV cache has "
                f"only {usable} usable blocks ({usable * bs} tokens): lower "
                f"max_new_tokens, shorten the prompt, or give the KV cache more memory")

    def cancel(self, request_id: str) -> bool:
        """Finish a waiting or running request as "cancelled", freeing its blocks now.
        False if no such unfinished request."""
        req = self._requests.get(request_id)
        if req is None:
            return False
        self._finish(req, "cancelled")
        return True

    def finish(self, request_id: str, reason: str) -> bool:
        """The engine finishes a request ("stop": EOS or a stop string). False if it was
        not unfinished; a "stop" on the token that just hit the length limit turns its
        "length" into "stop"."""
        if reason not in FINISH_REASONS:
            raise ValueError(f"finish reason must be one of {FINISH_REASONS}, got {reason!r}")
        req = self._requests.get(request_id)
        if req is None:
            late = self._length_finished.get(request_id)
            if late is None or reason != "stop":
                return False
            late.finish_reason = "stop"
            return True
        self._finish(req, reason)
        return True

    def _finish(self, req: Request, reason: str) -> None:
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
        else:
            self.waiting.remove(req)
        self.pool.free(req)
        self._in_flight.pop(req, None)
        self._flying.pop(req, None)
        del self._requests[req.id]
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        req.finished_s = self.clock()

    # ---- one step --------------------------------------------------------------------
    def schedule(self, max_seqs: int | None = None, ahead: bool = False) -> SchedulerStep:
        """The next step: at most ``max_seqs`` sequences (None: max_batch). A pipeline
        with P stages in flight asks for about max_batch / P, so the running requests
        split into P groups that take turns, one group per stage. ``ahead``: a request
        whose step in flight samples its next token may decode that token in this step
        (a ``pending`` chunk), so the host schedules while the device computes; see
        ``can_go_ahead`` for which may."""
        step = SchedulerStep()
        limit = self.max_batch if max_seqs is None else max(1, max_seqs)
        budget = self._schedule_running(step, self.max_batch_tokens, limit, ahead)
        if not step.preempted:
            self._admit_waiting(step, budget, limit)
        for c in step.chunks:
            self._in_flight[c.request] = self._in_flight.get(c.request, 0) + 1
            self._flying[c.request] = c
        return step

    def can_go_ahead(self, req: Request) -> bool:
        """One chunk in flight that samples the request's next token, and tokens left
        after it; not a request whose sampling needs its outputs on the host (penalties)."""
        c = self._flying.get(req)
        if c is None or not c.sample or self._in_flight.get(req) != 1:
            return False
        p, outs = req.params, len(req.output_ids)
        return (c.start + c.num_tokens == len(req.prompt_ids) + outs
                and p.max_new_tokens - outs > 1  # remaining_new
                and p.repetition_penalty == 1.0 and not p.presence_penalty
                and not p.frequency_penalty)

    def _schedule_running(self, step: SchedulerStep, budget: int, limit: int,
                          ahead: bool = False) -> int:
        # Requests with a step in flight wait for its result (unless they may go ahead);
        # the earliest admitted first.
        in_flight = self._in_flight
        if ahead:
            todo = [r for r in self.running if r not in in_flight or self.can_go_ahead(r)]
        else:
            todo = [r for r in self.running if r not in in_flight]
        del todo[limit:]
        # Tokens each computes: one for a decode and for a request going ahead (one
        # pending token), its prompt's rest for a prefill. One token of the budget is kept
        # for each decode later in the order, so a chunked prefill ahead of them (a resumed
        # request, or one whose earlier chunk was in flight when they were admitted) never
        # stalls their decoding.
        lefts = [1 if r in in_flight else len(r.prompt_ids) + len(r.output_ids) - r.num_computed
                 for r in todo]
        reserve = lefts.count(1)
        scheduled: set[Request] = set()
        chunks, running, block_size = step.chunks, RequestStatus.RUNNING, self.pool.block_size
        for req, left in zip(todo, lefts):
            if req.status is not running:
                continue  # preempted a moment ago
            if left == 1:
                reserve -= 1
            n = min(left, budget - reserve)
            if n <= 0:
                continue
            # (A decode preempted later in the loop keeps its reserved token unused: at
            # most one token per victim, in a step already short of blocks.)
            going = req in in_flight
            start = self._flying[req].end if going else req.num_computed
            # a block only when the chunk crosses into one the request does not hold yet
            if start + n > len(req.block_ids) * block_size and not self._allocate_or_preempt(
                    req, start + n - req.num_computed, step, scheduled):
                continue
            chunks.append(Chunk(req, start, n, True, True, self._flying[req]) if going else
                          Chunk(req, start, n, n == left))  # samples: reaches its end
            scheduled.add(req)
            budget -= n
        return budget

    def _allocate_or_preempt(self, req: Request, n: int, step: SchedulerStep,
                             scheduled: set[Request]) -> bool:
        while not self.pool.allocate(req, n):
            victim = next((r for r in reversed(self.running)
                           if r not in scheduled and r not in self._in_flight), None)
            if victim is None:
                return False  # everyone else is in flight: try again next step
            self._preempt(victim)
            step.preempted.append(victim)
            if victim is req:
                return False
        return True

    def requeue_all(self) -> int:
        """The KV cache was lost (a worker died): every running request goes back to the
        front of the waiting queue, in admission order, its outputs kept, so it is
        recomputed from its prompt and outputs (replay); the prefix cache is emptied.
        Steps in flight must have been aborted first. Returns how many were requeued."""
        if self._in_flight:
            raise RuntimeError("abort the steps in flight before requeueing")
        moved = list(self.running)
        for req in reversed(moved):
            self.running.remove(req)
            self.pool.free(req)
            req.num_computed = 0
            req.status = RequestStatus.WAITING
            self.waiting.appendleft(req)
        self.pool.forget_cache()
        return len(moved)

    def release_all(self) -> list[Request]:
        """Hand every unfinished request over (to another replica's scheduler): all must
        be waiting (``requeue_all`` first). This scheduler is left empty."""
        if self.running:
            raise RuntimeError("requeue the running requests before releasing them")
        out = list(self.waiting)
        self.waiting.clear()
        self._requests.clear()
        return out

    def adopt(self, reqs: list[Request]) -> None:
        """Take requests another replica's scheduler released: at the front of the queue,
        in their order (they were admitted before anything waiting here)."""
        for req in reqs:
            if req.id in self._requests:
                raise ValueError(f"request id {req.id!r} is already queued or running")
            self._check_fits(req)
        for req in reversed(reqs):
            self._requests[req.id] = req
            self.waiting.appendleft(req)

    # ---- KV migration (engine.replicas): a running request with its computed tokens -----
    def hand_over(self, req: Request) -> tuple[list[int], int]:
        """Let a running request (no chunk in flight) go to another replica with its KV:
        -> (the blocks holding its computed tokens, in order; how many tokens). Its blocks
        are freed here (their contents stay until reused: read them before the next step
        of this scheduler); the request holds none and waits to be taken over."""
        if req.status is not RequestStatus.RUNNING or req in self._in_flight:
            raise RuntimeError(f"request {req.id!r} is not running or has a chunk in flight")
        n = req.num_computed
        blocks = req.block_ids[:self.pool.blocks_for(n)]
        self.running.remove(req)
        del self._requests[req.id]
        self.pool.free(req)
        req.num_computed, req.status = 0, RequestStatus.WAITING
        return blocks, n

    def take_over(self, req: Request, num_computed: int) -> list[int] | None:
        """Run a request handed over by another replica whose first ``num_computed``
        tokens' K/V will be written into the blocks returned (before the next step); None
        when no batch slot or not enough free blocks (nothing changed). It joins as the
        latest admitted; its full blocks enter the prefix cache at its next update."""
        if req.id in self._requests:
            raise ValueError(f"request id {req.id!r} is already queued or running")
        self._check_fits(req)
        if len(self.running) >= self.max_batch or not self.pool.allocate(req, num_computed):
            return None
        req.num_computed, req.status = num_computed, RequestStatus.RUNNING
        self._requests[req.id] = req
        self.running.append(req)
        return list(req.block_ids)

    def recompute(self, req: Request) -> None:
        """A running request whose KV never arrived (a failed migration): back to the
        front of the queue, to be recomputed from prompt + outputs."""
        self.running.remove(req)
        self.pool.free(req)
        req.num_computed, req.status = 0, RequestStatus.WAITING
        self.waiting.appendleft(req)

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.pool.free(req)
        req.num_computed = 0
        req.num_preemptions += 1
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)  # later victims are earlier admitted: order kept
        self.preemptions += 1

    def _admit_waiting(self, step: SchedulerStep, budget: int, limit: int) -> None:
        while (self.waiting and budget > 0 and len(self.running) < self.max_batch
               and len(step.chunks) < limit):
            req = self.waiting[0]
            prefix, num_cached = self.pool.match_prefix(req.all_ids)
            if req.params.prompt_logprobs is not None and req.first_token_s is None:
                prefix, num_cached = [], 0  # its prompt's logits are wanted: compute it all
            n = min(req.num_tokens - num_cached, budget)
            if not self.pool.allocate(req, n, prefix):
                return  # first come, first served: nobody overtakes the head
            self.waiting.popleft()
            req.num_computed = num_cached
            if req.first_scheduled_s is None:
                req.first_scheduled_s = self.clock()
                req.num_cached_prompt = min(num_cached, len(req.prompt_ids))
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            step.chunks.append(self._chunk(req, n))
            budget -= n

    @staticmethod
    def _chunk(req: Request, n: int) -> Chunk:
        start = req.num_computed
        return Chunk(req, start, n, sample=start + n == req.num_tokens)

    # ---- results of a step -------------------------------------------------------------
    def abort(self, step: SchedulerStep) -> None:
        """Forget a step that failed (or was held back) before its results came back: its
        chunks are no longer in flight and nothing advanced, so scheduling its requests
        again computes the same tokens. (What scheduling did stays done: blocks allocated,
        requests admitted, preemptions; the next schedule takes them as they are.)"""
        for c in step.chunks:
            self._land(c)

    def _land(self, c: Chunk) -> None:
        """A chunk's step is over (done or aborted): it is no longer in flight."""
        left = self._in_flight.get(c.request, 0) - 1
        if left > 0:
            self._in_flight[c.request] = left
            if c.prev is not None and self._flying.get(c.request) is c:
                self._flying[c.request] = c.prev  # the newest aborted: the one before
        else:
            self._in_flight.pop(c.request, None)
            self._flying.pop(c.request, None)

    def update(self, step: SchedulerStep, sampled: dict[str, int | None]) -> list[Request]:
        """Advance each chunk's request by its tokens, append the sampled token of each
        chunk with ``sample`` (``sampled[request.id]``), register newly full blocks in the
        prefix cache, and finish requests that reached max_new_tokens ("length"); returns
        those. Chunks of requests finished meanwhile (cancelled) are ignored."""
        finished: list[Request] = []
        self._length_finished.clear()
        in_flight, flying, running = self._in_flight, self._flying, RequestStatus.RUNNING
        for c in step.chunks:
            req = c.request
            left = in_flight.get(req, 0) - 1  # self._land(c), inline: once per sequence
            if left > 0:
                in_flight[req] = left
                flying[req].prev = None  # c is done: the chunk after it has none to return to
            else:
                in_flight.pop(req, None)
                flying.pop(req, None)
            if req.status is not running:
                continue
            if req.num_computed != c.start:
                raise RuntimeError(f"request {req.id!r}: chunk starts at {c.start} but "
                                   f"{req.num_computed} tokens are computed (steps updated "
                                   f"out of order?)")
            req.num_computed = c.end
            if c.sample:
                token = sampled.get(req.id)
                if token is None:
                    raise ValueError(f"request {req.id!r}: its chunk samples but no token "
                                     f"came back for it")
                req.output_ids.append(token)
                if req.first_token_s is None:
                    req.first_token_s = self.clock()
            self.pool.commit(req)
            if len(req.output_ids) >= req.params.max_new_tokens:  # remaining_new <= 0
                self._finish(req, "length")
                self._length_finished[req.id] = req
                finished.append(req)
        return finished
