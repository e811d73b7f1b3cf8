"""From a checked OpenAI request to engine requests and back: prompts and SamplingParams
per choice, the choices' outputs merged as they come, and the OpenAI response objects
(whole, or as server-sent-event chunks). No HTTP here (serve.app routes to it); the
engine is reached through serve.engine_client (it runs in another process)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from llamadist.generation.params import SamplingParams
from llamadist.generation.tokenizer import Tokenizer, TokenizerError
from llamadist.serve.engine_client import EngineClient, EngineStream, StepOutput, Stopping
from llamadist.serve.protocol import ApiError, ChatRequest, CompletionRequest, Sampling


@dataclass
class Choice:
    """One choice's engine request and what it produced so far."""
    index: int
    prompt_ids: list[int]
    stream: EngineStream | None = None
    text: str = ""
    outputs: list[StepOutput] = field(default_factory=list)
    finish_reason: str | None = None
    scored_only: bool = False  # max_tokens 0: the one token drawn is not reported

    @property
    def completion_tokens(self) -> int:
        if self.scored_only:
            return 0
        req = self.stream.request if self.stream else None
        return len(req.output_ids) if req is not None else len(self.outputs)


@dataclass
class Job:
    """One API request: its kind, id, choices and the logprobs it asks for."""
    kind: str                      # "chat" or "completion"
    body: Sampling
    choices: list[Choice]
    num_logprobs: int | None       # None: no logprobs; k: the chosen token's and the top k
    echo: bool = False
    params: list[SamplingParams] = field(default_factory=list)  # one per choice
    released: bool = False  # the server has let it go (its queue places given back)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def object_id(self) -> str:
        return ("chatcmpl-" if self.kind == "chat" else "cmpl-") + self.id

    def usage(self) -> dict:
        prompt = sum(len(p) for p in {tuple(c.prompt_ids) for c in self.choices})
        done = sum(c.completion_tokens for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": done,
                "total_tokens": prompt + done}


