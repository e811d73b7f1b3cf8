"""Planning: profile, devices, plan validation, the five strategies, JSON, plot, commands.
Pure and fast: no torch device, no checkpoint."""

from __future__ import annotations

import itertools
import json
import math
import random

import pytest

from llamadist.config import ModelConfig, named_shape
from llamadist.planning import devices as devmod
from llamadist.cli.plan import analyze_command, plan_command
from llamadist.planning.devices import DeviceSpec, parse_devices, parse_memory
from llamadist.planning.plan import Plan, Stage, format_plan_table, validate_stages
from llamadist.planning.profile import ModelProfile, format_profile_table, profile
from llamadist.planning.strategies import (STRATEGIES, CostModel, headroom_bytes, make_plan,
                                           parse_boundaries)
from llamadist.planning.units import PlanningError

GIB = 2**30


def tiny(num_layers: int = 6, tied: bool = False, **kw) -> ModelConfig:
    base = dict(vocab_size=64, hidden_size=16, intermediate_size=40, num_layers=num_layers,
                num_heads=4, num_kv_heads=2, head_dim=4, max_position_embeddings=128,
                tie_word_embeddings=tied)
    return ModelConfig(**{**base, **kw})


def cpu(mem: int, speed: float = 1.0, name: str = "cpu") -> DeviceSpec:
    return DeviceSpec(name, mem, speed, "cpu", 4e14 * speed, 3e12 * speed)


BIG = 10**12


# ---- profile -------------------------------------------------------------
@pytest.mark.parametrize("shape,params", [("smollm2-135m", 134_515_008),
                                          ("llama3-8b", 8_030_261_248)])
def test_profile_param_counts_match_hf(shape, params):
    p = profile(named_shape(shape))
    assert p.total_params == params
    assert p.total_weight_bytes == 2 * params
    assert len(p.layers) == named_shape(shape).num_layers


