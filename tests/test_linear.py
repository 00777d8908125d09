"""The linear-classification proxy: batched logistic regression and its held-out protocol."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from layerprobe.linear import fit_logistic, linear_accuracy, standardise


def blobs(n: int, d: int, k: int, spread: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    return rng.normal(size=(k, d))[y] + spread * rng.normal(size=(n, d)), y


def test_fit_matches_scikit_learn_logistic_regression() -> None:
    x, y = blobs(400, 6, 4, 1.5, 0)
    l2 = 1e-2
    w = fit_logistic(torch.tensor(x)[None], torch.tensor(y), 4, l2, max_iter=500,
                     tolerance=1e-10)[0]
    ref = LogisticRegression(C=1 / (l2 * len(y)), tol=1e-12, max_iter=10_000).fit(x, y)
    ours = torch.softmax(torch.tensor(x) @ w[:-1] + w[-1], dim=-1).numpy()
    assert np.abs(ours - ref.predict_proba(x)).max() < 1e-5
    assert np.abs(w[:-1].T.numpy() - ref.coef_).max() < 1e-5


def test_layers_are_fitted_independently() -> None:
    x0, y = blobs(300, 5, 3, 1.0, 1)
    x1 = np.random.default_rng(2).normal(size=x0.shape)
    both = fit_logistic(torch.tensor(np.stack([x0, x1])), torch.tensor(y), 3, 1e-3,
                        max_iter=300, tolerance=1e-9)
    alone = fit_logistic(torch.tensor(x0)[None], torch.tensor(y), 3, 1e-3, max_iter=300,
                         tolerance=1e-9)
    assert torch.allclose(both[0], alone[0], atol=1e-5)


def test_accuracy_separates_an_informative_layer_from_noise() -> None:
    x, y = blobs(1200, 8, 5, 0.3, 3)
    noise = np.random.default_rng(4).normal(size=x.shape)
    shards = np.random.default_rng(5).integers(0, 20, len(y))
    r = linear_accuracy(np.stack([x, noise]).astype(np.float32), y, shards, n_seeds=3)
    assert r.scores[0] > 0.95 and r.scores[1] < 0.4
    assert r.std is not None and len(r.std) == 2
    assert len(r.details["seed_scores"]) == 3 and r.details["n_classes"] == 5
    assert 0.15 < r.details["majority_baseline"] < 0.3


def test_the_same_items_and_seed_give_the_same_scores() -> None:
    x, y = blobs(600, 4, 3, 1.0, 6)
    shards = np.arange(len(y)) % 20
    a = linear_accuracy(x.astype(np.float32), y, shards, n_seeds=2, seed=3)
    b = linear_accuracy(x.astype(np.float32), y, shards, n_seeds=2, seed=3)
    assert a.scores == b.scores and a.details["trials"] == b.details["trials"]


def test_standardise_uses_the_given_rows_only() -> None:
    x = torch.arange(24, dtype=torch.float64).reshape(1, 6, 4)
    mean, std = standardise(x, torch.tensor([0, 1]))
    assert torch.equal(mean[0, 0], x[0, :2].mean(0)) and torch.all(std > 0)


def test_bad_inputs_are_refused() -> None:
    x, y = blobs(100, 3, 2, 1.0, 7)
    with pytest.raises(ValueError, match="shape"):
        linear_accuracy(x, y[:-1], np.zeros(100, int))
    with pytest.raises(ValueError, match="single class"):
        linear_accuracy(x, np.zeros(100, int), np.arange(100) % 10)
    with pytest.raises(ValueError, match="2 shards per split"):
        linear_accuracy(x, y, np.arange(100) % 10, n_seeds=2)
    with pytest.raises(ValueError, match="non-finite"):
        bad = x.copy()
        bad[0, 0] = np.nan
        linear_accuracy(bad, y, np.arange(100) % 10)
