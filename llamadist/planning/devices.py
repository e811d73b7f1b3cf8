"""Device specs for planning: name, memory budget and speed, parsed from the command line
or discovered. Pure apart from discovery, which reads /proc/meminfo and (if importable) torch.

Planning is for hardware that need not be here: a device this machine lacks is planned with
the budget given for it. Only running needs the devices present: the run side calls
:func:`check_devices_present`."""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, replace
from typing import Any, Sequence

from llamadist.planning.units import PlanningError

# Sustained (not peak) rates for bf16 decode-ish work; the planner only needs ratios right.
REFERENCE_FLOPS = 4e14          # H100 class
REFERENCE_BANDWIDTH = 3e12      # H100 HBM3, bytes/s
CPU_FLOPS = 1e11
CPU_BANDWIDTH = 2e10
# Substring of torch.cuda.get_device_name -> (FLOP/s, bytes/s).
KNOWN_GPUS: dict[str, tuple[float, float]] = {
    "H200": (4e14, 4.5e12), "H100": (4e14, 3e12), "H800": (4e14, 3e12),
    "A100": (2e14, 1.8e12), "A800": (2e14, 1.8e12), "L40": (1.5e14, 8e11),
    "4090": (1.3e14, 9e11), "3090": (6e13, 8e11), "A10": (6e13, 5e11),
    "L4": (6e13, 2.7e11), "V100": (8e13, 8e11), "T4": (3e13, 2.7e11),
}
VALID_FORMS = "cpu, cuda, cuda:N"
# Help text for --device-speed (what 1.0 means), kept next to the numbers it refers to;
# no "%" in it, so argparse and print show it alike.
DEVICE_SPEED_HELP = ("relative speed per device, e.g. 1,1,0.05: 1.0 = an H100 (400 TFLOP/s "
                     "bf16 and 3 TB/s memory bandwidth, sustained); 0.05 = 1/20 of that")
