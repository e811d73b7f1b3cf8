"""A picture of a plan: memory per stage against its budget, and predicted time per stage."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from llamadist.planning.devices import DeviceSpec
from llamadist.planning.plan import Plan
from llamadist.planning.units import PlanningError

_GIB = 2**30


def _pyplot():
    """matplotlib is optional (the `plot` extra); import it only when a plot is asked for,
    with the Agg backend so it works without a display."""
    try:
        import matplotlib
    except ImportError:
        raise PlanningError("plotting needs matplotlib: pip install matplotlib "
                            "(or pip install 'llamadist[plot]')") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_plan(plan: Plan, devices: Sequence[DeviceSpec] | None, path: str | Path) -> Path:
    """Write a PNG (or any format matplotlib infers from ``path``) with two panels: stacked
    weights + KV cache per stage with each budget (and its headroom) as a line, and the
    predicted decode-step time per stage. ``devices`` supplies budgets a plan lacks."""
    plt = _pyplot()
    path = Path(path)
    stages = plan.stages
    budgets = [s.budget_bytes if s.budget_bytes is not None
               else (devices[i].memory_bytes if devices and i < len(devices) else None)
               for i, s in enumerate(stages)]
    labels = [f"{s.index}: {s.device}\n[{s.start},{s.end})" for s in stages]
    x = list(range(len(stages)))
    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(max(8, 2.2 * len(stages) + 4), 4.5))
    weights = [s.weight_bytes / _GIB for s in stages]
    kv = [s.kv_bytes / _GIB for s in stages]
    ax_mem.bar(x, weights, label="weights", color="#4c72b0")
    ax_mem.bar(x, kv, bottom=weights, label="KV cache", color="#dd8452")
    for i, (s, b) in enumerate(zip(stages, budgets)):
        if b is None:
            continue
        ax_mem.hlines(b / _GIB, i - 0.4, i + 0.4, colors="red",
                      label="budget" if i == 0 else None)
        if s.headroom_bytes:
            ax_mem.hlines((b - s.headroom_bytes) / _GIB, i - 0.4, i + 0.4, colors="red",
                          linestyles="dotted", label="budget - headroom" if i == 0 else None)
    ax_mem.set_xticks(x, labels)
    ax_mem.set_ylabel("GiB")
    ax_mem.set_title("memory per stage")
    ax_mem.legend(fontsize="small")
    ax_time.bar(x, [s.predicted_time_s * 1e3 for s in stages], color="#55a868")
    ax_time.set_xticks(x, labels)
    ax_time.set_ylabel("ms per decode step")
    ax_time.set_title(f"predicted time (batch {plan.batch_size}, context {plan.max_seq_len})")
    fig.suptitle(f"{plan.strategy} plan: {plan.model}", fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
