"""Per-layer mutual information between k-means cluster ids and labels (Pasad et al. 2023).

For each layer: ``MiniBatchKMeans`` is fitted on the train items, the held-out items are assigned
to clusters, and the score is ``mutual_info_score(labels, clusters) / H(labels)`` on the held-out
items (natural logs on both sides, so the ratio is unit-free), in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.cluster import MiniBatchKMeans
from sklearn.metrics import mutual_info_score

__all__ = ["MIResult", "mi_score", "label_entropy"]


@dataclass(frozen=True)
class MIResult:
    """Per-layer normalised MI and JSON-able details."""

    scores: list[float]
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"metric": "mi", "scores": [float(s) for s in self.scores],
                "details": self.details}


def label_entropy(labels: np.ndarray) -> float:
    """Entropy (nats) of the empirical label distribution."""
    _, counts = np.unique(labels, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def _as_numpy(a, *, name: str) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    return np.asarray(a)


def mi_score(features, labels, train_mask, *, n_clusters: int, batch_size: int, seed: int = 0,
             max_iter: int = 500, n_init: int = 3) -> MIResult:
    """Normalised MI per layer.

    features ``[L, n, d]`` (or ``[n, d]``), labels ``[n]`` ints, train_mask ``[n]`` bool: k-means
    is fitted on the train items and scored on the others. ``n_clusters`` is clipped to the
    number of train items (noted in details).
    """
    x = _as_numpy(features, name="features")
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3:
        raise ValueError(f"mi_score: features must be [L, n, d] or [n, d], got shape {x.shape}")
    L, n, _ = x.shape
    y = _as_numpy(labels, name="labels")
    mask = _as_numpy(train_mask, name="train_mask")
    if y.shape != (n,):
        raise ValueError(f"mi_score: labels must have shape ({n},), got {y.shape}")
    if mask.shape != (n,) or mask.dtype != np.bool_:
        raise ValueError(f"mi_score: train_mask must be a bool array of shape ({n},), got "
                         f"{mask.shape} {mask.dtype}")
    n_train, n_test = int(mask.sum()), int((~mask).sum())
    if n_train < 1 or n_test < 1:
        raise ValueError(f"mi_score: need train and held-out items, got {n_train} train and "
                         f"{n_test} held-out")
    if n_clusters < 1 or batch_size < 1:
        raise ValueError(f"mi_score: n_clusters and batch_size must be >= 1, got {n_clusters}, "
                         f"{batch_size}")
    x = x.astype(np.float32, copy=False)
    bad = [layer for layer in range(L) if not np.isfinite(x[layer]).all()]
    if bad:
        raise ValueError(f"mi_score: non-finite values (NaN/inf) in layer(s) {bad}")
    k = min(n_clusters, n_train)
    notes = [] if k == n_clusters else [f"n_clusters clipped from {n_clusters} to {k} (the number "
                                        f"of train items)"]
    y_test = y[~mask]
    h = label_entropy(y_test)
    if h <= 0:
        raise ValueError("mi_score: the held-out labels have a single class (H(labels) = 0)")
    scores, mis, inertia = [], [], []
    for layer in range(L):
        km = MiniBatchKMeans(n_clusters=k, batch_size=batch_size, max_iter=max_iter,
                             random_state=seed, n_init=n_init)
        km.fit(x[layer][mask])
        pred = km.predict(x[layer][~mask])
        mi = float(mutual_info_score(y_test, pred))
        mis.append(mi)
        scores.append(mi / h)
        inertia.append(float(km.inertia_))
    details = {"n_clusters": k, "n_clusters_requested": n_clusters, "batch_size": batch_size,
               "max_iter": max_iter, "n_init": n_init, "seed": seed, "n_train": n_train,
               "n_test": n_test, "label_entropy": h, "mutual_info": mis,
               "train_inertia": inertia, "notes": notes}
    return MIResult(scores=scores, details=details)
