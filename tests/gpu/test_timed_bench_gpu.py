"""A timed run on CUDA (what ``llamadist bench`` runs): each stage's seconds come from CUDA
events read without a host sync inside the step loop (runtime.work_timer), so the timed
run steps like the untimed one, and the stats still hold the stage's device time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llamadist.config import RuntimeConfig
from llamadist.generation.sampling import SamplingParams
from llamadist.runtime.work_timer import WorkTimer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="needs CUDA")]
ROOT = Path(__file__).resolve().parents[2]
NEW = 16


@pytest.mark.parametrize("devices", ["cuda:0", "cuda:0,cuda:0"])
def test_timed_steps_read_events_without_a_sync(tiny_model, monkeypatch, devices):
    from llamadist.api import LLM
    llm = LLM(str(tiny_model), devices=devices,
              runtime=RuntimeConfig(max_batch=2, timed=True, dtype="float32"))
    prompts = [list(range(5, 21)), list(range(30, 46))]
    params = SamplingParams(max_new_tokens=NEW, ignore_eos=True)
    llm.run([[t + 1 for t in p] for p in prompts], params)  # warm: every shape met once
    syncs, waits = [], []
    real_sync, real_read = torch.cuda.synchronize, WorkTimer._read_oldest

    def counted_sync(*a, **k):
        syncs.append(1)
        return real_sync(*a, **k)

    def counted_read(self, wait):
        waits.append(wait)
        return real_read(self, wait)

    monkeypatch.setattr(torch.cuda, "synchronize", counted_sync)
    monkeypatch.setattr(WorkTimer, "_read_oldest", counted_read)
    llm.llm_engine.reset_stats()
    _, st = llm.run(prompts, params)
    assert syncs == [] and True not in waits  # no host wait for a stage's time in the loop
    assert False in waits  # the events were read as the steps went (query, no wait)
    stages = llm.final_stage_stats()
    for s in stages:
        assert s["calls"] == NEW  # one prefill and NEW - 1 decode steps, each timed
        assert 0 < s["compute_s"] <= st["wall_s"]
    assert sum(s["compute_s"] for s in stages) <= st["wall_s"]
    assert all(s.timer.pending == 0 for s in llm.engine.stages)


def test_bench_reports_device_time_over_processes(tiny_model):
    """The worker path: each rank's compute seconds from events, read at its report."""
    env = dict(os.environ, NCCL_NVLS_ENABLE="0")
    out = subprocess.run([sys.executable, "-m", "llamadist", "bench", str(tiny_model),
                          "--nproc", "2", "--pp", "2", "--devices", "cuda", "--batch", "2",
                          "--prompt-len", "16", "--gen-len", str(NEW), "--json"],
                         cwd=ROOT, env=env, text=True, capture_output=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rep = json.loads(out.stdout.strip().splitlines()[-1])
    assert [s["stage"] for s in rep["stages"]] == [0, 1]
    assert all(0 < s["busy"] <= 1 and s["compute_s"] > 0 for s in rep["stages"])
