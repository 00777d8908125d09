"""Figures of layerwise curves, read from Results (the one results format)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from layerprobe.atomic import atomic_write  # noqa: E402
from layerprobe.labels import unique_labels  # noqa: E402
from layerprobe.registry import ALL_PROBES  # noqa: E402
from layerprobe.results import Result, load_results  # noqa: E402

PROBE_ORDER = ALL_PROBES  # panels in this order (layerprobe.registry)
METRIC_NAMES = {
    "pwcca": "PWCCA",
    "pwcca-centred": "PWCCA (centred)",
    "mean-cca": "mean CCA",
    "svcca": "SVCCA",
    "cka": "linear CKA",
    "mi": "MI / H(labels)",
    "linear-accuracy": "linear accuracy",
}
_ITERATION = re.compile(r"(?:^|[^a-z])it(?:er(?:ation)?)?[-_ ]?(\d+)$", re.IGNORECASE)


def natural_key(text: str) -> list[object]:
    """Sort key in which ``it2`` comes before ``it10``."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", text)]


def _panels(results: Sequence[Result]) -> list[tuple[str, str]]:
    keys = {r.key for r in results}
    rank = {p: i for i, p in enumerate(PROBE_ORDER)}
    return sorted(keys, key=lambda k: (rank.get(k[0], len(rank)), k[0], k[1]))


RUN_MAPS = ("Blues", "Oranges", "Greens", "Purples", "Reds", "Greys")


def _colours(labels: Sequence[str]) -> dict[str, object]:
    """Iterations get a sequential map (progression reads as colour), one map per run prefix
    (``demo/it1``, ``p5/it1``: blues for demo, oranges for p5); other labels tab10."""
    matches = [_ITERATION.search(lbl) for lbl in labels]
    if not labels or not all(matches):
        cmap = plt.get_cmap("tab10")
        return {lbl: cmap(i % 10) for i, lbl in enumerate(labels)}
    runs: dict[str, list[str]] = {}
    for lbl, match in zip(labels, matches, strict=True):
        runs.setdefault(lbl[: match.start(1)], []).append(lbl)
    colours: dict[str, object] = {}
    for r, members in enumerate(runs.values()):
        if len(runs) == 1:
            cmap, low, high = plt.get_cmap("viridis"), 0.0, 0.9
        else:  # a lone iteration takes its run's strongest shade
            cmap, low, high = plt.get_cmap(RUN_MAPS[r % len(RUN_MAPS)]), 0.45, 0.9
            low = high if len(members) == 1 else low
        n = max(len(members) - 1, 1)
        colours.update({lbl: cmap(low + (high - low) * i / n) for i, lbl in enumerate(members)})
    return colours


def row_fields(results: Sequence[Result]) -> list[str]:
    """Meta fields that can split results into rows: those with a plain (str/number) value."""
    fields = {k for r in results for k, v in r.meta.items()
              if isinstance(v, str | int | float | bool)}
    return sorted(fields)


def _check_rows_by(results: Sequence[Result], rows_by: str) -> None:
    valid = row_fields(results)
    if rows_by not in valid:
        raise ValueError(f"rows by {rows_by!r}: not a meta field of these results with plain "
                         f"values; valid fields: {', '.join(valid) or '(none)'}")


def _file_runs(paths: Sequence[Path]) -> list[str]:
    """A run name per results file: its folder's (``runs/p5/profile.json`` -> ``p5``), or the
    file's own name when files share a folder."""
    folders = [p.resolve().parent for p in paths]
    distinct = len(set(folders)) == len(set(p.resolve() for p in paths))
    return unique_labels([str(f) for f in folders] if distinct else [str(p) for p in paths])


def _distinct_labels(results: Sequence[Result]) -> list[Result]:
    """Results whose label is shared by several models get labels that tell the models apart."""
    models_of: dict[str, list[str]] = {}
    for r in results:
        models_of.setdefault(r.label, [])
        if r.model not in models_of[r.label]:
            models_of[r.label].append(r.model)
    renamed = {(label, model): new for label, models in models_of.items() if len(models) > 1
               for model, new in zip(models, unique_labels(models), strict=True)}
    return [replace(r, label=renamed.get((r.label, r.model), r.label)) for r in results]


