"""How much memory scoring a model needs, and the plan that fits it into a budget.

A scoring run holds, per probe, its moment accumulators (every shard's statistics of every layer:
the bulk), a flush buffer, and (for MI and the linear proxy) the pooled items of segment probes;
besides them the model, a forward batch and the fits' working set. :func:`estimate` adds these
up from the model's and probes' sizes, before any audio is read. :func:`plan_passes` compares
the total with the budget (``[model] memory_gb``, default: the memory available now) and picks
the first strategy that fits:

1. every probe in one pass over the corpus (the default, one forward pass);
2. probes in turn: several passes, each accumulating the probes that fit together (each pass
   repeats the forward pass; scores are the same bits, as a probe's statistics never depend on
   the others');
3. if a probe does not fit even alone: refused at once, naming what it needs and what to change.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

GB = 1024**3
BASE_BYTES = int(0.55 * GB)  # the interpreter with torch, numpy and transformers imported
FORWARD_COPIES = 4  # a forward batch's hidden states and activations, in copies of the states
FIT_COPIES = 8  # the fits' working set per probe, in copies of one slot's X^T X (full matrices)
AVAILABLE_FRACTION = 0.9  # of MemAvailable, the default budget


@dataclass(frozen=True)
class ProbeShape:
    """What a probe's statistics are made of."""

    name: str
    dy: int  # target dimensions
    items: int  # pooled items kept for MI / the linear proxy (0: none kept)


def moments_bytes(n_layers: int, dx: int, dy: int, n_slots: int, *, compensated: bool,
                  packed: bool) -> int:
    """Bytes of one probe's :class:`layerprobe.stats.Moments` (float64; ``X^T X`` as its upper
    triangle when ``packed``; every sum twice with its compensation term when ``compensated``)."""
    xx = dx * (dx + 1) // 2 if packed else dx * dx
    per_slot = n_layers * (xx + dx * dy + dx) + dy * dy + dy
    return per_slot * n_slots * 8 * (2 if compensated else 1)


@dataclass(frozen=True)
class Estimate:
    """A scoring run's memory, in bytes, by part; ``peak`` is what the plan is checked against."""

    moments: dict[str, int]  # per probe
    buffers: dict[str, int]  # per probe: flush buffer and its sorted copy
    items: dict[str, int]  # per probe: pooled items kept for MI / the linear proxy
    model: int
    forward: int
    fits: int  # the largest probe's fit working set
    base: int = BASE_BYTES

    def peak(self, probes: Sequence[str] | None = None) -> int:
        """Peak bytes when ``probes`` (default: all) are accumulated in one pass: the larger of
        the accumulation (buffers, a forward batch) and the fits, on top of what is kept."""
        names = list(self.moments) if probes is None else list(probes)
        kept = self.base + self.model + sum(self.moments[p] + self.items[p] for p in names)
        streaming = sum(self.buffers[p] for p in names) + self.forward
        return kept + max(streaming, self.fits)

    def describe(self, probes: Sequence[str] | None = None) -> str:
        names = list(self.moments) if probes is None else list(probes)
        parts = ", ".join(f"{p} {self.moments[p] / GB:.1f}" for p in names)
        return (f"about {self.peak(names) / GB:.1f} GB (moments {parts} GB; buffers "
                f"{sum(self.buffers[p] for p in names) / GB:.1f}, items "
                f"{sum(self.items[p] for p in names) / GB:.1f}, model {self.model / GB:.1f}, "
                f"fits {self.fits / GB:.1f} GB)")


def estimate(n_layers: int, dx: int, probes: Sequence[ProbeShape], *, n_slots: int,
             compensated: bool, packed: bool, model_bytes: int, frames_per_batch: int,
             buffer_rows: int = 4096) -> Estimate:
    """The memory of scoring a model with ``n_layers`` states of ``dx`` dimensions."""
    one_slot_xx = n_layers * dx * dx * 8
    return Estimate(
        moments={p.name: moments_bytes(n_layers, dx, p.dy, n_slots, compensated=compensated,
                                       packed=packed) for p in probes},
        # float32 rows, their sorted copy while flushing, one split's rows in float64
        buffers={p.name: buffer_rows * (n_layers * dx * 4 * 4 + p.dy * 8 * 2) for p in probes},
        items={p.name: p.items * n_layers * dx * 4 for p in probes},
        model=model_bytes,
        forward=FORWARD_COPIES * n_layers * frames_per_batch * dx * 4,
        fits=FIT_COPIES * one_slot_xx)


def available_bytes() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` (None where there is none)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def default_budget() -> int | None:
    """The budget when none is set: 90 % of the memory available now (None if unknown)."""
    free = available_bytes()
    return None if free is None else int(AVAILABLE_FRACTION * free)


@dataclass(frozen=True)
class MemoryPlan:
    """How a run fits its budget: the probes of each pass over the corpus."""

    passes: tuple[tuple[str, ...], ...]
    peak: int  # estimated bytes of the largest pass
    budget: int | None
    estimate: Estimate

    def describe(self) -> str:
        est = self.estimate
        budget = "no budget known" if self.budget is None else \
            f"budget {self.budget / GB:.1f} GB"
        if len(self.passes) == 1:
            return f"memory: {est.describe(self.passes[0])}; {budget}"
        return (f"memory: {est.describe()} does not fit the {budget}: "
                f"{len(self.passes)} passes over the corpus ("
                + "; ".join(f"{'+'.join(p)} {est.peak(p) / GB:.1f} GB" for p in self.passes)
                + ")")


class MemoryBudgetError(ValueError):
    """The run cannot fit the memory budget (the message says what it needs)."""


def plan_passes(est: Estimate, budget: int | None, *, order: Sequence[str] | None = None
                ) -> MemoryPlan:
    """One pass if everything fits ``budget`` (or no budget is known); else probes grouped into
    passes greedily in ``order`` (default: the estimate's); a probe that does not fit alone is a
    :class:`MemoryBudgetError`."""
    names = list(order) if order is not None else list(est.moments)
    if budget is None or est.peak(names) <= budget:
        return MemoryPlan((tuple(names),), est.peak(names), budget, est)
    too_big = [p for p in names if est.peak([p]) > budget]
    if too_big:
        p = max(too_big, key=lambda name: est.peak([name]))
        raise MemoryBudgetError(
            f"scoring needs {est.describe([p])} for probe {p!r} alone, more than the memory "
            f"budget of {budget / GB:.1f} GB; set a larger [model] memory_gb (--memory-gb) if "
            "the machine has it, or halve the moments with [cca] exact_sums = false (sums then "
            "depend on their order) or [probes] shards_per_split = 1 with --seeds 1 (no "
            "spread)")
    passes: list[list[str]] = []
    for p in names:
        for group in passes:
            if est.peak([*group, p]) <= budget:
                group.append(p)
                break
        else:
            passes.append([p])
    groups = tuple(tuple(g) for g in passes)
    return MemoryPlan(groups, max(est.peak(g) for g in groups), budget, est)


def budget_from_gb(memory_gb: float) -> int | None:
    """The budget in bytes: ``memory_gb`` when positive, else :func:`default_budget`."""
    if memory_gb < 0:
        raise ValueError(f"memory_gb must be >= 0 (0: the memory available), got {memory_gb}")
    return int(memory_gb * GB) if memory_gb > 0 else default_budget()
