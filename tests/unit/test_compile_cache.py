"""torch.compile's artifacts handed from a stage's process to the next
(llamadist/runtime/compile_cache.py), and the compile workers a rank may fork.

The hand-over runs the real path on the CPU (Inductor's C++ backend): a first process
compiles the tiny model's decoder layer through DecodeGraphs and writes the file; a
second, with an empty Inductor cache directory (a fresh host), loads it and finds its
graphs in the cache instead of compiling them."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llamadist.distributed.launch import worker_env
from llamadist.runtime import compile_cache

ROOT = Path(__file__).resolve().parents[2]

# One process of a stage: layer 0 of the tiny model, buckets argv[3] through the compiled
# layer (no C kernels: torch.compile traces the torch layers) -> Inductor's cache counters.
STAGE = """
import json, logging, sys, torch
from torch._dynamo.utils import counters
from llamadist.config import RuntimeConfig
from llamadist.runtime.cuda_graph import DecodeGraphs
from llamadist.runtime.stage import build_stage
from llamadist.weights.checkpoint import open_checkpoint
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
ck = open_checkpoint(sys.argv[1])
st = build_stage(ck, range(1), "cpu", torch.float32, 2, 16,
                 runtime=RuntimeConfig(cpu_kernels=False))
g = DecodeGraphs([st], static_cpu=True, compile_cache=sys.argv[2])
finite = True
for b in map(int, sys.argv[3].split(",")):  # each bucket's first step saves the file again
    ids = torch.zeros(b, 1, dtype=torch.long)
    finite &= bool(torch.isfinite(g.forward(ids, ids, 0, None)).all())
print(json.dumps({"compiled": g.decoders[0].layer_fn is not None, "finite": finite,
                  "hits": counters["inductor"]["fxgraph_cache_hit"],
                  "misses": counters["inductor"]["fxgraph_cache_miss"]}))
"""


def _stage_process(model, folder: Path, inductor_dir: Path,
                   buckets: str = "1,2") -> tuple[dict, str]:
    # TORCHINDUCTOR_VEC_ISA_OK: Inductor trusts /proc/cpuinfo for the vector ISA instead of
    # building and loading a probe library per ISA (~20 s per process here, redone in each
    # empty cache directory); the graphs, their cache keys and the hand-over are the same.
    env = dict(os.environ, PYTHONPATH=str(ROOT), TORCHINDUCTOR_CACHE_DIR=str(inductor_dir),
               TORCHINDUCTOR_VEC_ISA_OK="1", OMP_NUM_THREADS="1",
               TORCHINDUCTOR_COMPILE_THREADS="1")
    r = subprocess.run([sys.executable, "-c", STAGE, str(model), str(folder), buckets], cwd=ROOT,
                       env=env, text=True, capture_output=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1]), r.stderr


@pytest.mark.skipif(not hasattr(torch.compiler, "save_cache_artifacts")
                    or shutil.which(os.environ.get("CXX", "g++")) is None,
                    reason="needs torch.compiler's cache artifacts (torch >= 2.7) and a C++ "
                           "compiler for Inductor's CPU backend")
def test_next_process_loads_what_the_first_saved(tiny_model, tmp_path):
    folder = tmp_path / "artifacts"  # made by the first save
    first, err = _stage_process(tiny_model, folder, tmp_path / "inductor-a")
    assert first["compiled"] and first["finite"]
    assert first["hits"] == 0 and first["misses"] >= 2  # buckets 1 and 2: two graphs at least
    assert "yet; compiling" in err
    files = list(folder.iterdir())
    assert len(files) == 1 and files[0].stat().st_size > 0
    assert "saved" in err
    assert files[0].stat().st_mode & 0o044 == 0o044  # readable by another user's process

    # Fresh hosts (empty Inductor caches) with the file: one running bucket 1 only finds
    # its graph in the cache and saves again; that save keeps bucket 2's graphs, which it
    # loaded and never ran, so a next process running both buckets compiles nothing.
    second, err = _stage_process(tiny_model, folder, tmp_path / "inductor-b", "1")
    assert "compile artifacts: loaded" in err
    assert second["compiled"] and second["finite"]
    assert second["hits"] >= 1 and second["misses"] == 0
    third, err = _stage_process(tiny_model, folder, tmp_path / "inductor-c")
    assert third["compiled"] and third["finite"]
    assert third["hits"] == first["misses"] and third["misses"] == 0, (first, second, third)


def test_missing_and_damaged_files_fall_back(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=compile_cache.__name__)
    assert not compile_cache.load(tmp_path / "none.bin")
    assert "no " in caplog.text and "compiling" in caplog.text
    bad = tmp_path / "bad.bin"
    bad.write_bytes(os.urandom(64))
    assert not compile_cache.load(bad)
    assert "unusable" in caplog.text


def test_torch_without_the_api(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger=compile_cache.__name__)
    monkeypatch.delattr(torch.compiler, "save_cache_artifacts", raising=False)
    monkeypatch.delattr(torch.compiler, "load_cache_artifacts", raising=False)
    path = tmp_path / "a.bin"
    path.write_bytes(b"x")
    assert not compile_cache.load(path)
    assert not compile_cache.save(path)
    assert path.read_bytes() == b"x"
    assert "has no torch.compiler.load_cache_artifacts" in caplog.text


def test_save_before_any_compile_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: None)
    assert not compile_cache.save(tmp_path / "sub" / "a.bin")
    assert not (tmp_path / "sub" / "a.bin").exists()


def test_artifact_path_per_stage(tiny_model, tmp_path):
    from llamadist.runtime.stage import build_stage
    from llamadist.weights.checkpoint import open_checkpoint
    ck = open_checkpoint(tiny_model)
    a, b = (build_stage(ck, r, "cpu", torch.float32, 1, 16) for r in (range(2), range(2, 5)))
    c = build_stage(ck, range(2), "cpu", torch.bfloat16, 1, 16)
    paths = {compile_cache.artifact_path(tmp_path, s) for s in (a, b, c)}
    assert len(paths) == 3 and all(p.parent == tmp_path for p in paths)
    assert compile_cache.artifact_path(tmp_path, a) == compile_cache.artifact_path(tmp_path, a)


@pytest.mark.parametrize("cpus,local_world,want", [(16, 2, "8"), (16, 1, "16"), (2, 4, "1"),
                                                   (128, 2, "16")])  # Inductor's cap: 32
def test_ranks_of_a_host_share_its_compile_workers(monkeypatch, cpus, local_world, want):
    monkeypatch.setattr(os, "cpu_count", lambda: cpus)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)), raising=False)
    env = worker_env(0, local_world, 1234, base={})
    assert env["TORCHINDUCTOR_COMPILE_THREADS"] == want
    assert env["OMP_NUM_THREADS"] == str(max(1, cpus // local_world))
    given = worker_env(0, local_world, 1234, base={"TORCHINDUCTOR_COMPILE_THREADS": "3"})
    assert given["TORCHINDUCTOR_COMPILE_THREADS"] == "3"  # the user's choice stands


def test_compile_cache_flag_reaches_the_runtime_config(tmp_path):
    from llamadist.cli.args import runtime_config
    from llamadist.cli.main import build_parser
    p = build_parser()
    on = p.parse_args(["serve", "m", "--compile-cache", str(tmp_path)])
    assert runtime_config(on).compile_cache == str(tmp_path)
    assert runtime_config(p.parse_args(["serve", "m"])).compile_cache is None
