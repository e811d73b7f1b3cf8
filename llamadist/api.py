"""The Python API: ``LLM(model, devices=..., strategy=...)`` then ``generate`` / ``stream`` / ``chat``.

    from llamadist import LLM, SamplingParams
    llm = LLM("smollm2-135m", devices="cpu,cpu", strategy="uniform")
    print(llm.generate("The capital of France is", max_new_tokens=20)[0].text)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path


from llamadist.config import QUANTIZE_HEAD_ALONE, ConfigError, RuntimeConfig, default_devices
from llamadist.engine.engine import LLMEngine, RequestOutput, run_stats
from llamadist.engine.request import Request
from llamadist.generation.generate import GenerationResult
from llamadist.generation.sampling import SamplingParams
from llamadist.generation.tokenizer import Tokenizer
from llamadist.planning.layout import (Layout, check_cpu_blocks, layout_quantize,
                                       resolve_layout)
from llamadist.runtime.engine import Engine
from llamadist.runtime.stage import parse_dtype
from llamadist.weights.checkpoint import Checkpoint, open_checkpoint
from llamadist.weights.loader import held_bytes


def build_engine(ckpt: Checkpoint, layout: Layout, runtime: RuntimeConfig,
                 progress: bool = False, static_cache: bool = True) -> Engine:
    """The stages of a resolved layout in this process (runtime.max_seq_len resolved, its
    --quantize the layout's formats: a --quantize-head without any is refused here, as
    the planner refuses it); ``static_cache`` False when only the paged engine will run
    them."""
    if runtime.quantize_head and not runtime.quantize:
        raise ConfigError(QUANTIZE_HEAD_ALONE)
    return Engine.build(ckpt, list(layout.layer_ranges), list(layout.devices),
                        parse_dtype(runtime.dtype_for(list(layout.devices))), runtime.max_batch,
                        runtime.max_seq_len, progress=progress, runtime=runtime,
                        static_cache=static_cache)


class LLM:
    """A loaded model, split as asked, ready to generate."""

    def __init__(self, model: str | Checkpoint, *, tokenizer: Tokenizer | None = None,
                 devices: str | list[str] | None = None,
                 strategy: str | None = None, max_memory: str | None = None,
                 device_speed: str | None = None, boundaries: str | None = None,
                 plan: str | None = None, dtype: str | None = None,
                 max_batch: int | None = None, max_seq_len: int | None = None,
                 weights: str | None = None,
                 runtime: RuntimeConfig | None = None, layout: Layout | None = None,
                 progress: bool = False, warmup: bool = True):
        """How to run: ``runtime`` (a RuntimeConfig) or the keywords dtype / max_batch /
        max_seq_len / weights, not both (RuntimeConfig holds the defaults). Where: ``layout`` (a
        one-process planning Layout) or the placement keywords, not both. ``warmup``: on
        GPUs, capture every batch bucket's decode graph now (compiling the layers takes
        10-20 s) rather than when a batch of that size first runs."""
        self.ckpt = open_checkpoint(model) if isinstance(model, (str, Path)) else model
        self.config = self.ckpt.config
        self.tokenizer = tokenizer or self.ckpt.tokenizer()
        how = {k: v for k, v in (("dtype", dtype), ("max_batch", max_batch),
                                 ("max_seq_len", max_seq_len), ("weights", weights))
               if v is not None}
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
            dtype = runtime.dtype_for(dev or default_devices())
            layout = resolve_layout(self.config, devices=dev, strategy=strategy,
                                    max_memory=max_memory, device_speed=device_speed,
                                    boundaries=boundaries, plan=plan, dtype=dtype,
                                    max_batch=runtime.max_batch,
                                    max_seq_len=runtime.max_seq_len,
                                    quantize=runtime.quantize,
                                    quantize_head=runtime.quantize_head,
                                    held=held_bytes(self.ckpt, runtime.weights, dtype))
            # a plan file's per-stage weight formats are what the stages load with
            runtime = runtime.replace(quantize=layout_quantize(layout, runtime.quantize))
            check_cpu_blocks(self.config, layout, runtime.quantize)
        elif where:
            raise TypeError(f"give layout= or {', '.join(where)}=, not both")
        elif layout.processes > 1 or layout.tp > 1 or layout.dp > 1:
            raise ValueError(f"LLM runs in this process; the layout asks for tp={layout.tp} "
                             f"dp={layout.dp} over {layout.processes} processes: run it with "
                             f"`llamadist generate --nproc ...` or torchrun")
        self.runtime, self.layout = runtime, layout
        self.dtype = runtime.dtype_for(list(layout.devices))
        self.max_seq_len = runtime.max_seq_len
        # The stages (runtime.engine.Engine) and the continuous-batching loop over them.
        self.engine = build_engine(self.ckpt, layout, runtime, progress=progress,
                                   static_cache=False)
        self.llm_engine = LLMEngine(self.engine, self.tokenizer, runtime)
        if warmup:
            self.llm_engine.warmup()
        self._stage_stats = self.engine.stage_stats
        # the end of a run: every timed piece of work read (one wait for the devices)
        self._final_stats = lambda: self.engine.stage_stats(settle=True)
        self.stats_live = True  # stage_stats may be read at any time (/metrics)
        stages = self.engine.stages
        self._expert_load = lambda: {k: v for s in stages for k, v in s.expert_load().items()}

    @classmethod
    def over(cls, llm_engine: LLMEngine, ckpt: Checkpoint, tokenizer: Tokenizer,
             runtime: RuntimeConfig, layout: Layout,
             stage_stats: Callable[[], list[dict]],
             expert_load: Callable[[], dict[int, list[int]]] = dict,
             final_stats: Callable[[], list[dict]] | None = None) -> "LLM":
        """The same API over an engine built elsewhere, whose executors drive worker
        ranks. ``final_stats`` closes the engine and returns every rank's final report;
        ``stage_stats`` either is that (rank 0 under torchrun: no statistics before the
        end) or, with ``final_stats`` given, reads the ranks' live statistics (the
        front: their heartbeats); ``expert_load`` the layers counted here (the front: every
        worker's; rank 0 under torchrun: its own stage's)."""
        self = cls.__new__(cls)
        self.ckpt, self.config, self.tokenizer = ckpt, ckpt.config, tokenizer
        self.runtime, self.layout, self.max_seq_len = runtime, layout, runtime.max_seq_len
        self.dtype = runtime.dtype_for(list(layout.devices))
        self.engine, self.llm_engine, self._stage_stats = None, llm_engine, stage_stats
        self._final_stats = final_stats or stage_stats
        self.stats_live = final_stats is not None
        self._expert_load = expert_load
        return self

    def expert_load(self) -> dict[int, list[int]]:
        """{global layer index: tokens routed to each expert} of a mixture-of-experts
        model ({} for a dense one), counted on the device since the load or the last
        stats reset, read now (a cheap host copy; safe between or during steps). In one
        process every MoE layer; with ``--nproc`` every layer of every stage, summed over
        the replicas, as of the workers' last heartbeats (about a second old); under
        torchrun the layers of rank 0's own stage, whose counts cover every replica
        sharing its experts (every rank reports its own in ``stage_stats`` at the end)."""
        return self._expert_load()

    def stage_stats(self) -> list[dict]:
        """Per stage (per rank over processes): layers, device, steps, compute seconds.
        In one process read now; with ``--nproc`` each worker's as of its last heartbeat
        (with ``busy``, the fraction of the last beat spent computing, memory and
        ``expert_load``) until the engine closes, then its final report; under torchrun
        (``stats_live`` False) the first call closes the engine and gathers every rank's
        final report."""
        return self._stage_stats()

    def final_stage_stats(self) -> list[dict]:
        """The end-of-run statistics (bench, ``generate --stats``): over processes the
        first call closes the engine and returns every rank's final report (bytes in,
        load seconds, exact compute seconds). Call it from the thread that runs the
        engine's steps: on CUDA it reads the stages' timing events, which another thread
        must not do while that one captures a CUDA graph."""
        return self._final_stats()

    def _params(self, params: SamplingParams | list[SamplingParams] | None,
                overrides: dict) -> SamplingParams | list[SamplingParams]:
        if params is not None and overrides:
            raise TypeError("give either a SamplingParams or keyword overrides, not both")
        return params if params is not None else SamplingParams(**overrides)

    def encode(self, prompt: str | list[dict[str, str]]) -> list[int]:
        """Token ids of a text, or of a chat history through the chat template."""
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
            return self.tokenizer.encode_chat(prompt)
        what = ("an empty list" if isinstance(prompt, list) and not prompt else
                "a list of token ids" if isinstance(prompt, list)
                and all(isinstance(t, int) for t in prompt) else type(prompt).__name__)
        raise TypeError(f"a prompt is a str or a chat history (a list of {{'role': ..., "
                        f"'content': ...}} dicts), got {what}; token ids go to "
                        f"llm.run([ids, ...]) or llm.stream_ids(ids)")

    def submit(self, prompts: list[list[int]],
               params: SamplingParams | list[SamplingParams] | None = None, **overrides
               ) -> tuple[list[Request], Iterator[list[tuple[int, RequestOutput]]]]:
        """Queue tokenized prompts (one SamplingParams for all, or one each): the requests,
        and the iterator that runs the engine and yields each step's (index, output)
        pairs. Requests are batched continuously, at most runtime.max_batch at once."""
        return self.llm_engine.submit(prompts, self._params(params, overrides))

    def run(self, prompts: list[list[int]],
            params: SamplingParams | list[SamplingParams] | None = None,
            on_output: Callable[[int, RequestOutput], None] | None = None, **overrides
            ) -> tuple[list[Request], dict]:
        """Run tokenized prompts to completion (``on_output(index, output)`` sees each
        output as it comes): the finished requests (text in ``request.text``) and the
        run's statistics (engine.run_stats)."""
        t0 = time.perf_counter()
        # without a callback nobody reads the text as it comes: each request's is made
        # once, at its end
        reqs, steps = self.llm_engine.submit(prompts, self._params(params, overrides),
                                             stream_text=on_output is not None)
        for step in steps:
            if on_output is not None:
                for i, out in step:
                    on_output(i, out)
        return reqs, run_stats(reqs, time.perf_counter() - t0)

    def generate(self, prompts: str | list[str], params: SamplingParams | None = None,
                 **overrides) -> list[GenerationResult]:
        prompts = [prompts] if isinstance(prompts, str) else prompts
        reqs, stats = self.run([self.encode(p) for p in prompts], params, **overrides)
        return [GenerationResult(r.prompt_ids, r.output_ids, r.text, r.finish_reason, stats,
                                 r.seed) for r in reqs]

    def stream(self, prompt: str | list[dict[str, str]], params: SamplingParams | None = None,
               **overrides) -> Iterator[str]:
        """Yield text pieces of one prompt (or chat history) as they are generated."""
        return self.stream_ids(self.encode(prompt), params, **overrides)

    def stream_ids(self, prompt_ids: list[int], params: SamplingParams | None = None,
                   **overrides) -> Iterator[str]:
        """stream() for a prompt already tokenized."""
        _, steps = self.submit([prompt_ids], params, **overrides)
        for step in steps:
            for _, out in step:
                if out.text:
                    yield out.text

    def chat(self, messages: str | list[dict[str, str]], params: SamplingParams | None = None,
             **overrides) -> str:
        """The reply to a chat history (a str: one user message), through the template."""
        if isinstance(messages, str):   # not a plain-text prompt: this is chat
            messages = [{"role": "user", "content": messages}]
        return "".join(self.stream(messages, params, **overrides))
