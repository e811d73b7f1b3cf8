"""The Python API: ``LLM(model, devices=..., strategy=...)`` then ``generate`` / ``stream`` / ``chat``.

    from llamadist import LLM, SamplingParams
    llm = LLM("smollm2-135m", devices="cpu,cpu", strategy="uniform")
    print(llm.generate("The capital of France is", max_new_tokens=20)[0].text)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from llamadist.config import ModelConfig, default_dtype
from llamadist.generation.generate import GenerationResult, Generator, StreamEvent
from llamadist.generation.sampling import SamplingParams
from llamadist.generation.tokenizer import Tokenizer
from llamadist.runtime.engine import Engine
from llamadist.runtime.stage import parse_dtype
from llamadist.weights.checkpoint import Checkpoint, open_checkpoint


@dataclass
class Layout:
    """Resolved placement: one (layer range, device) per pipeline stage."""
    layer_ranges: list[range]
    devices: list[str]
    plan: object | None = None  # the llamadist.planning Plan it came from, if any


def resolve_layout(config: ModelConfig, *, devices: str | list[str] | None = None,
                   strategy: str | None = None, max_memory: str | None = None,
                   device_speed: str | None = None, boundaries: str | None = None,
                   plan: str | None = None, dtype: str = "float32", max_batch: int = 1,
                   max_seq_len: int = 2048) -> Layout:
    """Turn the user's placement options into stages, through the planner."""
    from llamadist.planning.devices import parse_devices
    from llamadist.planning.plan import Plan
    from llamadist.planning.profile import profile
    from llamadist.planning.strategies import make_plan

    if plan is not None:
        p = Plan.load(plan)
        p.validate(config.num_layers)
        parse_devices(",".join(p.devices))  # a device this machine lacks: a clear error
    else:
        dev_str = devices if isinstance(devices, str) or devices is None else ",".join(devices)
        dev_str = dev_str or "cpu"
        specs = parse_devices(dev_str, max_memory=max_memory, speeds=device_speed)
        if strategy is None:
            strategy = "custom" if boundaries else "uniform"
        p = make_plan(profile(config, dtype=dtype, seq_len=max_seq_len), specs, strategy=strategy,
                      boundaries=boundaries, batch_size=max_batch, max_seq_len=max_seq_len)
    return Layout([range(s.start, s.end) for s in p.stages], [s.device for s in p.stages], p)


def build_engine(ckpt: Checkpoint, layout: Layout, dtype: torch.dtype, max_batch: int,
                 max_seq_len: int, progress: bool = False) -> Engine:
    return Engine.build(ckpt, layout.layer_ranges, layout.devices, dtype, max_batch,
                        max_seq_len, progress=progress)


class LLM:
    """A loaded model, split as asked, ready to generate."""

    def __init__(self, model: str | Checkpoint, *, tokenizer: Tokenizer | None = None,
                 devices: str | list[str] | None = None,
                 strategy: str | None = None, max_memory: str | None = None,
                 device_speed: str | None = None, boundaries: str | None = None,
                 plan: str | None = None, dtype: str | None = None, max_batch: int = 8,
                 max_seq_len: int | None = None, progress: bool = False):
        self.ckpt = open_checkpoint(model) if isinstance(model, (str, Path)) else model
        self.config = self.ckpt.config
        self.tokenizer = tokenizer or self.ckpt.tokenizer()
        dev_list = (devices.split(",") if isinstance(devices, str) else devices) or ["cpu"]
        self.dtype = dtype or default_dtype(dev_list)
        self.max_seq_len = min(max_seq_len or 4096, self.config.max_position_embeddings)
        self.layout = resolve_layout(self.config, devices=devices, strategy=strategy,
                                     max_memory=max_memory, device_speed=device_speed,
                                     boundaries=boundaries, plan=plan, dtype=self.dtype,
                                     max_batch=max_batch, max_seq_len=self.max_seq_len)
        self.engine = build_engine(self.ckpt, self.layout, parse_dtype(self.dtype), max_batch,
                                   self.max_seq_len, progress=progress)

    def _params(self, params: SamplingParams | None, overrides: dict) -> SamplingParams:
        if params is not None and overrides:
            raise TypeError("give either a SamplingParams or keyword overrides, not both")
        return params or SamplingParams(**overrides)

    def encode(self, prompt: str | list[dict[str, str]]) -> list[int]:
        if isinstance(prompt, list):
            return self.tokenizer.encode_chat(prompt)
        return self.tokenizer.encode(prompt)

    def stream_tokens(self, prompts: list[list[int]], params: SamplingParams | None = None,
                      **overrides) -> tuple[Generator, Iterator[list[StreamEvent]]]:
        """Start generating for tokenized prompts: the Generator (sequences, stats) and its
        iterator of per-step events."""
        gen = Generator(self.engine, self.tokenizer, self._params(params, overrides),
                        self.config.eos_token_ids)
        return gen, gen.stream(prompts)

    def generate(self, prompts: str | list[str], params: SamplingParams | None = None,
                 **overrides) -> list[GenerationResult]:
        prompts = [prompts] if isinstance(prompts, str) else prompts
        results: list[GenerationResult] = []
        for start in range(0, len(prompts), self.engine.max_batch):
            batch = [self.encode(p) for p in prompts[start:start + self.engine.max_batch]]
            gen, events = self.stream_tokens(batch, params, **overrides)
            for _ in events:
                pass
            results += [GenerationResult(s.prompt_token_ids, s.token_ids, s.text, s.finish_reason,
                                         gen.stats.to_dict()) for s in gen.sequences]
        return results

    def stream(self, prompt: str | list[dict[str, str]], params: SamplingParams | None = None,
               **overrides) -> Iterator[str]:
        """Yield text pieces of one prompt (or chat history) as they are generated."""
        _, events = self.stream_tokens([self.encode(prompt)], params, **overrides)
        for step in events:
            for e in step:
                if e.text:
                    yield e.text

    def chat(self, messages: list[dict[str, str]], params: SamplingParams | None = None,
             **overrides) -> str:
        return "".join(self.stream(messages, params, **overrides))
