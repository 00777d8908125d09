"""Pretraining schedules (Vielzeuf 2024): which targets each iteration predicts, for how long.

A plan is a list of iterations. Iteration 1 always predicts k-means clusters of 39-d MFCC; each
later iteration predicts clusters of layer ``layer`` of the previous iteration's checkpoint.

- ``original``: the HuBERT Base recipe, exactly 2 iterations; steps split 250k:400k; iteration 2
  uses ``first_layer`` and ``last_clusters`` (published: layer 6, 500 clusters).
- ``uniform``: N iterations with equal steps; iterations >= 2 keep the original recipe's targets,
  ``first_layer`` and ``last_clusters``: only the number of iterations changes.
- ``progressive``: steps of iteration i proportional to i (rising linearly); the supervision layer
  rises linearly from ``first_layer`` (iteration 2) to ``last_layer`` (iteration N);
  iterations >= 2 use ``last_clusters``.
- ``progressive-cluster``: as progressive, and the cluster count rises linearly from
  ``first_clusters`` (iteration 1) to ``last_clusters`` (iteration N).

Iteration 1 always uses ``first_clusters``. Steps are rounded by largest remainder so that they sum
to the budget exactly; layers and clusters are rounded to the nearest integer.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

from pretraining.config import SCHEDULES, ScheduleConfig

ORIGINAL_STEPS = (250_000, 400_000)  # HuBERT Base: iteration 1, iteration 2


@dataclass(frozen=True)
class Iteration:
    """One iteration of a plan (1-based ``index``)."""

    index: int
    steps: int
    source: str  # "mfcc" | "layer"
    layer: int | None  # supervision layer of the previous checkpoint (None for MFCC)
    clusters: int
    kmeans_fraction: float

    @property
    def target_name(self) -> str:
        return "MFCC" if self.source == "mfcc" else f"layer {self.layer}"


@dataclass(frozen=True)
class Plan:
    schedule: str
    total_steps: int
    iterations: tuple[Iteration, ...]

    def to_dict(self) -> dict:
        return {"schedule": self.schedule, "total_steps": self.total_steps,
                "iterations": [asdict(it) for it in self.iterations]}

    @classmethod
    def from_dict(cls, data: dict) -> Plan:
        its = tuple(Iteration(**it) for it in data["iterations"])
        return cls(schedule=data["schedule"], total_steps=int(data["total_steps"]), iterations=its)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1) + "\n"

    def format(self) -> str:
        """A human-readable table of the plan."""
        lines = [f"plan: {self.schedule}, {len(self.iterations)} iterations, "
                 f"{self.total_steps} steps in total",
                 f"{'iter':>4} {'steps':>9} {'targets':>9} {'clusters':>8} {'k-means on':>10}"]
        for it in self.iterations:
            lines.append(f"{it.index:>4} {it.steps:>9} {it.target_name:>9} {it.clusters:>8} "
                         f"{it.kmeans_fraction:>9.0%}")
        return "\n".join(lines)


def split_steps(total: int, weights: list[float]) -> list[int]:
    """Integers proportional to ``weights`` summing to ``total`` (largest remainder, >= 1 each)."""
    if total < len(weights):
        raise ValueError(f"total_steps={total} is less than the {len(weights)} iterations")
    if any(w <= 0 for w in weights):
        raise ValueError(f"step weights must be positive, got {weights}")
    spare = total - len(weights)  # every iteration gets at least one step
    exact = [spare * w / sum(weights) for w in weights]
    steps = [math.floor(e) for e in exact]
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - steps[i]), i))
    for i in order[: spare - sum(steps)]:
        steps[i] += 1
    return [s + 1 for s in steps]


def _linear(first: int, last: int, n: int) -> list[int]:
    """``n`` integers rising linearly from ``first`` to ``last`` (rounded half up)."""
    if n == 1:
        return [last]
    return [math.floor(first + (last - first) * k / (n - 1) + 0.5) for k in range(n)]


def build_plan(schedule: str, iterations: int, total_steps: int, *, first_layer: int,
               last_layer: int, first_clusters: int, last_clusters: int,
               kmeans_fraction: float = 0.1) -> Plan:
    """Resolve a schedule into per-iteration steps, targets and cluster counts."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule {schedule!r} unknown; choose from {list(SCHEDULES)}")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    if schedule == "original" and iterations != 2:
        raise ValueError(f"the original schedule has exactly 2 iterations, got {iterations}")
    if min(first_layer, last_layer) < 0:
        raise ValueError(f"supervision layers must be >= 0, got {first_layer}..{last_layer}")
    if min(first_clusters, last_clusters) < 2:
        raise ValueError(f"cluster counts must be >= 2, got {first_clusters}..{last_clusters}")
    n = iterations
    if schedule == "original":
        weights = [float(s) for s in ORIGINAL_STEPS]
    elif schedule == "uniform":
        weights = [1.0] * n
    else:
        weights = [float(i) for i in range(1, n + 1)]
    steps = split_steps(total_steps, weights)
    if schedule in ("original", "uniform"):
        layers = [first_layer] * (n - 1)
    else:
        layers = _linear(first_layer, last_layer, n - 1) if n > 1 else []
    if schedule == "progressive-cluster":
        clusters = _linear(first_clusters, last_clusters, n) if n > 1 else [first_clusters]
    else:
        clusters = [first_clusters] + [last_clusters] * (n - 1)
    its = [Iteration(1, steps[0], "mfcc", None, clusters[0], kmeans_fraction)]
    for i in range(1, n):
        its.append(Iteration(i + 1, steps[i], "layer", layers[i - 1], clusters[i], kmeans_fraction))
    return Plan(schedule=schedule, total_steps=total_steps, iterations=tuple(its))


def plan_from_config(config: ScheduleConfig) -> Plan:
    return build_plan(config.name, config.iterations, config.total_steps,
                      first_layer=config.first_layer, last_layer=config.last_layer,
                      first_clusters=config.first_clusters, last_clusters=config.last_clusters,
                      kmeans_fraction=config.kmeans_fraction)
