"""The one results format: a JSON file holding a list of layerwise scores.

Every plot and comparison reads this format. A file looks like::

    {"format": "layerprobe-results-v1",
     "results": [{"model": ..., "label": ..., "corpus": ..., "probe": "word", "metric": "pwcca",
                  "layers": [0, 1, ...], "scores": [...], "std": [...], "details": {...},
                  "meta": {...}}, ...]}

``std`` (optional) is the per-layer spread of the score: the standard deviation over seeds
(re-dealt splits for CCA metrics, k-means seeds for MI); ``details["spread"]`` says what varied.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from layerprobe.atomic import atomic_write_text

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

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "<dict>") -> Result:
        required = ("model", "label", "corpus", "probe", "metric", "layers", "scores")
        missing = [k for k in required if k not in data]
        if missing:
            raise ValueError(f"{source}: result entry lacks {missing}")
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
    return [Result.from_dict(d, source=str(path)) for d in payload.get("results", [])]
