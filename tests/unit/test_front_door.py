"""The front door: a request that cannot run is refused before any process starts or any
weight loads, with one `llamadist: error:` line and a non-zero exit; planning works for
hardware that is not here."""

import json
import shutil

import pytest
import torch

from llamadist.cli import main


def run_cli(capsys, *argv):
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err.strip().splitlines()


def one_line_error(code, err, *needles):
    assert code == 2, err
    lines = [line for line in err if line.startswith("llamadist: error:")]
    assert len(lines) == 1, err
    assert not any("Traceback" in line or "[rank" in line for line in err), err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


# ---- planning for hardware that is not here -------------------------------------------
def test_plan_for_gpus_this_machine_lacks(capsys):
    flags = ["plan", "llama3-70b", "--devices", "cuda:0,cuda:1,cpu", "--max-memory",
             "80GiB,80GiB,64GiB", "--device-speed", "1,1,0.05"]
    code, out, err = run_cli(capsys, *flags, "--dtype", "bfloat16")
    assert code == 0, err
    assert "cuda:0" in out and "cuda:1" in out and "cpu" in out
    # float32 (the default with a CPU in the list) needs 280 GB: planned, shown, refused
    code, out, err = run_cli(capsys, *flags)
    assert "cuda:1" in out
    one_line_error(code, err, "does not fit", "short")


def test_plan_for_an_absent_gpu_wants_its_budget(capsys):
    if torch.cuda.device_count() > 3:
        pytest.skip("this machine has a cuda:3")
    code, _, err = run_cli(capsys, "plan", "llama3-8b", "--devices", "cuda:3")
    one_line_error(code, err, "cuda:3", "--max-memory")


def test_running_on_an_absent_device_is_refused(capsys, tiny_model):
    if torch.cuda.device_count() > 3:
        pytest.skip("this machine has a cuda:3")
    code, _, err = run_cli(capsys, "generate", str(tiny_model), "--prompt", "hi", "--devices",
                           "cuda:3", "--max-memory", "1GiB")
    one_line_error(code, err, "cuda:3", "not present")


# ---- memory ------------------------------------------------------------------------------
def test_run_over_the_memory_budget_names_device_and_shortfall(capsys, smollm2):
    code, _, err = run_cli(capsys, "generate", str(smollm2), "--prompt", "hi", "--devices",
                           "cpu,cpu", "--max-memory", "1MiB,1MiB")
    one_line_error(code, err, "stage 0 on cpu", "budget 1.00 MiB", "short")


def test_plan_over_budget_prints_the_table_and_exits_non_zero(capsys, tiny_model):
    code, out, err = run_cli(capsys, "plan", str(tiny_model), "--devices", "cpu,cpu",
                             "--max-memory", "10KiB,10KiB")
    assert "stage" in out and "cpu" in out  # the table, so the user sees what is over
    one_line_error(code, err, "does not fit", "10.00 KiB")


def test_max_seq_len_above_the_context(capsys, tiny_model):
    code, _, err = run_cli(capsys, "generate", str(tiny_model), "--prompt", "hi",
                           "--max-seq-len", "1000")
    one_line_error(code, err, "--max-seq-len 1000", "context of 256")


def test_kv_cache_that_cannot_fit_is_refused_with_numbers(capsys):
    code, _, err = run_cli(capsys, "plan", "llama3-8b", "--devices", "cpu", "--max-memory",
                           "24GiB", "--max-seq-len", "8192", "--batch-size", "64")
    line = one_line_error(code, err, "KV cache 128.00 GiB", "24.00 GiB")
    assert "cpu" in line


# ---- impossible layouts, refused before any process starts -------------------------------
@pytest.mark.parametrize("flags, needles", [
    (["--tp", "4"], ["tensor parallel 4", "9 query heads"]),
    (["--nproc", "4", "--tp", "2", "--pp", "2"], ["tensor parallel 2", "9 query heads"]),
    (["--nproc", "40", "--pp", "40"], ["40 pipeline stages", "30 layers"]),
    (["--nproc", "3", "--pp", "2"], ["--nproc 3", "pp=2"]),
])
def test_impossible_layout(capsys, smollm2, flags, needles):
    code, _, err = run_cli(capsys, "generate", str(smollm2), "--prompt", "hi", *flags)
    one_line_error(code, err, *needles)


