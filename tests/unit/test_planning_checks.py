"""Requests refused before any process starts or weight loads: impossible layouts, plans
over their budgets (KV cache included), devices absent at run time, broken plan files.
Pure: no torch device, no checkpoint."""

from __future__ import annotations

import json

import pytest

from llamadist.config import ModelConfig, named_shape
from llamadist.planning import devices as devmod
from llamadist.planning.auto import auto_plan
from llamadist.planning.checks import check_fits, check_grid, grid_problems, plan_problems
from llamadist.planning.devices import (DEVICE_SPEED_HELP, REFERENCE_BANDWIDTH,
                                        check_devices_present, parse_devices)
from llamadist.planning.plan import Plan
from llamadist.planning.profile import profile
from llamadist.planning.strategies import STRATEGIES, make_plan
from llamadist.planning.tp_shapes import valid_tp_sizes
from llamadist.planning.units import PlanningError, format_bytes

GIB = 2**30
SMOL = named_shape("smollm2-135m")      # 30 layers, 9 heads, 3 KV heads


@pytest.fixture
def cpu_only(monkeypatch):
    monkeypatch.setattr(devmod, "_cuda_inventory", lambda: [])
    monkeypatch.setattr(devmod, "_cpu_available_bytes", lambda: 64 * GIB)


# ---- layouts -----------------------------------------------------------------
def test_tp_that_does_not_divide_the_heads_is_refused_with_the_valid_sizes():
    assert valid_tp_sizes(SMOL) == [1, 3]    # 9 divides the heads, not intermediate 1536
    with pytest.raises(PlanningError) as e:
        check_grid(SMOL, None, None, tp=4)
    msg = str(e.value)
    assert "9 query heads to divide by 4" in msg and "valid --tp" in msg and msg.endswith("1, 3")
    assert "\n" not in msg


def test_nproc4_tp2_pp2_on_smollm2_is_refused():
    with pytest.raises(PlanningError, match=r"9 query heads to divide by 2.*: 1, 3$"):
        check_grid(SMOL, 4, 2, tp=2)


def test_more_stages_than_layers_is_refused():
    with pytest.raises(PlanningError) as e:
        check_grid(SMOL, 40, 40)
    assert "40 pipeline stages" in str(e.value) and "only 30 layers" in str(e.value)
    assert "--pp 30 or fewer" in str(e.value)


@pytest.mark.parametrize("nproc,pp,tp,dp,needle", [
    (6, 2, 1, 1, "--nproc 6 but pp=2 x tp=1 x dp=1 = 2"),
    (7, None, 3, 1, "--nproc 7 does not divide by tp=3 x dp=1 = 3"),
    (None, 2, 0, 1, "--tp must be >= 1, got 0"),
])
def test_grid_arithmetic_is_refused(nproc, pp, tp, dp, needle):
    with pytest.raises(PlanningError) as e:
        check_grid(SMOL, nproc, pp, tp, dp)
    assert needle in str(e.value)


def test_kv_heads_and_intermediate_size_are_checked():
    gqa = ModelConfig(vocab_size=100, hidden_size=96, intermediate_size=300, num_layers=4,
                      num_heads=12, num_kv_heads=4, head_dim=8)
    with pytest.raises(PlanningError, match=r"cannot place 4 KV heads.*4 % 6 = 4, 6 % 4 = 2"):
        check_grid(gqa, None, 1, tp=6)
    odd_ffn = ModelConfig(vocab_size=100, hidden_size=96, intermediate_size=302, num_layers=4,
                          num_heads=12, num_kv_heads=4, head_dim=8)
    with pytest.raises(PlanningError, match="intermediate_size 302 to divide by 4"):
        check_grid(odd_ffn, 4, 1, tp=4)


def test_a_valid_grid_is_filled_in():
    assert check_grid(SMOL, 6, None, tp=3) == (6, 2, 3, 1)
    assert check_grid(SMOL, None, None) == (1, 1, 1, 1)
    assert check_grid(SMOL, 12, 2, tp=3, dp=2) == (12, 2, 3, 2)
    with pytest.raises(PlanningError, match="intermediate_size 1536 to divide by 9"):
        check_grid(SMOL, 9, 1, tp=9)


