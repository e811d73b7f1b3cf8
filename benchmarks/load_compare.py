"""Loading a checkpoint unsplit vs as 2 stages: write random weights of a named shape as a
sharded safetensors checkpoint, then time building it as 1 stage and as 2 stages on one
device (each stage reads only its own tensors), ``--repeats`` times each.

    PYTHONPATH=. python3 benchmarks/load_compare.py --shape llama3-8b --repeats 2

Prints and (with --json-out) writes checkpoint bytes, write seconds, load seconds per
repeat, and the split / unsplit ratio of the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.getcwd())
from llamadist.cli.bench_shape import (check_device, random_model, sync_all,  # noqa: E402
                                       uniform_ranges)
from llamadist.config import ModelConfig, named_shape  # noqa: E402
from llamadist.model.llama import Llama  # noqa: E402
from llamadist.runtime.stage import parse_dtype  # noqa: E402

GiB = 1 << 30


def write_checkpoint(model: Llama, config: ModelConfig, folder: Path,
                     shard_bytes: int = 4 * GiB) -> int:
    """``model``'s (unfused) tensors as a Hugging Face folder; returns the bytes written."""
    from safetensors.torch import save_file
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config.to_hf_dict()))
    shard, size, n, total, weight_map = {}, 0, 0, 0, {}

    def flush():
        nonlocal shard, size, n
        name = f"model-{n:05d}.safetensors"
        save_file(shard, str(folder / name))
        weight_map.update({k: name for k in shard})
        shard, size, n = {}, 0, n + 1

    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        shard[name] = t.detach().cpu().contiguous()
        size += t.nbytes
        total += t.nbytes
        if size >= shard_bytes:
            flush()
    if shard:
        flush()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}  # as HF writes it
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return total


def time_load(folder: Path, k: int, device: str, dtype: torch.dtype) -> float:
    """Seconds to build the checkpoint as ``k`` uniform stages on ``device``."""
    from llamadist.runtime.stage import build_stage
    from llamadist.weights.checkpoint import open_checkpoint
    ckpt = open_checkpoint(folder)
    ranges = uniform_ranges(ckpt.config.num_layers, k)
    sync_all()
    t0 = time.perf_counter()
    stages = [build_stage(ckpt, r, device, dtype, 1, 256, has_embed=i == 0, has_head=i == k - 1)
              for i, r in enumerate(ranges)]
    sync_all()
    dt = time.perf_counter() - t0
    del stages
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return dt


def load_compare(full: Llama, config: ModelConfig, device: str, dtype: torch.dtype,
                 repeats: int, where: str | None) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="llamadist-ckpt-", dir=where))
    try:
        t0 = time.perf_counter()
        nbytes = write_checkpoint(full, config, folder)
        write_s = time.perf_counter() - t0
        times: dict[int, list[float]] = {1: [], 2: []}
        for _ in range(repeats):
            for k in (1, 2):
                times[k].append(time_load(folder, k, device, dtype))
        return dict(checkpoint_bytes=nbytes, write_s=write_s, unsplit_s=times[1],
                    split2_s=times[2],
                    ratio=statistics.median(times[2]) / statistics.median(times[1]))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--devices", help="one device (default cuda:0, or cpu without CUDA)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--checkpoint-dir", help="where the checkpoint is written (default: temp)")
    ap.add_argument("--json-out")
    args = ap.parse_args(argv)
    dev = check_device(args.devices or ("cuda:0" if torch.cuda.is_available() else "cpu"))
    dtype_name = args.dtype or ("bfloat16" if dev.type == "cuda" else "float32")
    config = named_shape(args.shape)
    full = random_model(config, dev, parse_dtype(dtype_name))
    res = dict(shape=args.shape, device=str(dev), dtype=dtype_name,
               load=load_compare(full, config, str(dev), parse_dtype(dtype_name), args.repeats,
                                 args.checkpoint_dir))
    print(f"load: {res['load']}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