def test_plan_refuses_an_impossible_layout_too(capsys):
    code, _, err = run_cli(capsys, "plan", "smollm2-135m", "--tp", "4")
    one_line_error(code, err, "tensor parallel 4", "9 query heads")


def test_mixed_device_kinds_over_processes(capsys, tiny_model):
    code, _, err = run_cli(capsys, "generate", str(tiny_model), "--prompt", "hi", "--nproc",
                           "2", "--devices", "cuda:0,cpu", "--max-memory", "1GiB,1GiB")
    one_line_error(code, err, "mixes device kinds")


def test_auto_says_why_it_runs_fewer_processes(capsys, tiny_model):
    code, out, err = run_cli(capsys, "generate", str(tiny_model), "--prompt", "hi", "--nproc",
                             "2", "--auto", "--max-new-tokens", "2", "--json")
    assert code == 0, err
    assert any("running 1 process(es), not --nproc 2" in line for line in err), err
    assert len(json.loads(out)["token_ids"]) == 2


# ---- no tracebacks -----------------------------------------------------------------------
def test_shape_bench_on_a_missing_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, _, err = run_cli(capsys, "bench", "--shape", "llama3-8b", "--devices", "cuda:0")
    one_line_error(code, err, "cuda:0", "--devices cpu")


@pytest.mark.parametrize("flag, value", [("--timeout", "0"), ("--max-seq-len", "0"),
                                         ("--max-new-tokens", "-1")])
def test_bad_numbers(capsys, tiny_model, flag, value):
    code, _, err = run_cli(capsys, "generate", str(tiny_model), "--prompt", "hi", flag, value)
    one_line_error(code, err, flag, value)


def test_convert_onto_an_existing_file(capsys, smollm2, tmp_path):
    target = tmp_path / "taken"
    target.write_text("mine")
    code, _, err = run_cli(capsys, "convert", str(smollm2), str(target))
    one_line_error(code, err, str(target), "not a folder")
    assert target.read_text() == "mine"


def test_convert_wants_a_gguf(capsys, tiny_model, tmp_path):
    code, _, err = run_cli(capsys, "convert", str(tiny_model), str(tmp_path / "out"))
    one_line_error(code, err, ".gguf", str(tiny_model))


@pytest.mark.parametrize("content, needles", [
    (b"\x00\xff\x10garbage", ["bad.json"]),
    (b'{"stages": 3}', ["bad.json", "stages"]),
    (b"[1, 2]", ["bad.json"]),
])
def test_bad_plan_file(capsys, tiny_model, tmp_path, content, needles):
    bad = tmp_path / "bad.json"
    bad.write_bytes(content)
    code, _, err = run_cli(capsys, "generate", str(tiny_model), "--prompt", "hi", "--plan",
                           str(bad))
    one_line_error(code, err, *needles)


def test_plan_file_missing(capsys, tiny_model, tmp_path):
    code, _, err = run_cli(capsys, "generate", str(tiny_model), "--prompt", "hi", "--plan",
                           str(tmp_path / "nope.json"))
    one_line_error(code, err, "nope.json")


def test_binary_prompts_file(capsys, tiny_model, tmp_path):
    f = tmp_path / "prompts.bin"
    f.write_bytes(bytes(range(256)) * 4)
    code, _, err = run_cli(capsys, "generate", str(tiny_model), "--prompts-file", str(f))
    one_line_error(code, err, "prompts.bin", "not UTF-8")


def test_missing_prompts_file(capsys, tiny_model, tmp_path):
    code, _, err = run_cli(capsys, "generate", str(tiny_model), "--prompts-file",
                           str(tmp_path / "absent.txt"))
    one_line_error(code, err, "absent.txt", "no such file")


def test_a_bug_keeps_its_traceback(capsys, monkeypatch):
    """Only user errors become one line; a programming error is not swallowed."""
    import llamadist.cli.plan as commands

    def broken(*a, **k):
        raise KeyError("a bug")
    monkeypatch.setattr(commands, "analyze_command", broken)
    with pytest.raises(KeyError, match="a bug"):
        main(["analyze", "smollm2-135m"])