def results_of_files(paths: Sequence[str | Path], *, rows_by: str | None = None) -> list[Result]:
    """The results of several files, ready to plot together.

    Each result gets ``meta["run"]`` (its own, else the file's run: see ``_file_runs``). When a
    label occurs in several files, every label becomes ``<run>/<label>`` so that curves of
    different runs stay apart (unless ``rows_by`` is ``"run"``: each run has its own row then).
    """
    paths = [Path(p) for p in paths]
    per_file = [_distinct_labels(load_results(p)) for p in paths]
    runs = _file_runs(paths)
    per_file = [[replace(r, meta={**r.meta, "run": str(r.meta.get("run", run))}) for r in rs]
                for rs, run in zip(per_file, runs, strict=True)]
    files_of_label: dict[str, set[int]] = {}
    for i, rs in enumerate(per_file):
        for r in rs:
            files_of_label.setdefault(r.label, set()).add(i)
    results = [r for rs in per_file for r in rs]
    if rows_by == "run" or all(len(files) == 1 for files in files_of_label.values()):
        return results
    return [replace(r, label=f"{r.meta['run']}/{r.label}") for r in results]


def check_figure_path(out: str | Path) -> Path:
    """``out`` as a Path if it names a figure format we write, else a ValueError naming it."""
    out = Path(out)
    if out.suffix.lower() not in (".png", ".pdf", ".svg"):
        raise ValueError(f"{out}: figure must be .png, .pdf or .svg")
    return out


