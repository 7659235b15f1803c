"""Roofline planner: memory, max batch, tokens/s, ops:bytes and cost for a model on some GPUs.

`hardware` holds accelerators (datasheets, or this machine measured now), `catalog` model shapes,
`roofline` the arithmetic, including `step_time`, the step-cost model the simulator uses, and
`Efficiency`, which both turn into expected step times.
Pure Python: importing it costs nothing (torch is imported only to measure this machine).
"""

from chatscale.planner.catalog import Model, from_hf_config, get_model
from chatscale.planner.hardware import Hardware, get_hardware, measure_this_machine
from chatscale.planner.roofline import Efficiency, Layout, Plan, StepCost, plan, step_cost, step_time

__all__ = [
    "Efficiency", "Hardware", "Layout", "Model", "Plan", "StepCost", "from_hf_config", "get_hardware",
    "get_model", "measure_this_machine", "plan", "step_cost", "step_time",
]
