"""Linear classification of segment labels from frozen features: the downstream proxy.

For each layer, a multinomial logistic regression (L2-regularised, with intercept, on features
standardised with the train items' mean and std) predicts each item's label (e.g. its phone) from
its pooled features; the score is the held-out accuracy. It is the cheap stand-in for
SUPERB-style phone recognition from frozen features, on exactly the items and splits of the CCA
probes:

* items are dealt into shards by the probe (:mod:`layerprobe.probes`); each split seed re-deals
  whole shards into ``n_splits`` splits (:func:`layerprobe.cca.shard_groups`);
* each trial takes the CCA protocol's (dev, test) pair of that seed
  (:func:`layerprobe.cca.trial_pairs`) and trains on the other splits;
* the regulariser is chosen on dev from ``L2_GRID`` (strongest first, each fit warm-started from
  the previous one), and the test accuracy at that choice is the trial's score;
* a seed's score is the mean over trials; the reported score is the mean over split seeds and
  ``std`` their standard deviation (ddof 1).

All layers are fitted together (one L-BFGS over ``[L, d + 1, K]`` weights; the objective is a sum
of independent per-layer objectives, so its optimum is every layer's own). The objective of a
layer is ``mean cross-entropy + l2 / 2 * ||W||^2`` (intercept not penalised): scikit-learn's
``LogisticRegression(C=1 / (l2 * n_train))``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from layerprobe.cca import shard_groups, trial_pairs
from layerprobe.stats import check_finite

__all__ = ["L2_GRID", "LinearResult", "fit_logistic", "linear_accuracy", "standardise"]

L2_GRID: tuple[float, ...] = (1e-2, 1e-3, 1e-4)  # strongest first: each fit warm-starts the next
MAX_ITER = 200  # L-BFGS iterations per regulariser (1e-2: ~100 to converge, 1e-3: ~200)
TOLERANCE = 1e-5  # L-BFGS stops when the largest gradient entry is below this


@dataclass(frozen=True)
class LinearResult:
    """Per-layer held-out accuracy (mean over split seeds), its spread and JSON-able details."""

    scores: list[float]
    details: dict = field(default_factory=dict)
    std: list[float] | None = None


def standardise(x: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer mean and std ``[L, 1, d]`` of ``x [L, n, d]`` over ``rows`` (a std of 0 → 1)."""
    sub = x[:, rows]
    mean = sub.mean(dim=1, keepdim=True)
    std = sub.std(dim=1, keepdim=True, unbiased=False)
    return mean, torch.where(std > 0, std, torch.ones_like(std))


