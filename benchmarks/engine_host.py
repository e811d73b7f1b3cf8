"""The engine's host cost per sequence per decode step (issue 13): the real ``LLMEngine``,
``Scheduler``, block pool and tokenizer, over an executor that does no model work (it
builds the step's columns, as every executor reads them, and returns a token per sampled
sequence at once), so what is timed is the Python the engine thread runs around a step.

Every request: a random 128-token prompt, ``--new`` tokens, EOS ignored, all submitted
at once with ``max_batch`` = the batch; the sampled tokens spell a fixed English text
(SmolLM2's tokenizer), so detokenization sees real words. Workloads:

* ``plain``:   nobody reads the text while it is generated (``LLM.run`` without a
               callback; the final text is read from the request at the end);
* ``stream``:  a consumer reads every output's text delta each step (a streaming client);
* ``stop``:    no streaming, but every request has stop strings (never matched here, so
               the workload is the same length): text is needed every step to look for them;
* ``stream+stop``: both.

Only plain decode steps are timed (every request has its first token, none finishes in
the step): microseconds of the engine thread's CPU time (``time.thread_time``: on a
shared machine wall time also counts the time other processes held the core; the wall
figure is printed beside it) per sequence per step, split into phases (the
engine's methods timed by wrapping them; ``outputs`` is the rest of ``step()``: sampling
results into requests, EOS/stop checks, detokenization, RequestOutputs). The consumer's
own reading is included in ``total`` for the streaming workloads.

    PYTHONPATH=. python benchmarks/engine_host.py [--batches 64,256] [--repeats 5]

The same file runs against another checkout (``PYTHONPATH=/tmp/before``: the code before
a change) to measure "before" the same way; it uses only the engine's public calls there.
``--versions /tmp/before,.`` runs both, each in its own process, alternating by round, and
prints them side by side (the machine's load moves between rounds, not between columns):

    git archive BASE llamadist | tar -x -C /tmp/before
    python benchmarks/engine_host.py --versions /tmp/before,. --rounds 3 --repeats 3

``serve`` and ``serve-whole``: the server path (``EngineHost`` over an ``AsyncEngine``,
a consumer process reading the step messages through the real ``EngineClient``): the
engine process's CPU time per sequence per decode step by phase (benchmarks/serve_host.py
says which); compare with ``plain`` / ``stream``, LLM.run's path.

``--decoder``: the streamed text alone, us per token (CPU): ``--batches`` streams of the
same text from random offsets, each given one token in turn per step, through a new
``IncrementalDecoder`` each (built before timing: any per-tokenizer table is made once
first). Workloads: ``update`` (the decoder's ``update`` alone), ``delta`` (``text_delta``
with that decoder, as the engine calls it for a streamed request) and ``delta+stop`` (with
the stop strings above).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

from llamadist.config import RuntimeConfig, named_shape
from llamadist.engine.engine import LLMEngine
from llamadist.generation.sampling import SamplingParams
from llamadist.generation.tokenizer import load_hf_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TEXT = ("The engine thread schedules every running request, builds the step, launches it "
        "and streams each request's new text to its client while the device computes. ")
STOPS = ("\n\n###", "<|stop|>")  # never in TEXT: every request runs to its length
WORKLOADS = ("plain", "stream", "stop", "stream+stop")
# the server path (benchmarks/serve_host.py): EngineHost + a consumer process
SERVE_WORKLOADS = ("serve", "serve-whole")
# --decoder: the detokenizer alone, batch streams each given a token in turn per step
DECODER_WORKLOADS = ("update", "delta", "delta+stop")


class NullExecutor:
    """The executor interface (engine.executor.Executor) without a model: ``launch``
    builds the step's columns (what every executor reads: tokens, block tables, specs),
    ``collect`` returns each sampled sequence's token: ``tokens[k % len(tokens)]`` for its
    k-th output, so every request spells the same text."""

    depth = 1
    blocking = True
    kv_path = None
    kv_dtype = "bfloat16"

    def __init__(self, tokens: list[int], ahead: bool = True, devices=("cuda:0",)):
        self.config = named_shape("llama3-8b")
        self.devices = list(devices)
        self.ahead = ahead
        self.tokens = tokens
        self._out: list[list[int]] = []

    def init_paged(self, num_blocks: int, block_size: int) -> None:
        pass

    def launch(self, work) -> None:
        cols = work.columns
        toks, n = self.tokens, len(self.tokens)
        steps = cols.tail().steps if cols.samples.any() else []
        self._out.append([toks[s % n] for s in steps])

    def collect(self) -> list[int]:
        return self._out.pop(0)

    def idle(self) -> None:
        pass

    def reset(self) -> None:
        self._out.clear()

    def close(self) -> None:
        pass


class Phases:
    """Seconds spent in wrapped methods during the timed steps."""

    def __init__(self):
        self.s: dict[str, float] = {}
        self.on = False

    def wrap(self, obj, name: str, label: str) -> None:
        fn = getattr(obj, name)

        def timed(*a, **k):
            if not self.on:
                return fn(*a, **k)
            t0 = time.thread_time()
            try:
                return fn(*a, **k)
            finally:
                self.s[label] = self.s.get(label, 0.0) + time.thread_time() - t0
        setattr(obj, name, timed)


def run_once(tok, text_ids: list[int], batch: int, new: int, workload: str,
             phases: bool, seed: int, ahead: bool = True) -> dict:
    runtime = RuntimeConfig(max_batch=batch, max_seq_len=128 + new + 16)
    ex = NullExecutor(text_ids, ahead=ahead)
    engine = LLMEngine(ex, tok, runtime)
    streaming = workload.startswith("stream")
    stops = STOPS if "stop" in workload else ()
    params = SamplingParams(max_new_tokens=new, ignore_eos=True, stop=stops)
    rng = random.Random(seed)
    lazy_ok = "stream_text" in inspect.signature(engine.add_request).parameters
    reqs = []
    for i in range(batch):
        prompt = [rng.randrange(1000, 40000) for _ in range(128)]
        extra = {"stream_text": streaming} if lazy_ok else {}
        reqs.append(engine.add_request(prompt, params, f"r{i}", **extra))
    ph = Phases()
    if phases:
        sched = engine.replicas[0].scheduler
        ph.wrap(sched, "schedule", "schedule")
        ph.wrap(sched, "update", "update")
        ph.wrap(engine, "_work", "work")
        ph.wrap(ex, "launch", "executor")
        ph.wrap(ex, "collect", "executor")
    texts = {r.id: [] for r in reqs}
    timed_s, wall_s, timed_steps = 0.0, 0.0, 0
    while engine.has_unfinished:
        plain = all(r.output_ids for r in reqs)
        ph.on, kept = plain, dict(ph.s)
        t0, w0 = time.thread_time(), time.perf_counter()
        outs = engine.step()
        if streaming:
            for out in outs:
                texts[out.request_id].append(out.text)
        dt, dw = time.thread_time() - t0, time.perf_counter() - w0
        ph.on = False
        if plain and len(outs) == batch and not any(o.finished for o in outs):
            timed_s += dt
            wall_s += dw
            timed_steps += 1
        else:
            ph.s = kept  # not a timed step: its phases do not count either
    for r in reqs:  # the same text whatever the workload, streamed or read at the end
        want = tok.decode(r.output_ids)
        assert r.text == want, (r.id, r.text[-40:], want[-40:])
        if streaming:
            assert "".join(texts[r.id]) == want
    per = 1e6 / (timed_steps * batch)
    out = {"us": timed_s * per, "wall_us": wall_s * per, "steps": timed_steps}
    if phases:
        out["phases"] = {k: v * per for k, v in ph.s.items()}
    return out


def measure(args, tok, text_ids) -> list[dict]:
    """Per (batch, workload): the runs' CPU and wall us/seq/step, and the phases of the
    runs timed by phase (separate runs: the wrappers cost a little)."""
    cells = []
    for b in [int(x) for x in args.batches.split(",")]:
        for w in args.workloads.split(","):
            if w in SERVE_WORKLOADS:
                from serve_host import run_serve
                runs = [run_serve(tok, text_ids, b, args.new, w, 7 + i, args.ahead)
                        for i in range(args.repeats)]
                cells.append({"batch": b, "workload": w, "us": [r["us"] for r in runs],
                              "wall": [r["wall_us"] for r in runs],
                              "phased": [{**r["phases"], "total": r["us"]} for r in runs]})
                continue
            runs = [run_once(tok, text_ids, b, args.new, w, False, 7 + i, args.ahead)
                    for i in range(args.repeats)]
            timed = [run_once(tok, text_ids, b, args.new, w, True, 7 + i, args.ahead)
                     for i in range(max(1, args.repeats // 2))]
            cells.append({"batch": b, "workload": w, "us": [r["us"] for r in runs],
                          "wall": [r["wall_us"] for r in runs],
                          "phased": [{**t["phases"], "total": t["us"]} for t in timed]})
    return cells


def measure_decoder(args, tok, text_ids: list[int]) -> list[dict]:
    """Cells of ``--decoder``: CPU us per token of the streamed text alone."""
    from llamadist.generation.generate import text_delta
    from llamadist.generation.tokenizer import IncrementalDecoder
    IncrementalDecoder(tok).update(text_ids[:1])  # any per-tokenizer table: built now
    n, cells = len(text_ids), []
    for b in [int(x) for x in args.batches.split(",")]:
        for w in args.workloads.split(","):
            stops = STOPS if w.endswith("stop") else ()
            us, wall = [], []
            for r in range(args.repeats):
                rng = random.Random(7 + r)
                offs = [rng.randrange(n) for _ in range(b)]
                streams: list[list[int]] = [[] for _ in range(b)]
                decs = [IncrementalDecoder(tok) for _ in range(b)]
                emitted = [0] * b
                t0, w0 = time.thread_time(), time.perf_counter()
                for step in range(args.new):
                    for i in range(b):
                        ids = streams[i]
                        ids.append(text_ids[(offs[i] + step) % n])
                        if w == "update":
                            decs[i].update(ids)
                        else:
                            delta = text_delta(tok, ids, stops, emitted[i], False, decs[i])[1]
                            emitted[i] += len(delta)
                us.append((time.thread_time() - t0) / (b * args.new) * 1e6)
                wall.append((time.perf_counter() - w0) / (b * args.new) * 1e6)
            cells.append({"batch": b, "workload": w, "us": us, "wall": wall,
                          "phased": [{"total": u} for u in us]})
    return cells


def phases_of(phased: list[dict]) -> dict[str, float]:
    if "deliver" in phased[0]:  # a serve workload: its phases add up to total themselves
        keys = ["step", "deliver", "send", "loop", "others", "consumer", "submit/req",
                "observe/req"]
        return {k: statistics.median(t[k] for t in phased) for k in keys if k in phased[0]}
    keys = ["schedule", "work", "executor", "update"]
    ph = {k: statistics.median(t.get(k, 0.0) for t in phased) for k in keys}
    ph["outputs"] = statistics.median(t["total"] for t in phased) - sum(ph.values())
    return ph


def compare(args) -> None:
    """Each checkout in ``--versions`` in its own process, alternating, ``--rounds``
    times: the same cells side by side, medians over every round's runs."""
    versions = args.versions.split(",")
    got: dict[tuple, list[dict]] = {}
    for _ in range(args.rounds):
        for v in versions:
            cmd = [sys.executable, __file__, "--json"] + [
                f"--{k.replace('_', '-')}={getattr(args, k)}" for k in
                ("batches", "new", "repeats", "workloads", "tokenizer_from")] + (
                [] if args.ahead else ["--no-ahead"]) + (["--decoder"] if args.decoder else [])
            env = {**os.environ, "PYTHONPATH": str(Path(v).resolve())}
            res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            for cell in json.loads(res.stdout.strip().splitlines()[-1]):
                got.setdefault((v, cell["batch"], cell["workload"]), []).append(cell)
    print(f"versions: {' -> '.join(versions)}; {args.rounds} rounds x {args.repeats} runs, "
          f"alternating; CPU us/seq/step, medians")
    print(f"{'batch':>5} {'workload':<12} " + " ".join(f"{'v' + str(i):>7}"
                                                        for i in range(len(versions)))
          + "   ratio  phases of the last (schedule work executor update outputs; serve: "
          "step deliver send loop others consumer)")
    for b in [int(x) for x in args.batches.split(",")]:
        for w in args.workloads.split(","):
            meds, phases = [], []
            for v in versions:
                cells = got[(v, b, w)]
                meds.append(statistics.median(u for c in cells for u in c["us"]))
                phases.append(phases_of([t for c in cells for t in c["phased"]]))
            last = phases[-1]
            share = (f"  ({meds[-1] / (args.step_ms * 1000 / b):.0%} of a {args.step_ms:g} ms "
                     f"step, was {meds[0] / (args.step_ms * 1000 / b):.0%})" if b == 256 else "")
            print(f"{b:5d} {w:<12} " + " ".join(f"{m:7.2f}" for m in meds)
                  + f"  {meds[0] / meds[-1]:5.2f}x  "
                  + " ".join(f"{v:.2f}" for v in last.values()) + share, flush=True)
            if w in SERVE_WORKLOADS:  # the server path's phases of every version
                for v, ph in zip(versions, phases):
                    print(f"{'':18} {v}: " + " ".join(f"{k} {x:.2f}" for k, x in ph.items()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", default="64,256")
    p.add_argument("--new", type=int, default=64, help="new tokens per request")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--tokenizer-from", default=str(ROOT / ".whl" / "smollm2-tok"))
    p.add_argument("--step-ms", type=float, default=8.0,
                   help="device time of a decode step at the largest batch (the H200's "
                        "~8 ms at 256), to state the host time as a share of it")
    p.add_argument("--versions", default=None,
                   help="checkouts to compare, comma-separated (each one's root is put on "
                        "PYTHONPATH of its own process), e.g. /tmp/before,.")
    p.add_argument("--rounds", type=int, default=3, help="with --versions")
    p.add_argument("--no-ahead", dest="ahead", action="store_false",
                   help="an executor that takes no decodes scheduled ahead (worker ranks, "
                        "the CPU); default: it does, as one GPU in-process does")
    p.add_argument("--decoder", action="store_true",
                   help="time the streamed text alone (us per token; workloads "
                        + ",".join(DECODER_WORKLOADS) + ")")
    p.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.decoder and args.workloads == ",".join(WORKLOADS):
        args.workloads = ",".join(DECODER_WORKLOADS)
    if args.versions:
        return compare(args)
    folder = Path(args.tokenizer_from)
    if not folder.is_dir():
        folder = Path("/work/main/.whl/smollm2-tok")
    args.tokenizer_from = str(folder)
    tok = load_hf_tokenizer(folder)
    text_ids = tok.encode(TEXT, add_special_tokens=False)
    cells = (measure_decoder if args.decoder else measure)(args, tok, text_ids)
    if args.json:
        print(json.dumps(cells))
        return
    import llamadist
    print(f"llamadist from {Path(llamadist.__file__).parent}; python {platform.python_version()}")
    print(f"{'batch':>5} {'workload':<12} {'us/seq/step':>11} {'min':>6} {'max':>6} "
          f"{'wall':>6}  phases (CPU us/seq/step, median; 'outputs' = rest of step)")
    for c in cells:
        b, us = c["batch"], c["us"]
        med = statistics.median(us)
        ph = phases_of(c["phased"])
        share = med / (args.step_ms * 1000 / b) if b == 256 else None
        print(f"{b:5d} {c['workload']:<12} {med:11.2f} {min(us):6.2f} {max(us):6.2f} "
              f"{statistics.median(c['wall']):6.2f}  "
              + " ".join(f"{k} {v:.2f}" for k, v in ph.items())
              + (f"  ({share:.0%} of a {args.step_ms:g} ms step)" if share else ""))


if __name__ == "__main__":
    main()
