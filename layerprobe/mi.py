"""Per-layer mutual information between k-means cluster ids and labels (Pasad et al. 2023).

For each layer: k-means (:mod:`layerprobe.kmeans`, all layers in one batched fit) is fitted on the
train items, the held-out items are assigned to the nearest centroid, and the score is
``I(labels; clusters) / H(labels)`` on the held-out items (natural logs on both sides, so the
ratio is unit-free), in [0, 1]. With ``n_seeds > 1`` k-means is re-seeded (``seed + i``): the
score is the mean over seeds and the spread their standard deviation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from layerprobe.kmeans import KMeansConfig, assign_chunked, kmeans_fit
from layerprobe.stats import check_finite

__all__ = ["MIResult", "mi_score", "label_entropy", "mutual_information"]


@dataclass(frozen=True)
class MIResult:
    """Per-layer normalised MI (mean over seeds), its spread and JSON-able details.

    ``clusters`` (not saved): held-out cluster ids ``[n_seeds, L, n_test]``."""

    scores: list[float]
    details: dict = field(default_factory=dict)
    std: list[float] | None = None
    clusters: np.ndarray | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        return {"metric": "mi", "scores": [float(s) for s in self.scores], "std": self.std,
                "details": self.details}


def label_entropy(labels: np.ndarray) -> float:
    """Entropy (nats) of the empirical label distribution."""
    _, counts = np.unique(labels, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def mutual_information(a: np.ndarray, b: np.ndarray) -> float:
    """Plug-in mutual information (nats) of two label arrays of the same length."""
    _, ia = np.unique(a, return_inverse=True)
    _, ib = np.unique(b, return_inverse=True)
    nb = int(ib.max()) + 1
    joint = np.bincount(ia * nb + ib, minlength=(int(ia.max()) + 1) * nb).reshape(-1, nb)
    p = joint / joint.sum()
    pa, pb = p.sum(1, keepdims=True), p.sum(0, keepdims=True)
    nz = p > 0
    return float(max((p[nz] * np.log(p[nz] / (pa * pb)[nz])).sum(), 0.0))


def _as_numpy(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    return np.asarray(a)


def mi_score(features, labels, train_mask, *, n_clusters: int, kmeans: KMeansConfig | None = None,
             seed: int = 0, n_seeds: int = 1, device: torch.device | str | None = None
             ) -> MIResult:
    """Normalised MI per layer.

    features ``[L, n, d]`` (or ``[n, d]``), labels ``[n]`` ints, train_mask ``[n]`` bool: k-means
    is fitted on the train items and scored on the others. ``n_clusters`` is clipped to the
    number of train items (noted in details). ``device``: where the torch k-means runs (default:
    the features').
    """
    kmeans = kmeans or KMeansConfig()
    x = features if isinstance(features, torch.Tensor) else torch.as_tensor(np.asarray(features))
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3:
        raise ValueError(f"mi_score: features must be [L, n, d] or [n, d], got shape "
                         f"{tuple(x.shape)}")
    L, n, _ = x.shape
    y = _as_numpy(labels)
    mask = _as_numpy(train_mask)
    if y.shape != (n,):
        raise ValueError(f"mi_score: labels must have shape ({n},), got {y.shape}")
    if mask.shape != (n,) or mask.dtype != np.bool_:
        raise ValueError(f"mi_score: train_mask must be a bool array of shape ({n},), got "
                         f"{mask.shape} {mask.dtype}")
    n_train, n_test = int(mask.sum()), int((~mask).sum())
    if n_train < 1 or n_test < 1:
        raise ValueError(f"mi_score: need train and held-out items, got {n_train} train and "
                         f"{n_test} held-out")
    if n_clusters < 1 or n_seeds < 1:
        raise ValueError(f"mi_score: n_clusters and n_seeds must be >= 1, got {n_clusters}, "
                         f"{n_seeds}")
    x = x.float()
    check_finite(x, name="mi_score", layered=True)
    k = min(n_clusters, n_train)
    notes = [] if k == n_clusters else [f"n_clusters clipped from {n_clusters} to {k} (the number "
                                        f"of train items)"]
    y_test = y[~mask]
    h = label_entropy(y_test)
    if h <= 0:
        raise ValueError("mi_score: the held-out labels have a single class (H(labels) = 0)")
    target = torch.device(device) if device is not None else x.device
    mask_t = torch.from_numpy(mask).to(target)
    x = x.to(target)
    x_train, x_test = x[:, mask_t], x[:, ~mask_t]
    seed_scores, seed_mi, inertia, steps, clusters = [], [], [], [], []
    for i in range(n_seeds):
        # the train rows' inertia is not needed (one assignment pass less); the held-out rows'
        # comes with their assignment
        fit = kmeans_fit(x_train, k, config=kmeans, seed=seed + i, compute_inertia=False)
        ids, dist = assign_chunked(x_test, fit.centroids.to(target), memory_mb=kmeans.memory_mb)
        pred = ids.cpu().numpy()
        mis = [mutual_information(y_test, pred[layer]) for layer in range(L)]
        seed_mi.append(mis)
        seed_scores.append([mi / h for mi in mis])
        inertia.append(dist.double().sum(-1).tolist())
        steps.append(fit.n_steps)
        clusters.append(pred)
    table = np.asarray(seed_scores)
    std = table.std(axis=0, ddof=1).tolist() if n_seeds > 1 else None
    details = {"n_clusters": k, "n_clusters_requested": n_clusters, "kmeans": asdict(kmeans),
               "seed": seed, "n_seeds": n_seeds, "n_train": n_train, "n_test": n_test,
               "label_entropy": h, "mutual_info": np.mean(seed_mi, axis=0).tolist(),
               "seed_scores": seed_scores, "heldout_inertia": inertia, "kmeans_steps": steps,
               "notes": notes}
    if n_seeds > 1:
        details["spread"] = "k-means seeds"
    return MIResult(scores=table.mean(axis=0).tolist(), details=details, std=std,
                    clusters=np.stack(clusters))
