"""The autoencoder index of layerwise curves (Pasad et al.'s "autoencoder behaviour"): how far a
model's top layer has drifted from word information back towards the input features.

Per (label, metric):

- ``word_drop`` = (max over layers − last layer) / max of the word probe's scores: how much
  word information the top layer has lost relative to the best layer (0 = the top layer is the
  best; large = "autoencoder" top layers). Undefined (None) when the max is <= 0.
- ``fbank_rise`` = last layer − min over layers of the fbank probe's scores: how far the top
  layer climbs back towards the input features (0 = the top layer is the least fbank-like).

Both are computed only for probes present in the results. Where a result carries per-seed curves
(``details["seed_scores"]``: split seeds, or training runs for results pooled by
:func:`layerprobe.results.pool_runs`), each index is also computed per curve and its standard
deviation is reported (``word_drop_std``, ``fbank_rise_std``): a difference between checkpoints
smaller than that is not a finding.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from typing import Any

from layerprobe.results import Result

__all__ = ["autoencoder_index", "fbank_rise", "format_index", "word_drop"]


def word_drop(scores: Sequence[float]) -> float | None:
    """(max − last) / max, None if the max is not positive."""
    if not scores:
        raise ValueError("word_drop of an empty score list")
    top = max(scores)
    return None if top <= 0 else (top - scores[-1]) / top


def fbank_rise(scores: Sequence[float]) -> float:
    """last − min."""
    if not scores:
        raise ValueError("fbank_rise of an empty score list")
    return scores[-1] - min(scores)


def _seed_std(index: Callable[[Sequence[float]], float | None], r: Result) -> float | None:
    """Std (ddof 1) over the result's per-seed curves of an index computed on each curve."""
    per_seed = r.details.get("seed_scores") or []
    values = [index(curve) for curve in per_seed]
    if len(values) < 2 or any(v is None for v in values):
        return None
    return statistics.stdev(values)


def autoencoder_index(results: Sequence[Result]) -> list[dict[str, Any]]:
    """One row per (label, metric): ``word_drop`` and ``fbank_rise`` where the probe exists,
    with their std over the per-seed curves (``*_std``, None without them)."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for r in results:
        if r.probe not in ("word", "fbank"):
            continue
        if r.layers != sorted(r.layers):
            raise ValueError(f"result {r.label!r} ({r.probe}/{r.metric}): layers are not sorted")
        row = rows.setdefault((r.label, r.metric), {"label": r.label, "metric": r.metric})
        name, index = ("word_drop", word_drop) if r.probe == "word" else \
            ("fbank_rise", fbank_rise)
        row[name] = index(r.scores)
        row[f"{name}_std"] = _seed_std(index, r)
    return list(rows.values())


def format_index(rows: Sequence[dict[str, Any]], spread: str = "split seeds") -> str:
    """A table of the index; ``spread`` names what the ± is a std over."""
    def fmt(row: dict[str, Any], name: str) -> str:
        v, std = row.get(name), row.get(f"{name}_std")
        if v is None:
            return "n/a"
        return f"{v:.3f}" if std is None else f"{v:.3f} ± {std:.3f}"

    lines = [f"{'checkpoint':<12} {'metric':<14} {'word_drop':>15} {'fbank_rise':>15}"]
    for row in rows:
        lines.append(f"{row['label']:<12} {row['metric']:<14} {fmt(row, 'word_drop'):>15} "
                     f"{fmt(row, 'fbank_rise'):>15}")
    lines.append(f"(± : std over {spread}; differences smaller than that are not findings)")
    if spread == "split seeds":  # one run: how precisely each checkpoint is measured
        lines.append("(it leaves out training noise, which was ~20x larger on the demo: compare "
                     "iterations or schedules over training seeds, `pretrain --seeds N`)")
    return "\n".join(lines)
