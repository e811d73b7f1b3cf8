"""Planning: profile a model from its config, describe devices, and cut the model into
pipeline stages. Pure: no torch device is needed (only device discovery touches torch)."""

from llamadist.planning.devices import DeviceSpec, discover_devices, parse_devices, parse_memory
from llamadist.planning.plan import Plan, Stage, format_plan_table, validate_stages
from llamadist.planning.profile import LayerCost, ModelProfile, format_profile_table, profile
from llamadist.planning.strategies import STRATEGIES, make_plan, parse_boundaries
from llamadist.planning.units import PlanningError

__all__ = [
    "DeviceSpec", "LayerCost", "ModelProfile", "Plan", "PlanningError", "STRATEGIES", "Stage",
    "discover_devices", "format_plan_table", "format_profile_table", "make_plan",
    "parse_boundaries", "parse_devices", "parse_memory", "profile", "validate_stages",
]
