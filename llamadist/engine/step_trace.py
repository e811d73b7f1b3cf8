"""A per-step trace of the engine: what each step computed and what it cost, to tell
where a serving run's time goes (issue 13).

    engine.trace = StepTrace()            # off (None) by default: no cost
    ... run ...
    engine.trace.write("steps.jsonl")     # one JSON object per step
    print(summarise(engine.trace.records))

Per step (``StepRecord``): its prefill tokens and sequences (chunks of a prompt, or of
prompt + outputs being recomputed), its decodes (one fed-back output token each), the KV
tokens its sequences attend over (each one's context up to its last token: what a decode
reads), whether it ran through a CUDA graph (None: the executor does not say), the host's
time before launch (scheduling and building the step), the launch call's time (on a GPU:
enqueueing its kernels; on a CPU: the whole step), how long collecting its tokens waited,
and its wall time: from the previous step's tokens on the host to its own, so the steps'
wall times add up to the run's. With steps scheduled ahead (the next launched before this
one's tokens are back) a step's wall time is its share of the overlapped run.

Tracing adds no device synchronisation: its times are taken around the engine's own
calls, and the only wait is the one ``collect`` always makes for the sampled tokens.

With a ``marker`` (``cuda_marker(device)``: a CUDA event recorded on the device's current
stream) each step also gets the device's own timeline: an event before and after its
launch, read only when the trace is written or summarised (the run is over then):
``device_s``, from the device reaching the step's first kernel to passing its last (with
steps scheduled ahead the host enqueues while the device still runs the previous step,
so this is the step's device time plus any gap in it where the device waited for the
host), and ``idle_before_s``, how long the device sat idle between the previous step's
last kernel and this one's first.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

KINDS = ("decode", "mixed", "prefill")


@dataclass(slots=True)
class StepRecord:
    step: int              # launch order in the run
    kind: str              # "decode" (decodes only), "mixed", "prefill" (no decode)
    prefill_tokens: int
    prefill_seqs: int
    decode_seqs: int
    sampled: int           # sequences that sample a token (decodes + prompts completed)
    kv_tokens: int         # sum over sequences of the positions attended by its last token
    resumed_seqs: int      # prefill chunks that continue a sequence (start > 0)
    longest_chunk: int     # the most tokens of one sequence (prompts' attention pads to it)
    graph: bool | None     # ran through a CUDA graph (None: unknown to the executor)
    t_schedule: float      # s since the trace began: scheduling of this step began
    host_s: float          # scheduling + building the step, before launch
    launch_s: float        # inside the executor's launch
    t_done: float | None = None  # its tokens were on the host (None: not yet)
    wait_s: float = 0.0    # collect's wait for them
    wall_s: float = 0.0    # t_done - the previous step's t_done (first: - 0)
    device_s: float | None = None       # with a marker: the device's time for the step
    idle_before_s: float | None = None  # with a marker: the device idle before it

    @property
    def tokens(self) -> int:
        return self.prefill_tokens + self.decode_seqs


def step_counts(chunks: Iterable) -> tuple[int, ...]:
    """(prefill tokens, prefill sequences, decodes, sampled, KV tokens, resumed prefill
    sequences, longest chunk) of a scheduled step's chunks (engine.scheduler.Chunk): a
    decode is one token past the prompt."""
    pre_t = pre_s = dec = sampled = kv = resumed = longest = 0
    for c in chunks:
        n, start = c.num_tokens, c.start
        if n == 1 and start >= len(c.request.prompt_ids):
            dec += 1
        else:
            pre_t += n
            pre_s += 1
            resumed += start > 0
            longest = max(longest, n)
        sampled += c.sample
        kv += start + n
    return pre_t, pre_s, dec, sampled, kv, resumed, max(longest, 1 if dec else 0)


class StepTrace:
    """The records of one run's steps; the engine calls ``launched`` and ``collected``.
    ``clock``: seconds (a simulation passes its own)."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter,
                 marker: Callable[[], Any] | None = None):
        self.clock = clock
        self.marker = marker  # records a device event now (None: host times only)
        self.t0 = clock()
        self.records: list[StepRecord] = []
        self._open: dict[int, StepRecord] = {}  # launched, not collected, by launch id
        self._last_done = 0.0
        self._marks: list[tuple[StepRecord, Any, Any]] = []  # events not read yet

    def mark(self) -> Any:
        """A device event recorded now, or None without a marker."""
        return self.marker() if self.marker is not None else None

    def launched(self, key: int, chunks: Iterable, t_schedule: float, t_built: float,
                 graph: bool | None, marks: tuple[Any, Any] | None = None) -> None:
        """Step ``key`` was launched now; scheduling began at ``t_schedule`` and its work
        was built at ``t_built`` (this clock); ``marks``: the device events (``mark``)
        recorded just before and just after its launch."""
        now = self.clock()
        pre_t, pre_s, dec, sampled, kv, resumed, longest = step_counts(chunks)
        kind = "mixed" if pre_s and dec else ("prefill" if pre_s else "decode")
        rec = StepRecord(len(self.records), kind, pre_t, pre_s, dec, sampled, kv, resumed,
                         longest, graph, t_schedule - self.t0, t_built - t_schedule,
                         now - t_built)
        self.records.append(rec)
        self._open[key] = rec
        if marks is not None and marks[0] is not None:
            self._marks.append((rec, *marks))

    def collected(self, key: int, t_wait: float) -> None:
        """Step ``key``'s tokens are on the host now; collecting began at ``t_wait``."""
        rec = self._open.pop(key, None)
        if rec is None:  # launched before the trace began
            return
        now = self.clock() - self.t0
        rec.t_done, rec.wait_s = now, now - (t_wait - self.t0)
        rec.wall_s, self._last_done = now - self._last_done, now

    def aborted(self) -> None:
        """Steps in flight failed: they will never be collected."""
        for rec in self._open.values():
            self.records.remove(rec)
        self._open.clear()

    def _read_marks(self) -> None:
        """Each marked step's device times, from events (waits for the last one: call it
        once the run is over)."""
        prev_end = None
        for rec, start, end in self._marks:
            end.synchronize()
            rec.device_s = start.elapsed_time(end) / 1e3
            if prev_end is not None:
                rec.idle_before_s = max(0.0, prev_end.elapsed_time(start) / 1e3)
            prev_end = end
        self._marks.clear()

    def write(self, path: str | Path) -> None:
        """The collected steps as JSON lines."""
        self._read_marks()
        with open(path, "w") as f:
            for rec in self.records:
                if rec.t_done is not None:
                    f.write(json.dumps(asdict(rec)) + "\n")

    def summary(self) -> dict:
        self._read_marks()
        return summarise([asdict(r) for r in self.records if r.t_done is not None])


