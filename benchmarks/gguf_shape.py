"""Write a random-weight GGUF of a named shape, its decoder layers' linears as GGUF blocks:
a quantized checkpoint of a model whose float copy does not fit the disk (Llama-3-70B:
141 GB in bf16 against the H200 machine's 64 GiB disk; about 40 GB as Q4_0), so that
`llamadist bench FILE` measures it through the path users run (issue 16: "Llama-3-70B
shape int4 on one H200 at batch 1 and 32"; a GPU stage converts Q4_0 / Q4_1 / Q8_0
blocks to its int4 / int8 weights at load, --weights native).

    PYTHONPATH=. python3 benchmarks/gguf_shape.py --shape llama3-70b --type Q4_0 \
        --tokenizer-from .whl/smollm2-tok --out /tmp/ck/llama3-70b-q4_0.gguf

The linears' blocks are random bytes with a sane scale in each block (weights of standard
deviation ~0.02, as an initialisation); the embedding and the head are float16, the norms
float32 ones. One tensor is in memory at a time: the file is written as it is made. The
tokenizer comes from an HF folder's tokenizer.json (its vocabulary may be smaller than the
shape's: the ids a benchmark uses are below both). Not written: Llama 3's RoPE frequency
scaling (`rope_freqs`), which changes no cost.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import time
from pathlib import Path

import gguf
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root

from llamadist.config import NAMED_SHAPES, named_shape  # noqa: E402
from tests.moe_gguf import config_fields, tokenizer_fields  # noqa: E402

STD = 0.02  # the weights' standard deviation
# type -> the standard deviation of its uniform random codes, in units of the block's scale
# (Q4: q - 8 over [-8, 8); Q8_0: int8 over [-128, 128))
BLOCKS = {"Q4_0": 4.61, "Q4_1": 4.61, "Q8_0": 73.9}
HALF = ("F16", "BF16")  # 16-bit linears (uniform values, as the embedding's)
LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def tensors(cfg, qtype: gguf.GGMLQuantizationType):
    """(name, numpy shape (rows, cols), GGML type) of every tensor, in file order."""
    h, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    d, f = cfg.hidden_size, cfg.intermediate_size
    shapes = {"attn_q": (h, d), "attn_k": (kv, d), "attn_v": (kv, d), "attn_output": (d, h),
              "ffn_gate": (f, d), "ffn_up": (f, d), "ffn_down": (d, f)}
    out = [("token_embd.weight", (cfg.vocab_size, d), gguf.GGMLQuantizationType.F16)]
    for i in range(cfg.num_layers):
        out += [(f"blk.{i}.attn_norm.weight", (d,), gguf.GGMLQuantizationType.F32)]
        out += [(f"blk.{i}.{n}.weight", shapes[n], qtype) for n in LINEARS]
        out += [(f"blk.{i}.ffn_norm.weight", (d,), gguf.GGMLQuantizationType.F32)]
    out += [("output_norm.weight", (d,), gguf.GGMLQuantizationType.F32),
            ("output.weight", (cfg.vocab_size, d), gguf.GGMLQuantizationType.F16)]
    return out


def byte_shape(shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> tuple[int, ...]:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return (*shape[:-1], shape[-1] // block * size)


def nbytes(shape, qtype) -> int:
    return int(np.prod(byte_shape(shape, qtype)))


def random_tensor(shape, qtype: gguf.GGMLQuantizationType,
                  rng: np.random.Generator) -> np.ndarray:
    """Random values of ``shape`` as ``qtype`` (a block type: random codes, each block's
    float16 scale (and minimum) set so the weights have standard deviation STD)."""
    if qtype == gguf.GGMLQuantizationType.F32:
        return np.ones(shape, np.float32)
    if qtype.name in HALF:  # uniform, from random bytes (fast)
        codes = np.frombuffer(rng.bytes(2 * int(np.prod(shape))), np.int16).reshape(shape)
        bf16 = qtype == gguf.GGMLQuantizationType.BF16
        out = np.empty(shape, np.uint16 if bf16 else np.float16)
        for i in range(0, shape[0], 4096):
            v = codes[i:i + 4096] * np.float32(STD * 3 ** 0.5 / 32768)
            out[i:i + 4096] = (v.view(np.uint32) >> 16) if bf16 else v  # bf16: the top half
        return out.view(np.uint8) if bf16 else out
    name = qtype.name
    raw = np.frombuffer(bytearray(rng.bytes(nbytes(shape, qtype))), np.uint8)
    _, size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = raw.reshape(-1, size)
    scale = STD / BLOCKS[name]
    blocks[:, 0:2] = np.frombuffer(np.float16(scale).tobytes(), np.uint8)
    if name == "Q4_1":  # value = d * q + m, q in [0, 16): centred by m = -8 d
        blocks[:, 2:4] = np.frombuffer(np.float16(-8 * scale).tobytes(), np.uint8)
    return raw.reshape(byte_shape(shape, qtype))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", required=True, choices=sorted(NAMED_SHAPES))
    p.add_argument("--type", default="Q4_0", choices=sorted(BLOCKS) + list(HALF))
    p.add_argument("--tokenizer-from", required=True, metavar="HF_FOLDER",
                   help="a folder with the tokenizer.json to store")
    p.add_argument("--layers", type=int, help="only this many decoder layers")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    cfg = named_shape(a.shape)
    if a.layers is not None:
        cfg = dataclasses.replace(cfg, num_layers=a.layers)
    qtype = gguf.GGMLQuantizationType[a.type]
    plan = tensors(cfg, qtype)
    for name, shape, t in plan:
        block = gguf.GGML_QUANT_SIZES[t][0]
        if shape[-1] % block:
            p.error(f"{name}: {shape[-1]} columns are not whole {a.type} blocks of {block}")
    total = sum(nbytes(s, t) for _, s, t in plan)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out.parent).free
    if total > free * 0.98:
        p.error(f"{out.parent} has {free / 1e9:.1f} GB free, the file needs {total / 1e9:.1f} GB")
    w = gguf.GGUFWriter(out, "llama")
    config_fields(w, cfg)
    tokenizer_fields(w, Path(a.tokenizer_from))
    w.add_add_bos_token(False)
    for name, shape, t in plan:
        dtype = {gguf.GGMLQuantizationType.F32: np.float32,
                 gguf.GGMLQuantizationType.F16: np.float16}.get(t, np.uint8)
        w.add_tensor_info(name, byte_shape(shape, t) if dtype is np.uint8 else shape,
                          np.dtype(dtype), nbytes(shape, t) if dtype is np.uint8
                          else int(np.prod(shape)) * np.dtype(dtype).itemsize,
                          raw_dtype=t if dtype is np.uint8 else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng, t0, done = np.random.default_rng(a.seed), time.perf_counter(), 0
    for name, shape, t in plan:
        data = random_tensor(shape, t, rng)
        w.write_tensor_data(data)
        done += data.nbytes
        if name.endswith("ffn_down.weight") or name.startswith(("token_embd", "output.")):
            print(f"[{time.perf_counter() - t0:6.1f} s] {name}: {done / 1e9:.2f} of "
                  f"{total / 1e9:.2f} GB", flush=True)
    w.close()
    print(f"{out}: {out.stat().st_size / 1e9:.2f} GB, {cfg.num_layers} layers of "
          f"{a.shape}, linears {a.type}, {time.perf_counter() - t0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
