"""Issue 13's cold start, host side, measured on the CPU (no GPU needed):

exit   ``llamadist generate`` on a tiny model in a process that woke Inductor's compile
       pool first (as compile_fx does for CUDA inputs; TORCHINDUCTOR_COMPILE_THREADS=8):
       seconds from the CLI's return to the process's exit, with the compile workers
       killed by the CLI (now) against left to Inductor's atexit wait (before), and the
       compile-worker processes alive after the exit.
import a CPU stage of a random ~0.8 GB model built while the compiler imports in a
       background thread (``start_compiler_import``) against the build, then the import.
       The CPU build is CPU-bound (no idle time to fill), unlike a GPU load.
gil    a GPU-like load: 4000 steps (the torch calls of an 8B load) that each wait 0.5 ms
       with the GIL released (a copy in flight), with the import serial, overlapped at
       Python's 5 ms switch interval, or overlapped at compiled_layer's SWITCH_S.

Runs alternate (before, after, before, ...) so both see the same load; give the load
(uptime) with the numbers. Example::

    PYTHONPATH=$PWD python benchmarks/cold_start_cpu.py --runs 3 --dir /tmp/coldcpu
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

EXIT_CHILD = """
import json, sys, time
import torch._inductor.async_compile as ac
ac.AsyncCompile.wakeup()
pid = ac.AsyncCompile.process_pool().process.pid
if sys.argv[2] == "before":  # the exit as it was: Inductor's atexit hook waits
    import llamadist.runtime.compile_workers as cw
    cw.stop_compile_workers = lambda: 0
from llamadist.cli.main import main
t0 = time.monotonic()
code = main(["generate", sys.argv[1], "--devices", "cpu", "--prompt", "Hello",
             "--max-new-tokens", "4"])
print(json.dumps({"returned": time.monotonic(), "cli_s": time.monotonic() - t0,
                  "sidecar": pid}), flush=True)
"""

IMPORT_CHILD = """
import json, sys, time, torch
from llamadist.config import RuntimeConfig
from llamadist.runtime import compiled_layer as cl
from llamadist.runtime.stage import build_stage
from llamadist.weights.checkpoint import open_checkpoint
ck = open_checkpoint(sys.argv[1])
t0 = time.perf_counter()
if sys.argv[2] == "overlap":
    cl.start_compiler_import(cuda=False)
st = build_stage(ck, range(ck.config.num_layers), "cpu", torch.float32, 1, 64,
                 runtime=RuntimeConfig())
built = time.perf_counter() - t0
if sys.argv[2] == "serial":
    cl.start_compiler_import(cuda=False)
cl.compiled_layer_call()
print(json.dumps({"build_s": built, "import_s": cl.import_s,
                  "total_s": time.perf_counter() - t0}))
"""


GIL_CHILD = """
import json, sys, time, torch
from llamadist.runtime import compiled_layer as cl
if sys.argv[1] == "overlap-5ms":
    cl.SWITCH_S = 0.005
t0 = time.perf_counter()
if sys.argv[1] != "serial":
    cl.start_compiler_import(cuda=False)
for _ in range(4000):
    time.sleep(0.0005)
load = time.perf_counter() - t0
if sys.argv[1] == "serial":
    cl.start_compiler_import(cuda=False)
cl.compiled_layer_call()
print(json.dumps({"load_s": load, "import_s": cl.import_s, "total_s": time.perf_counter() - t0}))
"""


def compile_processes(parent: int) -> int:
    n = 0
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{name}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        n += any(b"compile_worker" in a for a in argv) and f"--parent={parent}".encode() in argv
    return n


def exit_run(model: Path, mode: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), TORCHINDUCTOR_COMPILE_THREADS="8")
    t0 = time.monotonic()
    p = subprocess.Popen([sys.executable, "-c", EXIT_CHILD, str(model), mode], cwd=ROOT,
                         env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    row = None
    for line in p.stdout:
        if line.startswith("{"):
            row = json.loads(line)
    p.wait()
    end = time.monotonic()
    alive = compile_processes(p.pid)
    return {"mode": mode, "exit_after_return_s": round(end - row["returned"], 2),
            "wall_s": round(end - t0, 2), "cli_s": round(row["cli_s"], 2),
            "compile_processes_left": alive}


def write_model(folder: Path, hidden=1024, layers=8, inter=4096, vocab=32000) -> Path:
    """A random Llama checkpoint of ~0.8 GB (float32), config and weights only."""
    import torch
    from safetensors.torch import save_file
    if (folder / "model.safetensors").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    heads, kv = hidden // 64, hidden // 256
    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=hidden,
               intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
               num_key_value_heads=kv, vocab_size=vocab, max_position_embeddings=2048,
               rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
               torch_dtype="float32", bos_token_id=1, eos_token_id=2)
    (folder / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.02
    t = {"model.embed_tokens.weight": r(vocab, hidden), "lm_head.weight": r(vocab, hidden),
         "model.norm.weight": torch.ones(hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        t |= {p + "self_attn.q_proj.weight": r(hidden, hidden),
              p + "self_attn.k_proj.weight": r(kv * 64, hidden),
              p + "self_attn.v_proj.weight": r(kv * 64, hidden),
              p + "self_attn.o_proj.weight": r(hidden, hidden),
              p + "mlp.gate_proj.weight": r(inter, hidden),
              p + "mlp.up_proj.weight": r(inter, hidden),
              p + "mlp.down_proj.weight": r(hidden, inter),
              p + "input_layernorm.weight": torch.ones(hidden),
              p + "post_attention_layernorm.weight": torch.ones(hidden)}
    save_file(t, str(folder / "model.safetensors"))
    return folder


def import_run(model: Path | None, mode: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    argv = ["-c", GIL_CHILD, mode] if model is None else ["-c", IMPORT_CHILD, str(model), mode]
    r = subprocess.run([sys.executable, *argv], cwd=ROOT,
                       env=env, text=True, capture_output=True, timeout=600)
    if r.returncode:
        raise SystemExit(r.stderr[-2000:])
    return {"mode": mode} | {k: round(v, 2) for k, v in
                             json.loads(r.stdout.strip().splitlines()[-1]).items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/cold_start_cpu"))
    ap.add_argument("--parts", default="exit,import,gil")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    parts = args.parts.split(",")
    print(json.dumps({"load": os.getloadavg(), "cores": os.cpu_count()}), flush=True)
    if "exit" in parts:
        from tests.tiny import make_tiny_model
        tiny = args.dir / "tiny"
        if not (tiny / "config.json").exists():
            make_tiny_model(tiny)
        for _ in range(args.runs):
            for mode in ("before", "after"):
                print(json.dumps({"part": "exit"} | exit_run(tiny, mode)), flush=True)
    if "import" in parts:
        big = write_model(args.dir / "big")
        import_run(big, "serial")  # the page cache and the .pyc files warm
        for _ in range(args.runs):
            for mode in ("serial", "overlap"):
                print(json.dumps({"part": "import"} | import_run(big, mode)), flush=True)
    if "gil" in parts:
        for _ in range(args.runs):
            for mode in ("serial", "overlap-5ms", "overlap"):
                print(json.dumps({"part": "gil"} | import_run(None, mode)), flush=True)
    print(json.dumps({"load": os.getloadavg()}), flush=True)


if __name__ == "__main__":
    main()
