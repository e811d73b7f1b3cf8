"""One scheduled step as every stage sees it: host data only, small and picklable, so the
front process can send it to worker ranks (``StepWork.pack``) and each stage builds its
own ``PagedBatch`` from it. The stage with the head samples with ``sample_step``, the one
sampling function of the paged engine, in-process or in a worker.

    work = StepWork([SeqWork("a", [5, 6, 7], [1], 0, SampleSpec(params, seed, 0))], 16)
    logits = model.forward_paged(work.tokens(device), work.batch())      # (S, V)
    tokens = sample_step(logits, work)                                    # (sampled,)
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field

import torch

from llamadist.generation.generate import make_sampler
from llamadist.generation.sampling import SamplingParams
from llamadist.runtime.paged_kv import PagedBatch


@dataclass(frozen=True)
class SampleSpec:
    """How to draw a sequence's next token: its request's params and seed, and which of
    its tokens this is (``step``: the count already sampled), so a draw depends on the
    request alone, never on the batch, the layout or the process."""
    params: SamplingParams
    seed: int
    step: int
    seen: tuple[int, ...] = ()  # prompt + outputs, only when a repetition penalty needs them


@dataclass(frozen=True)
class SeqWork:
    """Compute ``token_ids`` at positions [start, start + len) of request ``request_id``,
    whose KV blocks are ``block_ids``; sample after the last one when ``sample`` is set."""
    request_id: str
    token_ids: tuple[int, ...]
    block_ids: tuple[int, ...]
    start: int
    sample: SampleSpec | None


@dataclass
class StepWork:
    seqs: list[SeqWork]
    block_size: int
    reset_stats: bool = False  # the first step after a warm-up: stages zero their counters
    _batch: PagedBatch | None = field(default=None, repr=False, compare=False)

    def tokens(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """(N,) every sequence's tokens, sequence after sequence."""
        flat = [t for s in self.seqs for t in s.token_ids]
        return torch.tensor(flat, dtype=torch.long).to(device)

    def batch(self) -> PagedBatch:
        """The host PagedBatch of this step (built once)."""
        if self._batch is None:
            self._batch = PagedBatch.build([(s.block_ids, s.start, len(s.token_ids))
                                            for s in self.seqs], self.block_size)
        return self._batch

    @property
    def sampled_ids(self) -> list[str]:
        """The requests that get a token from this step, in the order ``sample_step``
        returns them."""
        return [s.request_id for s in self.seqs if s.sample is not None]

    def pack(self) -> torch.Tensor:
        """(bytes,) uint8: this step for another process (``unpack`` reverses it)."""
        data = pickle.dumps((self.seqs, self.block_size, self.reset_stats),
                            protocol=pickle.HIGHEST_PROTOCOL)
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)

    @classmethod
    def unpack(cls, packed: torch.Tensor) -> "StepWork":
        return cls(*pickle.loads(packed.numpy().tobytes()))


def sample_step(logits: torch.Tensor, work: StepWork) -> torch.Tensor:
    """logits (S, V) of each sequence's last token -> (sampled,) int64 token ids of the
    sequences that sample, in their order (on the logits' device)."""
    rows = [i for i, s in enumerate(work.seqs) if s.sample is not None]
    if not rows:
        return torch.empty(0, dtype=torch.long, device=logits.device)
    specs = [work.seqs[i].sample for i in rows]
    sampler = make_sampler([list(s.seen) for s in specs], [s.params for s in specs],
                           [s.seed for s in specs], logits.shape[-1], logits.device)
    if not sampler.all_greedy:  # an argmax draws nothing: its step does not matter
        sampler.steps = torch.tensor([s.step for s in specs]).to(logits.device,
                                                                   non_blocking=True)
    return sampler.sample(logits[rows])
