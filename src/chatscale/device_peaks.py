"""The serving device's peaks (FLOP/s, memory bandwidth), which MFU, MBU and the ridge point divide by.

A known GPU takes its datasheet entry from the planner's catalog: measuring a GPU takes longer than
a server start should, and its datasheet is what people compare against. A CPU (or a GPU the catalog
lacks) is measured once per process with the planner's own roofline probe, a second or two.
"""

from __future__ import annotations

import functools

import torch

from chatscale.planner.hardware import CATALOG, Hardware, measure_this_machine

# Torch dtypes the engine serves in, by the planner's names.
PLANNER_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

# Substrings of CUDA device names (torch.cuda.get_device_name) -> catalog key; first match wins.
_GPU_NAMES = (("h200", "h200"), ("h100", "h100"), ("b200", "b200"), ("a100-sxm4-40gb", "a100-40gb"),
              ("a100", "a100-80gb"))


def catalog_entry(device_name: str) -> Hardware | None:
    name = device_name.lower()
    return next((CATALOG[key] for part, key in _GPU_NAMES if part in name), None)


@functools.cache
def _measured(device: str, threads: int) -> Hardware:
    return measure_this_machine(seconds=0.3, device=device)


def device_peaks(device: torch.device) -> Hardware:
    """Peaks of `device`; CPU figures are for the torch threads the engine set, measured once."""
    if device.type == "cuda":
        entry = catalog_entry(torch.cuda.get_device_name(device))
        if entry is not None:
            return entry
    return _measured(str(device), torch.get_num_threads())
