#!/bin/bash
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.used --format=csv
python3 - <<'PY'
import sys, argparse, time; sys.path.insert(0, 'benchmarks')
t = time.time()
from serving import checkpoint
a = argparse.Namespace(checkpoint_dir='/tmp/ck', device='cuda', tokenizer_from='.whl/smollm2-tok', shape='llama3-8b', model=None)
print(checkpoint(a), f"written in {time.time() - t:.1f} s")
PY
CK=/tmp/ck/llama3-8b-bfloat16
cat $CK/*.safetensors > /dev/null   # page cache
ttft() {  # seconds from the command's start to its first output byte, then the rest
python3 - "$@" <<'PY'
import subprocess, sys, time
t0 = time.time()
p = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
first = p.stdout.read(1); t1 = time.time()
rest = p.stdout.read(); err = p.stderr.read(); p.wait(); t2 = time.time()
print(f"first output byte at {t1 - t0:.2f} s, exit at {t2 - t0:.2f} s, rc {p.returncode}")
print(err.decode()[-600:])
PY
}
echo "== cold start (compile cache empty), generate 200 tokens"
ttft python3 -m llamadist generate $CK --devices cuda:0 --prompt "The history of distributed computing" --max-new-tokens 200
echo "== warm start (compile cache on disk)"
ttft python3 -m llamadist generate $CK --devices cuda:0 --prompt "The history of distributed computing" --max-new-tokens 200
B="--batch 1 --prompt-len 128 --gen-len 256"
echo "== A in-process batch 1"; python3 -m llamadist bench $CK --devices cuda:0 $B 2>&1 | tail -3
echo "== B worker process (torchrun, 1 rank) batch 1"; torchrun --standalone --nproc-per-node 1 -m llamadist bench $CK --devices cuda $B 2>&1 | tail -3
echo "== C two stages in one process batch 1"; python3 -m llamadist bench $CK --devices cuda:0,cuda:0 --strategy uniform $B 2>&1 | tail -4
echo "== A64 in-process batch 64"; python3 -m llamadist bench $CK --devices cuda:0 --batch 64 --prompt-len 128 --gen-len 128 2>&1 | tail -3
echo "== B64 worker batch 64"; torchrun --standalone --nproc-per-node 1 -m llamadist bench $CK --devices cuda --batch 64 --prompt-len 128 --gen-len 128 2>&1 | tail -3
