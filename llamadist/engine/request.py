"""A request's state as the scheduler sees it: its tokens, its KV blocks, its timestamps.

Token positions: ``all_ids`` is prompt + outputs. The first ``num_computed`` of them have
their K/V in the cache (in ``block_ids``, ``block_size`` tokens per block, in order). A
running request that is decoding has ``num_computed == num_tokens - 1``: its newest
sampled token is computed by the next step, which also samples the one after it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from llamadist.generation.sampling import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"    # queued, or preempted and waiting to recompute (holds no blocks)
    RUNNING = "running"    # admitted: holds blocks, prefilling in chunks or decoding
    FINISHED = "finished"  # done ("stop", "length" or "cancelled"); holds no blocks


FINISH_REASONS = ("stop", "length", "cancelled")


@dataclass(eq=False)  # identity equality: two requests are never "the same" by value
class Request:
    id: str
    prompt_ids: list[int]
    params: SamplingParams
    seed: int  # the sampler's seed for this request, drawn once by the engine
    output_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_computed: int = 0      # tokens of all_ids whose K/V are in the cache
    block_ids: list[int] = field(default_factory=list)
    num_cached_prompt: int = 0  # prompt tokens reused from the prefix cache at first admission
    finish_reason: str | None = None
    arrival_s: float | None = None  # the scheduler's clock (time.monotonic) at each event;
    # arrival_s is set by Scheduler.add unless given
    first_scheduled_s: float | None = None
    first_token_s: float | None = None
    finished_s: float | None = None
    num_preemptions: int = 0
    text: str = ""   # the engine's detokenized output so far (cut at a stop string)
    emitted: int = 0  # characters of ``text`` already streamed
    decoder: object | None = field(default=None, repr=False)  # its IncrementalDecoder
    # someone reads each step's text as it comes (a streaming client); False: the text is
    # made once, when the request finishes (or is cancelled), unless stop strings need it
    stream_text: bool = True
    # params.prompt_logprobs: one entry per prompt token (None for the first, which no
    # logits predict), filled as the prompt's chunks are computed
    prompt_logprobs: list | None = None

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise ValueError(f"request {self.id!r} has an empty prompt; it needs at least "
                             f"one token (e.g. BOS) to produce logits")
        self.prompt_ids = list(self.prompt_ids)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def tokens(self, start: int, end: int) -> list[int]:
        """``all_ids[start:end]`` without building ``all_ids`` (cheap on long sequences)."""
        p = len(self.prompt_ids)
        if end <= p:
            return self.prompt_ids[start:end]
        if start >= p:
            return self.output_ids[start - p:end - p]
        return self.prompt_ids[start:] + self.output_ids[:end - p]

    @property
    def remaining_new(self) -> int:
        return self.params.max_new_tokens - len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    # ---- statistics (seconds; None until the events happened) -----------------------
    @property
    def queue_s(self) -> float | None:
        """Arrival to first admission."""
        if self.first_scheduled_s is None or self.arrival_s is None:
            return None
        return self.first_scheduled_s - self.arrival_s

    @property
    def ttft_s(self) -> float | None:
        """Arrival to first output token."""
        if self.first_token_s is None or self.arrival_s is None:
            return None
        return self.first_token_s - self.arrival_s

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first."""
        if self.finished_s is None or self.first_token_s is None or len(self.output_ids) < 2:
            return None
        return (self.finished_s - self.first_token_s) / (len(self.output_ids) - 1)
