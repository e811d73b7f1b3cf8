"""The per-rank cost of a step's message (issue 13): pack on the front, bytes sent, unpack
and PagedBatch build on every rank, and the sampler rank's extra reading of the specs.

Two paths in the same run, interleaved, medians of repeats:
* old: the step pickled as its list of SeqWork/SampleSpec objects (``pickle`` of
  ``(seqs, block_size, reset_stats)``), unpickled into objects, PagedBatch built from
  them (the per-sequence code as it was before the columnar form, kept here);
* new: ``StepWork.pack`` / ``StepWork.unpack`` (llamadist.runtime.step_columns) and
  ``StepWork.batch`` (PagedBatch.from_arrays).

    python benchmarks/step_message.py [--repeats 15]
"""

from __future__ import annotations

import argparse
import itertools
import pickle
import random
import statistics
import time

import numpy as np
import torch

from llamadist.generation.sampling import SamplingParams
from llamadist.runtime.paged_kv import PagedBatch
from llamadist.runtime.step_work import SampleSpec, SeqWork, StepWork

BS = 16


def decode_step(n: int, blocks: int = 64) -> list[SeqWork]:
    """n decoding requests, each with its own (equal) params, as the engine makes them."""
    rng = random.Random(n)
    out = []
    for i in range(n):
        table = tuple(rng.sample(range(1, 100_000), blocks))
        spec = SampleSpec(SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=256),
                          rng.randrange(2**62), rng.randrange(200))
        out.append(SeqWork(f"cmpl-{i:08x}", (rng.randrange(128_000),), table,
                           blocks * BS - 1 - rng.randrange(BS), spec))
    return out


def mixed_step() -> list[SeqWork]:
    """60 decodes and 4 prefill chunks of 512 tokens (one scoring its prompt)."""
    rng = random.Random(7)
    seqs = decode_step(60)
    for i in range(4):
        start = 512 * i
        table = tuple(rng.sample(range(100_000, 200_000), (start + 512) // BS))
        score = tuple(rng.randrange(128_000) for _ in range(512)) if i == 0 else ()
        seqs.append(SeqWork(f"prefill-{i}", tuple(rng.randrange(128_000) for _ in range(512)),
                            table, start, SampleSpec(SamplingParams(), 0, 0), score,
                            2 if score else 0))
    return seqs


# ---- the old path (as it was) -----------------------------------------------------------
def old_pack(seqs, bs):
    data = pickle.dumps((seqs, bs, False), protocol=pickle.HIGHEST_PROTOCOL)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def old_unpack(packed):
    return pickle.loads(packed.numpy().tobytes())


def old_batch(seqs, bs):
    chunks = [(s.block_ids, s.start, len(s.token_ids)) for s in seqs]
    s = len(chunks)
    starts = np.fromiter((c[1] for c in chunks), np.int64, s)
    qlens = np.fromiter((c[2] for c in chunks), np.int64, s)
    need = -(-(starts + qlens) // bs)
    flat = np.fromiter(itertools.chain.from_iterable(
        c[0][:k] for c, k in zip(chunks, need.tolist())), np.int64, int(need.sum()))
    tables = np.zeros((s, int(need.max())), np.int64)
    tables[np.repeat(np.arange(s), need),
           np.arange(len(flat)) - np.repeat(np.cumsum(need) - need, need)] = flat
    qstart = np.zeros(s + 1, np.int64)
    np.cumsum(qlens, out=qstart[1:])
    seq = np.repeat(np.arange(s), qlens)
    pos = np.arange(qstart[-1]) + (starts - qstart[:-1])[seq]
    slots = tables[seq, pos // bs] * bs + pos % bs
    t = torch.from_numpy
    b = PagedBatch(bs, t(pos), t(slots), t(qstart), t(starts + qlens), t(tables),
                   t(qstart[1:] - 1), tuple(qlens.tolist()), tuple(starts.tolist()))
    first = qstart.tolist()
    extra = [first[i] + j for i, q in enumerate(seqs) for j in range(len(q.score))]
    if extra:
        b.logits_index = torch.cat([b.last_token_index, torch.tensor(extra)])
    tokens = torch.tensor([x for q in seqs for x in q.token_ids], dtype=torch.long)
    return b, tokens


def old_specs(seqs):
    return [s.sample for s in seqs if s.sample is not None]


# ---- measurement ------------------------------------------------------------------------
def ms(fn, inner: int) -> float:
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner * 1e3


def measure(seqs, repeats: int) -> dict[str, tuple[float, float]]:
    old_bytes, new_bytes = old_pack(seqs, BS), StepWork(seqs, BS).pack()
    old_b, _ = old_batch(old_unpack(old_bytes)[0], BS)
    new_b = StepWork.unpack(new_bytes).batch()
    for name in ("positions", "slot_mapping", "block_tables", "last_token_index"):
        assert torch.equal(getattr(old_b, name), getattr(new_b, name)), name
    inner = max(1, 2000 // len(seqs))
    cases = {  # name: (old, new)
        "pack (front)": (lambda: old_pack(seqs, BS), lambda: StepWork(seqs, BS).pack()),
        "unpack (every rank)": (lambda: old_unpack(old_bytes),
                                lambda: StepWork.unpack(new_bytes)),
        "PagedBatch + tokens (every rank)": (
            lambda: old_batch(old_unpack(old_bytes)[0], BS),
            lambda: (lambda w: (w.batch(), w.tokens()))(StepWork.unpack(new_bytes))),
        "unpack + specs (sampler rank)": (lambda: old_specs(old_unpack(old_bytes)[0]),
                                 lambda: StepWork.unpack(new_bytes).columns.tail()),
    }
    got: dict[str, tuple[list, list]] = {k: ([], []) for k in cases}
    for _ in range(repeats):  # interleaved: old, new, old, new...
        for k, (old, new) in cases.items():
            got[k][0].append(ms(old, inner))
            got[k][1].append(ms(new, inner))
    out = {k: (statistics.median(a), statistics.median(b)) for k, (a, b) in got.items()}
    # the batch rows above include the unpack: report the build alone too
    u_old, u_new = out["unpack (every rank)"]
    b_old, b_new = out["PagedBatch + tokens (every rank)"]
    out["PagedBatch + tokens (every rank)"] = (b_old - u_old, b_new - u_new)
    out["bytes sent"] = (old_bytes.numel(), new_bytes.numel())
    out["worker rank total: unpack + batch"] = (b_old, b_new)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(1)
    steps = [(f"decode {n} x 64 blocks", decode_step(n)) for n in (16, 64, 256)]
    steps.append(("mixed: 60 decodes + 4 x 512 prefill", mixed_step()))
    print("| step | measure | old | new | old/new |\n|---|---|---:|---:|---:|")
    for label, seqs in steps:
        for k, (old, new) in measure(seqs, args.repeats).items():
            unit = "" if k == "bytes sent" else " ms"
            fmt = "{:,}" if k == "bytes sent" else "{:.3f}"
            print(f"| {label} | {k} | {fmt.format(old)}{unit} | {fmt.format(new)}{unit} | "
                  f"{old / new:.1f}x |")


if __name__ == "__main__":
    main()
