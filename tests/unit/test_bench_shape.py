"""`bench --shape` on the CPU: random SmolLM2-135M weights, tiny batch and lengths.

Calls ``bench_shape_cmd`` with an argparse.Namespace, so it does not depend on the parser.
"""

import argparse
import json

import pytest
import torch

from llamadist.cli.bench_shape import bench_shape_cmd, check_device
from llamadist.config import named_shape
from llamadist.planning.profile import decode_step_bytes, prefill_flops, profile

SMOL_PARAMS = 134_515_008           # tied head: the 49152 x 576 matrix counted once
SMOL_KV_FP32 = 30 * 2 * 3 * 64 * 4  # bytes of K and V per cached position, float32


def ns(**kw) -> argparse.Namespace:
    base = dict(shape="smollm2-135m", devices="cpu", batch=1, prompt_len=16, gen_len=4,
                stages="1", prefill_reps=1)
    base.update(kw)
    return argparse.Namespace(**base)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread: on a shared, loaded machine extra threads spin-wait and run slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def cpu_run(one_thread, tmp_path_factory):
    """One run: batch 2, unsplit and as 2 stages on the CPU (shares one random model)."""
    out = tmp_path_factory.mktemp("bench") / "res.json"
    rc = bench_shape_cmd(ns(batch=[2], stages="1,2", json_out=str(out)))
    return rc, json.loads(out.read_text())


def test_cpu_run_reports_sane_numbers(cpu_run):
    rc, res = cpu_run
    assert rc == 0 and res["errors"] == []
    assert res["dtype"] == "float32" and res["max_seq_len"] == 128
    assert [(r["stages"], r["batch"], r["mode"]) for r in res["rows"]] == \
        [(1, 2, "off"), (2, 2, "off")]
    assert res["rows"][1]["layout"] == ["cpu:0-15", "cpu:15-30"]
    for r in res["rows"]:
        assert r["decode_ms"] > 0 and r["prefill_ms"] > 0
        assert r["tokens_per_s"] == pytest.approx(2 / (r["decode_ms"] / 1e3))
        assert r["decode_steps"] == 3  # 4 new tokens: the first comes from the prefill
        assert len(r["tokens"]) == 4 and all(0 <= t < 49152 for t in r["tokens"])
        assert r["decode_mbu"] > 0 and r["prefill_mfu"] > 0


def test_cpu_run_costs_are_the_profiles(cpu_run):
    _, res = cpu_run
    prof = profile(named_shape("smollm2-135m"), dtype="float32", seq_len=128)
    for r in res["rows"]:
        ctx = 16 + 4 / 2  # mean cached positions over the decode steps
        assert r["decode_context"] == ctx
        assert r["decode_bytes_per_step"] == decode_step_bytes(prof, 2, ctx)
        # ... which is every weight once, two embedding rows and the KV cache read.
        assert r["decode_bytes_per_step"] == (SMOL_PARAMS + 2 * 576) * 4 + 2 * ctx * SMOL_KV_FP32
        assert r["prefill_flops"] == prefill_flops(prof, 2, 16)
        ceil = res["ceilings"]
        assert r["decode_mbu"] == pytest.approx(
            r["decode_bytes_per_step"] / (r["decode_ms"] / 1e3) / ceil["copy_Bps"])


def test_cpu_run_prints_the_table(capsys):
    assert bench_shape_cmd(ns(gen_len=2)) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:4] == ["impl", "mode", "st", "B"]
    assert out[1].split()[:4] == ["llamadist", "off", "1", "1"]


def test_cuda_device_without_cuda_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"--devices cuda:0: CUDA is not available .*"
                                         r"use --devices cpu"):
        bench_shape_cmd(ns(devices="cuda:0"))
    with pytest.raises(ValueError, match="cuda:1"):
        bench_shape_cmd(ns(devices="cpu,cuda:1"))


def test_missing_cuda_index_names_the_devices_there(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match=r"cuda:7: this machine has 2 CUDA device\(s\), "
                                         r"cuda:0 to cuda:1"):
        check_device("cuda:7")
    with pytest.raises(ValueError, match="tpu"):
        check_device("tpu")


@pytest.mark.parametrize("kw,match", [
    (dict(shape="llama9-1t"), "unknown shape 'llama9-1t'"),
    (dict(graph_modes="compiled,fast"), "--graph-modes fast"),
    (dict(gen_len=0), "--gen-len must be >= 1"),
    (dict(max_seq_len=8), "--max-seq-len 8 is below"),
])
def test_bad_options_fail_before_any_work(kw, match):
    with pytest.raises(ValueError, match=match):
        bench_shape_cmd(ns(**kw))


def test_planned_layout_with_boundaries_and_stage_stats(capsys):
    assert bench_shape_cmd(ns(devices="cpu,cpu", boundaries="0:10,10:30", gen_len=2,
                              stage_stats=True)) == 0
    out = capsys.readouterr().out
    assert "stage 0 layers 0:10 on cpu" in out and "stage 1 layers 10:30 on cpu" in out
    assert out.splitlines()[1].split()[:4] == ["llamadist", "off", "2", "1"]


def test_a_stage_on_cuda_without_an_index_is_the_full_model_s_device(monkeypatch):
    """make_engine shares the model built on "cuda" (whose tensors say "cuda:0") instead of
    drawing another: found on the H200, where a second model of another seed was used."""
    import torch

    from llamadist.cli import bench_shape
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert bench_shape._indexed(torch.device("cuda")) == torch.device("cuda:0")
    assert bench_shape._indexed(torch.device("cuda:1")) == torch.device("cuda:1")
    assert bench_shape._indexed(torch.device("cpu")) == torch.device("cpu")


def test_shape_runtime_takes_the_eager_kernels_and_the_graph_mode():
    """bench --shape passes --eager-kernels on (it was dropped) and maps each graph mode to
    RuntimeConfig.compile: compiled True, eager False, auto None (where it pays)."""
    import argparse

    from llamadist.cli.bench_shape import ShapeOptions, shape_runtime
    opts = ShapeOptions.from_args(argparse.Namespace(eager_kernels="torch"))
    rts = {m: shape_runtime(opts, m) for m in ("compiled", "eager", "auto", "off")}
    assert all(rt.eager_kernels == "torch" for rt in rts.values())
    assert [rts[m].compile for m in ("compiled", "eager", "auto")] == [True, False, None]
    assert not rts["off"].cuda_graphs
    assert shape_runtime(ShapeOptions(), "auto").eager_kernels == "triton"  # the default
