"""The engine over processes (gloo on CPU) against one process.

Launches are the expensive part (each rank imports torch), so one launch runs several
jobs through rank 0's engine: a 2-stage world (greedy with every request in one step,
with at most 2 at once, with a KV budget so small the scheduler preempts; seeded
sampling at two batch sizes) and a 3-stage world. Tolerance: 1e-5 max abs logit
difference in float32 (the same stage code; only the batch shapes differ).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from llamadist.distributed.launch import Launcher
from llamadist.generation.generate import generate
from llamadist.generation.sampling import SamplingParams
from llamadist.runtime.engine import Engine
from llamadist.weights.checkpoint import open_checkpoint

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("engine_worker.py")
LOGIT_TOL = 1e-5
MAX_SEQ = 64
NEW = 10
BLOCK = 4  # small blocks: requests grow by blocks, so a small budget forces preemption
PROMPTS = ["The quick brown fox", "Distributed inference splits a model", "1 2 3",
           "Once upon a time there was a tiny language model", "def main():"]
GREEDY = dict(max_new_tokens=NEW, ignore_eos=True)
SAMPLED = dict(max_new_tokens=NEW, ignore_eos=True, temperature=0.9, top_k=20, seed=7)


def worker_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.update(extra)
    return env


class Recorder:
    """A StepModel around the Engine that keeps each step's last-position logits."""

    def __init__(self, engine: Engine):
        self.engine, self.steps = engine, []
        self.config, self.max_seq_len = engine.config, engine.max_seq_len
        self.max_batch, self.device = engine.max_batch, engine.device

    def forward(self, tokens, positions, start, valid=None, logits="last"):
        out = self.engine.forward(tokens, positions, start, valid, logits)
        self.steps.append(out[:, -1].float().clone())  # (B, V)
        return out


@pytest.fixture(scope="module")
def encoded(tiny_model) -> list[list[int]]:
    tok = open_checkpoint(tiny_model).tokenizer()
    return [tok.encode(p) for p in PROMPTS]


@pytest.fixture(scope="module")
def reference(tiny_model, encoded) -> dict:
    """Greedy tokens and per-step logits of the single-process static Engine."""
    rec = Recorder(Engine.load(str(tiny_model), max_batch=len(encoded), max_seq_len=MAX_SEQ))
    results = generate(rec, None, encoded, SamplingParams(**GREEDY))
    return {"tokens": [r.token_ids for r in results], "logits": rec.steps}


