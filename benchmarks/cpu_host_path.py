"""Where a CPU decode token's time goes on the path `llamadist generate` runs (the LLM API:
LLMEngine -> scheduler -> LocalExecutor -> stages -> the whole-step C call -> sampler ->
detokenizer -> the caller's callback), batch 1, greedy: microseconds per token per part.

    PYTHONPATH=$PWD python benchmarks/cpu_host_path.py /tmp/llamacpp/smollm2-F16.gguf \
        --gen 128 --repeats 3 [--threads 2] [--profile]

Each part is timed by wrapping the function that does it (perf_counter, inclusive); a
part's own time is its inclusive time less the parts inside it. The wrappers cost about
a microsecond per call each (a dozen calls a token). ``--profile``: also a cProfile of
one run (the 25 functions with the most own time). Decode tokens only: the prefill
step and the first token are left out (every counter is reset after the first token).
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import pstats
import statistics
import time

import torch

from llamadist.api import LLM
from llamadist.engine import engine as engine_mod
from llamadist.engine import executor as executor_mod
from llamadist.generation.sampling import SamplingParams
from llamadist.kernels import cpu_step
from llamadist.runtime import step_work

TEXT = ("The history of distributed computing begins with time-sharing systems, in which many "
        "users shared one large machine, and continues through networks of workstations, ")

# (part, the part it runs inside or None)
PARTS = {"step": None, "schedule": "step", "work": "step", "launch": "step",
         "forward_paged": "launch", "stage": "forward_paged", "decode_step": "stage",
         "C call": "decode_step", "batch": "launch", "sample_step": "launch",
         "collect": "step", "update": "step", "output": "step"}


class Timers:
    def __init__(self, clock=time.perf_counter):
        self.clock = clock
        self.total = dict.fromkeys(PARTS, 0.0)
        self.calls = dict.fromkeys(PARTS, 0)

    def wrap(self, name: str, fn):
        total, calls, clock = self.total, self.calls, self.clock

        @functools.wraps(fn)
        def timed(*a, **k):
            t0 = clock()
            try:
                return fn(*a, **k)
            finally:
                total[name] += clock() - t0
                calls[name] += 1
        return timed

    def reset(self):
        for k in self.total:
            self.total[k], self.calls[k] = 0.0, 0

    def own(self) -> dict[str, float]:
        """Seconds of each part outside the parts inside it."""
        out = dict(self.total)
        for name, parent in PARTS.items():
            if parent is not None:
                out[parent] -= self.total[name]
        return out


def instrument(llm: LLM, t: Timers) -> None:
    """Wrap the functions of each part (instances and module globals, this process only)."""
    eng = llm.llm_engine
    ex = eng.replicas[0].executor
    sched = eng.replicas[0].scheduler
    model = llm.engine
    sched.schedule = t.wrap("schedule", sched.schedule)
    sched.update = t.wrap("update", sched.update)
    eng._work = t.wrap("work", eng._work)
    eng._output = t.wrap("output", eng._output)
    ex.launch = t.wrap("launch", ex.launch)
    ex.collect = t.wrap("collect", ex.collect)
    model.forward_paged = t.wrap("forward_paged", model.forward_paged)
    for s in model.stages:
        s.forward_paged = t.wrap("stage", s.forward_paged)
        if s.step_fn is not None:
            s.step_fn = t.wrap("decode_step", s.step_fn)
    cpu_step._bound()
    cpu_step._step_fn = t.wrap("C call", cpu_step._step_fn)
    executor_mod.sample_step = t.wrap("sample_step", step_work.sample_step)
    step_work.StepWork.batch = t.wrap("batch", step_work.StepWork.batch)
    engine_mod.LLMEngine.step = t.wrap("step", engine_mod.LLMEngine.step)


def run(llm: LLM, ids: list[int], gen: int, t: Timers | None) -> tuple[float, int, list[int]]:
    """Seconds of decode (after the first token; on ``t``'s clock) and tokens, as `llamadist generate` runs
    one prompt: llm.run with a streaming callback."""
    marks, clock = [], time.perf_counter if t is None else t.clock

    def on_output(_, out):
        if len(marks) == 0 and t is not None:
            t.reset()
        marks.append(clock())

    reqs, _ = llm.run([ids], SamplingParams(max_new_tokens=gen, ignore_eos=True), on_output)
    return marks[-1] - marks[0], len(marks) - 1, reqs[0].output_ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: each part's CPU time of the calling thread (time.thread_time: "
                         "not the time the thread was preempted; the C call's is thread 0's)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    llm = LLM(args.model, dtype="float32", max_batch=1, max_seq_len=args.prompt + args.gen + 8)
    ids = (llm.tokenizer.encode(TEXT * 20))[:args.prompt]
    t = Timers(time.thread_time if args.clock == "cpu" else time.perf_counter)
    instrument(llm, t)
    run(llm, ids, 8, None)  # warm
    rows, ref = [], None
    for _ in range(args.repeats):
        secs, n, toks = run(llm, ids, args.gen, t)
        assert ref is None or toks == ref, "greedy tokens differ between runs"
        ref = toks
        own = t.own()
        assert all(c in (0, n) for c in t.calls.values()), f"calls per part: {t.calls}, tokens {n}"
        rows.append({k: 1e6 * v / n for k, v in own.items()} | {"token": 1e6 * secs / n})
    parts = list(PARTS) + ["token"]
    med = {k: statistics.median(r[k] for r in rows) for k in parts}
    inside = sum(med[k] for k in PARTS)
    med["outside step()"] = med["token"] - inside
    print(f"{args.model}: {args.gen} tokens x {args.repeats}, {args.threads} threads; "
          f"decode {1e6 / med['token']:.1f} tokens/s; first tokens {ref[:8]}")
    print("| part | us per token (median) | runs |")
    print("|---|---:|---|")
    for k in parts[:-1] + ["outside step()", "token"]:
        each = ", ".join(f"{r[k]:.0f}" for r in rows) if k in rows[0] else ""
        print(f"| {k} | {med[k]:.1f} | {each} |")
    print(f"host (token less C call): {med['token'] - med['C call']:.1f} us")
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        run(llm, ids, args.gen, None)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
