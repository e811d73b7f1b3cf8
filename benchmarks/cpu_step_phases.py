"""Where a CPU decode step's time goes, phase by phase (issue 16): the whole-step C call
built with ``-DLLAMADIST_PHASE_TIMING`` (a build of its own in the kernel cache; the
normal build has no timers), and the Python around it.

    python benchmarks/cpu_step_phases.py MODEL.gguf [--gen 32] [--repeats 5] [--threads 2]

Greedy generations of ``--gen`` tokens after a 128-token prompt (as benchmarks/quant_cpu.py,
``--weights native``); prints the decode tokens/s, the C call's median time, the median
Python time of ``cpu_step.decode_step`` around it, and per thread the microseconds a step
spends in each phase kind (summed over the layers: q|k|v GEMV, attention with RoPE and the
cache write, o_proj, gate|up, down, the head; "wait": at phase boundaries for the other
threads' items; "step": the whole parallel region).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
import time

import torch

from llamadist.kernels import cpu_decode, cpu_step
from llamadist.weights.checkpoint import open_checkpoint, resolve_model_path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quant_cpu  # noqa: E402  (the same prompt, engine and generation)

# cpu_decode.c's PT_* kinds, in order
PHASES = ["wait", "qkv", "attn", "o", "gu", "down", "head", "step"]


def timed_calls(fn, out: list):
    def call(*args, **kwargs):
        t = time.perf_counter_ns()
        r = fn(*args, **kwargs)
        out.append(time.perf_counter_ns() - t)
        return r
    return call


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model")
    p.add_argument("--gen", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cpu_decode.FLAGS = cpu_decode.FLAGS + ["-DLLAMADIST_PHASE_TIMING"]  # before the build
    step_ns: list[int] = []
    cpu_step.decode_step = timed_calls(cpu_step.decode_step, step_ns)  # before the engine
    tok = open_checkpoint(str(resolve_model_path("smollm2-135m"))).tokenizer()
    ids = tok.encode(quant_cpu.TEXT * 20)[:128]
    eng, _ = quant_cpu.load(open_checkpoint(args.model), 128 + args.gen + 8, weights="native")
    quant_cpu.run_once(eng, ids, 4)  # warm-up: the timing build made and loaded
    lib = cpu_decode.library()
    c_ns: list[int] = []
    cpu_step._step_fn = timed_calls(cpu_step._bound(), c_ns)
    buf = (ctypes.c_double * (64 * len(PHASES)))()
    lib.llamadist_phase_times(buf, 1)
    step_ns.clear()
    rates = [quant_cpu.run_once(eng, ids, args.gen)[0] for _ in range(args.repeats)]
    lib.llamadist_phase_times(buf, 1)
    n = len(c_ns)
    py = [a - b for a, b in zip(step_ns, c_ns)]
    print(f"{os.path.basename(args.model)}, {args.threads} threads, load average "
          f"{os.getloadavg()[0]:.1f}: decode {statistics.median(rates):.1f} tokens/s median "
          f"({1e3 / statistics.median(rates):.2f} ms a token), C call "
          f"{statistics.median(c_ns) / 1e6:.3f} ms median, Python in decode_step "
          f"{statistics.median(py) / 1e3:.0f} us median ({n} steps)")
    print("| thread | " + " | ".join(PHASES) + " |")
    print("| --- " * (len(PHASES) + 1) + "|")
    for t in range(args.threads):
        row = [buf[t * len(PHASES) + i] / n / 1e3 for i in range(len(PHASES))]
        print(f"| {t} | " + " | ".join(f"{v:.0f}" for v in row) + " |")


if __name__ == "__main__":
    main()
