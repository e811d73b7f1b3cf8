"""Shared pieces of the planning package: its error type and human-readable units."""

from __future__ import annotations


class PlanningError(ValueError):
    """A plan, device list or profile request that cannot be honoured; the message says why,
    naming devices, layers and byte counts."""


def format_bytes(n: float) -> str:
    """Binary units (KiB, MiB, GiB, TiB), as memory budgets are usually given."""
    sign = "-" if n < 0 else ""
    n = abs(float(n))
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{sign}{n:.0f} {unit}" if unit == "B" else f"{sign}{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_flops(n: float) -> str:
    """Decimal units (FLOP, MFLOP, GFLOP, TFLOP, PFLOP)."""
    n = float(n)
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} FLOP"


def format_seconds(s: float) -> str:
    if s >= 1:
        return f"{s:.3f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3f} ms"
    return f"{s * 1e6:.1f} us"