def plot_layerwise(
    results: Sequence[Result],
    out: str | Path,
    *,
    title: str | None = None,
    rows_by: str | None = None,
) -> Path:
    """Draw a panel per (probe, metric) and a curve per result label; write PNG or PDF.

    ``rows_by`` names a ``meta`` field (e.g. ``"schedule"``, ``"run"``): one row of panels per
    value, in the order of first appearance, sharing each column's y axis, each row with its own
    colour scale (an unknown field is a ValueError listing the valid ones).
    Each curve is labelled at its right end, so no legend hunting is needed.
    """
    if not results:
        raise ValueError("no results to plot")
    out = check_figure_path(out)
    if rows_by:
        _check_rows_by(results, rows_by)
    panels = _panels(results)
    # rows in the order they first appear (the order of the files a user passes)
    rows = list(dict.fromkeys(str(r.meta.get(rows_by, "")) for r in results)) if rows_by \
        else [""]
    labels = sorted({r.label for r in results}, key=natural_key)
    colours = {row: _colours(sorted({r.label for r in results
                                     if not rows_by or str(r.meta.get(rows_by, "")) == row},
                                    key=natural_key)) for row in rows}
    fig, axes = plt.subplots(
        len(rows), len(panels), figsize=(3.6 * len(panels) + 0.8, 2.9 * len(rows) + 0.6),
        squeeze=False, sharey="col" if len(rows) > 1 else False,
    )
    spread = False
    pooled = set()  # "std over N runs" of pooled results (layerprobe pool)
    for row_index, row in enumerate(rows):
        for col, (probe, metric) in enumerate(panels):
            ax = axes[row_index][col]
            chosen = [r for r in results if r.key == (probe, metric)
                      and (not rows_by or str(r.meta.get(rows_by, "")) == row)]
            for r in sorted(chosen, key=lambda r: natural_key(r.label)):
                ax.plot(r.layers, r.scores, marker="o", markersize=3, linewidth=1.6,
                        color=colours[row][r.label], label=r.label)
                if r.std is not None:  # the spread over seeds: a band of +-1 std
                    low = [s - d for s, d in zip(r.scores, r.std, strict=True)]
                    high = [s + d for s, d in zip(r.scores, r.std, strict=True)]
                    ax.fill_between(r.layers, low, high, color=colours[row][r.label],
                                    alpha=0.2, linewidth=0)
                    if "runs" in r.details:
                        pooled.add(str(r.details.get("spread", "")))
                    else:
                        spread = True
                ax.annotate(r.label, (r.layers[-1], r.scores[-1]), xytext=(4, 0),
                            textcoords="offset points", fontsize=7, va="center",
                            color=colours[row][r.label])
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
    one_colour_each = all(len({str(colours[row][lbl]) for row in rows if lbl in colours[row]})
                          == 1 for lbl in labels)
    if not one_colour_each:  # rows colour the same label differently: each curve is annotated
        handles = []
    show_legend = len(labels) > 1 and bool(handles)
    if show_legend:
        fig.legend(handles, names, loc="lower center", ncol=min(len(labels), 8), fontsize=8,
                   frameon=False)
    if title:
        fig.suptitle(title, fontsize=11)
    kinds = sorted(pooled) + (["std over seeds (split seeds for CCA, k-means seeds for MI)"]
                              if spread else [])
    spread = bool(kinds)
    if spread:  # what each kind of band is a std over (pooled runs, and/or seeds)
        fig.text(0.995, 0.005, "bands: ±1 " + "; ".join(kinds), ha="right", va="bottom",
                 fontsize=6, color="0.4")
    fig.tight_layout(rect=(0, 0.06 if show_legend else 0.02 if spread else 0, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        atomic_write(out, lambda handle: fig.savefig(handle, format=out.suffix[1:], dpi=150))
    finally:
        plt.close(fig)
    return out


Point = tuple[float, float, float | None]  # (x, value, std or None)


def learning_curve_points(results: Sequence[Result]) -> dict[str, list[Point]]:
    """Per panel, one point per checkpoint at its ``meta["cumulative_step"]``: each (probe,
    metric)'s best-layer score (with that layer's std), the autoencoder index (``word_drop``,
    ``fbank_rise``) and the masked accuracy of training (``meta["acc_masked"]``)."""
    from layerprobe.autoencoder import autoencoder_index

    steps = {r.label: r.meta.get("cumulative_step") for r in results}
    panels: dict[str, list[Point]] = {}
    for r in results:
        if steps[r.label] is None:
            continue
        best = max(range(len(r.scores)), key=lambda i: r.scores[i])
        name = f"{r.probe} · {METRIC_NAMES.get(r.metric, r.metric)}, best layer"
        panels.setdefault(name, []).append(
            (steps[r.label], r.scores[best], r.std[best] if r.std else None))
    for row in autoencoder_index(results):
        for index in ("word_drop", "fbank_rise"):
            if row.get(index) is not None and steps.get(row["label"]) is not None:
                panels.setdefault(f"{index} ({row['metric']})", []).append(
                    (steps[row["label"]], row[index], row.get(f"{index}_std")))
    accuracy = {r.label: r.meta.get("acc_masked") for r in results}
    for label, acc in accuracy.items():
        if acc is not None and steps[label] is not None:
            panels.setdefault("masked accuracy (training)", []).append((steps[label], acc, None))
    return {name: sorted(points) for name, points in panels.items()}


def plot_curves(series: Mapping[str, Mapping[str, Sequence[Point]]], out: str | Path, *,
                title: str | None = None, xlabel: str = "training steps (all iterations)",
                boundaries: Sequence[float] = ()) -> Path:
    """One panel per key of ``series``, one line per inner key (e.g. a run or a schedule) through
    its ``(x, value, std)`` points, with a ±1 std band where stds are given; ``boundaries``: x
    positions marked by dotted lines (e.g. iteration ends)."""
    if not series:
        raise ValueError("no curves to plot")
    out = check_figure_path(out)
    names = list(series)
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    lines = sorted({k for panel in series.values() for k in panel}, key=natural_key)
    colours = _colours(lines)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows + 0.6), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        for line in lines:
            points = sorted(series[name].get(line, ()))
            if not points:
                continue
            x = [p[0] for p in points]
            y = [p[1] for p in points]
            ax.plot(x, y, marker="o", markersize=3, linewidth=1.5, color=colours[line],
                    label=line)
            if all(p[2] is not None for p in points):
                ax.fill_between(x, [v - p[2] for v, p in zip(y, points, strict=True)],
                                [v + p[2] for v, p in zip(y, points, strict=True)],
                                color=colours[line], alpha=0.2, linewidth=0)
        for b in boundaries:
            ax.axvline(b, color="0.6", linestyle=":", linewidth=0.8)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    if len(lines) > 1:
        fig.legend(*axes.flat[0].get_legend_handles_labels(), loc="lower center",
                   ncol=min(len(lines), 6), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.05 if len(lines) > 1 else 0, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        atomic_write(out, lambda handle: fig.savefig(handle, format=out.suffix[1:], dpi=150))
    finally:
        plt.close(fig)
    return out


def plot_learning_curves(runs: Sequence[tuple[str, Sequence[Result]]], out: str | Path, *,
                         title: str | None = None) -> Path:
    """Learning curves of one or more runs (name, results of their step checkpoints)."""
    series: dict[str, dict[str, Sequence[Point]]] = {}
    for name, results in runs:
        for panel, points in learning_curve_points(results).items():
            series.setdefault(panel, {})[name] = points
    return plot_curves(series, out, title=title)
