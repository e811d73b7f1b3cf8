"""What a request asks of the sampler (SamplingParams) and what the sampler reports per
token (TokenLogprob): plain data without torch, so that the HTTP process of ``llamadist
serve`` (serve.http_server) builds and reads them without loading torch. The sampling
itself is in generation.sampling."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 means off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    # OpenAI's: subtracted from a token's logit once it was generated (presence) and per
    # time it was generated (frequency); the prompt does not count
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None  # the request's seed; None: one from the OS, recorded per sequence
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    # the chosen token's log-probability and the top ``logprobs`` others' (None: none),
    # of the model's own distribution (log-softmax of the raw logits, before temperature,
    # penalty and filters)
    logprobs: int | None = None
    prompt_logprobs: int | None = None  # the same for every prompt token after the first

    def __post_init__(self) -> None:
        # one string is one stop string (not one per character, as iterating it would give)
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        object.__setattr__(self, "stop", stop)
        checks = [
            (all(isinstance(s, str) and s for s in stop),
             f"stop strings must be non-empty strings (an empty one would end every "
             f"request at its first token), got {stop!r}"),
            (self.max_new_tokens >= 0, f"max_new_tokens must be >= 0, got {self.max_new_tokens}"),
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (0 <= self.min_p < 1, f"min_p must be in [0, 1), got {self.min_p}"),
            (self.repetition_penalty > 0,
             f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (-2 <= self.presence_penalty <= 2,
             f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (-2 <= self.frequency_penalty <= 2,
             f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            (self.logprobs is None or self.logprobs >= 0,
             f"logprobs must be >= 0, got {self.logprobs}"),
            (self.prompt_logprobs is None or self.prompt_logprobs >= 0,
             f"prompt_logprobs must be >= 0, got {self.prompt_logprobs}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    @property
    def counts_outputs(self) -> bool:
        """The sampler needs the counts of the tokens generated so far."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def new_seed() -> int:
    """A fresh seed from the operating system (never from torch's global RNG)."""
    return secrets.randbits(63)


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model (log-softmax of the raw logits: before
    temperature, penalty and filters) and the ``k`` most likely tokens' (id, logprob)."""
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()
