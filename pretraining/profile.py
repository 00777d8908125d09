"""Profiling of each iteration's checkpoint with ``layerprobe.score`` and the autoencoder index.

Autoencoder index (per checkpoint label and metric):

- ``word_drop`` = (max over layers − last layer) / max of the word probe's scores: how much
  word information the top layer has lost relative to the best layer (0 = the top layer is the
  best; large = "autoencoder" top layers). Undefined (None) when the max is <= 0.
- ``fbank_rise`` = last layer − min over layers of the fbank probe's scores: how far the top
  layer climbs back towards the input features (0 = the top layer is the least fbank-like).

Both are computed only for probes present in the results; nothing else is added. Where a result
carries per-seed curves (``details["seed_scores"]``, split seeds), each index is also computed per
seed and its standard deviation over seeds is reported (``word_drop_std``, ``fbank_rise_std``): a
difference between checkpoints smaller than that is not a finding.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from layerprobe.atomic import atomic_write_text
from layerprobe.results import Result, load_results, save_results
from pretraining.config import ProfileConfig


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
    """Std (ddof 1) over split seeds of an index computed on each seed's curve."""
    per_seed = r.details.get("seed_scores") or []
    values = [index(curve) for curve in per_seed]
    if len(values) < 2 or any(v is None for v in values):
        return None
    return statistics.stdev(values)


def autoencoder_index(results: Sequence[Result]) -> list[dict[str, Any]]:
    """One row per (label, metric): ``word_drop`` and ``fbank_rise`` where the probe exists,
    with their std over split seeds (``*_std``, None without per-seed curves)."""
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


def format_index(rows: Sequence[dict[str, Any]]) -> str:
    def fmt(row: dict[str, Any], name: str) -> str:
        v, std = row.get(name), row.get(f"{name}_std")
        if v is None:
            return "n/a"
        return f"{v:.3f}" if std is None else f"{v:.3f} ± {std:.3f}"

    lines = [f"{'checkpoint':<12} {'metric':<14} {'word_drop':>15} {'fbank_rise':>15}"]
    for row in rows:
        lines.append(f"{row['label']:<12} {row['metric']:<14} {fmt(row, 'word_drop'):>15} "
                     f"{fmt(row, 'fbank_rise'):>15}")
    lines.append("(± : std over split seeds; differences smaller than that are not findings)")
    return "\n".join(lines)


def analysis_config(profile: ProfileConfig, device: str):
    """The ``AnalysisConfig`` the profile uses: its TOML (if any) with the profile's overrides."""
    from layerprobe.config import AnalysisConfig

    cfg = AnalysisConfig.from_toml(profile.analysis_config) if profile.analysis_config \
        else AnalysisConfig()
    changes: dict[str, Any] = {"probes": profile.probes, "metrics": profile.metrics,
                               "device": device}
    if profile.corpus:
        changes["corpus"] = profile.corpus
    if profile.max_utterances:
        changes["max_utterances"] = profile.max_utterances
    return cfg.replace(**changes)


def collect_results(run_dir: Path, n_iterations: int) -> list[Result]:
    """All ``it{i}/probe.json`` results of a run so far, in iteration order."""
    out: list[Result] = []
    for i in range(1, n_iterations + 1):
        path = run_dir / f"it{i}" / "probe.json"
        if path.is_file():
            out.extend(load_results(path))
    return out


def profile_iteration(run_dir: Path, iteration: int, n_iterations: int, profile: ProfileConfig,
                      *, device: str = "cpu", meta: dict[str, Any] | None = None,
                      log: Callable[[str], None] = print) -> list[Result]:
    """Score ``it{i}/ckpt.pt``, write ``it{i}/probe.json``, and refresh the run's figure
    (``profile.png``), results (``profile.json``) and index (``autoencoder.json``)."""
    return profile_checkpoints(run_dir, [iteration], n_iterations, profile, device=device,
                               meta=meta, log=log)


def profile_checkpoints(run_dir: Path, iterations: Sequence[int], n_iterations: int,
                        profile: ProfileConfig, *, device: str = "cpu",
                        meta: dict[str, Any] | None = None,
                        log: Callable[[str], None] = print) -> list[Result]:
    """Score the checkpoints ``it{i}/ckpt.pt`` of ``iterations`` in one pass of
    :func:`layerprobe.score.score_models` (corpus read and probes built once, the same items for
    every iteration), write each ``it{i}/probe.json``, then refresh the run's figure, results and
    index. Scores in this process alone (it may be rank 0 of a training job)."""
    from layerprobe.distributed import Dist
    from layerprobe.plots import plot_layerwise
    from layerprobe.score import score_models

    cfg = analysis_config(profile, device)
    ckpts = [run_dir / f"it{i}" / "ckpt.pt" for i in iterations]
    results = score_models(ckpts, cfg.corpus or None, cfg, labels=[f"it{i}" for i in iterations],
                           dist_info=Dist())
    by_label = {f"it{i}": i for i in iterations}
    results = [Result(**{**r.to_dict(), "meta": {**r.meta, **(meta or {}),
                                                "iteration": by_label[r.label]}})
               for r in results]
    for i in iterations:
        save_results([r for r in results if r.label == f"it{i}"],
                     run_dir / f"it{i}" / "probe.json")
    everything = collect_results(run_dir, n_iterations)
    save_results(everything, run_dir / "profile.json")
    plot_layerwise(everything, run_dir / "profile.png",
                   title=f"{run_dir.name}: layerwise scores across iterations")
    rows = autoencoder_index(everything)
    atomic_write_text(run_dir / "autoencoder.json", json.dumps(rows, indent=1) + "\n")
    log(format_index(rows))
    return results