class Frontend:
    """Builds jobs for one model (its tokenizer and context) and runs them on the engine."""

    def __init__(self, engine: EngineClient, tokenizer: Tokenizer, model_name: str,
                 max_seq_len: int, vocab_size: int):
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.max_seq_len, self.vocab_size = max_seq_len, vocab_size

    # ---- requests -> engine requests ----------------------------------------------------
    def chat_job(self, body: ChatRequest) -> Job:
        if not self.tokenizer.chat_template:  # the tokenizer's own advice is the CLI's
            raise ApiError(400, "messages: this model has no chat template; send the text "
                                "as a prompt to /v1/completions instead", "messages")
        messages = [{"role": "system" if m.role == "developer" else m.role,
                     "content": m.text()} for m in body.messages]
        try:
            ids = self.tokenizer.encode_chat(messages)
        except TokenizerError as e:
            raise ApiError(400, f"messages: {e}", "messages") from None
        return self._job("chat", body, [ids], body.limit(), body.num_logprobs())

    def completion_job(self, body: CompletionRequest) -> Job:
        prompts = []
        for p in body.prompts():
            ids = self.tokenizer.encode(p) if isinstance(p, str) else p
            if not ids:
                raise ApiError(400, "prompt: empty (it needs at least one token)", "prompt")
            bad = [t for t in ids if t >= self.vocab_size]
            if bad:
                raise ApiError(400, f"prompt: token id {bad[0]} is out of range (the "
                                    f"vocabulary has {self.vocab_size})", "prompt")
            prompts.append(ids)
        if body.echo and body.stream:
            raise ApiError(400, "echo: not supported with stream", "echo")
        return self._job("completion", body, prompts, body.limit(), body.logprobs,
                         echo=body.echo)

    def _job(self, kind: str, body: Sampling, prompts: list[list[int]], limit: int | None,
             num_logprobs: int | None, echo: bool = False) -> Job:
        if body.model is not None and body.model != self.model_name:
            raise ApiError(404, f"model: {body.model!r} is not served here (this server "
                                f"serves {self.model_name!r})", "model", "not_found_error")
        choices = [Choice(i * body.n + j, ids, scored_only=limit == 0)
                   for i, ids in enumerate(prompts) for j in range(body.n)]
        job = Job(kind, body, choices, num_logprobs, echo)
        for c in choices:
            self._check_length(len(c.prompt_ids), limit)
        job.params = [self._params(body, len(c.prompt_ids), limit, c.index % body.n, echo,
                                   num_logprobs) for c in choices]
        return job

    def _check_length(self, p: int, limit: int | None) -> None:
        s = self.max_seq_len
        if p >= s:
            raise ApiError(400, f"prompt: {p} tokens, the context is {s} (the prompt must "
                                f"leave room for at least one new token)", "messages/prompt")
        if limit is not None and p + limit > s:
            raise ApiError(400, f"max_tokens: prompt {p} + max_tokens {limit} = {p + limit} "
                                f"tokens, more than the context of {s}; ask for at most "
                                f"{s - p}", "max_tokens")

    def _params(self, body: Sampling, p: int, limit: int | None, j: int, echo: bool,
                num_logprobs: int | None) -> SamplingParams:
        new = self.max_seq_len - p if limit is None else limit
        seed = None if body.seed is None else body.seed + j  # n choices: n seeds
        return SamplingParams(
            max_new_tokens=max(new, 1), temperature=body.temperature,
            top_k=max(body.top_k, 0), top_p=body.top_p, min_p=body.min_p,
            repetition_penalty=body.repetition_penalty,
            presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
            seed=seed, stop=body.stops(),
            ignore_eos=body.ignore_eos, logprobs=num_logprobs,
            prompt_logprobs=num_logprobs if echo and num_logprobs is not None else None)

    # ---- running --------------------------------------------------------------------------
    async def submit(self, job: Job) -> None:
        """Queue every choice (refused as a whole: nothing queued if one is refused)."""
        try:
            streams = await self.engine.submit(
                [(c.prompt_ids, p) for c, p in zip(job.choices, job.params)],
                stream_text=job.body.stream)  # a whole response: its text made at the end
        except ValueError as e:
            raise ApiError(400, str(e)) from None
        except RuntimeError as e:
            raise ApiError(503, str(e), kind="server_error") from None
        for c, stream in zip(job.choices, streams):
            c.stream = stream

    def cancel(self, job: Job) -> None:
        left = [c.stream for c in job.choices
                if c.stream is not None and c.finish_reason is None]
        if left:
            self.engine.cancel(left)

    async def steps(self, job: Job) -> AsyncIterator[tuple[Choice, list[StepOutput]]]:
        """``outputs`` a wake-up at a time: a choice's outputs that are here, together
        (a streamed response writes them at once: one write per stream per step)."""
        if len(job.choices) > 1:
            async for c, out in self.outputs(job):
                yield c, [out]
            return
        c = job.choices[0]
        try:
            while outs := await c.stream.take():
                c.outputs += outs
                c.text += outs[0].text if len(outs) == 1 else "".join(o.text for o in outs)
                if outs[-1].finished:
                    c.finish_reason = outs[-1].finish_reason
                yield c, outs
        except RuntimeError as e:  # the engine failed, or the server stops
            raise _ended(e) from None
        finally:
            self.cancel(job)

    async def outputs(self, job: Job) -> AsyncIterator[tuple[Choice, StepOutput]]:
        """Every choice's outputs as they come; the job's unfinished choices are cancelled
        if the reader stops early (a client that went away)."""
        if len(job.choices) == 1:  # most requests: the stream itself, no merging task
            async for c, outs in self.steps(job):
                for out in outs:
                    yield c, out
            return
        merged: asyncio.Queue = asyncio.Queue()

        async def pump(c: Choice) -> None:
            try:
                async for out in c.stream:
                    await merged.put((c, out))
            except BaseException as e:  # noqa: BLE001 - the engine failed: the reader learns
                await merged.put((c, e))
            await merged.put((c, None))

        tasks = [asyncio.ensure_future(pump(c)) for c in job.choices]
        try:
            left = len(tasks)
            while left:
                c, out = await merged.get()
                if out is None:
                    left -= 1
                    continue
                if isinstance(out, BaseException):
                    raise _ended(out)
                c.outputs.append(out)
                c.text += out.text
                if out.finished:
                    c.finish_reason = out.finish_reason
                yield c, out
        finally:
            self.cancel(job)
            for t in tasks:
                t.cancel()


def _ended(e: BaseException) -> ApiError:
    """The 503 of a request whose stream ended in an error: the engine's, or the server's
    stopping (engine_client.Stopping)."""
    return ApiError(503, str(e) if isinstance(e, Stopping) else f"the engine failed: {e}",
                    kind="server_error")


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"