_NAME_RE = re.compile(r"^(cpu|cuda(?::(\d+))?)$")
_MEM_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")
_UNITS = {"": 1, "b": 1,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


@dataclass(frozen=True)
class DeviceSpec:
    """One pipeline stage's device. ``memory_bytes`` is this entry's budget (two entries on one
    device have one budget each). ``speed`` is relative to the reference GPU (an H100):
    ``flops``/``mem_bandwidth`` are what the cost model uses."""

    name: str
    memory_bytes: int
    speed: float = 1.0
    kind: str = "cuda"
    flops: float = REFERENCE_FLOPS
    mem_bandwidth: float = REFERENCE_BANDWIDTH

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DeviceSpec":
        return cls(**d)


def parse_memory(text: str | int | float) -> int:
    """"20GiB" / "512MiB" / "1.5GB" / "1000" -> bytes. KB/MB/GB/TB are decimal, KiB/MiB/GiB/TiB
    and the bare K/M/G/T are binary."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if text < 0:
            raise PlanningError(f"memory size must not be negative, got {text}")
        return int(text)
    m = _MEM_RE.match(str(text))
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS:
        raise PlanningError(
            f"cannot parse memory size {text!r}; use a byte count or a number with a unit, "
            f"e.g. 1000, 512MiB, 20GiB, 1.5GB (units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")
    return int(float(m.group(1)) * _UNITS[unit])


def _cuda_inventory() -> list[tuple[str, int]]:
    """(device name, free bytes) per visible CUDA device; [] without torch or CUDA.
    Tests monkeypatch this to simulate GPUs."""
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        free, _total = torch.cuda.mem_get_info(i)
        out.append((torch.cuda.get_device_name(i), int(free)))
    return out


def _cpu_available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024     # reported in kB
    except OSError:
        pass
    try:  # POSIX fallback without psutil
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        raise PlanningError("cannot discover CPU memory (no /proc/meminfo, no sysconf); "
                            "give --max-memory explicitly") from None


def _gpu_rates(gpu_name: str | None) -> tuple[float, float]:
    for key, rates in KNOWN_GPUS.items():
        if gpu_name and key in gpu_name:
            return rates
    return REFERENCE_FLOPS, REFERENCE_BANDWIDTH


def _canonical_name(name: str) -> str:
    raw = name.strip().lower()
    m = _NAME_RE.match(raw)
    if not m:
        raise PlanningError(f"unknown device {name.strip()!r}; valid forms: {VALID_FORMS} "
                            f"(present here: {', '.join(_present(_cuda_inventory()))})")
    return "cpu" if raw == "cpu" else f"cuda:{int(m.group(2) or 0)}"


def _present(inventory: list[tuple[str, int]]) -> list[str]:
    return ["cpu"] + [f"cuda:{i}" for i in range(len(inventory))]


def check_devices_present(names: Sequence[str],
                          inventory: list[tuple[str, int]] | None = None) -> None:
    """Raise PlanningError unless every device in ``names`` is on this machine: the run
    side calls this before loading weights (planning never needs it)."""
    inventory = _cuda_inventory() if inventory is None else inventory
    present = _present(inventory)
    missing = []
    for n in names:
        canon = _canonical_name(n)
        if canon not in present and canon not in missing:
            missing.append(canon)
    if missing:
        which = ", ".join(missing)
        raise PlanningError(
            f"device{'s' if len(missing) > 1 else ''} {which} "
            f"{'are' if len(missing) > 1 else 'is'} not present on this machine (present: "
            f"{', '.join(present)}); a plan may name absent devices, but running needs them: "
            f"pass --devices with present ones")


def _split_list(value: str | Sequence[Any] | None) -> list[Any] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [v.strip() for v in value.split(",")]
    return list(value)


def parse_devices(devices: str | Sequence[str] | None = None,
                  max_memory: str | Sequence[str | int] | None = None,
                  speeds: str | Sequence[float | str] | None = None,
                  check_available: bool = False) -> list[DeviceSpec]:
    """One DeviceSpec per entry of ``devices`` ("cuda:0,cuda:1,cpu"; None = discover).

    Devices need not be present: planning for hardware that is not here is the point.
    ``max_memory``: one budget per entry; an empty or "auto" entry is discovered (only a
    present device can be), and a device named several times splits its discovered free
    memory evenly among those entries. An absent device without a budget is a
    PlanningError naming it and --max-memory. ``speeds``: one relative speed per entry
    (1 = the reference GPU), overriding the per-kind FLOP/s and bandwidth.
    ``check_available=True`` also requires every device present (see
    :func:`check_devices_present`), for callers about to run on them."""
    if devices is None or (isinstance(devices, str) and not devices.strip()):
        specs = discover_devices()
        names = [s.name for s in specs]
    else:
        names = [n for n in _split_list(devices) if n != ""]
        if not names:
            raise PlanningError("no devices given")
    names = [_canonical_name(n) for n in names]
    budgets = _split_list(max_memory)
    speed_list = _split_list(speeds)
    for label, values in (("--max-memory budgets", budgets), ("--device-speed values", speed_list)):
        if values is not None and len(values) != len(names):
            raise PlanningError(f"{len(names)} devices ({', '.join(names)}) but {len(values)} "
                                f"{label} ({', '.join(map(str, values))}); give one per device")
    inventory = _cuda_inventory() if _needs_inventory(names, budgets, speed_list,
                                                      check_available) else []
    if check_available:
        check_devices_present(names, inventory)
    memory = _resolve_budgets(names, budgets, inventory)
    out = []
    for i, name in enumerate(names):
        spec = _default_spec(name, memory[i], inventory)
        if speed_list is not None:
            spec = with_speed(spec, _parse_speed(speed_list[i], name))
        out.append(spec)
    return out


def _is_auto(budget: Any) -> bool:
    return isinstance(budget, str) and budget.strip().lower() in ("", "auto")


def _needs_inventory(names: list[str], budgets: list[Any] | None, speeds: list[Any] | None,
                     check_available: bool) -> bool:
    """Whether torch must be asked about GPUs: to check presence, to discover a GPU's free
    memory, or to take a GPU's rates from its model name. Explicit budgets and speeds plan
    without importing torch at all."""
    if check_available:
        return True
    return any(n != "cpu" and (budgets is None or _is_auto(budgets[i]) or speeds is None)
               for i, n in enumerate(names))


def _parse_speed(value: float | str, name: str) -> float:
    try:
        s = float(value)
    except (TypeError, ValueError):
        raise PlanningError(f"speed {value!r} for {name} is not a number") from None
    if not s > 0:
        raise PlanningError(f"speed for {name} must be positive, got {value!r}")
    return s


def with_speed(spec: DeviceSpec, speed: float) -> DeviceSpec:
    """A relative speed scales the reference GPU's rates (so "1,1,0.05" means the CPU runs at
    5% of a GPU, whatever the per-kind defaults say)."""
    return replace(spec, speed=speed, flops=REFERENCE_FLOPS * speed,
                   mem_bandwidth=REFERENCE_BANDWIDTH * speed)


def _default_spec(name: str, memory: int, inventory: list[tuple[str, int]]) -> DeviceSpec:
    if name == "cpu":
        return DeviceSpec(name, memory, CPU_FLOPS / REFERENCE_FLOPS, "cpu", CPU_FLOPS,
                          CPU_BANDWIDTH)
    idx = int(name.split(":")[1])
    gpu_name = inventory[idx][0] if idx < len(inventory) else None
    flops, bw = _gpu_rates(gpu_name)
    return DeviceSpec(name, memory, flops / REFERENCE_FLOPS, "cuda", flops, bw)


def _discovered_free(name: str, inventory: list[tuple[str, int]]) -> int:
    if name == "cpu":
        return _cpu_available_bytes()
    idx = int(name.split(":")[1])
    if idx >= len(inventory):
        raise PlanningError(f"device {name} is not present here, so its memory cannot be "
                            f"discovered: give its budget with --max-memory (one per device, "
                            f"e.g. 80GiB)")
    return inventory[idx][1]


def _resolve_budgets(names: list[str], budgets: list[Any] | None,
                     inventory: list[tuple[str, int]]) -> list[int]:
    explicit: list[int | None] = [None] * len(names)
    if budgets is not None:
        for i, b in enumerate(budgets):
            if not _is_auto(b):
                explicit[i] = parse_memory(b)
    out: list[int] = []
    for i, name in enumerate(names):
        if explicit[i] is not None:
            out.append(explicit[i])
            continue
        # Entries sharing a device share what the explicit entries of that device leave over.
        same = [j for j, n in enumerate(names) if n == name]
        taken = sum(explicit[j] or 0 for j in same)
        auto = sum(1 for j in same if explicit[j] is None)
        out.append(max(0, _discovered_free(name, inventory) - taken) // auto)
    return out


def discover_devices() -> list[DeviceSpec]:
    """Every visible CUDA device with its free memory, or the CPU when there is none."""
    inventory = _cuda_inventory()
    if not inventory:
        return [_default_spec("cpu", _cpu_available_bytes(), inventory)]
    return [_default_spec(f"cuda:{i}", free, inventory) for i, (_n, free) in enumerate(inventory)]
