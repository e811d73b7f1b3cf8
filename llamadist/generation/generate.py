"""Generation: one iterator shared by the CLI, the chat loop and the benchmarks.

A batch of prompts of different lengths is left-padded into shared cache slots;
each sequence gets its own RoPE positions and a mask that hides the padding, so
its tokens are those it would get alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch

from llamadist.config import ModelConfig
from llamadist.generation.sampling import Sampler, SamplingParams, request_seeds
from llamadist.generation.tokenizer import IncrementalDecoder, Tokenizer, settled


class ContextLimitError(ValueError):
    """A request that cannot fit the context, refused before any compute."""


class StepModel(Protocol):
    """What the static generation loop drives: the in-process Engine (bench --shape and
    the reference runs of tests; requests go through llamadist.engine)."""
    config: ModelConfig
    max_seq_len: int
    max_batch: int
    device: torch.device

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, start: int,
                valid: torch.Tensor | None = None, logits: str = "last") -> torch.Tensor: ...


@dataclass
class Sequence:
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop" (EOS or stop string) or "length"
    params: SamplingParams | None = None  # this request's own (None: the Generator's)
    seed: int | None = None  # the concrete seed its tokens were sampled with
    _emitted: int = 0  # characters of text already streamed

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


@dataclass
class StreamEvent:
    index: int  # which prompt
    token_id: int
    text: str  # newly streamable text (may be "" while a stop string or UTF-8 char is pending)
    finished: bool


@dataclass
class GenerationStats:
    prefill_s: float = 0.0
    decode_s: float = 0.0
    prompt_tokens: int = 0
    decode_steps: int = 0
    batch_size: int = 0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_steps * self.batch_size / self.decode_s if self.decode_s else 0.0

    def to_dict(self) -> dict:
        return {"prefill_s": self.prefill_s, "decode_s": self.decode_s,
                "prompt_tokens": self.prompt_tokens, "decode_steps": self.decode_steps,
                "decode_tokens_per_s": self.decode_tokens_per_s}


def check_context(prompts: list[list[int]], max_new_tokens: int, max_seq_len: int,
                  max_batch: int | None = None) -> None:
    if not prompts:
        raise ValueError("no prompts given")
    if max_batch is not None and len(prompts) > max_batch:
        raise ValueError(f"{len(prompts)} prompts but the engine was built for a batch of "
                         f"{max_batch}; raise max_batch")
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty after tokenization")
    longest = max(len(p) for p in prompts)
    if longest > max_seq_len:
        raise ContextLimitError(f"prompt of {longest} tokens is longer than the context limit "
                                f"of {max_seq_len} tokens")
    if longest + max_new_tokens > max_seq_len:
        room = max_seq_len - longest
        fix = (f"lower --max-new-tokens to {room} or shorten the prompt" if room >= 1 else
               "shorten the prompt: it leaves no room for a new token")
        raise ContextLimitError(
            f"prompt of {longest} tokens + max_new_tokens {max_new_tokens} = "
            f"{longest + max_new_tokens} exceeds the context limit of {max_seq_len} tokens; "
            f"{fix}")


def pad_id(tokenizer: Tokenizer | None) -> int:
    """The id left padding uses (its value never matters: padded slots are masked)."""
    return tokenizer.pad_token_id if tokenizer and tokenizer.pad_token_id is not None else 0


def seen_mask(prompts: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """(B, V) bool: the tokens each prompt already holds, for the repetition penalty."""
    seen = torch.zeros(len(prompts), vocab, dtype=torch.bool, device=device)
    for i, ptoks in enumerate(prompts):
        seen[i, torch.tensor(ptoks, dtype=torch.long, device=device)] = True
    return seen


def make_sampler(prompts: list[list[int]], params: list[SamplingParams], seeds: list[int],
                 vocab: int, device: torch.device,
                 outputs: list[list[int]] | None = None) -> Sampler:
    """The sampler for a batch of requests (with the prompts' tokens marked seen when a
    request asks for a repetition penalty, and ``outputs``, the tokens generated so far,
    counted when one asks for a presence or frequency penalty)."""
    penalised = any(p.repetition_penalty != 1.0 for p in params)
    seen = seen_mask(prompts, vocab, device) if penalised else None
    counts = None
    if any(p.counts_outputs for p in params):
        counts = torch.zeros(len(params), vocab, dtype=torch.float32)  # (B, V)
        for i, out in enumerate(outputs or [[] for _ in params]):
            if out:
                counts[i].index_add_(0, torch.tensor(out), torch.ones(len(out)))
        counts = counts.to(device)
    return Sampler(params, seeds, device, seen, counts)


def fit_history(encode: Callable[[list[dict]], list[int]], system: list[dict],
                history: list[dict], max_new: int, max_seq_len: int) -> list[dict]:
    """Drop the oldest turns until the conversation plus the reply fits the cache."""
    while len(history) > 1 and len(encode(system + history)) + max_new > max_seq_len:
        history = history[2:] if len(history) > 2 else history[1:]
    return history


def left_pad(prompts: list[list[int]], pad_id: int, max_seq_len: int, device: torch.device
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """-> tokens (B, L), positions (B, L), valid (B, max_seq_len) or None when no padding."""
    longest = max(len(p) for p in prompts)
    pads = [longest - len(p) for p in prompts]
    tokens = torch.tensor([[pad_id] * n + p for n, p in zip(pads, prompts)], dtype=torch.long)
    pad_t = torch.tensor(pads).view(-1, 1)
    positions = (torch.arange(longest).view(1, -1) - pad_t).clamp(min=0)
    valid = None
    if any(pads):
        valid = torch.ones(len(prompts), max_seq_len, dtype=torch.bool)
        valid[:, :longest] = torch.arange(longest).view(1, -1) >= pad_t
        valid = valid.to(device)
    return tokens.to(device), positions.to(device), valid


class _HostCopy:
    """Token ids copied to pinned host memory behind a CUDA event: waiting on the event
    waits for this step's tokens only, where ``.tolist()`` would also wait for the next
    step already queued behind them on the stream (and so never overlap host and device)."""

    def __init__(self, n: int, device: torch.device):
        self.cuda = device.type == "cuda"
        self.buf = torch.empty(n, dtype=torch.long, pin_memory=True) if self.cuda else None
        self.event: torch.cuda.Event | None = None

    def start(self, tok: torch.Tensor) -> None:
        if self.cuda:
            self.buf.copy_(tok, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record(torch.cuda.current_stream(tok.device))

    def result(self, tok: torch.Tensor) -> list[int]:
        if not self.cuda:
            return tok.tolist()
        self.event.synchronize()
        return self.buf.tolist()


class Generator:
    """Streams tokens for a batch of tokenized prompts through a StepModel.

    ``params`` is every request's default; ``stream`` may give each prompt its own. A
    request's tokens depend only on its prompt, its params and its seed (see
    ``generation.sampling``), so splitting prompts into batches changes nothing."""

    def __init__(self, model: StepModel, tokenizer: Tokenizer | None, params: SamplingParams,
                 eos_token_ids: tuple[int, ...] = ()):
        self.model = model
        self.tokenizer = tokenizer
        self.params = params
        self.eos = set(eos_token_ids) | set(tokenizer.eos_token_ids if tokenizer else ())
        self.stats = GenerationStats()
        self.sequences: list[Sequence] = []

    def stream(self, prompts: list[list[int]], params: list[SamplingParams] | None = None
               ) -> Iterator[list[StreamEvent]]:
        """Yield, after each step, one event per sequence that produced a token.
        ``params``: one per prompt (default: the Generator's for all); an unseeded request
        gets a seed from the OS, kept in ``sequences[i].seed``."""
        per = list(params) if params is not None else [self.params] * len(prompts)
        if len(per) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(per)} sampling params")
        most = max((p.max_new_tokens for p in per), default=0)
        check_context(prompts, most, self.model.max_seq_len, self.model.max_batch)
        seeds = request_seeds(per)
        self.sequences = [Sequence(list(x), params=p, seed=s)
                          for x, p, s in zip(prompts, per, seeds)]
        self.stats = GenerationStats(prompt_tokens=sum(map(len, prompts)), batch_size=len(prompts))
        for seq in self.sequences:
            if seq.params.max_new_tokens == 0 and most > 0:
                seq.finish_reason = "length"
        if most == 0:
            return
        dev = self.model.device
        tokens, positions, valid = left_pad(prompts, pad_id(self.tokenizer),
                                            self.model.max_seq_len, dev)
        sampler = make_sampler(prompts, per, seeds, self.model.config.vocab_size, dev)

        t0 = time.perf_counter()
        logits = self.model.forward(tokens, positions, 0, valid)  # (B, 1, V)
        slot, pos = tokens.shape[1], positions[:, -1:] + 1
        next_tok = sampler(logits[:, -1])  # (B,)
        fetch = _HostCopy(len(prompts), next_tok.device)
        fetch.start(next_tok)
        last = t0
        for step in range(most):
            more = step < most - 1
            # Queue the next step before waiting for this one's tokens, so the device works
            # while the host checks stops and streams text (not right after the prefill,
            # whose time is reported alone). A step queued past a stop is simply dropped.
            ahead = more and step > 0
            if ahead:
                logits = self.model.forward(next_tok.view(-1, 1), pos, slot, valid)
            ids = fetch.result(next_tok)  # the one host sync per step: stop checks need it
            now = time.perf_counter()
            if step == 0:
                self.stats.prefill_s = now - t0
            else:
                self.stats.decode_s += now - last
                self.stats.decode_steps += 1
            last = now
            events = self._advance(ids, step)
            yield events
            if all(s.done for s in self.sequences) or not more:
                break
            if not ahead:
                logits = self.model.forward(next_tok.view(-1, 1), pos, slot, valid)
            slot, pos = slot + 1, pos + 1
            next_tok = sampler(logits[:, -1])
            fetch.start(next_tok)

    def _advance(self, ids: list[int], step: int) -> list[StreamEvent]:
        events = []
        for i, (seq, tok) in enumerate(zip(self.sequences, ids)):
            if seq.done:
                continue
            p = seq.params or self.params
            seq.token_ids.append(tok)
            if tok in self.eos and not p.ignore_eos:
                seq.token_ids.pop()  # EOS ends the sequence and is not part of its text
                seq.finish_reason = "stop"
            elif step == p.max_new_tokens - 1:
                seq.finish_reason = "length"
            events.append(StreamEvent(i, tok, self._new_text(seq), seq.done))
        return events

    def _new_text(self, seq: Sequence) -> str:
        if self.tokenizer is None:
            return ""
        seq.text, delta, stopped = text_delta(self.tokenizer, seq.token_ids,
                                              (seq.params or self.params).stop, seq._emitted,
                                              seq.done)
        if stopped:
            seq.finish_reason = "stop"
        seq._emitted += len(delta)
        return delta


def text_delta(tokenizer: Tokenizer, token_ids: list[int], stops: tuple[str, ...],
               emitted: int, done: bool, decoder: IncrementalDecoder | None = None
               ) -> tuple[str, str, bool]:
    """The text of ``token_ids`` cut at the first stop string, the part of it that may be
    streamed now beyond the ``emitted`` characters already sent, and whether a stop string
    ended it. An unfinished UTF-8 character and any tail that may begin a stop string are
    held back until the sequence is done. ``decoder``: the sequence's own incremental
    decoder (its text so far), instead of decoding every token again."""
    if decoder is not None and not done:
        text = decoder.update(token_ids)
        if not stops:  # a stream without stop strings: only a trailing U+FFFD held back
            safe = settled(text)
            return text, text[emitted:safe] if safe > emitted else "", False
        # the decoder's text only grows, and what was sent ends before any stop string's
        # start that was not in the text then (that start's tail was held back): a stop
        # can begin only at ``emitted`` or after it
        start = emitted
    else:  # the last call decodes in full: exactly the text of the whole list
        text, start = tokenizer.decode(token_ids), 0
    stopped = False
    for stop in stops:
        cut = text.find(stop, start)
        if cut >= 0:
            text, stopped = text[:cut], True
    safe = len(text)
    if not (done or stopped):
        safe = settled(text)
        for stop in stops:
            # _held_back's first look, inline: mostly no tail begins the stop string
            if stop and text.find(stop[0], max(0, safe - len(stop) + 1), safe) >= 0:
                safe = _held_back(text, safe, stop)
    return text, text[emitted:safe] if safe > emitted else "", stopped


def _held_back(text: str, safe: int, stop: str) -> int:
    """Where ``text[:safe]`` ends if its longest tail that begins ``stop`` (shorter than
    ``stop``) is held back: the earliest j in [safe - len(stop) + 1, safe) with
    ``text[j:safe]`` a prefix of ``stop``, found by ``str.find`` of its first character
    (C speed, usually no hit) instead of comparing every tail length."""
    if not stop:
        return safe
    j = text.find(stop[0], max(0, safe - len(stop) + 1), safe)
    while j >= 0:
        if stop.startswith(text[j:safe]):
            return j
        j = text.find(stop[0], j + 1, safe)
    return safe


@dataclass
class GenerationResult:
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None
    stats: dict
    seed: int | None = None  # the seed it was sampled with (repeat a run by passing it)

    def to_dict(self) -> dict:
        return {"prompt_token_ids": self.prompt_token_ids, "token_ids": self.token_ids,
                "text": self.text, "finish_reason": self.finish_reason, "seed": self.seed,
                "stats": self.stats}

    @classmethod
    def of(cls, seq: Sequence, stats: dict) -> "GenerationResult":
        return cls(seq.prompt_token_ids, seq.token_ids, seq.text, seq.finish_reason, stats,
                   seq.seed)


def generate(model: StepModel, tokenizer: Tokenizer | None, prompts: list[list[int]],
             params: SamplingParams | list[SamplingParams]) -> list[GenerationResult]:
    """Run to completion and return one result per prompt (``params``: one for all, or
    one per prompt)."""
    shared = params if isinstance(params, SamplingParams) else params[0]
    gen = Generator(model, tokenizer, shared)
    for _ in gen.stream(prompts, None if isinstance(params, SamplingParams) else params):
        pass
    stats = gen.stats.to_dict()
    return [GenerationResult.of(s, stats) for s in gen.sequences]
