"""The layout a run uses: which layers each pipeline stage holds, on which device, and the
process grid (tp x pp x dp) around them. Decided once, before any process starts or any
weight loads, from the user's placement flags, a plan file or the auto planner."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping

from llamadist.config import ModelConfig, default_devices
from llamadist.planning.units import PlanningError

if TYPE_CHECKING:
    from llamadist.planning.experts import ExpertPlacement


@dataclass(frozen=True)
class Layout:
    """Resolved placement.

    layer_ranges  half-open layer range of each pipeline stage
    devices       one device per stage; over processes a bare kind ("cuda", "cpu") means
                  each rank's own device of that kind (cuda:LOCAL_RANK)
    tp, dp        tensor-parallel ranks per stage and data-parallel replicas
    cp            context-parallel ranks per stage (each holds a stripe of every request)
    processes     1: every stage runs in this process; else pp x cp x tp x dp ranks
    why           how it was chosen (the auto planner's reason), for the user
    ep            ranks one stage's experts are spread over (planning.checks.check_ep): 1,
                  tp, or tp x dp (then the data-parallel replicas step in lockstep)
    weight_formats  each stage's --quantize format as the planner chose it (--fit-bits;
                  None: the dtype); () when the planner chose none. Kept in the JSON, so
                  a process given this layout loads the formats its front planned.
    expert_shares with ep > tp: the experts each EP rank owns (planning.experts.
                  run_shares: --expert-split, by memory when the ranks' budgets differ);
                  () = the even shares. Kept in the JSON: every rank loads these.
    """
    layer_ranges: tuple[range, ...]
    devices: tuple[str, ...]
    tp: int = 1
    dp: int = 1
    processes: int = 1
    why: str = ""
    plan: object | None = field(default=None, compare=False)  # the planning.Plan, if any
    cp: int = 1
    ep: int = 1
    weight_formats: tuple[str | None, ...] = ()
    expert_shares: tuple[tuple[int, ...], ...] = ()

    @property
    def stage_formats(self) -> tuple[str | None, ...]:
        """Each stage's weight format: ``weight_formats``, else the plan's (Stage.
        weight_format); () when neither gives any."""
        fmts = self.weight_formats or tuple(getattr(s, "weight_format", None)
                                            for s in getattr(self.plan, "stages", ()))
        return fmts if any(fmts) else ()

    @property
    def lockstep(self) -> bool:
        """The experts span data-parallel replicas: every replica joins every step."""
        return self.ep > self.tp

    @property
    def pp(self) -> int:
        return len(self.layer_ranges)

    @property
    def bounds(self) -> str:
        return ",".join(f"{r.start}:{r.stop}" for r in self.layer_ranges)

    def to_json(self) -> str:
        return json.dumps({"layers": [[r.start, r.stop] for r in self.layer_ranges],
                           "devices": list(self.devices), "tp": self.tp, "dp": self.dp,
                           "processes": self.processes, "why": self.why, "cp": self.cp,
                           "ep": self.ep, "weight_formats": list(self.stage_formats),
                           "expert_shares": [list(s) for s in self.expert_shares]})

    @classmethod
    def from_json(cls, text: str) -> "Layout":
        d = json.loads(text)
        return cls(tuple(range(a, b) for a, b in d["layers"]), tuple(d["devices"]), d["tp"],
                   d["dp"], d["processes"], d.get("why", ""), cp=d.get("cp", 1),
                   ep=d.get("ep", 1), weight_formats=tuple(d.get("weight_formats", ())),
                   expert_shares=tuple(tuple(s) for s in d.get("expert_shares", ())))


def stage_devices(devices: str | None, pp: int, gpus: int | None = None) -> list[str]:
    """The device names the planner sees, one per stage. ``--devices cuda`` (or cpu) over
    processes means every rank uses its own cuda:LOCAL_RANK; the planner is told
    cuda:0..pp-1 (a single host's view, or identical hosts), wrapped round-robin over
    ``gpus`` when a run has fewer GPUs than stages (they share)."""
    names = [d.strip() for d in (devices or default_devices(processes=True)).split(",")
             if d.strip()]
    if len(names) == pp:
        return names
    if len(names) != 1:
        raise PlanningError(f"--devices lists {len(names)} devices for {pp} pipeline stages: "
                            f"give one per stage, or one kind (cpu or cuda) for all")
    if names[0].startswith("cuda") and ":" not in names[0]:
        return [f"cuda:{i % (gpus or pp)}" for i in range(pp)]
    return [names[0]] * pp


def resolve_layout(config: ModelConfig, *, devices: str | list[str] | None = None,
                   strategy: str | None = None, max_memory: str | None = None,
                   device_speed: str | None = None, boundaries: str | None = None,
                   plan: str | None = None, dtype: str, max_batch: int, max_seq_len: int,
                   tp: int = 1, cp: int = 1, ep: int = 1,
                   quantize: str | None = None, fit_bits: bool = False,
                   one_format: bool = False, quantize_head: bool = False,
                   experts: "ExpertPlacement | None" = None,
                   held: "Mapping[str, Mapping[str, tuple[int, int]]] | None" = None) -> Layout:
    """The user's placement options turned into stages through the planner, every stage
    checked against its device's budget for this run's batch, KV length, ``tp`` (each
    stage then a tensor-parallel group: memory per shard), ``cp`` (KV per context-parallel
    rank) and ``ep`` (experts per rank). A plan file gives the stages; they are costed
    again on this run's devices, budgets and lengths, not the file's.
    ``quantize`` (RuntimeConfig.quantize): each stage's weights counted in its format
    (``quantize_head``: the last stage's head too, a plan file's format where --quantize
    is not given; under ``fit_bits`` a tied head counted as its own copy as stored, an
    upper bound).
    ``fit_bits`` (--fit-bits): each device's format chosen as `plan --fit-bits` chooses it
    (planning.bits.choose_bits; ``one_format``: one for every stage, as stages over
    processes need), a plan file's formats chosen again; the Layout's ``why`` then holds
    the report `plan` prints (bits_report). ``experts`` (planning.experts.ExpertPlacement,
    e.g. run_placement's with hot-expert replicas): each stage's memory counts its busiest
    EP rank's experts; a refusal then says how many it holds. ``held``: a quantized
    checkpoint's tensors as a --weights native run holds them per device kind
    (profile.native_profile; weights.loader.native_bytes), counted in those bytes."""
    from llamadist.planning.devices import check_devices_present, parse_devices
    from llamadist.planning.plan import Plan
    from llamadist.planning.profile import native_profile, profile

    if isinstance(devices, (list, tuple)):
        devices = ",".join(devices)
    saved_formats = None
    if plan is not None:
        if strategy not in (None, "custom") or boundaries is not None:
            raise PlanningError(f"--plan {plan} gives the stages: drop --strategy and "
                                f"--boundaries (or drop --plan)")
        saved = Plan.load(plan)
        saved.validate(config.num_layers)
        devices = devices or ",".join(saved.devices)
        strategy, boundaries = "custom", ",".join(f"{s.start}:{s.end}" for s in saved.stages)
        if any(s.weight_format for s in saved.stages):
            saved_formats = [s.weight_format for s in saved.stages]
    devices = devices or default_devices()
    check_devices_present([d.strip() for d in devices.split(",") if d.strip()])
    specs = parse_devices(devices, max_memory=max_memory, speeds=device_speed)
    prof = profile(config, dtype=dtype, seq_len=max_seq_len)
    if held:
        prof = native_profile(prof, held)
    kw = dict(boundaries=boundaries, batch_size=max_batch, max_seq_len=max_seq_len, tp=tp,
              config=config, cp=cp, ep=ep, experts=experts)
    try:
        p, why = _placed(prof, specs, strategy, kw, quantize, fit_bits, one_format, plan,
                         saved_formats, quantize_head)
    except PlanningError as e:
        from llamadist.planning.experts import replicas_refusal
        raise replicas_refusal(e, experts, config.num_layers) from None
    return Layout(tuple(range(s.start, s.end) for s in p.stages),
                  tuple(s.device for s in p.stages), why=why, plan=p)


def _placed(prof, specs, strategy, kw, quantize, fit_bits, one_format, plan, saved_formats,
            quantize_head=False):
    """resolve_layout's checked plan and its --fit-bits report ("" without)."""
    from llamadist.config import quantize_for
    from llamadist.planning.checks import check_fits
    from llamadist.planning.profile import planned_head
    from llamadist.planning.strategies import make_plan
    why = ""
    if fit_bits:
        from llamadist.planning.bits import bits_report, check_fit_bits, choose_bits
        check_fit_bits(quantize)
        prof = planned_head(prof, quantize_head, chosen_later=True)
        p = check_fits(choose_bits(prof, specs, strategy, one_format, **kw).plan)
        why = "\n".join(bits_report(p, prof, specs))
    else:
        formats = [quantize_for(quantize, d.name) for d in specs]
        if saved_formats is not None:
            formats = _plan_formats(plan, saved_formats, [d.name for d in specs], quantize,
                                    formats)
        prof = planned_head(prof, quantize_head, formats, specs)
        p = check_fits(make_plan(prof, specs, strategy=strategy,
                                 formats=formats if any(formats) else None, **kw))
    return p, why


def _plan_formats(path: str, saved: list[str | None], devices: list[str],
                  quantize: str | None, asked: list[str | None]) -> list[str | None]:
    """A plan file's per-stage weight formats on this run's devices (stage i on devices[i]),
    refused where a device cannot run its format or where --quantize says otherwise."""
    from llamadist.planning.plan import format_problem
    if len(saved) != len(devices):
        return saved   # make_plan refuses the stage count, naming both
    for i, (fmt, dev) in enumerate(zip(saved, devices)):
        problem = format_problem(fmt, dev)
        if problem:
            raise PlanningError(f"--plan {path}: stage {i} runs on {dev} here, but {problem}; "
                                f"re-plan for these devices (llamadist plan ... --fit-bits)")
        if quantize is not None and asked[i] != fmt:
            raise PlanningError(
                f"--plan {path} gives stage {i} ({dev}) weights {fmt or 'as stored'}, but "
                f"--quantize {quantize} gives {asked[i] or 'none'}: drop --quantize (the plan's "
                f"formats are used) or re-plan with that format")
    return saved


def check_cpu_blocks(config: ModelConfig, layout: Layout, quantize: str | None) -> None:
    """A CPU stage quantized at load (--quantize int8 / int4) holds GGUF blocks of 32
    inputs: refuse, before anything starts, a layout whose CPU linears (each
    tensor-parallel rank's slice) take a number of inputs that is not a multiple of 32,
    naming the linear and the fixes (a worker would otherwise fail while loading)."""
    from llamadist.config import quantize_for
    from llamadist.planning.tp_shapes import tp_sizes
    cpus = {d for d in layout.devices if d.split(":")[0] == "cpu"}
    if not any(quantize_for(quantize, d) for d in cpus):
        return
    tp = layout.tp
    sizes = tp_sizes(config, 0, tp)
    split = f" / --tp {tp}" if tp > 1 else ""
    inputs = {"q/k/v and gate/up": (config.hidden_size, "hidden_size"),
              "o_proj": (sizes.q_heads * config.head_dim, f"heads x head_dim{split}")}
    if not config.num_experts:  # experts are not quantized
        inputs["down_proj"] = (sizes.intermediate, f"intermediate_size{split}")
    for name, (k, what) in inputs.items():
        if k % 32:
            raise PlanningError(
                f"--quantize {quantize}: the CPU stage's {name} would take {k} inputs "
                f"({what}), not a multiple of the 32 a GGUF block holds; leave the CPU "
                f"unquantized (--quantize cuda=FMT,cpu=none)"
                + (" or choose a --tp that splits it into multiples of 32" if split else ""))


def layout_quantize(layout: Layout, given: str | None,
                    plan_file: str | None = None) -> str | None:
    """The --quantize value a run with ``layout`` loads with: ``given``, or the formats the
    layout was planned with (Layout.stage_formats: --fit-bits, or the plan file's
    Stage.weight_format; resolve_layout has already refused a --quantize that disagrees
    with them), else of ``plan_file`` (a worker's layout comes without its plan). In one process each device gets its stage's format;
    over processes every rank's device is its own, so the stages must share one format."""
    from llamadist.planning.plan import Plan
    planned = layout.stage_formats
    if not planned and layout.plan is None and plan_file is not None and given is None:
        planned = tuple(s.weight_format for s in Plan.load(plan_file).stages)
    if given is not None or not any(planned):
        return given
    fmts = [f or "none" for f in planned]
    if layout.processes > 1:
        if len(set(fmts)) > 1:
            raise PlanningError(
                f"the plan gives its stages different weight formats ({', '.join(fmts)}), "
                f"which runs in one process only (stages over processes take one --quantize): "
                f"drop --nproc/--pp, or re-plan with one format for every device")
        return fmts[0]
    by_device: dict[str, str] = {}
    for dev, fmt in zip(layout.devices, fmts):
        if by_device.setdefault(dev, fmt) != fmt:
            raise PlanningError(
                f"the plan gives two stages on {dev} different weight formats "
                f"({by_device[dev]} and {fmt}), but a run quantizes per device: re-plan with "
                f"one format per device (llamadist plan ... --fit-bits does)")
    return ",".join(f"{d}={f}" for d, f in by_device.items())