def test_device_speed_help_says_what_one_means(capsys):
    with pytest.raises(SystemExit):
        main(["plan", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "1.0 = an H100" in text



# ---- one RuntimeConfig, built once from the flags and passed down ------------------------
def test_flags_become_one_runtime_config_that_reaches_the_engine(tiny_model):
    from llamadist.cli.jobs import generate_job
    from llamadist.cli.main import build_parser
    from llamadist.cli.run import load_llm
    from llamadist.weights.checkpoint import open_checkpoint
    args = build_parser().parse_args([
        "generate", str(tiny_model), "--prompt", "hi", "--prompt", "there", "--no-cuda-graphs",
        "--no-compile", "--no-cpu-kernels", "--decode-attention", "sdpa", "--timeout", "5",
        "--max-seq-len", "64", "--max-batch", "2", "--dtype", "float32",
        "--max-new-tokens", "8"])
    ckpt = open_checkpoint(args.model)
    job = generate_job(args, ckpt, ckpt.tokenizer())
    rt = job.runtime
    assert (rt.max_seq_len, rt.max_batch, rt.dtype, rt.timeout) == (64, 2, "float32", 5.0)
    assert not (rt.cuda_graphs or rt.compile or rt.cpu_kernels)
    assert rt.decode_attention == "sdpa"
    llm = load_llm(job, ckpt, ckpt.tokenizer())
    assert llm.engine.runtime == rt and llm.max_seq_len == 64
    assert all(s.layer_fn is None for s in llm.engine.stages)  # no C decode layer


def test_compile_is_where_it_pays_unless_a_flag_says(tiny_model):
    """RuntimeConfig.compile: --compile True, --no-compile False, neither None: compile
    only where it pays (quantized weights on torch's products, MoE), foreseen before the
    load so the compiler's import can start beside it."""
    import torch

    from llamadist.cli.args import runtime_config
    from llamadist.cli.main import build_parser
    from llamadist.config import RuntimeConfig, named_shape
    from llamadist.kernels import gpu as gpu_kernels
    from llamadist.runtime.kernel_passes import compile_expected, compile_pays
    from llamadist.weights.checkpoint import open_checkpoint
    given = {flags: runtime_config(build_parser().parse_args(
        ["generate", str(tiny_model), "--prompt", "hi", *flags]), 4).compile
        for flags in ((), ("--compile",), ("--no-compile",))}
    assert given == {(): None, ("--compile",): True, ("--no-compile",): False}
    dense, moe = named_shape("llama3-8b"), named_shape("mixtral-8x7b")
    gpu, cpu = torch.device("cuda:0"), torch.device("cpu")
    assert not compile_expected(dense, RuntimeConfig(), gpu)
    assert compile_expected(dense, RuntimeConfig(compile=True), gpu)
    assert compile_expected(moe, RuntimeConfig(), gpu)
    assert not compile_expected(moe, RuntimeConfig(compile=False), gpu)
    assert compile_expected(dense, RuntimeConfig(quantize="int4", wquant="torch"), gpu)
    # int8's decode rows take the Triton kernels where Triton is (an opaque op: no compile)
    assert compile_expected(dense, RuntimeConfig(quantize="int8", wquant="torch"),
                            gpu) is not gpu_kernels.INSTALLED
    assert not compile_expected(dense, RuntimeConfig(quantize="int8", wquant="triton"), gpu)
    assert not compile_expected(moe, RuntimeConfig(cuda_graphs=False), gpu)
    assert not compile_expected(moe, RuntimeConfig(compile=True), cpu)
    assert compile_expected(dense, RuntimeConfig(eager_kernels="torch"), gpu)
    from llamadist.model.llama import RMSNorm
    from llamadist.runtime.stage import build_stage
    ckpt = open_checkpoint(str(tiny_model))
    stage = build_stage(ckpt, range(0, ckpt.config.num_layers), "cpu", torch.float32, 1, 32)
    assert compile_pays(stage.model)  # PyTorch's eager ops (no fused kernels off CUDA)
    for m in stage.model.modules():  # as use_eager_fused sets them on a GPU
        if isinstance(m, RMSNorm):
            m.add_norm = lambda *a: None
    assert not compile_pays(stage.model)  # dense float layers with the fused kernels


def test_int4_compiles_only_past_the_rows_cuda_int4_takes(tiny_model):
    """int4 on tinygemm's words compiles where torch's products serve the rows (past
    wquant_torch.ROWS_MAX_M, or everywhere cuda_int4 does not run); fewer rows take
    cuda_int4's kernel, whose steps run as fast through the eager layers. The engine's
    buckets follow compile_rows, and the compiler's early import its max batch."""
    from torch import nn

    from llamadist.config import RuntimeConfig, named_shape
    from llamadist.kernels import wquant, wquant_torch
    from llamadist.model.llama import MLP, RMSNorm
    from llamadist.runtime.kernel_passes import compile_expected, compile_pays, compile_rows
    from llamadist.runtime.stage import build_stage
    from llamadist.weights.checkpoint import open_checkpoint
    few = wquant_torch.ROWS_MAX_M
    dense, gpu = named_shape("llama3-8b"), torch.device("cuda:0")
    int4 = RuntimeConfig(quantize="int4", wquant="torch")
    assert compile_expected(dense, int4, gpu) and compile_expected(dense, int4, gpu, few + 1)
    assert not compile_expected(dense, int4, gpu, few)
    assert compile_expected(dense, RuntimeConfig(quantize="int4", wquant="torch", compile=True),
                            gpu, 1)
    ckpt = open_checkpoint(str(tiny_model))
    stage = build_stage(ckpt, range(0, ckpt.config.num_layers), "cpu", torch.float32, 1, 32)
    for m in stage.model.modules():  # as use_eager_fused sets them on a GPU
        if isinstance(m, RMSNorm):
            m.add_norm = lambda *a: None
    assert compile_rows(stage.model) is None
    mlp = next(m for m in stage.model.modules() if isinstance(m, MLP))
    lin = nn.Linear(mlp.down_proj.in_features, mlp.down_proj.out_features, bias=False)
    del lin.weight
    lin.weight = wquant.quantize(mlp.down_proj.weight.detach(), "int4-g32")
    mlp.down_proj = lin = wquant.as_packed_linear(lin, "torch")
    assert lin.path == "tinygemm" and not lin.tg_rows  # cuda_int4 runs on CUDA only
    assert compile_pays(stage.model, 1) and compile_rows(stage.model) == 1
    lin.tg_rows = True  # as on a GPU where cuda_int4's kernel runs
    assert [compile_pays(stage.model, r) for r in (1, few, few + 1)] == [False, False, True]
    assert compile_pays(stage.model) and compile_rows(stage.model) == few + 1
    # the engine's stages (as CUDA stages): buckets of at most `few` rows stay eager, and
    # a max batch within them compiles nothing, unless the run says --compile / --no-compile
    from types import SimpleNamespace

    from llamadist.runtime.engine import Engine
    cuda = torch.device("cuda")
    made = {(mb, c): Engine(ckpt.config, [SimpleNamespace(device=cuda, model=stage.model,
                                                          batch_size=mb)],
                            runtime=RuntimeConfig(compile=c))
            for mb in (few, few + 1) for c in (None, True, False)}
    assert {k: (e.compile_layers, e.compile_from) for k, e in made.items()} == {
        (few, None): ((False,), (few + 1,)), (few + 1, None): ((True,), (few + 1,)),
        (few, True): ((True,), (1,)), (few + 1, True): ((True,), (1,)),
        (few, False): ((False,), (1,)), (few + 1, False): ((False,), (1,))}


def test_kv_length_defaults_to_what_the_request_needs(smollm2):
    from llamadist.cli.jobs import chat_job, generate_job
    from llamadist.cli.main import build_parser
    from llamadist.weights.checkpoint import open_checkpoint
    ckpt = open_checkpoint(smollm2)  # a context of 8192 positions
    tok = ckpt.tokenizer()
    job = generate_job(build_parser().parse_args(
        ["generate", str(smollm2), "--prompt", "hi", "--max-new-tokens", "300"]), ckpt, tok)
    assert job.max_seq_len == 512  # 1 + 300 tokens, rounded up to 256
    chat = chat_job(build_parser().parse_args(["chat", str(smollm2)]), ckpt, tok)
    assert chat.max_seq_len == 4096  # an open-ended request: the context, capped


# ---- review fixes: tensor-parallel budgets, --auto and --plan checks, bad checkpoints -----
def test_plan_budgets_are_per_tensor_parallel_shard(capsys):
    # float32 weights (513 MiB): as stored, the Q4_1 file's 92 MiB would fit one device
    flags = ["plan", "smollm2-135m", "--devices", "cpu", "--max-memory", "400MiB",
             "--weights", "float32"]
    code, out, err = run_cli(capsys, *flags, "--tp", "3")
    assert code == 0, err
    assert "3-way tensor-parallel" in out and "1/3 shard" in out
    code, _, err = run_cli(capsys, *flags)  # the whole model on one such device: too big
    one_line_error(code, err, "does not fit", "400.00 MiB")


def test_auto_refuses_an_absent_device(capsys, tiny_model):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, _, err = run_cli(capsys, "generate", str(tiny_model), "--prompt", "hi", "--auto",
                           "--devices", "cuda:0", "--max-memory", "80GiB")
    one_line_error(code, err, "cuda:0", "not present")


def test_plan_file_is_costed_on_this_run(capsys, tiny_model, tmp_path):
    plan = tmp_path / "p.json"
    assert main(["plan", str(tiny_model), "--devices", "cpu,cpu", "--save", str(plan)]) == 0
    capsys.readouterr()
    code, _, err = run_cli(capsys, "generate", str(tiny_model), "--prompt", "hi", "--plan",
                           str(plan), "--max-memory", "10KiB,10KiB")
    one_line_error(code, err, "does not fit", "10.00 KiB")
    code, _, err = run_cli(capsys, "generate", str(tiny_model), "--prompt", "hi", "--plan",
                           str(plan), "--strategy", "memory")
    one_line_error(code, err, "--plan", "drop --strategy")


def test_bench_prompts_have_the_asked_length(capsys, tiny_model):
    code, out, err = run_cli(capsys, "bench", str(tiny_model), "--batch", "70", "--prompt-len",
                             "4", "--gen-len", "1", "--json")
    assert code == 0, err
    assert json.loads(out)["prompt_tokens"] == 70 * 4


def test_shape_bench_refuses_process_flags(capsys):
    code, _, err = run_cli(capsys, "bench", "--shape", "smollm2-135m", "--devices", "cpu",
                           "--nproc", "2", "--pp", "2")
    one_line_error(code, err, "--nproc", "--pp", "one process")


@pytest.mark.parametrize("field, value, needle", [
    ("hidden_size", None, "cannot read"), ("num_attention_heads", 0, "cannot read"),
    ("num_hidden_layers", 0, "num_hidden_layers=0")])
def test_corrupt_config_field(capsys, tiny_model, tmp_path, field, value, needle):
    m = tmp_path / "m"
    shutil.copytree(tiny_model, m)
    cfg = json.loads((m / "config.json").read_text())
    cfg[field] = value
    (m / "config.json").write_text(json.dumps(cfg))
    code, _, err = run_cli(capsys, "generate", str(m), "--prompt", "hi")
    one_line_error(code, err, needle)


@pytest.mark.parametrize("name, content", [("config.json", "[1]"),
                                           ("generation_config.json", "[]"),
                                           ("tokenizer_config.json", "{not json")])
def test_corrupt_json_files(capsys, tiny_model, tmp_path, name, content):
    m = tmp_path / "m"
    shutil.copytree(tiny_model, m)
    (m / name).write_text(content)
    code, _, err = run_cli(capsys, "generate", str(m), "--prompt", "hi")
    one_line_error(code, err, name)


def test_llm_takes_runtime_or_keywords_not_both(tiny_model):
    from llamadist.api import LLM
    from llamadist.config import RuntimeConfig
    from llamadist.planning.layout import Layout
    with pytest.raises(TypeError, match="max_batch"):
        LLM(tiny_model, runtime=RuntimeConfig(), max_batch=4)
    with pytest.raises(ValueError, match="over 2 processes"):
        LLM(tiny_model, layout=Layout((range(0, 5),), ("cpu",), tp=2, processes=2))
    llm = LLM(tiny_model)
    assert llm.runtime.max_batch == 8 and llm.max_seq_len == 256  # RuntimeConfig's defaults


# ---- --ep: experts over a stage's tp or tp x dp ranks --------------------------------------
@pytest.mark.parametrize("model, flags, needles", [
    ("dense", ["--ep", "2"], ["--ep 2", "has no experts", "drop --ep"]),
    ("moe", ["--ep", "3", "--tp", "2"], ["--ep 3 is not a multiple of --tp 2"]),
    ("moe", ["--ep", "3", "--dp", "2"], ["--ep 3 with tp=1 x dp=2", "--ep 2"]),
    ("moe", ["--ep", "8"], ["--ep 8", "4 experts per layer", "--ep 4 or fewer"]),
    ("moe", ["--ep-dispatch", "all_to_all"], ["--ep-dispatch all_to_all", "ep=1 with tp=1"]),
    ("moe", ["--nproc", "2", "--tp", "2", "--ep", "2", "--ep-dispatch", "gather"],
     ["--ep-dispatch gather", "ep=2 with tp=2", "Drop --ep-dispatch"]),
    ("moe", ["--nproc", "2", "--ep", "2", "--hot-experts", "1"],
     ["--hot-experts N and --expert-load FILE go together"]),
    ("moe", ["--nproc", "2", "--ep", "2", "--hot-experts", "1", "--expert-load",
             "/nonexistent/load.json"], ["--expert-load /nonexistent/load.json", "JSON"]),
    ("moe", ["--nproc", "2", "--ep", "2", "--ep-dispatch", "gather", "--hot-experts", "1",
             "--expert-load", "x.json"], ["--hot-experts needs --ep-dispatch all_to_all"]),
    ("moe", ["--hot-experts", "1", "--expert-load", "x.json"],
     ["--hot-experts 1 goes with experts spread over data-parallel replicas"]),
])
def test_impossible_expert_grid(capsys, tiny_model, tiny_mixtrals, model, flags, needles):
    path = tiny_model if model == "dense" else tiny_mixtrals["moe_top2_gqa"]
    code, _, err = run_cli(capsys, "generate", str(path), "--prompt", "hi", *flags)
    one_line_error(code, err, *needles)


def test_plan_shows_where_the_experts_go(capsys):
    code, out, _ = run_cli(capsys, "plan", "mixtral-8x7b", "--devices", "cuda", "--tp", "2",
                           "--ep", "8", "--max-memory", "80GiB", "--pp", "1")
    assert code == 0, out
    assert "dp 4 x pp 1 x tp 2" in out
    assert "experts: each stage's spread over 8 ranks (1/8 each)" in out
    assert "data-parallel replicas stepping together" in out


def test_expert_grid_defaults():
    from llamadist.config import named_shape
    from llamadist.planning.checks import check_ep, grid_dp
    moe, dense = named_shape("mixtral-8x7b"), named_shape("smollm2-135m")
    assert grid_dp(1, None, 4) == 4 and grid_dp(2, None, 8) == 4   # --dp from --ep / --tp
    assert grid_dp(2, None, 2) == 1 and grid_dp(2, 3, 2) == 3 and grid_dp(1, None, None) == 1
    assert check_ep(moe, 2, 4, None) == 2      # default: the experts over each replica's TP
    assert check_ep(moe, 1, 4, None) == 1 and check_ep(dense, 2, 1, None) == 1
    assert check_ep(moe, 2, 2, 2) == 2 and check_ep(moe, 2, 2, 4) == 4


def test_devices_default_to_the_first_gpu_when_there_is_one(monkeypatch):
    """Without --devices a run goes to cuda:0 (over processes: each rank's own GPU) where
    CUDA is available, else to the CPU."""
    import torch
    from llamadist.config import default_devices
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_devices() == "cpu" and default_devices(processes=True) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_devices() == "cuda:0" and default_devices(processes=True) == "cuda"
