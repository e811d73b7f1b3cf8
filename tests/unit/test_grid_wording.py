"""Grid errors name what the user gave: under torchrun its WORLD_SIZE rather than a --nproc
never given; --cp with a device per rank says that context parallelism runs over
processes (give --nproc)."""

from __future__ import annotations

import argparse

import pytest

from llamadist.cli.layout import decide_layout
from llamadist.cli.main import build_parser
from llamadist.config import RuntimeConfig, named_shape
from llamadist.planning.checks import GridError, check_grid
from llamadist.planning.units import PlanningError


def grid_args(*flags: str) -> argparse.Namespace:
    return build_parser().parse_args(["generate", "llama3-8b", "--prompt", "x", *flags])


def test_torchrun_grid_error_names_world_size(monkeypatch):
    with pytest.raises(PlanningError) as e:
        check_grid(named_shape("llama3-8b"), 2, 3, world=True)
    assert "WORLD_SIZE 2" in str(e.value) and "--nproc " not in str(e.value)
    with pytest.raises(GridError) as e:   # pp filled in from a world that does not divide
        check_grid(named_shape("llama3-8b"), 3, None, tp=2, world=True)
    assert "WORLD_SIZE 3" in str(e.value) and "--nproc " not in str(e.value)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(PlanningError) as e:
        decide_layout(named_shape("llama3-8b"), grid_args("--pp", "3"), RuntimeConfig(), 64, 1)
    msg = str(e.value)
    assert "WORLD_SIZE 2" in msg and "torchrun" in msg and "--nproc " not in msg, msg
    # without torchrun the flag the user gave is named
    with pytest.raises(PlanningError, match="--nproc 2 but pp=3"):
        check_grid(named_shape("llama3-8b"), 2, 3)


def test_cp_with_a_device_per_rank_says_cp_runs_over_processes(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    args = grid_args("--devices", "cpu,cpu", "--cp", "2")
    with pytest.raises(PlanningError) as e:
        decide_layout(named_shape("llama3-8b"), args, RuntimeConfig(), 64, 1)
    msg = str(e.value)
    assert "context parallelism always runs over processes" in msg, msg
    assert "--nproc 2" in msg and "--devices cpu " in msg and "pipeline stages" not in msg
