"""Step-cost models: how long one scheduler step of one replica takes, from the step's shape.

A step is what `StepStats.chunks` records: per scheduled sequence, (tokens already in its KV cache,
tokens computed this step). Two models answer it:

- `LinearStepCost`, fitted to steps of a real chatscale engine (`chatscale simulate profile`): a
  fixed cost per step plus costs per sequence, per computed token, per decode attention group,
  per KV token a decode group reads (padded to the group's longest context, as the runner attends
  decodes in groups of similar length), and per prefill attention pair.
- `RooflineStepCost`, the planner's roofline for a catalog GPU and model: max(compute, memory) plus
  communication, turned into an expected step time by the planner's own `Efficiency` (a fraction
  of peak and a fixed cost per step), so that `chatscale plan` and the simulator agree.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from chatscale.planner.catalog import Model, get_model
from chatscale.planner.hardware import Hardware, get_hardware
from chatscale.planner.roofline import Efficiency, Layout, kv_bytes_per_token, step_cost, weight_bytes

Chunks = Sequence[tuple[int, int]]

FEATURES = ("step", "seqs", "tokens", "decode_groups", "decode_kv_padded", "prefill_pairs_k")
DECODE_GROUP = 16  # the runner's decode attention group (engine/runner.py DECODE_GROUP)
RESIDUAL_QUANTILES = 500


class StepCostModel(Protocol):
    def step_seconds(self, chunks: Chunks) -> float: ...

    def expected(self) -> StepCostModel:
        """The same model without random terms (what request-level curves are built from)."""
        ...


def step_features(chunks: Chunks, group: int = DECODE_GROUP) -> list[float]:
    """The quantities a step's time is linear in (see FEATURES); attention pairs in thousands."""
    tokens = pairs = 0
    contexts = []
    for cached, n in chunks:
        tokens += n
        if n == 1:
            contexts.append(cached + 1)
        else:
            pairs += n * cached + n * (n + 1) // 2
    contexts.sort(reverse=True)
    padded = sum(len(contexts[i:i + group]) * contexts[i] for i in range(0, len(contexts), group))
    return [1.0, float(len(chunks)), float(tokens), float(-(-len(contexts) // group)), float(padded),
            pairs / 1000.0]


@dataclass
class LinearStepCost:
    """seconds = coefficients . step_features(chunks), fitted by non-negative least squares, times
    a ratio drawn from the profile's own measured/fitted ratios when `residuals` are kept.

    The ratios carry what no step shape explains but a served engine still pays: a step stretched
    by a garbage collection, a new kernel shape, or another process on the core. Their mean is
    above one (the tail is long), so a deterministic fit alone runs fast under load.
    """

    coefficients: list[float]
    source: dict = field(default_factory=dict)  # what was measured: model, machine, threads, fit error
    group: int = DECODE_GROUP
    residuals: list[float] = field(default_factory=list)  # quantiles of measured / fitted step time
    seed: int = 0

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def step_seconds(self, chunks: Chunks) -> float:
        base = sum(c * f for c, f in zip(self.coefficients, step_features(chunks, self.group)))
        if self.residuals:
            base *= self.residuals[int(self._rng.random() * len(self.residuals))]
        return base

    def expected(self) -> LinearStepCost:
        """The deterministic model of the mean step: the fit scaled by the mean ratio (for curves)."""
        scale = float(np.mean(self.residuals)) if self.residuals else 1.0
        return LinearStepCost([c * scale for c in self.coefficients], self.source, self.group)

    @classmethod
    def fit(cls, steps: list[Chunks], seconds: list[float], source: dict | None = None,
            group: int = DECODE_GROUP) -> LinearStepCost:
        x = np.array([step_features(c, group) for c in steps])
        y = np.asarray(seconds)
        coef = _nonnegative_lstsq(x, y)
        ratio = y / (x @ coef)
        source = dict(source or {})
        source.update(steps=len(y), mean_abs_error=float(np.mean(np.abs(ratio - 1))),
                      mean_ratio=float(ratio.mean()))
        quantiles = np.quantile(ratio, (np.arange(RESIDUAL_QUANTILES) + 0.5) / RESIDUAL_QUANTILES)
        return cls([float(c) for c in coef], source, group, [round(float(q), 4) for q in quantiles])

    def save(self, path: str | Path) -> None:
        d = {"features": FEATURES, **asdict(self)}
        d.pop("seed")
        Path(path).write_text(json.dumps(d, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> LinearStepCost:
        try:
            d = json.loads(Path(path).read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not a step-cost profile (invalid JSON: {exc})") from exc
        return cls(d["coefficients"], d.get("source", {}), d.get("group", DECODE_GROUP), d.get("residuals", []))


def _nonnegative_lstsq(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares relative to y (every step matters, short or long) with no negative
    coefficient: drop the most negative feature and refit until none is left."""
    w = 1 / y
    active = list(range(x.shape[1]))
    while True:
        coef = np.zeros(x.shape[1])
        sol, *_ = np.linalg.lstsq(x[:, active] * w[:, None], y * w, rcond=None)
        coef[active] = sol
        if sol.min() >= 0:
            return coef
        active.pop(int(np.argmin(sol)))


@dataclass
class RooflineStepCost:
    """The planner's roofline step time for `model` on `hw` with `layout`, as `efficiency` expects
    it served (the same Efficiency `chatscale plan` prints its expected figures with)."""

    model: Model
    hw: Hardware
    layout: Layout = Layout()
    efficiency: Efficiency = Efficiency()

    def step_seconds(self, chunks: Chunks) -> float:
        decodes = [cached + 1 for cached, n in chunks if n == 1]
        prefills = [(n, cached) for cached, n in chunks if n > 1]
        cost = step_cost(self.model, self.hw, self.layout, decode_contexts=decodes, prefills=prefills)
        return self.efficiency.seconds(cost.seconds)

    def expected(self) -> RooflineStepCost:
        return self

    def kv_blocks(self, block_size: int, memory_utilization: float = 0.9) -> int:
        """KV pages that fit beside the weights on the replica's GPUs."""
        free = self.hw.memory_bytes * memory_utilization * self.layout.gpus - weight_bytes(self.model, self.layout)
        return max(0, int(free // (kv_bytes_per_token(self.model, self.layout) * block_size)))

    @classmethod
    def named(cls, model: str, hardware: str, tp: int = 1, **kw) -> RooflineStepCost:
        return cls(get_model(model), get_hardware(hardware), Layout(tp=tp), **kw)


def load_cost_model(spec: str, efficiency: Efficiency = Efficiency()) -> StepCostModel:
    """`profile.json` (a fitted profile) or `roofline:MODEL:HARDWARE[:TP]` (catalog names, served at
    `efficiency`)."""
    if spec.startswith("roofline:"):
        parts = spec.split(":")[1:]
        return RooflineStepCost.named(parts[0], parts[1], int(parts[2]) if len(parts) > 2 else 1,
                                      efficiency=efficiency)
    return LinearStepCost.load(spec)
