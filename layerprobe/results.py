"""The one results format: a JSON file holding a list of layerwise scores.

Every plot and comparison reads this format. A file looks like::

    {"format": "layerprobe-results-v1",
     "results": [{"model": ..., "label": ..., "corpus": ..., "probe": "word", "metric": "pwcca",
                  "layers": [0, 1, ...], "scores": [...], "std": [...], "details": {...},
                  "meta": {...}}, ...]}

``std`` (optional) is the per-layer spread of the score: the standard deviation over seeds
(re-dealt splits for CCA metrics, k-means seeds for MI); ``details["spread"]`` says what varied.

:func:`append_results` merges into an existing file under an exclusive ``fcntl.flock`` on a
sidecar ``<file>.lock`` (POSIX only), so concurrent writers of one file keep each other's results.
:func:`results_to_csv` flattens results to one row per model x probe x metric x layer.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from layerprobe.atomic import atomic_write_text, current_umask

RESULTS_FORMAT = "layerprobe-results-v1"


@dataclass(frozen=True)
class Result:
    """Per-layer scores of one model for one probe and one metric."""

    model: str
    label: str
    corpus: str
    probe: str
    metric: str
    layers: list[int]
    scores: list[float]
    details: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    std: list[float] | None = None  # per layer: spread over seeds (see details["spread"])

    def __post_init__(self) -> None:
        if len(self.layers) != len(self.scores):
            raise ValueError(
                f"result {self.label!r} ({self.probe}/{self.metric}): {len(self.layers)} layers "
                f"but {len(self.scores)} scores"
            )
        pairs = zip(self.layers, self.scores, strict=True)
        bad = [layer for layer, score in pairs if not math.isfinite(score)]
        if bad:
            raise ValueError(
                f"result {self.label!r} ({self.probe}/{self.metric}): "
                f"non-finite score at layers {bad}"
            )
        if self.std is not None:
            if len(self.std) != len(self.scores):
                raise ValueError(f"result {self.label!r} ({self.probe}/{self.metric}): "
                                 f"{len(self.std)} std values for {len(self.scores)} scores")
            if not all(math.isfinite(s) and s >= 0 for s in self.std):
                raise ValueError(f"result {self.label!r} ({self.probe}/{self.metric}): std "
                                 "must be finite and >= 0")

    @property
    def key(self) -> tuple[str, str]:
        """The (probe, metric) panel this result belongs to."""
        return (self.probe, self.metric)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def merge_key(self) -> tuple[str, str, str, str]:
        """Results with the same key replace each other when merged into a file."""
        return (self.model, self.label, self.probe, self.metric)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "<dict>") -> Result:
        if not isinstance(data, dict):
            raise ValueError(f"{source}: result entry is not an object: {data!r:.60}")
        required = ("model", "label", "corpus", "probe", "metric", "layers", "scores")
        missing = [k for k in required if k not in data]
        if missing:
            raise ValueError(f"{source}: result entry lacks {missing}")
        where = f"{source}: result {data['label']!s} ({data['probe']}/{data['metric']})"
        try:
            return cls(
                model=str(data["model"]),
                label=str(data["label"]),
                corpus=str(data["corpus"]),
                probe=str(data["probe"]),
                metric=str(data["metric"]),
                layers=[int(v) for v in data["layers"]],
                scores=[float(v) for v in data["scores"]],
                details=dict(data.get("details", {})),
                meta=dict(data.get("meta", {})),
                std=None if data.get("std") is None else [float(v) for v in data["std"]],
            )
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: {err}") from err


def save_results(results: Sequence[Result], path: str | Path) -> Path:
    """Write results atomically as one JSON file."""
    payload = {"format": RESULTS_FORMAT, "results": [r.to_dict() for r in results]}
    return atomic_write_text(path, json.dumps(payload, indent=1, allow_nan=False) + "\n")


def load_results(path: str | Path) -> list[Result]:
    """Read a results file written by :func:`save_results`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such results file")
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(payload, dict) or payload.get("format") != RESULTS_FORMAT:
        raise ValueError(
            f"{path}: not a layerprobe results file (expected format {RESULTS_FORMAT!r})"
        )
    entries = payload.get("results", [])
    if not isinstance(entries, list):
        raise ValueError(f"{path}: \"results\" must be a list")
    return [Result.from_dict(d, source=str(path)) for d in entries]


def merge_results(existing: Sequence[Result], new: Sequence[Result]) -> tuple[list[Result], int]:
    """``existing`` with each result of ``new`` replacing the one with the same
    :attr:`Result.merge_key` (in place) or appended; returns (merged, number replaced)."""
    merged = list(existing)
    index = {r.merge_key: i for i, r in enumerate(merged)}
    replaced = 0
    for r in new:
        if r.merge_key in index:
            merged[index[r.merge_key]] = r
            replaced += 1
        else:
            index[r.merge_key] = len(merged)
            merged.append(r)
    return merged, replaced


