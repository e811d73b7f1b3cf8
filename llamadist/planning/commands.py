"""The `analyze` and `plan` subcommands as functions returning the text to print, so the CLI
only parses arguments (and tests need no subprocess)."""

from __future__ import annotations

import logging
from pathlib import Path

from llamadist.config import ModelConfig
from llamadist.planning.devices import parse_devices
from llamadist.planning.plan import Plan, format_plan_table
from llamadist.planning.profile import format_profile_table, profile
from llamadist.planning.strategies import make_plan, overbudget_stages

log = logging.getLogger(__name__)


def analyze_command(config: ModelConfig, dtype: str = "bfloat16", seq_len: int | None = None,
                    as_json: bool = False) -> str:
    """`llamadist analyze`: the per-layer profile of ``config``.

    dtype    weight dtype: bfloat16 | float16 | float32 (aliases bf16, fp16, fp32)
    seq_len  context for decode attention FLOPs and prefill length
             (None: min(max_position_embeddings, 4096))
    as_json  return ModelProfile JSON instead of the table
    """
    prof = profile(config, dtype=dtype, seq_len=seq_len)
    return prof.to_json() if as_json else format_profile_table(prof)


def plan_command(config: ModelConfig, devices: str | None = None, max_memory: str | None = None,
                 device_speed: str | None = None, strategy: str = "uniform",
                 boundaries: str | None = None, plan_file: str | None = None,
                 batch_size: int = 1, max_seq_len: int | None = None, dtype: str = "bfloat16",
                 as_json: bool = False, save: str | None = None, plot: str | None = None,
                 headroom: float | int = 0.1, check_available: bool = True) -> str:
    """`llamadist plan`: one stage per device, printed as a table (or Plan JSON).

    devices        "cuda:0,cuda:1,cpu" (a device may repeat); None: every visible GPU, or cpu;
                   with plan_file and no devices, the plan file's devices are used
    max_memory     per-device budgets "20GiB,20GiB,64GiB" ("" / "auto" entries are
                   discovered: free memory, split evenly between repeats of one device)
    device_speed   per-device relative speeds "1,1,0.05" (1 = an H100); None: per-kind defaults
    strategy       uniform | memory | compute | mixed | custom
    boundaries     custom only: "0:7,7:19,19:30" (half-open layer ranges)
    plan_file      custom only: take the boundaries from a saved plan JSON
    batch_size, max_seq_len   size the KV cache and the predicted decode step
    dtype          weight and KV dtype
    as_json        return the Plan JSON (messages go to logging so the output stays parseable)
    save           write the Plan JSON to this path
    plot           write a PNG of the plan to this path (needs matplotlib)
    headroom       per-device activation reserve: fraction of the budget if < 1, else bytes
    check_available  False to plan for GPUs this machine lacks (budgets then must be explicit)
    """
    if plan_file is not None and devices is None:
        devices = ",".join(Plan.load(plan_file).devices)
    specs = parse_devices(devices, max_memory, device_speed, check_available=check_available)
    prof = profile(config, dtype=dtype, seq_len=max_seq_len)
    if plan_file is not None:
        if strategy not in ("custom", "uniform"):
            log.warning("--plan-file given: using strategy 'custom' instead of %r", strategy)
        strategy, boundaries = "custom", Path(plan_file)
    plan = make_plan(prof, specs, strategy=strategy, boundaries=boundaries,
                     batch_size=batch_size, max_seq_len=max_seq_len, headroom=headroom)
    notes = [f"warning: {w}" for w in overbudget_stages(plan)]
    if save:
        notes.append(f"saved plan to {plan.save(save)}")
    if plot:
        from llamadist.planning.plot import plot_plan  # lazy: matplotlib is optional
        notes.append(f"wrote plot to {plot_plan(plan, specs, plot)}")
    if as_json:
        for note in notes:
            if note.startswith("warning"):
                log.warning(note)
            else:
                log.info(note)
        return plan.to_json()
    return "\n".join([format_plan_table(plan), *notes])
