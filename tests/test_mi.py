"""Mutual-information scores: recomputed from a contingency table, limits and errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.cluster import MiniBatchKMeans

from layerprobe.mi import label_entropy, mi_score


def _mi_from_table(a: np.ndarray, b: np.ndarray) -> float:
    """MI (nats) from the joint counts, written out."""
    ua, ia = np.unique(a, return_inverse=True)
    ub, ib = np.unique(b, return_inverse=True)
    joint = np.zeros((len(ua), len(ub)))
    np.add.at(joint, (ia, ib), 1)
    p = joint / joint.sum()
    pa, pb = p.sum(1, keepdims=True), p.sum(0, keepdims=True)
    nz = p > 0
    return float((p[nz] * np.log(p[nz] / (pa @ pb)[nz])).sum())


def _data(n=600, d=5, n_classes=4, seed=0, spread=0.05):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_classes, n)
    centres = rng.standard_normal((n_classes, d)) * 5
    sep = centres[labels] + spread * rng.standard_normal((n, d))
    noise = rng.standard_normal((n, d))
    return np.stack([sep, noise]).astype(np.float32), labels, rng.random(n) < 0.7


def test_scores_match_contingency_table_and_limits():
    x, labels, train = _data()
    res = mi_score(torch.from_numpy(x), torch.from_numpy(labels), torch.from_numpy(train),
                   n_clusters=4, batch_size=64, seed=3)
    for layer in range(2):
        km = MiniBatchKMeans(n_clusters=4, batch_size=64, max_iter=500, random_state=3, n_init=3)
        pred = km.fit(x[layer][train]).predict(x[layer][~train])
        h = label_entropy(labels[~train])
        p = np.bincount(labels[~train]) / (~train).sum()
        assert h == pytest.approx(-(p * np.log(p)).sum())
        assert res.scores[layer] == pytest.approx(_mi_from_table(labels[~train], pred) / h,
                                                  rel=1e-9)
    assert res.scores[0] > 0.95  # separable layer
    assert res.scores[1] < 0.1  # noise layer
    assert json.loads(json.dumps(res.to_dict()))["scores"] == res.scores


def test_seeded_and_clipping_note():
    x, labels, train = _data(n=60)
    a = mi_score(x, labels, train, n_clusters=500, batch_size=16, seed=1)
    b = mi_score(x, labels, train, n_clusters=500, batch_size=16, seed=1)
    assert a.scores == b.scores
    assert a.details["n_clusters"] == int(train.sum()) and a.details["notes"]
    c = mi_score(x[0], labels, train, n_clusters=3, batch_size=16, seed=1)
    assert len(c.scores) == 1 and not c.details["notes"]


def test_errors():
    x, labels, train = _data(n=50)
    with pytest.raises(ValueError, match="train_mask"):
        mi_score(x, labels, train.astype(int), n_clusters=2, batch_size=8)
    with pytest.raises(ValueError, match="labels"):
        mi_score(x, labels[:-1], train, n_clusters=2, batch_size=8)
    with pytest.raises(ValueError, match="held-out"):
        mi_score(x, labels, np.ones(50, bool), n_clusters=2, batch_size=8)
    x[1, 3, 0] = np.nan
    with pytest.raises(ValueError, match=r"layer\(s\) \[1\]"):
        mi_score(x, labels, train, n_clusters=2, batch_size=8)