def lock_path(path: str | Path) -> Path:
    """The sidecar lock file of a results file: ``<file>.lock``."""
    path = Path(path)
    return path.with_name(path.name + ".lock")


@contextlib.contextmanager
def locked(path: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (a ``flock`` on its sidecar ``<file>.lock``).

    The lock file is left in place: removing it would let a waiting writer lock a file that a
    third one no longer sees. POSIX only (fcntl).
    """
    lock = lock_path(path)
    lock.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666 & ~current_umask())
    except OSError as err:
        raise type(err)(f"{path}: cannot create the lock file {lock} "
                        f"({err.strerror or err})") from err
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def append_results(results: Sequence[Result], path: str | Path) -> tuple[list[Result], int]:
    """Merge ``results`` into the results file ``path`` (created if absent) under its lock.

    A result with the same model, label, probe and metric as one in the file replaces it; the
    others are kept. Returns (everything now in the file, number of results replaced).
    """
    path = Path(path)
    with locked(path):
        existing = load_results(path) if path.exists() else []
        merged, replaced = merge_results(existing, results)
        save_results(merged, path)
    return merged, replaced


# meta fields that describe one run, not the pooled experiment (left out of pooled results)
RUN_OWN_META = ("run", "seed", "seconds", "timings", "created", "acc_masked", "loss",
                "targets_quality")


def pool_runs(runs: Sequence[tuple[str, Sequence[Result]]]) -> list[Result]:
    """Results of several runs of the same experiment (e.g. a pretraining schedule trained with
    different seeds) pooled per (label, probe, metric): scores = mean over runs, ``std`` = std
    over runs (ddof 1), the spread a comparison between runs' setups has to beat. ``runs``:
    ``(name, results)`` pairs; every (label, probe, metric) must occur in every run, on the
    same layers. Each run's curve is kept in ``details["seed_scores"]`` (so indices computed
    per curve, e.g. :func:`layerprobe.autoencoder.autoencoder_index`, get the spread over runs)
    and its own std (split seeds) in ``details["run_std"]``."""
    if len(runs) < 2:
        raise ValueError(f"pool_runs: need at least 2 runs, got {len(runs)}")
    keys: list[tuple[str, str, str]] = []
    tables: list[dict[tuple[str, str, str], Result]] = []
    for name, results in runs:
        table: dict[tuple[str, str, str], Result] = {}
        for r in results:
            key = (r.label, r.probe, r.metric)
            if key in table:
                raise ValueError(f"{name}: two results for {key}")
            table[key] = r
            if key not in keys and not tables:
                keys.append(key)
        tables.append(table)
    for (name, _), table in zip(runs, tables, strict=True):
        missing = [k for k in keys if k not in table]
        extra = [k for k in table if k not in keys]
        if missing or extra:
            raise ValueError(f"{name}: not the same results as {runs[0][0]} (missing {missing}, "
                             f"extra {extra})")
    pooled = []
    for key in keys:
        parts = [table[key] for table in tables]
        first = parts[0]
        for (name, _), r in zip(runs, parts, strict=True):
            if r.layers != first.layers:
                raise ValueError(f"{name}: {key} has layers {r.layers}, {runs[0][0]} has "
                                 f"{first.layers}")
        curves = [r.scores for r in parts]
        n = len(curves)
        mean = [sum(c[j] for c in curves) / n for j in range(len(first.layers))]
        std = [math.sqrt(sum((c[j] - mean[j]) ** 2 for c in curves) / (n - 1))
               for j in range(len(first.layers))]
        pooled.append(Result(
            model=first.model, label=first.label, corpus=first.corpus, probe=first.probe,
            metric=first.metric, layers=list(first.layers), scores=mean, std=std,
            details={"spread": f"std over {n} runs (ddof 1)", "runs": [name for name, _ in runs],
                     "seed_scores": curves, "run_std": [r.std for r in parts],
                     "run_models": [r.model for r in parts]},
            meta={"pooled_runs": n, **{k: v for k, v in first.meta.items()  # not one run's
                                       if k not in RUN_OWN_META}}))
    return pooled


CSV_COLUMNS = ("model", "label", "corpus", "probe", "metric", "layer", "score", "std")


def results_to_csv(results: Sequence[Result]) -> str:
    """One row per model x probe x metric x layer (``std`` empty where a result has none)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for r in results:
        stds = r.std if r.std is not None else [None] * len(r.scores)
        for layer, score, std in zip(r.layers, r.scores, stds, strict=True):
            writer.writerow([r.model, r.label, r.corpus, r.probe, r.metric, layer, repr(score),
                             "" if std is None else repr(std)])
    return buffer.getvalue()


def save_csv(results: Sequence[Result], path: str | Path) -> Path:
    """Write :func:`results_to_csv` atomically."""
    return atomic_write_text(path, results_to_csv(results))
