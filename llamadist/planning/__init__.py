"""Planning: profile a model from its config, describe devices, and cut the model into
pipeline stages. Pure: no torch device is needed (only device discovery touches torch)."""

from llamadist.planning.checks import check_fits, check_grid, grid_problems, plan_problems
from llamadist.planning.cost import LINKS, CostModel, Link, make_link
from llamadist.planning.devices import (DeviceSpec, check_devices_present, discover_devices,
                                        parse_devices, parse_memory)
from llamadist.planning.plan import Plan, Stage, format_plan_table, validate_stages
from llamadist.planning.profile import LayerCost, ModelProfile, format_profile_table, profile
from llamadist.planning.strategies import STRATEGIES, make_plan, parse_boundaries
from llamadist.planning.units import PlanningError

__all__ = [
    "CostModel", "DeviceSpec", "LINKS", "LayerCost", "Link", "ModelProfile", "Plan",
    "PlanningError", "STRATEGIES", "Stage", "check_devices_present", "check_fits",
    "check_grid", "discover_devices", "format_plan_table", "format_profile_table",
    "grid_problems", "make_link", "make_plan", "parse_boundaries", "parse_devices",
    "parse_memory", "plan_problems", "profile", "validate_stages",
]
