"""The plan: which device runs which contiguous, half-open range [start, end) of decoder
layers, with the embedding on the first stage and the head on the last. Frozen, JSON
round-trippable, and checked by ``validate`` with errors that name the offending layers.

A plan is the pipeline split of one replica and nothing more: tensor and data parallelism
are chosen at run time (``--tp``, ``--dp``), so a plan does not claim them."""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

from llamadist.config import CPU_QUANTIZE_FORMATS, QUANTIZE_FORMATS
from llamadist.planning.units import PlanningError, format_bytes, format_seconds

PLAN_FORMAT = "llamadist.plan/1"
# The weight formats (--quantize) each device kind runs: GPUs the Triton / torch kernels of
# kernels.wquant, the CPU GGUF Q8_0 / Q4_1 blocks (no fp8 kernel there); config.quantize_for
# refuses the same combinations at run time.
KIND_FORMATS: dict[str, tuple[str, ...]] = {"cuda": QUANTIZE_FORMATS,
                                            "cpu": CPU_QUANTIZE_FORMATS}


@dataclass(frozen=True)
class Stage:
    """One pipeline stage. ``weight_bytes`` includes embed/head when held (a tied head on a
    stage other than the first counts its own copy); ``kv_bytes`` is the preallocated cache
    for batch_size * max_seq_len tokens; ``predicted_time_s`` is one decode step of the
    batch through this stage by the one cost model (CostModel.decode_time; a plan from the
    auto planner adds its collectives and the send to the next stage, which it knows the
    links for). ``budget_bytes``/``headroom_bytes`` are the device entry's budget and the
    part reserved for activations (None when unknown); checks.check_fits refuses a stage
    over it."""

    index: int
    start: int
    end: int
    device: str
    has_embed: bool
    has_head: bool
    weight_bytes: int = 0
    kv_bytes: int = 0
    predicted_time_s: float = 0.0
    budget_bytes: int | None = None
    headroom_bytes: int = 0
    weight_format: str | None = None  # its decoder linears' --quantize format (None: dtype)

    @property
    def layers(self) -> range:
        return range(self.start, self.end)

    @property
    def num_layers(self) -> int:
        return self.end - self.start

    @property
    def memory_bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes

    @property
    def shortfall_bytes(self) -> int:
        """Bytes over the usable budget (0 when it fits or the budget is unknown)."""
        if self.budget_bytes is None:
            return 0
        return max(0, self.memory_bytes - (self.budget_bytes - self.headroom_bytes))


@dataclass(frozen=True)
class Plan:
    model: str
    num_layers: int
    stages: tuple[Stage, ...]
    strategy: str
    dtype: str
    batch_size: int = 1
    max_seq_len: int = 2048

    @property
    def devices(self) -> tuple[str, ...]:
        return tuple(s.device for s in self.stages)

    @property
    def boundaries(self) -> tuple[tuple[int, int], ...]:
        return tuple((s.start, s.end) for s in self.stages)

    @property
    def bottleneck_s(self) -> float:
        """Slowest stage: the steady-state time per step when the pipeline is full."""
        return max((s.predicted_time_s for s in self.stages), default=0.0)

    @property
    def latency_s(self) -> float:
        """One token through every stage in turn (a single sequence, no overlap)."""
        return sum(s.predicted_time_s for s in self.stages)

    def validate(self, num_layers: int | None = None) -> "Plan":
        validate_stages(self.stages, self.num_layers if num_layers is None else num_layers)
        return self

    # ---- JSON ----------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stages"] = [asdict(s) for s in self.stages]
        return {"format": PLAN_FORMAT, **d}

    @classmethod
    def from_dict(cls, d: Any, source: str = "plan") -> "Plan":
        """A Plan from parsed JSON, every field checked; errors name ``source`` (the file)
        and the field, e.g. "plan file p.json: field 'stages[1].end' must be an integer"."""
        where = f"{source}:"
        if not isinstance(d, dict):
            raise PlanningError(f"{where} expected a JSON object with the fields "
                                f"{', '.join(_names(cls))}, got {_json_kind(d)}")
        d = dict(d)
        fmt = d.pop("format", PLAN_FORMAT)
        if fmt != PLAN_FORMAT:
            raise PlanningError(f"{where} field 'format' is {fmt!r}, not {PLAN_FORMAT!r}")
        tp = d.pop("tp", 1)   # written by older versions; only tp 1 is what a plan runs as
        if tp != 1:
            raise PlanningError(f"{where} field 'tp' is {tp!r}, but a plan holds only the "
                                f"pipeline split: remove the field and run with --tp {tp}")
        stages = d.get("stages")
        if not isinstance(stages, list) or not stages:
            raise PlanningError(f"{where} field 'stages' must be a non-empty list of stage "
                                f"objects, got {_json_kind(stages)}")
        d["stages"] = tuple(Stage(**_checked(Stage, st, f"{where} field 'stages[{i}]", "."))
                            for i, st in enumerate(stages))
        plan = cls(**_checked(cls, d, f"{where} field '", ""))
        for name in ("num_layers", "batch_size", "max_seq_len"):
            if getattr(plan, name) < 1:
                raise PlanningError(f"{where} field '{name}' must be at least 1, got "
                                    f"{getattr(plan, name)}")
        for s in plan.stages:
            problem = format_problem(s.weight_format, s.device)
            if problem:
                raise PlanningError(f"{where} field 'stages[{s.index}].weight_format': "
                                    f"{problem}")
        try:
            return plan.validate()
        except PlanningError as e:
            raise PlanningError(f"{where} {e}") from None

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str, source: str = "plan") -> "Plan":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise PlanningError(f"{source} is not valid JSON: {e}") from None
        return cls.from_dict(data, source)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_json() + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        path = Path(path)
        if not path.is_file():
            raise PlanningError(f"no plan file at {path}")
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise PlanningError(f"plan file {path} cannot be read as text: {e}") from None
        return cls.from_json(text, f"plan file {path}")