def read(path: str | Path) -> list[dict]:
    """A trace file's records."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line]


def _label(r: dict) -> str:
    if r["kind"] != "decode":
        return r["kind"]
    return {True: "decode_graph", False: "decode_eager"}.get(r["graph"], "decode")


def summarise(records: list[dict]) -> dict:
    """Per kind of step (decode_graph, decode_eager, decode when the executor does not
    say, mixed, prefill) and in all: steps, wall seconds and their share, prefill tokens,
    decodes, sampled tokens, tokens/s (prefill tokens + decodes over wall), mean
    sequences, prefill tokens and KV tokens per step, mean host and launch ms per step,
    and the run's wall (the last step's tokens)."""
    out: dict = {}
    total_wall = sum(r["wall_s"] for r in records)
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(_label(r), []).append(r)
    groups["all"] = records
    for label, rs in groups.items():
        n = len(rs)
        wall = sum(r["wall_s"] for r in rs)
        pre = sum(r["prefill_tokens"] for r in rs)
        dec = sum(r["decode_seqs"] for r in rs)
        out[label] = {
            "steps": n, "wall_s": wall, "share": wall / total_wall if total_wall else 0.0,
            "prefill_tokens": pre, "decodes": dec,
            "sampled": sum(r["sampled"] for r in rs),
            "tokens_per_s": (pre + dec) / wall if wall else 0.0,
            "decodes_per_s": dec / wall if wall else 0.0,
            "ms_per_step": 1e3 * wall / n if n else 0.0,
            "mean_seqs": sum(r["prefill_seqs"] + r["decode_seqs"] for r in rs) / n if n else 0,
            "mean_prefill_tokens": pre / n if n else 0.0,
            "mean_kv_tokens": sum(r["kv_tokens"] for r in rs) / n if n else 0.0,
            "host_ms": 1e3 * sum(r["host_s"] for r in rs) / n if n else 0.0,
            "launch_ms": 1e3 * sum(r["launch_s"] for r in rs) / n if n else 0.0,
            "wait_ms": 1e3 * sum(r["wait_s"] for r in rs) / n if n else 0.0,
        }
        timed = [r for r in rs if r.get("device_s") is not None]
        if timed:  # the device's own timeline (a marker was given)
            out[label]["device_ms"] = 1e3 * sum(r["device_s"] for r in timed) / len(timed)
            out[label]["device_idle_ms"] = 1e3 * sum(r["idle_before_s"] or 0.0
                                                     for r in timed) / len(timed)
    out["all"]["run_s"] = max((r["t_done"] for r in records), default=0.0)
    return out


def cuda_marker(device) -> Callable[[], Any]:
    """A StepTrace ``marker`` for a CUDA device: an event recorded on its current stream."""
    import torch
    dev = torch.device(device)

    def mark():
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(torch.cuda.current_stream(dev))
        return ev
    return mark
