"""How fast a checkpoint folder already in the page cache can reach one GPU, path by path
(issue 13's cold start: the 8B folder's load took 2.5 s of a 10 s first token, 5.8 GB/s):

1. ``llamadist``: a stage's build (llamadist.runtime.stage.build_stage: model on meta,
   the loader, q/k/v and gate/up fusion, kernel passes), with the loader's own seconds;
2. ``get+to``: safetensors ``get_tensor`` then ``.to(device, non_blocking=True)``, tensor
   by tensor (the loader's primitive: a pageable host copy, staged by the driver);
3. ``pinned``: each tensor copied into one of two pinned host buffers, then to the device
   asynchronously (a side stream) while the next one is read;
4. ``pinned+Nthreads``: the same with N readers (``--threads``) filling N + 1 buffers.

Each path's GB/s against two figures measured in the same run: the device's pinned host
to device copy rate (a 1 GiB buffer) and one thread's ``read()`` of the files from the
page cache (not a ceiling: several threads over mmap can beat it). The pinned buffers are
allocated once, outside the timings (their pinning's seconds are reported apart), and
both pinned paths' device bytes are checked against the files, every tensor.

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


def timed(fn):
    """(seconds, result) of ``fn()``, the device synchronised before and after."""
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t, out


def h2d_rate(dev: torch.device) -> float:
    """Bytes/s of a 1 GiB pinned host buffer's copy to ``dev`` (the faster of two)."""
    host = torch.empty(1 << 30, dtype=torch.uint8, pin_memory=True)
    return host.nbytes / min(timed(lambda: host.to(dev))[0] for _ in range(2))


def tensors(folder: Path) -> list[tuple[Path, str, int]]:
    """(file, name, bytes) of every tensor of the folder's safetensors files."""
    out = []
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out += [(f, k, h.get_tensor(k).nbytes) for k in h.keys()]  # a view of the mmap
    return out


def opened(handles: dict, f: Path):
    if f not in handles:
        handles[f] = safe_open(str(f), "pt")
    return handles[f]


def get_to(items, dev: torch.device) -> list[torch.Tensor]:
    handles: dict = {}
    return [opened(handles, f).get_tensor(k).to(dev, non_blocking=True) for f, k, _ in items]


def pinned(items, dev: torch.device, buffers: list[torch.Tensor],
           threads: int) -> dict[str, torch.Tensor]:
    """``threads`` readers copy tensors into the pinned ``buffers`` (threads + 1 of them);
    the main thread copies each to the device on a side stream and hands the buffer back
    once its copy is done -> {name: the tensor's bytes on the device}. A reader's
    exception is raised here (never a hang)."""
    free: queue.Queue = queue.Queue()
    for b in buffers[:threads + 1]:
        free.put(b)
    todo: queue.Queue = queue.Queue()
    for it in items:
        todo.put(it)
    ready: queue.Queue = queue.Queue()

    def read() -> None:
        handles: dict = {}
        try:
            while True:
                try:
                    f, k, nbytes = todo.get_nowait()
                except queue.Empty:
                    return
                src = opened(handles, f).get_tensor(k)
                buf = free.get()
                buf[:nbytes].copy_(src.reshape(-1).view(torch.uint8))
                ready.put((k, buf, nbytes))
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            ready.put(e)
        finally:
            ready.put(None)

    workers = [threading.Thread(target=read, daemon=True) for _ in range(threads)]
    for w in workers:
        w.start()
    stream, done, out = torch.cuda.Stream(dev), 0, {}
    pending: list[tuple[torch.cuda.Event, torch.Tensor]] = []
    while done < threads:
        got = ready.get()
        if got is None:
            done += 1
            continue
        if isinstance(got, BaseException):
            raise got
        k, buf, nbytes = got
        with torch.cuda.stream(stream):
            out[k] = buf[:nbytes].to(dev, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(stream)
        pending.append((ev, buf))
        while pending and pending[0][0].query():  # copies done: their buffers are free
            free.put(pending.pop(0)[1])
        if free.empty() and pending:
            ev, b = pending.pop(0)
            ev.synchronize()
            free.put(b)
    stream.synchronize()
    return out


def check(items, out: dict[str, torch.Tensor]) -> None:
    """Every tensor's bytes on the device equal the file's."""
    handles: dict = {}
    assert len(out) == len(items), (len(out), len(items))
    for f, k, _ in items:
        want = opened(handles, f).get_tensor(k).reshape(-1).view(torch.uint8)
        assert torch.equal(out[k].cpu(), want), k


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folder")
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--threads", type=int, default=4)
    a = p.parse_args(argv)
    if a.threads < 1:
        p.error("--threads must be >= 1")
    folder, dev = Path(a.folder), torch.device(a.device)
    torch.cuda.init()
    res: dict = {"folder": str(folder), "threads": a.threads}

    def report() -> None:
        print(json.dumps(res), flush=True)

    res["h2d_pinned_GBps"] = round(h2d_rate(dev) / GB, 2)
    files = sorted(folder.glob("*.safetensors"))
    sum(len(f.read_bytes()) for f in files)  # into the page cache
    t = time.perf_counter()
    nread = sum(len(f.read_bytes()) for f in files)
    res["one_thread_read_GBps"] = round(nread / (time.perf_counter() - t) / GB, 2)
    items = tensors(folder)
    res["bytes"] = sum(n for *_, n in items)
    t = time.perf_counter()
    biggest = max(n for *_, n in items)
    buffers = [torch.empty(biggest, dtype=torch.uint8, pin_memory=True)
               for _ in range(a.threads + 1)]
    res["pin_s"] = round(time.perf_counter() - t, 3)
    report()
    for threads in sorted({1, a.threads}):
        check(items, pinned(items, dev, buffers, threads))
        torch.cuda.empty_cache()
    res["checked"] = True

    from llamadist.runtime.stage import build_stage
    from llamadist.weights.checkpoint import open_checkpoint

    def ours():
        ckpt = open_checkpoint(str(folder))
        stage = build_stage(ckpt, range(ckpt.config.num_layers), dev, torch.bfloat16, 1, 64)
        return stage.stats.load.seconds

    paths = {"llamadist": ours, "get+to": lambda: get_to(items, dev),
             "pinned": lambda: pinned(items, dev, buffers, 1),
             f"pinned+{a.threads}threads": lambda: pinned(items, dev, buffers, a.threads)}
    for _ in range(2):
        for name, fn in paths.items():
            s, out = timed(fn)
            if name == "llamadist":
                res.setdefault("llamadist_loader_s", []).append(round(out, 3))
            del out
            torch.cuda.empty_cache()
            res.setdefault(name, []).append(round(s, 3))
            print(f"{name:18s} {s:7.3f} s  {res['bytes'] / s / GB:6.2f} GB/s", flush=True)
        report()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