def format_problem(fmt: str | None, device: str) -> str | None:
    """Why ``device`` cannot run weights in ``fmt`` (None: it can, or fmt is None)."""
    if fmt is None:
        return None
    kind = device.split(":")[0].split("/")[-1]   # "node1/cuda:0" is a cuda device
    every = sorted({f for fs in KIND_FORMATS.values() for f in fs})
    if fmt not in every:
        return (f"unknown weight format {fmt!r}; give one of {', '.join(every)} or null "
                f"(the plan's dtype)")
    allowed = KIND_FORMATS.get(kind)
    if allowed is not None and fmt not in allowed:
        return (f"{fmt} does not run on {device} ({kind} runs {', '.join(allowed)}); "
                f"give one of those or null")
    return None


# ---- checked JSON fields ---------------------------------------------------
_JSON_TYPES = {"int": "an integer", "float": "a number", "bool": "true or false",
               "str": "a string"}


def _names(cls: type) -> list[str]:
    return [f.name for f in fields(cls)]


def _json_kind(v: Any) -> str:
    if v is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "an object"}.get(type(v), type(v).__name__) + f" ({v!r:.40})"


def _type_ok(kind: str, v: Any) -> bool:
    if kind == "bool":
        return isinstance(v, bool)
    if kind == "int":
        return isinstance(v, int) and not isinstance(v, bool)
    if kind == "float":
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    return isinstance(v, str)


def _checked(cls: type, d: Any, prefix: str, sep: str) -> dict[str, Any]:
    """``d``'s fields for ``cls(**...)``, each present (unless it has a default), known and
    of its annotated type (int, float, bool, str, optionally "| None"); messages read
    "<prefix><sep>field' must be ..."."""
    if not isinstance(d, dict):
        raise PlanningError(f"{prefix}' must be an object, got {_json_kind(d)}")
    known = {f.name: f for f in fields(cls)}
    for key in d:
        if key not in known:
            raise PlanningError(f"{prefix}{sep}{key}' is not a field of a "
                                f"{cls.__name__.lower()} (fields: {', '.join(known)})")
    for name, f in known.items():
        if name not in d:
            if f.default is MISSING:
                raise PlanningError(f"{prefix}{sep}{name}' is missing")
            continue
        kind, _, optional = str(f.type).partition(" | ")
        v = d[name]
        if kind in _JSON_TYPES and not (v is None and optional == "None") \
                and not _type_ok(kind, v):
            want = _JSON_TYPES[kind] + (" or null" if optional == "None" else "")
            raise PlanningError(f"{prefix}{sep}{name}' must be {want}, got {_json_kind(v)}")
    return dict(d)


def _span(a: int, b: int) -> str:
    """Inclusive layer range for messages: "layer 7" or "layers 7..8"."""
    return f"layer {a}" if a == b else f"layers {a}..{b}"


