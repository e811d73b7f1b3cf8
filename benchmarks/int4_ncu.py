"""One call each of the int4 decode products on Llama-3-8B's linears, for Nsight Compute
(issue 16: at one row cuda_int4's kernel and tinygemm both read ~1.3 TB/s where bf16's
cuBLAS GEMV reads ~4): the region between cudaProfilerStart and Stop holds, per linear,
bf16 ``F.linear``, tinygemm, ``cuda_int4`` in the rule's form and in its PROBE forms (1:
no math, 2: no global loads) and, per ``--reads`` entry, a plain streaming read of the
same words (wquant_rows's ``read:MULTxBLOCKxWARPS``, the floor), so ``ncu
--profile-from-start off`` sees those kernels only.

    ncu --clock-control none --profile-from-start off --section SpeedOfLight \\
        --section MemoryWorkloadAnalysis --section Occupancy --section WarpStateStats \\
        python3 benchmarks/int4_ncu.py --m 1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wquant_rows import parse_form, rows_form, stream_read  # noqa: E402
from wquant_sweep import model_shapes  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama3-8b")
    p.add_argument("--linears", default="qkv,gate_up,down", type=lambda s: s.split(","))
    p.add_argument("--m", type=int, default=1)
    p.add_argument("--forms", default="", type=lambda s: [c for c in s.split(",") if c],
                   help="cuda_int4 forms besides the rule's, as wquant_rows.parse_form reads "
                   "them: WARPSxNBxSTAGES[x...][k|kr]")
    p.add_argument("--reads", default="", type=lambda s: [c for c in s.split(",") if c],
                   help="streaming reads of the words, MULTxBLOCKxWARPS (wquant_rows)")
    p.add_argument("--no-baselines", action="store_true", help="leave bf16 and tinygemm out")
    a = p.parse_args(argv)
    import torch
    import torch.nn.functional as F

    from llamadist.kernels import cuda_int4, wquant, wquant_torch
    dev = torch.device("cuda:0")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count  # (the reads' grids)
    torch.manual_seed(0)
    calls = []
    for name in a.linears:
        n, k = model_shapes(a.shape)[name]
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
        pw = wquant.quantize(w, "int4")
        tg = wquant_torch.tinygemm_pack(pw.q, k)
        tz = wquant_torch.tinygemm_scales_zeros(pw.scale, pw.offset, torch.bfloat16)
        g, tiles = pw.group, wquant_torch._inner_k_tiles(k)
        x = torch.randn(a.m, k, device=dev, dtype=torch.bfloat16)
        if not a.no_baselines:
            calls.append((f"{name} bf16", lambda x=x, w=w: F.linear(x, w)))
            calls.append((f"{name} tinygemm", lambda x=x, tg=tg, tz=tz, g=g:
                          torch.ops.aten._weight_int4pack_mm(x, tg, g, tz)))
        calls.append((f"{name} rows", lambda x=x, tg=tg, tz=tz, n=n, g=g, t=tiles:
                      cuda_int4.int4_rows(x, tg, tz, n, g, t)))
        for spec in a.forms:
            calls.append((f"{name} rows:{spec}", lambda x=x, tg=tg, tz=tz, n=n, g=g, t=tiles,
                          form=parse_form(spec): rows_form(cuda_int4, x, tg, tz, n, g, t, *form)))
        for spec in a.reads:
            mult, block, warps = (int(v) for v in spec.split("x"))
            calls.append((f"{name} read:{spec}", lambda tg=tg, c=(sms * mult, block, warps):
                          stream_read(tg, *c)))
    for _, fn in calls:  # compile and warm everything outside the profiled region
        fn()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for label, fn in calls:
        torch.cuda.nvtx.range_push(label)
        fn()
        torch.cuda.nvtx.range_pop()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    print("\n".join(f"{i}: {label}" for i, (label, _) in enumerate(calls)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
