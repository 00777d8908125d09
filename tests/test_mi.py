"""Mutual-information scores: the MI of the returned clusters, limits, seeds' spread, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import mutual_info_score

from layerprobe.kmeans import KMeansConfig
from layerprobe.mi import label_entropy, mi_score, mutual_information


def _data(n=600, d=5, n_classes=4, seed=0, spread=0.05):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_classes, n)
    centres = rng.standard_normal((n_classes, d)) * 5
    sep = centres[labels] + spread * rng.standard_normal((n, d))
    noise = rng.standard_normal((n, d))
    return np.stack([sep, noise]).astype(np.float32), labels, rng.random(n) < 0.7


@pytest.mark.parametrize("backend", ["torch", "sklearn"])
def test_scores_are_the_mi_of_the_returned_clusters(backend):
    x, labels, train = _data()
    res = mi_score(torch.from_numpy(x), torch.from_numpy(labels), torch.from_numpy(train),
                   n_clusters=4, kmeans=KMeansConfig(backend=backend, batch_size=64), seed=3,
                   n_seeds=2)
    y_test = labels[~train]
    h = label_entropy(y_test)
    p = np.bincount(y_test) / (~train).sum()
    assert h == pytest.approx(-(p * np.log(p)).sum())
    assert res.clusters.shape == (2, 2, int((~train).sum()))
    per_seed = [[mutual_info_score(y_test, res.clusters[s, layer]) / h for layer in range(2)]
                for s in range(2)]
    np.testing.assert_allclose(res.details["seed_scores"], per_seed, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(res.scores, np.mean(per_seed, axis=0), rtol=1e-9)
    np.testing.assert_allclose(res.std, np.std(per_seed, axis=0, ddof=1), atol=1e-12)
    assert res.details["spread"] == "k-means seeds"
    # held-out inertia: at least the clusters' own sum of squares about their means (the least
    # any centroids can give), and near it on the separable layer
    x_test = x[:, ~train].astype(np.float64)
    for s in range(2):
        for layer in range(2):
            ids = res.clusters[s, layer]
            least = sum(((x_test[layer, ids == c] - x_test[layer, ids == c].mean(0)) ** 2).sum()
                        for c in np.unique(ids))
            inertia = res.details["heldout_inertia"][s][layer]
            assert least * (1 - 1e-6) <= inertia <= (1.5 * least if layer == 0 else np.inf)
    assert res.scores[0] > 0.95  # separable layer
    assert res.scores[1] < 0.1  # noise layer
    assert json.loads(json.dumps(res.to_dict()))["scores"] == res.scores


def test_mutual_information_matches_sklearn():
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 7, 500), rng.integers(3, 20, 500)
    assert mutual_information(a, b) == pytest.approx(mutual_info_score(a, b), rel=1e-12)
    assert mutual_information(a, a) == pytest.approx(label_entropy(a), rel=1e-12)


def test_seeded_and_clipping_note():
    x, labels, train = _data(n=60)
    a = mi_score(x, labels, train, n_clusters=500, seed=1)
    b = mi_score(x, labels, train, n_clusters=500, seed=1)
    assert a.scores == b.scores and a.std is None
    assert a.details["n_clusters"] == int(train.sum()) and a.details["notes"]
    c = mi_score(x[0], labels, train, n_clusters=3, seed=1)
    assert len(c.scores) == 1 and not c.details["notes"]


def test_errors():
    x, labels, train = _data(n=50)
    with pytest.raises(ValueError, match="train_mask"):
        mi_score(x, labels, train.astype(int), n_clusters=2)
    with pytest.raises(ValueError, match="labels"):
        mi_score(x, labels[:-1], train, n_clusters=2)
    with pytest.raises(ValueError, match="held-out"):
        mi_score(x, labels, np.ones(50, bool), n_clusters=2)
    x[1, 3, 0] = np.nan
    with pytest.raises(ValueError, match=r"layer\(s\) \[1\]"):
        mi_score(x, labels, train, n_clusters=2)
