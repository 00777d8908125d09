"""Profiling of each iteration's checkpoint with ``layerprobe.score`` and the autoencoder index.

The autoencoder index (``word_drop``, ``fbank_rise``, with their spread) is
:mod:`layerprobe.autoencoder`'s, written to ``autoencoder.json`` after every iteration.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from layerprobe.atomic import atomic_write_text
from layerprobe.autoencoder import autoencoder_index, format_index
from layerprobe.results import Result, load_results, pool_runs, save_results
from pretraining.config import ProfileConfig


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


def pool_seed_runs(run_dirs: Sequence[Path], out_dir: Path, *,
                   log: Callable[[str], None] = print) -> list[Result]:
    """Pool the profiles of the same run trained with different seeds (``run_dirs``, each with
    its ``profile.json``) into ``out_dir``: ``profile.json`` (mean curves, std over runs),
    ``profile.png`` and ``autoencoder.json`` (the index with its spread over runs: the noise a
    difference between iterations or schedules has to beat)."""
    from layerprobe.plots import plot_layerwise

    pooled = pool_runs([(d.name, load_results(d / "profile.json")) for d in run_dirs])
    save_results(pooled, out_dir / "profile.json")
    plot_layerwise(pooled, out_dir / "profile.png",
                   title=f"{out_dir.name}: {len(run_dirs)} training seeds, mean and std over runs")
    rows = autoencoder_index(pooled)
    atomic_write_text(out_dir / "autoencoder.json", json.dumps(rows, indent=1) + "\n")
    log(format_index(rows, spread=f"{len(run_dirs)} training seeds"))
    return pooled
