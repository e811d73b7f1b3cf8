"""How fast a checkpoint folder already in the page cache can reach one GPU, path by path
(issue 13's cold start: the 8B folder's load took 2.5 s of a 10 s first token, 5.8 GB/s):

1. ``llamadist``: the stage build's load (llamadist.weights.loader through build_stage);
2. ``get+to``: safetensors ``get_tensor`` then ``.to(device, non_blocking=True)``, tensor
   by tensor (the loader's primitive: a pageable host copy, staged by the driver);
3. ``pinned``: each tensor read into one of two pinned host buffers, then copied to the
   device asynchronously while the next one is read;
4. ``pinned+threads``: the same with ``--threads`` readers filling pinned buffers.

Each path's GB/s against the limits measured in the same run: the device's pinned host
to device copy rate (a 1 GiB buffer) and reading the files' bytes from the page cache.

    PYTHONPATH=. python3 benchmarks/load_paths_gpu.py /tmp/ck/llama3-8b-bfloat16 [--threads 4]
"""

from __future__ import annotations

import argparse
import json
import queue
import threading
import time
from pathlib import Path

import torch
from safetensors import safe_open

GB = 1e9


def timed(fn) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t


def h2d_rate(dev: torch.device) -> float:
    """Bytes/s of a 1 GiB pinned host buffer's copy to ``dev`` (the faster of two)."""
    host = torch.empty(1 << 30, dtype=torch.uint8, pin_memory=True)
    return host.nbytes / min(timed(lambda: host.to(dev)) for _ in range(2))


def tensors(folder: Path) -> list[tuple[Path, str]]:
    out = []
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out += [(f, k) for k in h.keys()]
    return out


def get_to(folder: Path, dev: torch.device) -> int:
    n, handles = 0, {}
    for f, k in tensors(folder):
        h = handles.setdefault(f, safe_open(str(f), "pt"))
        t = h.get_tensor(k).to(dev, non_blocking=True)
        n += t.nbytes
    return n


def pinned(folder: Path, dev: torch.device, threads: int = 1, keep: bool = False):
    """Readers fill pinned buffers (one per reader plus one); the main thread copies each
    to the device on a side stream and hands the buffer back once its copy is done.
    -> bytes copied, or (``keep``) the device tensors in the order read (one reader)."""
    items = tensors(folder)
    biggest = 0
    with_sizes = []
    for f, k in items:
        with safe_open(str(f), "pt") as h:
            s = h.get_slice(k)
            nbytes = torch.empty(s.get_shape(), dtype=torch.bfloat16, device="meta").nbytes
        with_sizes.append((f, k, nbytes))
        biggest = max(biggest, nbytes)
    free: queue.Queue = queue.Queue()
    for _ in range(threads + 1):
        free.put(torch.empty(biggest, dtype=torch.uint8, pin_memory=True))
    todo: queue.Queue = queue.Queue()
    for it in with_sizes:
        todo.put(it)
    ready: queue.Queue = queue.Queue()

    def read() -> None:
        handles = {}
        while True:
            try:
                f, k, nbytes = todo.get_nowait()
            except queue.Empty:
                ready.put(None)
                return
            h = handles.setdefault(f, safe_open(str(f), "pt"))
            src = h.get_tensor(k)
            buf = free.get()
            buf[:nbytes].copy_(src.view(-1).view(torch.uint8))
            ready.put((buf, nbytes))

    workers = [threading.Thread(target=read, daemon=True) for _ in range(threads)]
    for w in workers:
        w.start()
    stream, done, total, out = torch.cuda.Stream(dev), 0, 0, []
    pending: list[tuple[torch.cuda.Event, torch.Tensor]] = []
    while done < threads:
        got = ready.get()
        if got is None:
            done += 1
            continue
        buf, nbytes = got
        with torch.cuda.stream(stream):
            out.append(buf[:nbytes].to(dev, non_blocking=True))
            ev = torch.cuda.Event()
            ev.record(stream)
        pending.append((ev, buf))
        while pending and pending[0][0].query():  # copies done: their buffers are free
            free.put(pending.pop(0)[1])
        if free.empty() and pending:
            ev, b = pending.pop(0)
            ev.synchronize()
            free.put(b)
        total += nbytes
    stream.synchronize()
    return out if keep else total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folder")
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--threads", type=int, default=4)
    a = p.parse_args(argv)
    folder, dev = Path(a.folder), torch.device(a.device)
    torch.cuda.init()
    res = {"folder": str(folder)}
    res["h2d_pinned_GBps"] = round(h2d_rate(dev) / GB, 2)
    files = sorted(folder.glob("*.safetensors"))
    t = time.perf_counter()
    sum(len(f.read_bytes()) for f in files)  # warms the page cache too
    t = time.perf_counter() - t
    t2 = time.perf_counter()
    nread = sum(len(f.read_bytes()) for f in files)
    res["page_cache_read_GBps"] = round(nread / (time.perf_counter() - t2) / GB, 2)
    res["first_read_s"] = round(t, 2)

    from llamadist.runtime.stage import build_stage
    from llamadist.weights.checkpoint import open_checkpoint
    ckpt = open_checkpoint(str(folder))

    def ours():
        build_stage(ckpt, range(ckpt.config.num_layers), dev, torch.bfloat16, 1, 64)

    # the pinned path's bytes equal the file's (its first and last tensors, on the device)
    first, last = tensors(folder)[0], tensors(folder)[-1]
    got = pinned(folder, dev, 1, keep=True)
    for (f, k), t in ((first, got[0]), (last, got[-1])):
        with safe_open(str(f), "pt") as h:
            want = h.get_tensor(k)
        assert torch.equal(t.view(want.dtype).view(want.shape).cpu(), want), k
    del got
    paths = {"llamadist": ours, "get+to": lambda: get_to(folder, dev),
             "pinned": lambda: pinned(folder, dev, 1),
             f"pinned+{a.threads}threads": lambda: pinned(folder, dev, a.threads)}
    for rep in range(2):
        for name, fn in paths.items():
            s = timed(fn)
            torch.cuda.empty_cache()
            res.setdefault(name, []).append(round(s, 3))
            print(f"{name:18s} {s:7.3f} s  {nread / s / GB:6.2f} GB/s", flush=True)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