def run_worker_world(tmp: Path, model: Path, nproc: int, pp: int, ranges: list, jobs: list,
                     prompts: list[list[int]], dp: int = 1, **extra) -> dict[str, dict]:
    cfg = {"model": str(model), "out": str(tmp), "pp": pp, "dp": dp, "layer_ranges": ranges,
           "max_seq_len": MAX_SEQ, "prompts": prompts, "jobs": jobs, "block_size": BLOCK,
           "num_blocks": len(prompts) * MAX_SEQ // BLOCK + 1, **extra}
    path = tmp / "config.json"
    path.write_text(json.dumps(cfg))
    code = Launcher([str(WORKER), str(path)], nproc, env=worker_env()).run()
    assert code == 0, f"workers failed with exit code {code}"
    return {j["name"]: torch.load(tmp / f"{j['name']}.pt") for j in jobs}


@pytest.fixture(scope="module")
def pp2(tiny_model, encoded, tmp_path_factory) -> dict[str, dict]:
    jobs = [{"name": "greedy_b5", "max_batch": 5, "params": GREEDY, "warmup": True},
            {"name": "greedy_b2", "max_batch": 2, "params": GREEDY},
            # 12 blocks of 4 (11 usable: 44 tokens) for 5 requests of up to 22 tokens
            {"name": "greedy_preempt", "max_batch": 5, "num_blocks": 12, "params": GREEDY},
            {"name": "sampled_b5", "max_batch": 5, "params": SAMPLED},
            {"name": "sampled_b2", "max_batch": 2, "params": SAMPLED}]
    return run_worker_world(tmp_path_factory.mktemp("pp2"), tiny_model, 2, 2,
                            [[0, 3], [3, 5]], jobs, encoded)


@pytest.fixture(scope="module")
def pp3(tiny_model, encoded, tmp_path_factory) -> dict[str, dict]:
    # idle_after_warmup: the ranks wait past their step timeout (10 s) after the warm-up's
    # steps; they were told nothing is in flight, so none gives up on its peers
    jobs = [{"name": "greedy_b5", "max_batch": 5, "params": GREEDY},
            {"name": "greedy_b3", "max_batch": 3, "max_batch_tokens": 8, "params": GREEDY},
            {"name": "idle_after_warmup", "max_batch": 5, "params": GREEDY, "warmup": True,
             "idle_s": 12}]
    return run_worker_world(tmp_path_factory.mktemp("pp3"), tiny_model, 3, 3,
                            [[0, 2], [2, 4], [4, 5]], jobs, encoded, timeout=10.0)


@pytest.fixture(scope="module")
def ahead1(tiny_model, encoded, tmp_path_factory) -> dict[str, dict]:
    """One rank (a worker process of its own, as `torchrun --nproc-per-node 1`) taking
    steps scheduled ahead, as it does on a GPU: decodes read the step before's samples on
    its device."""
    jobs = [{"name": "greedy_b2", "max_batch": 2, "params": GREEDY},
            {"name": "greedy_preempt", "max_batch": 5, "num_blocks": 12, "params": GREEDY}]
    return run_worker_world(tmp_path_factory.mktemp("ahead1"), tiny_model, 1, 1, [[0, 5]],
                            jobs, encoded, ahead=True)


def check_logits(name: str, got: dict, ref_steps: list[torch.Tensor]) -> None:
    """got: {("name/row", step): (V,)} from the sampling rank; ref_steps[step]: (B, V)."""
    assert len(got) == sum(len(s) for s in ref_steps)
    worst = max((got[(f"{name}/{row}", step)] - ref[row]).abs().max().item()
                for step, ref in enumerate(ref_steps) for row in range(ref.shape[0]))
    assert worst <= LOGIT_TOL, f"max abs logit difference {worst:.2e} > {LOGIT_TOL}"


# ---- 2 and 3 processes against one -------------------------------------------------
@pytest.mark.parametrize("job", ["greedy_b5", "greedy_b2", "greedy_preempt"])
def test_two_stages_match_one_process(pp2, reference, job):
    assert pp2[job]["tokens"] == reference["tokens"]
    check_logits(job, pp2[job]["logits"], reference["logits"])


@pytest.mark.parametrize("job", ["greedy_b2", "greedy_preempt"])
def test_one_rank_scheduling_ahead_matches_one_process(ahead1, reference, job):
    assert ahead1[job]["tokens"] == reference["tokens"]
    check_logits(job, ahead1[job]["logits"], reference["logits"])


def test_small_kv_budget_preempted(pp2):
    assert pp2["greedy_preempt"]["preemptions"] > 0
    assert pp2["greedy_b5"]["preemptions"] == 0


@pytest.mark.parametrize("job", ["greedy_b5", "greedy_b3", "idle_after_warmup"])
def test_three_stages_match_one_process(pp3, reference, job):
    assert pp3[job]["tokens"] == reference["tokens"]
    check_logits(job, pp3[job]["logits"], reference["logits"])


def test_sampling_does_not_depend_on_the_batch(pp2, reference):
    a, b = pp2["sampled_b5"]["tokens"], pp2["sampled_b2"]["tokens"]
    assert a == b
    assert a != reference["tokens"]  # really sampled, not greedy


# ---- the command line: launcher, torchrun, data parallel, chat, bench -------------
def llamadist(*args: str, env: dict | None = None, stdin: str | None = None,
              timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llamadist", *args], cwd=ROOT, text=True,
                          capture_output=True, env=env or worker_env(), input=stdin,
                          timeout=timeout)


def json_tokens(stdout: str) -> list[list[int]]:
    return [json.loads(line)["token_ids"] for line in stdout.splitlines() if line.startswith("{")]


def prompt_args() -> list[str]:
    return [a for p in PROMPTS for a in ("--prompt", p)]


def test_cli_data_parallel_with_stop_string(tiny_model, reference, encoded):
    """Two replicas, each stopping its own sequences at a stop string, as in-process."""
    tok = open_checkpoint(tiny_model).tokenizer()
    texts = [tok.decode(t) for t in reference["tokens"]]
    text = next(t for t in texts if sum(c.isascii() and c.isprintable() for c in t) >= 4)
    chars = [c for c in text if c.isascii() and c.isprintable()]
    stop = "".join(chars[2:4])  # occurs in at least one greedy continuation
    engine = Engine.load(str(tiny_model), max_batch=len(encoded), max_seq_len=MAX_SEQ)
    want = generate(engine, tok, encoded, SamplingParams(max_new_tokens=NEW, stop=(stop,)))
    assert any(r.finish_reason == "stop" for r in want)
    out = llamadist("generate", str(tiny_model), "--nproc", "2", "--dp", "2", "--max-new-tokens",
                    str(NEW), "--max-seq-len", str(MAX_SEQ), f"--stop={stop}", "--json",
                    *prompt_args())
    assert out.returncode == 0, out.stderr
    got = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [(g["token_ids"], g["text"], g["finish_reason"]) for g in got] == \
        [(r.token_ids, r.text, r.finish_reason) for r in want]


def test_cli_tensor_x_pipeline_parallel(tiny_model, reference):
    """TP=2 inside each of PP=2 stages: 4 processes, the single-process greedy tokens."""
    out = llamadist("generate", str(tiny_model), "--nproc", "4", "--tp", "2", "--pp", "2",
                    "--max-new-tokens", str(NEW), "--max-seq-len", str(MAX_SEQ), "--json",
                    *prompt_args())
    assert out.returncode == 0, out.stderr
    assert json_tokens(out.stdout) == reference["tokens"]


def test_auto_layout_feeds_generate(tiny_model, reference):
    """--auto: budgets too small for one device (weights plus the KV cache of the 4 prompts)
    make the planner split the model over both devices, as 2 processes (tp=2, which halves
    the KV cache as well, is the layout that fits), with the single-process tokens."""
    out = llamadist("generate", str(tiny_model), "--devices", "cpu,cpu", "--max-memory",
                    "700KB,700KB", "--auto", "--max-new-tokens", str(NEW), "--max-seq-len",
                    str(MAX_SEQ), "--json", *prompt_args())
    assert out.returncode == 0, out.stderr
    assert "auto layout: tp=2 pp=1 dp=1" in out.stderr and "2 process(es)" in out.stderr
    assert json_tokens(out.stdout) == reference["tokens"]


def test_torchrun(tiny_model, reference):
    torchrun = Path(sys.executable).with_name("torchrun")
    out = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "llamadist",
                          "generate", str(tiny_model), "--pp", "2", "--max-batch", "2",
                          "--max-new-tokens", str(NEW),
                          "--max-seq-len", str(MAX_SEQ), "--json", *prompt_args()],
                         cwd=ROOT, text=True, capture_output=True, env=worker_env(), timeout=120)
    assert out.returncode == 0, out.stderr
    assert json_tokens(out.stdout) == reference["tokens"]