def test_auto_and_the_strategies_use_the_same_grid_check():
    prof = profile(SMOL, seq_len=512)
    cands = auto_plan(prof, gpus=8, config=SMOL, top=1000)
    assert {c.tp for c in cands} == {1, 3}          # 2, 4, 5, 6, 7, 8 divide no 9 heads
    assert all(not grid_problems(30, c.tp * c.pp * c.dp, c.pp, c.tp, c.dp, SMOL) for c in cands)
    tiny = profile(named_shape("smollm2-135m"), seq_len=64)
    with pytest.raises(PlanningError, match="31 pipeline stages but the model has only 30"):
        make_plan(tiny, parse_devices(["cpu"] * 31, ["1GiB"] * 31), "uniform")


# ---- memory budgets, KV cache included --------------------------------------------
def test_uniform_over_budget_is_an_error_naming_device_need_budget_and_shortfall(cpu_only):
    prof = profile(SMOL, dtype="float32", seq_len=2048)
    plan = make_plan(prof, parse_devices("cpu,cpu", "1MiB,1MiB"), "uniform")
    problems = plan_problems(plan)
    assert len(problems) == 2
    with pytest.raises(PlanningError) as e:
        check_fits(plan)
    msg, s0 = str(e.value), plan.stages[0]
    assert "stage 0 on cpu" in msg and "stage 1 on cpu" in msg
    assert f"needs {format_bytes(s0.memory_bytes)}" in msg
    assert f"budget {format_bytes(1 << 20)}" in msg and f"{format_bytes(s0.shortfall_bytes)} short" in msg
    assert "--max-memory" in msg and "\n" not in msg


@pytest.mark.parametrize("strategy", [s for s in STRATEGIES])
def test_every_strategy_honours_the_budgets(strategy, cpu_only):
    prof = profile(SMOL, dtype="float32", seq_len=512)
    devs = parse_devices("cpu,cpu", "1MiB,1MiB")
    bounds = "0:15,15:30" if strategy == "custom" else None
    with pytest.raises(PlanningError, match=r"needs .*(short|more)"):
        check_fits(make_plan(prof, devs, strategy, bounds))


def test_a_plan_that_fits_passes():
    plan = make_plan(profile(SMOL, seq_len=512), parse_devices("cpu,cpu", "4GiB,4GiB"))
    assert check_fits(plan) is plan and plan_problems(plan) == []


def test_a_kv_cache_too_large_for_the_device_is_refused_with_the_numbers():
    # SmolLM2 in float32 at a million tokens: 30 layers x 2 x 3 KV heads x 64 x 4 bytes
    # = 46,080 bytes a token, 42.92 GiB of KV for a 24 GiB machine.
    prof = profile(SMOL, dtype="float32", seq_len=1_000_000)
    plan = make_plan(prof, parse_devices("cpu", "24GiB"), "uniform", max_seq_len=1_000_000)
    assert plan.stages[0].kv_bytes == 46_080 * 1_000_000
    with pytest.raises(PlanningError) as e:
        check_fits(plan)
    msg = str(e.value)
    assert "KV cache 42.92 GiB" in msg and "budget 24.00 GiB" in msg
    assert "batch 1 x 1000000 tokens" in msg and "--max-seq-len" in msg


# ---- devices that are not here ------------------------------------------------------
def test_plan_for_gpus_on_a_cpu_only_machine(cpu_only):
    specs = parse_devices("cuda:0,cuda:1,cpu", "80GiB,80GiB,64GiB", "1,1,0.05")
    assert [s.name for s in specs] == ["cuda:0", "cuda:1", "cpu"]
    assert [s.memory_bytes for s in specs] == [80 * GIB, 80 * GIB, 64 * GIB]
    assert specs[2].mem_bandwidth == pytest.approx(0.05 * REFERENCE_BANDWIDTH)
    plan = check_fits(make_plan(profile(named_shape("llama3-70b")), specs, "mixed"))
    assert plan.devices == ("cuda:0", "cuda:1", "cpu")