def _runs(layers: list[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for x in layers:
        if runs and runs[-1][1] == x - 1:
            runs[-1] = (runs[-1][0], x)
        else:
            runs.append((x, x))
    return runs


def _stage_shape_errors(stages: tuple[Stage, ...] | list[Stage], num_layers: int) -> list[str]:
    errors = []
    for i, s in enumerate(stages):
        if s.index != i:
            errors.append(f"stage at position {i} has index {s.index}")
        if s.start < 0:
            errors.append(f"stage {i} starts at {s.start}, before layer 0")
        if s.end > num_layers:
            errors.append(f"stage {i} ends at {s.end} but the model has {num_layers} layers")
        if s.end <= s.start:
            errors.append(f"stage {i} is empty ([{s.start}, {s.end}) holds no layer)")
        if s.has_embed != (i == 0):
            errors.append(f"stage {i} {'holds' if s.has_embed else 'lacks'} the embedding; "
                          "only the first stage must hold it")
        if s.has_head != (i == len(stages) - 1):
            errors.append(f"stage {i} {'holds' if s.has_head else 'lacks'} the head; "
                          "only the last stage must hold it")
    return errors


def validate_stages(stages: tuple[Stage, ...] | list[Stage], num_layers: int) -> None:
    """Every layer in exactly one stage, stages contiguous and in order, embed on the first
    and head on the last. Raises PlanningError listing every problem found."""
    if not stages:
        raise PlanningError("the plan has no stages")
    errors = _stage_shape_errors(stages, num_layers)
    owners: dict[int, list[int]] = {i: [] for i in range(num_layers)}
    for s in stages:
        for layer in range(max(0, s.start), min(num_layers, s.end)):
            owners[layer].append(s.index)
    missing = [layer for layer, o in owners.items() if not o]
    errors += [f"{_span(a, b)} {'is' if a == b else 'are'} in no stage" for a, b in _runs(missing)]
    shared: dict[tuple[int, ...], list[int]] = {}
    for layer, o in owners.items():
        if len(o) > 1:
            shared.setdefault(tuple(o), []).append(layer)
    for who, layers in shared.items():
        names = ", ".join(map(str, who[:-1])) + f" and {who[-1]}"
        for a, b in _runs(layers):
            errors.append(f"{_span(a, b)} {'is' if a == b else 'are'} in stages {names}")
    if not missing and not shared:  # coverage is right; now the order must be too
        for prev, cur in zip(stages, stages[1:]):
            if cur.start != prev.end:
                errors.append(f"stage {cur.index} starts at {cur.start} but stage {prev.index} "
                              f"ends at {prev.end}; stages must be contiguous and in order")
    if errors:
        raise PlanningError("invalid plan: " + "; ".join(errors))


def format_plan_table(plan: Plan) -> str:
    """One line per stage; a ``format`` column when some stage's weights are quantized."""
    fmts = any(s.weight_format for s in plan.stages)
    fcol = f"{'format':<8}" if fmts else ""
    hdr = (f"{'stage':>5}  {'device':<8}{fcol}{'layers':>12}{'n':>4}  {'extra':<11}"
           f"{'weights':>12}"
           f"{'KV cache':>12}{'total':>12}{'budget':>12}{'time/step':>12}")
    lines = [f"plan: {plan.strategy}  model: {plan.model}",
             f"dtype={plan.dtype} batch_size={plan.batch_size} max_seq_len={plan.max_seq_len}",
             hdr, "-" * len(hdr)]
    for s in plan.stages:
        extra = "+".join(x for x, on in (("embed", s.has_embed), ("head", s.has_head)) if on)
        budget = "-" if s.budget_bytes is None else format_bytes(s.budget_bytes)
        flag = "  OVER" if s.shortfall_bytes else ""
        lines.append(
            f"{s.index:>5}  {s.device:<8}"
            f"{f'{s.weight_format or plan.dtype[:8]:<8}' if fmts else ''}"
            f"{f'[{s.start}, {s.end})':>12}{s.num_layers:>4}  "
            f"{extra or '-':<11}{format_bytes(s.weight_bytes):>12}{format_bytes(s.kv_bytes):>12}"
            f"{format_bytes(s.memory_bytes):>12}{budget:>12}"
            f"{format_seconds(s.predicted_time_s):>12}{flag}")
    lines.append("-" * len(hdr))
    lines.append(f"predicted decode step: bottleneck {format_seconds(plan.bottleneck_s)}, "
                 f"one token through all stages {format_seconds(plan.latency_s)}")
    return "\n".join(lines)