def test_profile_rows_formulas():
    cfg = tiny(4, attention_bias=True, mlp_bias=True)
    p = profile(cfg, dtype="float32", seq_len=10)
    d, f, q, kv = 16, 40, 16, 8
    layer = p.layers[0]
    assert layer.params == d * q + 2 * d * kv + q * d + 3 * d * f + (q + 2 * kv + d) + \
        (2 * f + d) + 2 * d
    assert layer.weight_bytes == 4 * layer.params
    assert layer.kv_bytes_per_token == 2 * 2 * 4 * 4
    matmul = 2 * (d * q + 2 * d * kv + q * d + 3 * d * f)
    assert layer.decode_flops_per_token == matmul + 4 * 10 * 4 * 4
    assert layer.prefill_flops == matmul * 10 + 4 * 4 * 4 * (10 * 11 // 2)
    assert p.embed.params == 64 * 16 and p.embed.decode_flops_per_token == 0
    assert p.head.params == 64 * 16 + 16 and not p.head.tied


def test_profile_tied_head_is_its_own_row():
    p = profile(tiny(3, tied=True), dtype="bf16")
    assert p.head.tied and p.head.weight_bytes == (64 * 16 + 16) * 2
    assert p.total_weight_bytes == sum(r.weight_bytes for r in p.rows) - p.embed.weight_bytes
    assert "tied" in format_profile_table(p)


def test_profile_json_round_trip_and_table():
    p = profile(named_shape("smollm2-135m"), dtype="float16", seq_len=256)
    assert ModelProfile.from_json(p.to_json()) == p
    d = json.loads(p.to_json())
    assert d["totals"]["params"] == p.total_params
    table = format_profile_table(p)
    assert "MiB" in table and "GFLOP" in table and "embed" in table and "head" in table


def test_profile_bad_dtype():
    with pytest.raises(PlanningError, match="bfloat16.*float16.*float32"):
        profile(tiny(), dtype="int3")


# ---- devices -------------------------------------------------------------
@pytest.mark.parametrize("text,expected", [
    ("20GiB", 20 * GIB), ("512MiB", 512 * 2**20), ("1.5GB", 1_500_000_000), ("1000", 1000),
    ("2 gib", 2 * GIB), ("4G", 4 * GIB), ("10KB", 10_000), ("0", 0), (2048, 2048)])
def test_parse_memory(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("bad", ["abc", "", "12XB", "-5GiB", "1.2.3GiB", "GiB"])
def test_parse_memory_garbage(bad):
    with pytest.raises(PlanningError, match="cannot parse memory size.*GiB"):
        parse_memory(bad)


@pytest.fixture
def one_gpu(monkeypatch):
    monkeypatch.setattr(devmod, "_cuda_inventory", lambda: [("NVIDIA A100-SXM4-80GB", 80 * GIB)])
    monkeypatch.setattr(devmod, "_cpu_available_bytes", lambda: 64 * GIB)


def test_parse_devices_explicit(one_gpu):
    specs = parse_devices("cuda:0,cuda:0,cpu", max_memory="20GiB,10GiB,64GiB", speeds="1,1,0.05")
    assert [s.name for s in specs] == ["cuda:0", "cuda:0", "cpu"]
    assert [s.memory_bytes for s in specs] == [20 * GIB, 10 * GIB, 64 * GIB]
    assert specs[2].speed == 0.05 and specs[2].flops == pytest.approx(0.05 * specs[0].flops)
    assert specs[2].kind == "cpu"


def test_parse_devices_discovered_splits_shared_devices(one_gpu):
    specs = parse_devices("cuda:0,cuda:0,cpu,cpu")
    assert [s.memory_bytes for s in specs] == [40 * GIB, 40 * GIB, 32 * GIB, 32 * GIB]
    assert specs[0].flops == 2e14  # A100 default rates from the device name
    specs = parse_devices("cpu,cpu", max_memory="16GiB,auto")
    assert [s.memory_bytes for s in specs] == [16 * GIB, 48 * GIB]
    assert [s.name for s in parse_devices(None)] == ["cuda:0"]
    assert parse_devices("cuda")[0].name == "cuda:0"


def test_parse_devices_cpu_defaults(one_gpu):
    spec = parse_devices("cpu")[0]
    assert (spec.flops, spec.mem_bandwidth) == (1e11, 2e10)
    assert spec.memory_bytes == 64 * GIB


@pytest.mark.parametrize("bad,needle", [("tpu:0", "valid forms: cpu, cuda, cuda:N"),
                                        ("cuda:x", "valid forms")])
def test_parse_devices_unknown(one_gpu, bad, needle):
    with pytest.raises(PlanningError) as e:
        parse_devices(bad)
    assert needle in str(e.value) and "cuda:0" in str(e.value)


def test_parse_devices_offline_planning(one_gpu):
    specs = parse_devices("cuda:5,cuda:6", "80GiB,80GiB", check_available=False)
    assert specs[1].name == "cuda:6" and specs[1].memory_bytes == 80 * GIB
    with pytest.raises(PlanningError, match="cuda:5.*--max-memory"):
        parse_devices("cuda:5", check_available=False)


def test_parse_devices_count_mismatch(one_gpu):
    with pytest.raises(PlanningError, match=r"3 devices .* but 2 --max-memory budgets"):
        parse_devices("cuda:0,cpu,cpu", max_memory="1GiB,2GiB")
    with pytest.raises(PlanningError, match=r"2 devices .* but 3 --device-speed"):
        parse_devices("cpu,cpu", speeds="1,1,1")
    with pytest.raises(PlanningError, match="positive"):
        parse_devices("cpu", speeds="0")


# ---- plan validation -----------------------------------------------------
def stages_of(ranges):
    k = len(ranges)
    return [Stage(i, s, e, "cpu", i == 0, i == k - 1) for i, (s, e) in enumerate(ranges)]


@pytest.mark.parametrize("ranges,n,needle", [
    ([(0, 7), (9, 30)], 30, "layers 7..8 are in no stage"),
    ([(0, 7), (8, 30)], 30, "layer 7 is in no stage"),
    ([(0, 8), (7, 30)], 30, "layer 7 is in stages 0 and 1"),
    ([(0, 9), (7, 30)], 30, "layers 7..8 are in stages 0 and 1"),
    ([(0, 10), (10, 20), (20, 31)], 30, "stage 2 ends at 31 but the model has 30 layers"),
    ([(0, 10), (10, 10), (10, 30)], 30, "stage 1 is empty"),
    ([(10, 30), (0, 10)], 30, "stage 1 starts at 0 but stage 0 ends at 30"),
])
def test_validate_errors(ranges, n, needle):
    with pytest.raises(PlanningError) as e:
        validate_stages(stages_of(ranges), n)
    assert needle in str(e.value)


def test_validate_embed_and_head_placement():
    st = [Stage(0, 0, 3, "cpu", False, False), Stage(1, 3, 6, "cpu", True, True)]
    with pytest.raises(PlanningError) as e:
        validate_stages(st, 6)
    assert "stage 0 lacks the embedding" in str(e.value)
    assert "stage 1 holds the embedding" in str(e.value)


# ---- strategies: helpers --------------------------------------------------
def check_invariants(plan: Plan, prof: ModelProfile, devs) -> None:
    plan.validate(prof.num_layers)
    assert len(plan.stages) == len(devs)
    assert plan.stages[0].start == 0 and plan.stages[-1].end == prof.num_layers
    assert all(s.predicted_time_s > 0 for s in plan.stages)
    assert [s.device for s in plan.stages] == [d.name for d in devs]


def all_splits(n: int, k: int):
    for cuts in itertools.combinations(range(1, n), k - 1):
        yield list(cuts) + [n]


def brute(prof, devs, batch, ctx, headroom, objective):
    cm, k = CostModel.build(prof, batch, ctx), len(devs)
    usable = [d.memory_bytes - headroom_bytes(d, headroom) for d in devs]
    best = math.inf
    for ends in all_splits(prof.num_layers, k):
        starts = [0] + ends[:-1]
        costs = []
        for i, (s, e) in enumerate(zip(starts, ends)):
            mem = cm.memory(s, e, i == 0, i == k - 1)
            t = cm.time(devs[i], s, e, i == 0, i == k - 1)
            if objective == "memory":
                costs.append(mem / usable[i])
            elif objective == "mixed":
                costs.append(t if mem <= usable[i] else math.inf)
            else:
                costs.append(t)
        best = min(best, max(costs))
    return best


def plan_objective(plan, usable, objective):
    if objective == "memory":
        return max(s.memory_bytes / u for s, u in zip(plan.stages, usable))
    return plan.bottleneck_s


# ---- strategies ------------------------------------------------------------
@pytest.mark.parametrize("shape", ["smollm2-135m", "llama3-8b"])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("strategy", ["uniform", "memory", "compute", "mixed"])
def test_strategies_on_named_shapes(shape, k, strategy):
    prof = profile(named_shape(shape), seq_len=2048)
    devs = [cpu(64 * GIB, speed=1.0 / (i + 1)) for i in range(k)]
    plan = make_plan(prof, devs, strategy, batch_size=2)
    check_invariants(plan, prof, devs)
    assert plan.max_seq_len == 2048 and plan.batch_size == 2
    assert sum(s.num_layers for s in plan.stages) == prof.num_layers
    if strategy == "uniform":
        counts = [s.num_layers for s in plan.stages]
        assert max(counts) - min(counts) <= 1 and counts == sorted(counts, reverse=True)


def test_uniform_remainder_to_first_stages():
    plan = make_plan(profile(tiny(10)), [cpu(BIG)] * 4, "uniform")
    assert plan.boundaries == ((0, 3), (3, 6), (6, 8), (8, 10))


@pytest.mark.parametrize("objective", ["memory", "compute", "mixed"])
def test_dp_matches_brute_force(objective):
    rng = random.Random(1234)
    checked = 0
    for trial in range(60):
        n, k = rng.randint(1, 9), rng.randint(1, 4)
        if k > n:
            continue
        prof = profile(tiny(n, tied=rng.random() < 0.5), seq_len=rng.choice([8, 64]))
        per_layer = prof.layers[0].weight_bytes
        devs = [cpu(rng.randint(per_layer, per_layer * (n + 4)), rng.choice([1, 0.5, 0.05, 2]))
                for _ in range(k)]
        batch, ctx = rng.randint(1, 3), rng.choice([8, 100])
        want = brute(prof, devs, batch, ctx, 0.0, objective)
        if want == math.inf or (objective == "memory" and want > 1):
            with pytest.raises(PlanningError, match="needs .* more"):
                make_plan(prof, devs, objective, batch_size=batch, max_seq_len=ctx, headroom=0.0)
            continue
        plan = make_plan(prof, devs, objective, batch_size=batch, max_seq_len=ctx, headroom=0.0)
        check_invariants(plan, prof, devs)
        usable = [d.memory_bytes for d in devs]
        assert plan_objective(plan, usable, objective) == pytest.approx(want, rel=1e-9)
        checked += 1
    assert checked > 15


def test_random_inputs_keep_invariants_and_budgets():
    rng = random.Random(7)
    for trial in range(150):
        n = rng.randint(1, 40)
        k = rng.randint(1, min(n, 6))
        prof = profile(tiny(n, tied=rng.random() < 0.5), seq_len=32)
        per_layer = prof.layers[0].weight_bytes
        devs = [cpu(rng.randint(per_layer, per_layer * (2 * n // k + 6)),
                    rng.choice([1, 0.3, 0.05])) for _ in range(k)]
        headroom = rng.choice([0.0, 0.1, 500])
        for strategy in ("uniform", "memory", "compute", "mixed"):
            try:
                plan = make_plan(prof, devs, strategy, batch_size=rng.randint(1, 4),
                                 headroom=headroom)
            except PlanningError as e:
                assert strategy in ("memory", "mixed") and "cpu" in str(e)
                assert "bytes" in str(e)
                continue
            check_invariants(plan, prof, devs)
            if strategy in ("memory", "mixed"):
                for s, d in zip(plan.stages, devs):
                    assert s.memory_bytes <= d.memory_bytes - headroom_bytes(d, headroom)
                    assert s.shortfall_bytes == 0


def test_memory_heterogeneous_budgets_fill_proportionally():
    prof = profile(named_shape("llama3-8b"), seq_len=1024)
    devs = [cpu(12 * GIB, name="cuda:0"), cpu(4 * GIB, name="cuda:1"),
            cpu(2 * GIB, name="cuda:2")]
    plan = make_plan(prof, devs, "memory")
    counts = [s.num_layers for s in plan.stages]
    assert counts[0] > counts[1] > counts[2]
    for s, d in zip(plan.stages, devs):
        assert s.memory_bytes <= 0.9 * d.memory_bytes


def test_tied_head_counts_a_copy_only_on_another_stage():
    prof = profile(tiny(4, tied=True))
    one = make_plan(prof, [cpu(BIG)], "uniform")
    two = make_plan(prof, [cpu(BIG), cpu(BIG)], "uniform")
    emb = prof.embed.weight_bytes
    assert one.stages[0].weight_bytes == prof.total_weight_bytes
    assert sum(s.weight_bytes for s in two.stages) == prof.total_weight_bytes + emb


def test_memory_shortfall_error_names_device_and_bytes():
    prof = profile(named_shape("llama3-8b"), seq_len=4096)
    devs = parse_devices("cpu,cpu", "8GiB,4GiB", check_available=False)
    devs = [devs[0], DeviceSpec("cuda:1", 4 * GIB, 1.0, "cuda")]
    for strategy in ("memory", "mixed"):
        with pytest.raises(PlanningError) as e:
            make_plan(prof, devs, strategy)
        msg = str(e.value)
        assert "needs" in msg and "more" in msg and "GiB" in msg
        assert f"budget {4 * GIB} bytes" in msg or f"budget {8 * GIB} bytes" in msg
        assert "fits in" in msg and "of 32 layers" in msg


def test_mixed_respects_memory_where_compute_does_not():
    prof = profile(tiny(12), seq_len=16)
    per = prof.layers[0].weight_bytes + prof.layers[0].kv_bytes_per_token * 16
    fast_small = cpu(per * 3 + prof.embed.weight_bytes, 1.0)
    slow_big = cpu(BIG, 0.01)
    compute = make_plan(prof, [fast_small, slow_big], "compute", max_seq_len=16, headroom=0)
    mixed = make_plan(prof, [fast_small, slow_big], "mixed", max_seq_len=16, headroom=0)
    assert compute.stages[0].shortfall_bytes > 0
    assert mixed.stages[0].shortfall_bytes == 0 and mixed.stages[0].num_layers == 3
    assert mixed.bottleneck_s >= compute.bottleneck_s


def test_compute_puts_more_layers_on_faster_device():
    prof = profile(named_shape("llama3-8b"), seq_len=1024)
    plan = make_plan(prof, [cpu(BIG, 1.0), cpu(BIG, 0.25)], "compute")
    assert plan.stages[0].num_layers > 3 * plan.stages[1].num_layers - 8


def test_no_usable_memory_error():
    with pytest.raises(PlanningError, match="cuda:1 has no usable memory"):
        make_plan(profile(tiny(4)), [cpu(BIG), cpu(10, name="cuda:1")], "memory", headroom=100)


def test_more_stages_than_layers_and_unknown_strategy():
    with pytest.raises(PlanningError, match="5 pipeline stages .* only 4 layers.*--pp 4"):
        make_plan(profile(tiny(4)), [cpu(BIG)] * 5, "uniform")
    with pytest.raises(PlanningError) as e:
        make_plan(profile(tiny(4)), [cpu(BIG)], "greedy")
    assert all(s in str(e.value) for s in STRATEGIES)


# ---- custom ----------------------------------------------------------------
def test_custom_boundaries_string_list_and_file(tmp_path):
    prof = profile(named_shape("smollm2-135m"))
    devs = [cpu(BIG)] * 3
    a = make_plan(prof, devs, "custom", "0:7,7:19,19:30")
    b = make_plan(prof, devs, "custom", [(0, 7), (7, 19), (19, 30)])
    assert a.boundaries == b.boundaries == ((0, 7), (7, 19), (19, 30))
    path = a.save(tmp_path / "plan.json")
    c = make_plan(prof, devs, "custom", str(path))
    assert c.boundaries == a.boundaries and c.strategy == "custom"
    assert parse_boundaries("0:1, 1:2") == [(0, 1), (1, 2)]


@pytest.mark.parametrize("bounds,needle", [
    ("0:7,9:30", "layers 7..8 are in no stage"),
    ("0:8,7:30", "layer 7 is in stages 0 and 1"),
    ("0:10,10:31", "stage 1 ends at 31 but the model has 30 layers"),
    ("0:10,10:20,20:30", "3 custom stages"),
    ("0-10,10-30", "cannot parse boundaries"),
])
def test_custom_errors(bounds, needle):
    prof = profile(named_shape("smollm2-135m"))
    with pytest.raises(PlanningError) as e:
        make_plan(prof, [cpu(BIG)] * 2, "custom", bounds)
    assert needle in str(e.value)
    with pytest.raises(PlanningError, match="needs boundaries"):
        make_plan(prof, [cpu(BIG)] * 2, "custom")


# ---- JSON, table, plot, commands ---------------------------------------------
def test_plan_json_round_trip(tmp_path):
    prof = profile(named_shape("llama3-8b"))
    for strategy in ("uniform", "memory", "compute", "mixed"):
        plan = make_plan(prof, [cpu(40 * GIB), cpu(40 * GIB, 0.5)], strategy)
        assert Plan.from_json(plan.to_json()) == plan
        assert Plan.load(plan.save(tmp_path / f"{strategy}.json")) == plan
    table = format_plan_table(plan)
    assert "embed" in table and "head" in table and "GiB" in table
    with pytest.raises(PlanningError, match="not valid JSON"):
        Plan.from_json("{")
    with pytest.raises(PlanningError, match="no plan file"):
        Plan.load(tmp_path / "missing.json")


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    from llamadist.planning.plot import plot_plan
    devs = [cpu(20 * GIB), cpu(12 * GIB, 0.5)]
    plan = make_plan(profile(named_shape("llama3-8b")), devs, "mixed")
    out = plot_plan(plan, devs, tmp_path / "plan.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_commands(tmp_path, one_gpu):
    cfg = named_shape("smollm2-135m")
    assert "layers.0-29" in analyze_command(cfg)
    assert json.loads(analyze_command(cfg, dtype="float32", as_json=True))["dtype"] == "float32"
    text = plan_command(cfg, devices="cpu,cpu", max_memory="1GiB,1GiB", strategy="memory",
                        save=str(tmp_path / "p.json"), batch_size=2, max_seq_len=512)
    assert "saved plan" in text and "[0," in text
    out = plan_command(cfg, plan_file=str(tmp_path / "p.json"), as_json=True)
    again = Plan.from_json(out)
    assert again.strategy == "custom" and again.devices == ("cpu", "cpu")
    assert again.boundaries == Plan.load(tmp_path / "p.json").boundaries
    warn = plan_command(cfg, devices="cpu,cpu", max_memory="100MiB,10MiB", strategy="uniform")
    assert "error: stage 1 on cpu needs" in warn


def test_plot_without_matplotlib_names_pip_install(tmp_path, monkeypatch):
    import sys
    from llamadist.planning.plot import plot_plan
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    plan = make_plan(profile(tiny(4)), [cpu(BIG)], "uniform")
    with pytest.raises(PlanningError, match="pip install matplotlib"):
        plot_plan(plan, None, tmp_path / "x.png")