def _logits(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x [L, n, d] @ w[:, :d] + w[:, d]`` → ``[L, n, K]``."""
    return torch.baddbmm(w[:, -1:, :], x, w[:, :-1, :])


def fit_logistic(x: torch.Tensor, y: torch.Tensor, n_classes: int, l2: float, *,
                 init: torch.Tensor | None = None, max_iter: int = MAX_ITER,
                 tolerance: float = TOLERANCE) -> torch.Tensor:
    """Multinomial logistic regression of every layer: ``x [L, n, d]``, ``y [n]`` class ids in
    ``[0, n_classes)`` → weights ``[L, d + 1, n_classes]`` (last row: intercepts) minimising
    ``mean CE + l2 / 2 * ||W[:, :d]||^2`` per layer. ``init``: warm start."""
    if x.ndim != 3 or y.shape != (x.shape[1],):
        raise ValueError(f"fit_logistic: x must be [L, n, d] and y [n], got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    if l2 < 0 or n_classes < 2:
        raise ValueError(f"fit_logistic: need l2 >= 0 and n_classes >= 2, got {l2}, {n_classes}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= n_classes):
        raise ValueError(f"fit_logistic: class ids must lie in [0, {n_classes})")
    n_layers, n, d = x.shape
    shape = (n_layers, d + 1, n_classes)
    w = torch.zeros(shape, dtype=x.dtype, device=x.device) if init is None else init.clone()
    if tuple(w.shape) != shape:
        raise ValueError(f"fit_logistic: init must be {shape}, got {tuple(w.shape)}")
    w.requires_grad_(True)
    target = y.expand(n_layers, n).reshape(-1)
    optimiser = torch.optim.LBFGS([w], lr=1.0, max_iter=max_iter, tolerance_grad=tolerance,
                                  tolerance_change=1e-12, history_size=20,
                                  line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        logits = _logits(x, w).reshape(-1, n_classes)
        # sum over layers of each layer's mean cross-entropy
        loss = torch.nn.functional.cross_entropy(logits, target, reduction="sum") / n
        loss = loss + 0.5 * l2 * w[:, :-1].pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimiser.step(closure)
    return w.detach()


def _accuracy(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Per-layer accuracy ``[L]`` of weights ``w`` on ``x [L, n, d]``, ``y [n]``."""
    return (_logits(x, w).argmax(dim=-1) == y).to(torch.float64).mean(dim=1)


def _trial(x: torch.Tensor, y: torch.Tensor, n_classes: int, train: torch.Tensor,
           dev: torch.Tensor, test: torch.Tensor, l2_grid: Sequence[float], max_iter: int
           ) -> dict[str, list]:
    """Fit on ``train`` for every regulariser, choose per layer on ``dev``, score on ``test``."""
    mean, std = standardise(x, train)

    def part(rows: torch.Tensor) -> torch.Tensor:
        return (x[:, rows] - mean) / std

    x_train, x_dev, x_test = part(train), part(dev), part(test)
    w = None
    dev_acc, test_acc = [], []
    for l2 in l2_grid:
        w = fit_logistic(x_train, y[train], n_classes, l2, init=w, max_iter=max_iter)
        dev_acc.append(_accuracy(x_dev, y[dev], w))
        test_acc.append(_accuracy(x_test, y[test], w))
    dev_t, test_t = torch.stack(dev_acc), torch.stack(test_acc)  # [n_l2, L]
    best = dev_t.argmax(dim=0)  # first (strongest) regulariser among ties
    layers = torch.arange(x.shape[0])
    return {"l2": [float(l2_grid[int(b)]) for b in best],
            "dev_accuracy": dev_t[best, layers].tolist(),
            "test_accuracy": test_t[best, layers].tolist()}


def linear_accuracy(features, labels, shards, *, n_splits: int = 10, n_trials: int = 1,
                    n_seeds: int = 1, seed: int = 0, l2_grid: Sequence[float] = L2_GRID,
                    max_iter: int = MAX_ITER, device: torch.device | str | None = None
                    ) -> LinearResult:
    """Held-out linear classification accuracy per layer (module docstring).

    ``features [L, n, d]`` (or ``[n, d]``), ``labels [n]`` class ids, ``shards [n]`` the items'
    shard ids in ``[0, n_shards)`` (``n_shards`` a multiple of ``n_splits``; split seeds after the
    first need at least two shards per split).
    """
    x = features if isinstance(features, torch.Tensor) else torch.as_tensor(np.asarray(features))
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3:
        raise ValueError(f"linear_accuracy: features must be [L, n, d] or [n, d], got "
                         f"{tuple(x.shape)}")
    n_layers, n, _ = x.shape
    y = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    shard = np.asarray(shards, dtype=np.int64)
    if y.shape != (n,) or shard.shape != (n,):
        raise ValueError(f"linear_accuracy: labels and shards must have shape ({n},), got "
                         f"{tuple(y.shape)} and {shard.shape}")
    if n_seeds < 1 or n_trials < 1 or not l2_grid:
        raise ValueError(f"linear_accuracy: need n_seeds >= 1, n_trials >= 1 and a regulariser "
                         f"grid, got {n_seeds}, {n_trials}, {list(l2_grid)}")
    if 2 * n_trials > n_splits:
        raise ValueError(f"linear_accuracy: {n_trials} trials need {2 * n_trials} splits, got "
                         f"{n_splits}")
    n_shards = int(shard.max()) + 1 if n else n_splits
    n_shards = -(-n_shards // n_splits) * n_splits
    if n_seeds > 1 and n_shards < 2 * n_splits:
        raise ValueError(f"linear_accuracy: {n_seeds} split seeds need at least 2 shards per "
                         f"split; the items have {n_shards} shards for {n_splits} splits")
    classes, y = torch.unique(y, return_inverse=True)
    if classes.numel() < 2:
        raise ValueError("linear_accuracy: the items have a single class")
    target = torch.device(device) if device is not None else x.device
    x = x.to(target).float() if not x.is_floating_point() else x.to(target)
    check_finite(x, name="linear_accuracy features", layered=True)
    y = y.to(target)
    seed_scores, seed_trials = [], []
    for index in range(n_seeds):
        groups = shard_groups(n_shards, n_splits, index, seed)
        split_of = np.empty(n_shards, dtype=np.int64)
        for j, group in enumerate(groups):
            split_of[group] = j
        split = torch.from_numpy(split_of[shard]).to(target)
        trials = []
        for dev_s, test_s in trial_pairs(n_splits, seed + index)[:n_trials]:
            rows = {name: torch.nonzero(mask).flatten() for name, mask in (
                ("train", (split != dev_s) & (split != test_s)), ("dev", split == dev_s),
                ("test", split == test_s))}
            if min(r.numel() for r in rows.values()) < 1:
                raise ValueError(f"linear_accuracy: (dev {dev_s}, test {test_s}) leaves an "
                                 "empty train, dev or test set")
            trials.append({"dev": dev_s, "test": test_s,
                           **_trial(x, y, int(classes.numel()), rows["train"], rows["dev"],
                                    rows["test"], l2_grid, max_iter)})
        seed_trials.append(trials)
        seed_scores.append(np.mean([t["test_accuracy"] for t in trials], axis=0).tolist())
    table = np.asarray(seed_scores)  # [n_seeds, L]
    counts = np.bincount(y.cpu().numpy(), minlength=classes.numel())
    details = {
        "protocol": {"n_splits": n_splits, "n_trials": n_trials, "n_seeds": n_seeds,
                     "seed": seed, "l2_grid": [float(v) for v in l2_grid], "max_iter": max_iter,
                     "model": "multinomial logistic regression on standardised features"},
        "n_classes": int(classes.numel()),
        "majority_baseline": float(counts.max() / counts.sum()),
        "seed_scores": seed_scores,
        "trials": seed_trials,
    }
    if n_seeds > 1:
        details["spread"] = f"std over {n_seeds} split seeds (re-dealt shards, ddof 1)"
    return LinearResult(scores=table.mean(axis=0).tolist(), details=details,
                        std=table.std(axis=0, ddof=1).tolist() if n_seeds > 1 else None)
