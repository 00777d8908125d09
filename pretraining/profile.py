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
from layerprobe.fault_points import fault_point
from layerprobe.results import Result, load_results, pool_runs, save_results
from pretraining.config import ProfileConfig
from pretraining.storage import read_json


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


def probe_corpus(profile: ProfileConfig, device: str):
    """The profile's corpus, read as scoring reads it (tiers and sampling of its config)."""
    from layerprobe.score import resolve_corpus

    cfg = analysis_config(profile, device)
    return resolve_corpus(None, cfg)


def collect_results(run_dir: Path, n_iterations: int, name: str = "probe.json") -> list[Result]:
    """All ``it{i}/NAME`` results of a run so far (``probe.json``: final checkpoints;
    ``curve.json``: learning-curve checkpoints), in iteration order."""
    out: list[Result] = []
    for i in range(1, n_iterations + 1):
        path = run_dir / f"it{i}" / name
        if path.is_file():
            out.extend(load_results(path))
    return out


def _checkpoint_meta(path: Path) -> dict[str, Any]:
    """The ``meta`` of a layerprobe checkpoint."""
    from layerprobe.models import load_checkpoint

    return dict(load_checkpoint(path).get("meta") or {})


def _iteration_meta(run_dir: Path, iteration: int) -> dict[str, Any]:
    """What a run knows of an iteration besides its scores: the teacher quality of its targets
    (``label_stage.json``)."""
    stage = run_dir / f"it{iteration}" / "label_stage.json"
    if not stage.is_file():
        return {}
    quality = read_json(stage, "label-stage record", "delete it and --resume to measure the "
                        "targets' quality again").get("teacher_quality")
    return {"targets_quality": {k: quality[k] for k in ("phone_purity", "cluster_purity",
                                                        "pnmi")} if quality else None}


def profile_iteration(run_dir: Path, iteration: int, n_iterations: int, profile: ProfileConfig,
                      *, device: str = "cpu", meta: dict[str, Any] | None = None,
                      log: Callable[[str], None] = print) -> list[Result]:
    """Score ``it{i}/ckpt.pt`` (and its learning-curve checkpoints ``it{i}/steps/*.pt``, in the
    same pass), write ``it{i}/probe.json`` (and ``it{i}/curve.json``), and refresh the run's
    figures, results and index."""
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
    from layerprobe.plots import plot_layerwise, plot_learning_curves
    from layerprobe.score import score_models

    cfg = analysis_config(profile, device)
    ckpts: list[Path] = []
    labels: list[str] = []
    for i in iterations:
        steps = sorted((run_dir / f"it{i}" / "steps").glob("step*.pt")) \
            if profile.every_steps else []
        ckpts += [*steps, run_dir / f"it{i}" / "ckpt.pt"]
        labels += [f"it{i}@{int(p.stem[4:])}" for p in steps] + [f"it{i}"]
    extra = {label: {**(meta or {}), **_iteration_meta(run_dir, int(label[2:].split("@")[0])),
                     **_curve_meta(_checkpoint_meta(path))}
             for label, path in zip(labels, ckpts, strict=True)}
    results = score_models(ckpts, cfg.corpus or None, cfg, labels=labels, dist_info=Dist())
    fault_point("profile")
    results = [Result(**{**r.to_dict(), "meta": {**r.meta, **extra[r.label]}}) for r in results]
    for i in iterations:
        mine = [r for r in results if r.meta["iteration"] == i]
        if profile.every_steps:
            save_results(mine, run_dir / f"it{i}" / "curve.json")
        save_results([r for r in mine if r.label == f"it{i}"], run_dir / f"it{i}" / "probe.json")
    everything = collect_results(run_dir, n_iterations)
    save_results(everything, run_dir / "profile.json")
    plot_layerwise(everything, run_dir / "profile.png",
                   title=f"{run_dir.name}: layerwise scores across iterations")
    if profile.every_steps:
        curve = collect_results(run_dir, n_iterations, "curve.json")
        save_results(curve, run_dir / "curve.json")
        plot_learning_curves([(run_dir.name, curve)], run_dir / "curve.png",
                             title=f"{run_dir.name}: best-layer scores over training")
    rows = autoencoder_index(everything)
    atomic_write_text(run_dir / "autoencoder.json", json.dumps(rows, indent=1) + "\n")
    log(format_index(rows))
    return results


def _curve_meta(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """Where a checkpoint lies on the learning curve, and its masked accuracy then."""
    stats = checkpoint.get("train_stats") or {}
    return {"iteration": checkpoint.get("iteration"), "step": checkpoint.get("step"),
            "cumulative_step": checkpoint.get("cumulative_step"),
            "acc_masked": stats.get("acc_masked"), "loss": stats.get("loss")}


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