def test_explicit_budgets_and_speeds_plan_without_asking_torch(monkeypatch):
    def no_torch():
        raise AssertionError("planning with explicit budgets and speeds must not ask torch")
    monkeypatch.setattr(devmod, "_cuda_inventory", no_torch)
    specs = parse_devices("cuda:0,cuda:1,cpu", "80GiB,80GiB,64GiB", "1,1,0.05")
    assert [s.speed for s in specs] == [1.0, 1.0, 0.05]


def test_an_absent_device_needs_an_explicit_budget(cpu_only):
    with pytest.raises(PlanningError) as e:
        parse_devices("cuda:0,cpu", ",64GiB")
    assert "cuda:0 is not present here" in str(e.value) and "--max-memory" in str(e.value)


def test_running_on_an_absent_device_is_refused(cpu_only):
    check_devices_present(["cpu", "cpu"])
    with pytest.raises(PlanningError) as e:
        check_devices_present(["cuda:0", "cpu", "cuda:1"])
    msg = str(e.value)
    assert "devices cuda:0, cuda:1 are not present" in msg and "present: cpu" in msg
    with pytest.raises(PlanningError, match="cuda:2 is not present"):
        parse_devices("cuda:2", "80GiB", check_available=True)


def test_device_speed_help_says_what_one_means():
    assert "1.0 = an H100" in DEVICE_SPEED_HELP and "3 TB/s" in DEVICE_SPEED_HELP


# ---- plan files --------------------------------------------------------------------
def _plan_dict() -> dict:
    plan = make_plan(profile(SMOL, seq_len=64), parse_devices("cpu,cpu", "4GiB,4GiB"))
    return plan.to_dict()


@pytest.mark.parametrize("mutate,needle", [
    (lambda d: d["stages"][1].update(end="30"), "field 'stages[1].end' must be an integer"),
    (lambda d: d["stages"][0].pop("device"), "field 'stages[0].device' is missing"),
    (lambda d: d.update(num_layers=None), "field 'num_layers' must be an integer, got null"),
    (lambda d: d.update(stages={}), "field 'stages' must be a non-empty list"),
    (lambda d: d.update(tp=4), "field 'tp' is 4, but a plan holds only the pipeline split"),
    (lambda d: d.update(colour="red"), "field 'colour' is not a field of a plan"),
    (lambda d: d["stages"][0].update(has_head="no"), "'stages[0].has_head' must be true or false"),
    (lambda d: d["stages"][1].update(start=14), "layer 14 is in stages 0 and 1"),
    (lambda d: d.update(batch_size=0), "field 'batch_size' must be at least 1"),
])
def test_a_wrongly_shaped_plan_file_names_the_file_and_the_field(tmp_path, mutate, needle):
    d = _plan_dict()
    mutate(d)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(d))
    with pytest.raises(PlanningError) as e:
        Plan.load(path)
    assert f"plan file {path}" in str(e.value) and needle in str(e.value)


@pytest.mark.parametrize("content,needle", [
    (b"[1, 2]", "expected a JSON object"), (b"{not json", "is not valid JSON"),
    (b"\xff\xfe\x00binary", "cannot be read as text")])
def test_a_garbage_plan_file_names_the_file(tmp_path, content, needle):
    path = tmp_path / "garbage.json"
    path.write_bytes(content)
    with pytest.raises(PlanningError) as e:
        Plan.load(path)
    assert str(path) in str(e.value) and needle in str(e.value)


def test_an_old_plan_file_with_tp_1_still_loads(tmp_path):
    d = _plan_dict()
    path = tmp_path / "old.json"
    path.write_text(json.dumps({**d, "tp": 1}))
    assert Plan.load(path).to_dict() == d
