"""Figures of layerwise curves, read from Results (the one results format)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from layerprobe.atomic import atomic_write  # noqa: E402
from layerprobe.results import Result  # noqa: E402

PROBE_ORDER = ("fbank", "phone", "word", "word-embedding")
METRIC_NAMES = {
    "pwcca": "PWCCA",
    "pwcca-centred": "PWCCA (centred)",
    "mean-cca": "mean CCA",
    "svcca": "SVCCA",
    "cka": "linear CKA",
    "mi": "MI / H(labels)",
}
_ITERATION = re.compile(r"(?:^|[^a-z])it(?:er(?:ation)?)?[-_ ]?(\d+)$", re.IGNORECASE)


def natural_key(text: str) -> list[object]:
    """Sort key in which ``it2`` comes before ``it10``."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", text)]


def _panels(results: Sequence[Result]) -> list[tuple[str, str]]:
    keys = {r.key for r in results}
    rank = {p: i for i, p in enumerate(PROBE_ORDER)}
    return sorted(keys, key=lambda k: (rank.get(k[0], len(rank)), k[0], k[1]))


def _colours(labels: Sequence[str]) -> dict[str, object]:
    """Iterations get a sequential map (progression reads as colour); other labels tab10."""
    if labels and all(_ITERATION.search(lbl) for lbl in labels):
        cmap = plt.get_cmap("viridis")
        n = max(len(labels) - 1, 1)
        return {lbl: cmap(0.9 * i / n) for i, lbl in enumerate(labels)}
    cmap = plt.get_cmap("tab10")
    return {lbl: cmap(i % 10) for i, lbl in enumerate(labels)}


def plot_layerwise(
    results: Sequence[Result],
    out: str | Path,
    *,
    title: str | None = None,
    rows_by: str | None = None,
) -> Path:
    """Draw a panel per (probe, metric) and a curve per result label; write PNG or PDF.

    ``rows_by`` names a ``meta`` field (e.g. ``"schedule"``): one row of panels per value, in the
    order of first appearance, sharing each column's y axis.
    Each curve is labelled at its right end, so no legend hunting is needed.
    """
    if not results:
        raise ValueError("no results to plot")
    out = Path(out)
    if out.suffix.lower() not in (".png", ".pdf", ".svg"):
        raise ValueError(f"{out}: figure must be .png, .pdf or .svg")
    panels = _panels(results)
    # rows in the order they first appear (the order of the files a user passes)
    rows = list(dict.fromkeys(str(r.meta.get(rows_by, "")) for r in results)) if rows_by \
        else [""]
    labels = sorted({r.label for r in results}, key=natural_key)
    colours = _colours(labels)
    fig, axes = plt.subplots(
        len(rows), len(panels), figsize=(3.6 * len(panels) + 0.8, 2.9 * len(rows) + 0.6),
        squeeze=False, sharey="col" if len(rows) > 1 else False,
    )
    for row_index, row in enumerate(rows):
        for col, (probe, metric) in enumerate(panels):
            ax = axes[row_index][col]
            chosen = [r for r in results if r.key == (probe, metric)
                      and (not rows_by or str(r.meta.get(rows_by, "")) == row)]
            for r in sorted(chosen, key=lambda r: natural_key(r.label)):
                ax.plot(r.layers, r.scores, marker="o", markersize=3, linewidth=1.6,
                        color=colours[r.label], label=r.label)
                ax.annotate(r.label, (r.layers[-1], r.scores[-1]), xytext=(4, 0),
                            textcoords="offset points", fontsize=7, va="center",
                            color=colours[r.label])
            heading = f"{probe} · {METRIC_NAMES.get(metric, metric)}"
            ax.set_title(f"{row} — {heading}" if row else heading, fontsize=10)
            ax.set_xlabel("layer (0 = transformer input)")
            if col == 0:
                ax.set_ylabel("score")
            ax.grid(alpha=0.3)
            ax.margins(x=0.15)
            if chosen:
                ax.set_xticks(chosen[0].layers)
    legend: dict[str, object] = {}
    for ax in axes.flat:
        for handle, name in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(name, handle)
    names = sorted(legend, key=natural_key)
    handles = [legend[name] for name in names]
    if len(labels) > 1 and handles:
        fig.legend(handles, names, loc="lower center", ncol=min(len(labels), 8), fontsize=8,
                   frameon=False)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.06 if len(labels) > 1 else 0, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        atomic_write(out, lambda handle: fig.savefig(handle, format=out.suffix[1:], dpi=150))
    finally:
        plt.close(fig)
    return out
