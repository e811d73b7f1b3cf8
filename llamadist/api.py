"""The Python API: ``LLM(model, devices=..., strategy=...)`` then ``generate`` / ``stream`` / ``chat``.

    from llamadist import LLM, SamplingParams
    llm = LLM("smollm2-135m", devices="cpu,cpu", strategy="uniform")
    print(llm.generate("The capital of France is", max_new_tokens=20)[0].text)
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path


from llamadist.config import RuntimeConfig
from llamadist.generation.generate import GenerationResult, Generator, StreamEvent
from llamadist.generation.sampling import SamplingParams
from llamadist.generation.tokenizer import Tokenizer
from llamadist.planning.layout import Layout, resolve_layout
from llamadist.runtime.engine import Engine
from llamadist.runtime.stage import parse_dtype
from llamadist.weights.checkpoint import Checkpoint, open_checkpoint


def build_engine(ckpt: Checkpoint, layout: Layout, runtime: RuntimeConfig,
                 progress: bool = False) -> Engine:
    """The in-process engine for a resolved layout (runtime.max_seq_len resolved)."""
    return Engine.build(ckpt, list(layout.layer_ranges), list(layout.devices),
                        parse_dtype(runtime.dtype_for(list(layout.devices))), runtime.max_batch,
                        runtime.max_seq_len, progress=progress, runtime=runtime)


class LLM:
    """A loaded model, split as asked, ready to generate."""

    def __init__(self, model: str | Checkpoint, *, tokenizer: Tokenizer | None = None,
                 devices: str | list[str] | None = None,
                 strategy: str | None = None, max_memory: str | None = None,
                 device_speed: str | None = None, boundaries: str | None = None,
                 plan: str | None = None, dtype: str | None = None,
                 max_batch: int | None = None, max_seq_len: int | None = None,
                 runtime: RuntimeConfig | None = None, layout: Layout | None = None,
                 progress: bool = False):
        """How to run: ``runtime`` (a RuntimeConfig) or the keywords dtype / max_batch /
        max_seq_len, not both (RuntimeConfig holds the defaults). Where: ``layout`` (a
        one-process planning Layout) or the placement keywords, not both."""
        self.ckpt = open_checkpoint(model) if isinstance(model, (str, Path)) else model
        self.config = self.ckpt.config
        self.tokenizer = tokenizer or self.ckpt.tokenizer()
        how = {k: v for k, v in (("dtype", dtype), ("max_batch", max_batch),
                                 ("max_seq_len", max_seq_len)) if v is not None}
        if runtime is not None and how:
            raise TypeError(f"give runtime= or {', '.join(how)}=, not both")
        runtime = runtime or RuntimeConfig(**how)
        runtime = runtime.replace(
            max_seq_len=runtime.seq_len_for(self.config.max_position_embeddings))
        where = {k: v for k, v in (("devices", devices), ("strategy", strategy),
                                   ("max_memory", max_memory), ("device_speed", device_speed),
                                   ("boundaries", boundaries), ("plan", plan)) if v is not None}
        if layout is None:
            dev = devices if isinstance(devices, str) or devices is None else ",".join(devices)
            layout = resolve_layout(self.config, devices=dev, strategy=strategy,
                                    max_memory=max_memory, device_speed=device_speed,
                                    boundaries=boundaries, plan=plan,
                                    dtype=runtime.dtype_for(dev or "cpu"),
                                    max_batch=runtime.max_batch,
                                    max_seq_len=runtime.max_seq_len)
        elif where:
            raise TypeError(f"give layout= or {', '.join(where)}=, not both")
        elif layout.processes > 1 or layout.tp > 1 or layout.dp > 1:
            raise ValueError(f"LLM runs in this process; the layout asks for tp={layout.tp} "
                             f"dp={layout.dp} over {layout.processes} processes: run it with "
                             f"`llamadist generate --nproc ...` or torchrun")
        self.runtime, self.layout = runtime, layout
        self.dtype = runtime.dtype_for(list(layout.devices))
        self.max_seq_len = runtime.max_seq_len
        self.engine = build_engine(self.ckpt, layout, runtime, progress=progress)

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
            results += [GenerationResult.of(s, gen.stats.to_dict()) for s in gen.sequences]
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