def test_chat_reads_stdin_on_rank0(tiny_model):
    out = llamadist("chat", str(tiny_model), "--nproc", "2", "--max-new-tokens", "4",
                    stdin="hello there\n/reset\nand again\n")  # EOF ends the chat
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("> ")  # rank 0 prompted, read, replied
    assert "(history cleared)" in out.stderr


def test_bench_reports_busy_time_per_stage(tiny_model):
    out = llamadist("bench", str(tiny_model), "--nproc", "2", "--batch", "4", "--prompt-len",
                    "8", "--gen-len", "6", "--json")
    assert out.returncode == 0, out.stderr
    rep = json.loads(out.stdout.strip().splitlines()[-1])
    assert rep["processes"] == 2 and [s["stage"] for s in rep["stages"]] == [0, 1]
    assert all(0 < s["busy"] <= 1 and s["compute_s"] > 0 for s in rep["stages"])
    assert rep["generated_tokens"] == 4 * 6


# ---- refusals and faults -----------------------------------------------------------
def test_bad_grid_is_refused(tiny_model, capsys):
    from llamadist.cli import main
    assert main(["generate", str(tiny_model), "--nproc", "3", "--pp", "2", "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "--nproc 3 but pp=2 x tp=1 x dp=1 = 2" in err and "multiplies to 3" in err


def live_tagged(tag: str) -> list[int]:
    """Pids of live processes whose environment carries ``tag`` (no psutil)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                env = (d / "environ").read_bytes()
                state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if tag.encode() in env and state != "Z":
                pids.append(int(d.name))
    return pids


def run_until_exit(args: list[str], env: dict, marker: str, timeout: float
                   ) -> tuple[int, str, float]:
    """Run llamadist; -> (exit code, stderr, seconds from ``marker`` on stderr to exit)."""
    p = subprocess.Popen([sys.executable, "-m", "llamadist", *args], cwd=ROOT, env=env, text=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    lines, seen_at = [], None
    deadline = time.monotonic() + timeout
    for line in p.stderr:
        lines.append(line)
        if marker in line and seen_at is None:
            seen_at = time.monotonic()
        assert time.monotonic() < deadline, "launcher did not exit in time:\n" + "".join(lines)
    code = p.wait(timeout=10)
    assert seen_at is not None, "".join(lines)
    return code, "".join(lines), time.monotonic() - seen_at


@pytest.mark.parametrize("mode", ["die", "hang"])
def test_failed_rank_stops_everyone(tiny_model, mode, tmp_path):
    """--on-failure fail: the run ends, naming the worker that failed."""
    tag = f"LLAMADIST_TEST_TAG_{mode}_{os.getpid()}"
    hook = "LLAMADIST_TEST_DIE_AT_STEP" if mode == "die" else "LLAMADIST_TEST_HANG_AT_STEP"
    env = worker_env(**{hook: "1:3", tag: "1"})
    limit = 4.0
    nproc = "2" if mode == "die" else "3"  # a hang in the middle of 3 stages: blame travels
    args = ["generate", str(tiny_model), "--nproc", nproc, "--max-new-tokens", str(NEW),
            "--timeout", str(limit), "--on-failure", "fail", "--prompt", "a", "--prompt", "b"]
    code, err, after = run_until_exit(args, env, "dying at step" if mode == "die" else "hanging",
                                      timeout=90)
    assert code != 0
    if mode == "die":
        assert "rank 1 (pid" in err and "exited with code 17" in err, err
        assert after < limit, f"{after:.1f} s from the death to the launcher's exit"
    else:
        assert "rank 1 (pid" in err and "stopped answering" in err, err
        assert after < limit + 4, f"{after:.1f} s from the hang to the launcher's exit"
    time.sleep(0.2)
    assert live_tagged(tag) == [], "worker processes left behind"


def test_generate_survives_a_dead_worker(tiny_model, reference):
    """The default --on-failure restart: rank 1 dies at its 4th step; the front restarts
    both workers, replays the prompts with the tokens they had, and every prompt gets the
    tokens of a run without the fault; no worker is left behind."""
    tag = f"LLAMADIST_TEST_TAG_restart_{os.getpid()}"
    out = llamadist("generate", str(tiny_model), "--nproc", "2", "--pp", "2",
                    "--max-new-tokens", str(NEW), "--max-seq-len", str(MAX_SEQ), "--json",
                    *prompt_args(), env=worker_env(LLAMADIST_TEST_DIE_AT_STEP="1:4", **{tag: "1"}))
    assert out.returncode == 0, out.stderr
    assert "dying at step 4" in out.stderr and "recovery of replica 0" in out.stderr, out.stderr
    assert json_tokens(out.stdout) == reference["tokens"]
    assert live_tagged(tag) == [], "worker processes left behind"


def test_past_max_restarts_the_run_fails_naming_the_worker(tiny_model):
    tag = f"LLAMADIST_TEST_TAG_maxrestarts_{os.getpid()}"
    out = llamadist("generate", str(tiny_model), "--nproc", "2", "--pp", "2",
                    "--max-restarts", "0", "--max-new-tokens", str(NEW), *prompt_args(),
                    env=worker_env(LLAMADIST_TEST_DIE_AT_STEP="1:2", **{tag: "1"}))
    assert out.returncode == 1, out.stderr
    assert "rank 1 (pid" in out.stderr and "exited with code 17" in out.stderr, out.stderr
    assert "giving up after 0 restart(s) (--max-restarts 0)" in out.stderr, out.stderr
    assert live_tagged(tag) == [], "worker processes left behind"


# ---- a real model ------------------------------------------------------------------
def test_smollm2_eight_prompts_three_at_once_over_two_stages(smollm2, tmp_path):
    """`generate --prompts-file F --max-batch 3 --nproc 2 --pp 2` with 8 prompts: at most
    three run at once over the two processes, and each gets the tokens it gets alone."""
    prompts = ["The capital of France is", "Water boils at", "def add(a, b):",
               "The three primary colors are", "Once upon a time", "1, 2, 3, 4,",
               "My favourite food is", "The sun rises in the"]
    f = tmp_path / "prompts.txt"
    f.write_text("\n".join(prompts) + "\n")
    ckpt = open_checkpoint(smollm2)
    tok = ckpt.tokenizer()
    engine = Engine.load(str(smollm2), max_seq_len=256)
    alone = [generate(engine, tok, [tok.encode(p)], SamplingParams(max_new_tokens=8))[0].token_ids
             for p in prompts]
    out = llamadist("generate", str(smollm2), "--nproc", "2", "--pp", "2", "--max-batch", "3",
                    "--prompts-file", str(f), "--max-new-tokens", "8", "--json")
    assert out.returncode == 0, out.stderr
    assert json_tokens(out.stdout) == alone and all(alone)
