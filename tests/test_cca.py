"""The CCA engine against a plain float64 numpy port of the reference CCA class.

The oracle below follows the algorithm step by step on the raw data (np.cov, scaling, pruning,
ridge, pinv, eigh inverse square root, full SVD, QR weights). The documented rules shared with
the engine: null directions of the fit set's scaled covariances (eigenvalue <= 1e-12 max|S|) are
projected out of the covariances and the projections, and pairs beyond the rank they leave are
zero rows (the exact-arithmetic limit); the sign convention (each canonical pair flipped so that
the largest-|.| entry of its X-view loadings ``px @ Sxx`` is positive); dead directions (variate
variance <= TOL |direction|^2 max|C| on the scored set: rho = 0). The oracle finds null
directions with a full eigh; the engine by inverse iteration.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from layerprobe.cca import (
    EPS_GRID,
    METRICS,
    CCAResult,
    assign_splits,
    cca_score,
    cca_score_metrics,
    cca_score_moments,
    cca_similarity,
    pwcca,
)
from layerprobe.stats import Moments

TOL = 1e-11  # the dead-direction rule (same value as layerprobe.cca.DEAD_TOL)
RTOL = 1e-6


# ----------------------------------------------------------------------------- oracle


def _inv_sqrt_literal(a: np.ndarray) -> np.ndarray:
    """The reference's pinv, then eigh, then sqrt."""
    w, v = np.linalg.eigh(np.linalg.pinv(a))
    return v @ np.diag(np.sqrt(w)) @ v.T


def _inv_sqrt(a: np.ndarray) -> np.ndarray:
    """pinv(a)^(1/2) with eigh of ``a`` itself and pinv's cut-off (rcond 1e-15).

    Equal in exact arithmetic to the literal version; that one takes eigh of a matrix whose norm
    is 1/eps, which costs it ~1e-6 relative when a view is singular (one-hot targets)."""
    w, v = np.linalg.eigh(a)
    keep = np.abs(w) > 1e-15 * np.abs(w).max()
    d = np.where(keep, 1.0 / np.sqrt(np.where(keep, w, 1.0)), 0.0)
    return (v * d) @ v.T


def ref_fit(x: np.ndarray, y: np.ndarray, ex: float, ey: float, inv_sqrt=_inv_sqrt):
    """Projections learned on x [n, dx], y [n, dy] (the reference's get_cca_parameters)."""
    xv, yv = x.T, y.T
    nx = xv.shape[0]
    cov = np.cov(xv, yv)
    sxx, sxy, syy = cov[:nx, :nx], cov[:nx, nx:], cov[nx:, nx:]
    xmax, ymax = np.max(np.abs(sxx)), np.max(np.abs(syy))
    sxx, syy, sxy = sxx / xmax, syy / ymax, sxy / np.sqrt(xmax * ymax)
    xi = np.abs(np.diag(sxx)) >= ex
    yi = np.abs(np.diag(syy)) >= ey
    sxx, syy, sxy = sxx[xi][:, xi], syy[yi][:, yi], sxy[xi][:, yi]
    nx, ny = _null(sxx), _null(syy)
    px_, py_ = np.eye(len(sxx)) - nx @ nx.T, np.eye(len(syy)) - ny @ ny.T
    sxx, syy, sxy = px_ @ sxx @ px_, py_ @ syy @ py_, px_ @ sxy @ py_
    ixx, iyy = inv_sqrt(sxx + ex * np.eye(xi.sum())), inv_sqrt(syy + ey * np.eye(yi.sum()))
    u, _, vh = np.linalg.svd(ixx @ sxy @ iyy)
    px, py = u.T @ ixx @ px_, vh @ iyy @ py_
    k = min(len(px), len(py))
    px, py = px[:k], py[:k]
    rank = min(len(sxx) - nx.shape[1], len(syy) - ny.shape[1])
    px[rank:], py[rank:] = 0.0, 0.0
    for i in range(k):  # sign convention (loadings)
        load = px[i] @ sxx
        if load[np.argmax(np.abs(load))] < 0:
            px[i], py[i] = -px[i], -py[i]
    return px, py, xi, yi


def _null(s: np.ndarray, tol: float = 1e-12) -> np.ndarray:
    """Columns: eigenvectors of s whose eigenvalue is <= tol max|s| (rounding level)."""
    w, v = np.linalg.eigh(s)
    return v[:, w <= tol * np.abs(s).max()]


def ref_score(fit, x: np.ndarray, y: np.ndarray, metric: str = "pwcca") -> float:
    """Score fitted projections on (x, y) (the reference's compute_pwcca, plus the dead rule)."""
    px, py, xi, yi = fit
    xv, yv = x.T[xi], y.T[yi]
    mx, my = xv.mean(1, keepdims=True), yv.mean(1, keepdims=True)
    k = min(len(px), len(py))
    p1, p2 = px[:k] @ (xv - mx), py[:k] @ (yv - my)
    v1, v2 = (p1 * p1).sum(1), (p2 * p2).sum(1)
    c1, c2 = (xv - mx) @ (xv - mx).T, (yv - my) @ (yv - my).T
    d1 = v1 <= TOL * (px[:k] ** 2).sum(1) * np.abs(c1).max()
    d2 = v2 <= TOL * (py[:k] ** 2).sum(1) * np.abs(c2).max()
    dead = d1 | d2
    rho = np.where(dead, 0.0, (p1 * p2).sum(1) / np.sqrt(np.where(dead, 1.0, v1 * v2)))
    if metric == "mean-cca":
        return float(rho.mean())
    view, means, p, dw = (xv, mx, p1, d1) if xi.sum() < yi.sum() else (yv, my, p2, d2)
    w = np.zeros(k)
    if metric == "pwcca":
        q, _ = np.linalg.qr((p + means[:k]).T)
        w = np.abs(q.T @ view[:k].T).sum(1)
    else:  # pwcca-centred
        q, _ = np.linalg.qr(p[~dw].T)
        w[~dw] = np.abs(q.T @ (view[:k] - means[:k]).T).sum(1)
    return float(np.sum(w / w.sum() * rho))


def ref_pwcca(x, y, eps, fit=None, metric="pwcca", inv_sqrt=_inv_sqrt):
    xf, yf = fit if fit is not None else (x, y)
    return ref_score(ref_fit(xf, yf, *eps, inv_sqrt=inv_sqrt), x, y, metric)


# ----------------------------------------------------------------------------- data


def make_views(n, dx, dy, *, seed=0, n_layers=None, shared=4, offset=3.0):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, shared))
    y = z @ rng.standard_normal((shared, dy)) + 0.7 * rng.standard_normal((n, dy)) \
        + offset * rng.standard_normal(dy)
    def one():
        return z @ rng.standard_normal((shared, dx)) * rng.uniform(0.2, 2.0) \
            + rng.standard_normal((n, dx)) * rng.uniform(0.3, 1.5, dx) \
            + offset * rng.standard_normal(dx)
    x = one() if n_layers is None else np.stack([one() for _ in range(n_layers)])
    return x, y


def one_hot_views(n, dx, n_classes, *, seed=0, absent=(), n_layers=None):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_classes, n)
    for a in absent:
        labels[labels == a] = (a + 1) % n_classes
    centroids = rng.standard_normal((n_classes, dx)) * 2
    def one():
        return centroids[labels] @ rng.standard_normal((dx, dx)) * 0.5 \
            + rng.standard_normal((n, dx)) + 1.0
    x = one() if n_layers is None else np.stack([one() for _ in range(n_layers)])
    return x, np.eye(n_classes)[labels], labels


def close(a, b, rtol=RTOL):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * 1e-3)


# ----------------------------------------------------------------------------- pwcca


@pytest.mark.parametrize("dx,dy", [(12, 5), (5, 12), (8, 8)])
@pytest.mark.parametrize("eps", [(0.0, 0.0), (1e-10, 1e-9), (1e-6, 1e-7)])
def test_pwcca_fit_equals_score(dx, dy, eps):
    x, y = make_views(600, dx, dy, seed=dx * 10 + dy)
    close(pwcca(x, y, eps=eps), ref_pwcca(x, y, eps))
    close(pwcca(x, y, eps=eps), ref_pwcca(x, y, eps, inv_sqrt=_inv_sqrt_literal))


@pytest.mark.parametrize("dx,dy", [(15, 6), (6, 15)])
@pytest.mark.parametrize("metric", ["pwcca", "pwcca-centred", "mean-cca"])
def test_held_out_fit(dx, dy, metric):
    x, y = make_views(1500, dx, dy, seed=3)
    fit = (x[:1200], y[:1200])
    got = cca_similarity(x[1200:], y[1200:], eps=(1e-10, 1e-11), fit=fit, metric=metric)
    close(got, ref_pwcca(x[1200:], y[1200:], (1e-10, 1e-11), fit=fit, metric=metric))


def test_pruning_of_small_and_constant_dimensions():
    x, y = make_views(800, 10, 6, seed=4)
    x[:, 2] = 1e-7 * x[:, 2] + 5.0  # scaled variance ~1e-14: pruned by eps 1e-10
    x[:, 7] = 3.0  # constant
    y[:, 1] = -2.0  # constant target column
    fx = ref_fit(x, y, 1e-10, 1e-10)
    assert fx[2].sum() == 8 and fx[3].sum() == 5  # the oracle prunes them too
    close(pwcca(x, y, eps=(1e-10, 1e-10)), ref_pwcca(x, y, (1e-10, 1e-10)))
    fit = (x[:600], y[:600])
    close(pwcca(x[600:], y[600:], eps=(1e-9, 1e-10), fit=fit),
          ref_pwcca(x[600:], y[600:], (1e-9, 1e-10), fit=fit))


def test_one_hot_targets_and_dead_direction():
    x, y, _ = one_hot_views(3000, 20, 9, seed=5, absent=(4,))
    fit = (x[:2400], y[:2400])
    for metric in ("pwcca", "pwcca-centred", "mean-cca"):
        got = cca_similarity(x[2400:], y[2400:], eps=(1e-10, 1e-10), fit=fit, metric=metric)
        close(got, ref_pwcca(x[2400:], y[2400:], (1e-10, 1e-10), fit=fit, metric=metric))
        literal = ref_pwcca(x[2400:], y[2400:], (1e-10, 1e-10), fit=fit, metric=metric,
                            inv_sqrt=_inv_sqrt_literal)
        close(got, literal, rtol=1e-4)  # the literal pinv->eigh path is itself noisy here
    # the centred one-hot view has a null direction (its columns sum to 1): it is projected out,
    # so exactly one canonical pair is a structural zero (zero rows), not rounding noise
    px, py, xi, yi = ref_fit(*fit, 1e-10, 1e-10)
    assert (np.abs(py).sum(1) == 0).sum() == 1 and (np.abs(px).sum(1) == 0).sum() == 1
    assert _null(np.cov(fit[1].T[yi])).shape[1] == 1


def test_batched_layers_equal_per_layer():
    x, y = make_views(700, 9, 4, seed=6, n_layers=4)
    x[2, :, 3] = 1.0  # a constant column in one layer only: different kept sets per layer
    got = pwcca(x, y, eps=(1e-10, 1e-10))
    assert isinstance(got, np.ndarray) and got.shape == (4,)
    for layer in range(4):
        single = pwcca(x[layer], y, eps=(1e-10, 1e-10))
        assert isinstance(single, float)
        close(got[layer], single, rtol=1e-10)
        close(got[layer], ref_pwcca(x[layer], y, (1e-10, 1e-10)))


def test_torch_inputs_and_float32():
    x, y = make_views(500, 6, 3, seed=7)
    a = pwcca(torch.from_numpy(x), torch.from_numpy(y), eps=(1e-10, 1e-10))
    close(a, pwcca(x, y, eps=(1e-10, 1e-10)), rtol=1e-12)
    b = pwcca(torch.from_numpy(x).float(), torch.from_numpy(y).float(), eps=(1e-10, 1e-10))
    close(b, ref_pwcca(x.astype(np.float32).astype(np.float64),
                       y.astype(np.float32).astype(np.float64), (1e-10, 1e-10)))


def test_errors_are_clear():
    x, y = make_views(30, 40, 3, seed=8)
    with pytest.raises(ValueError, match="more items than dimensions"):
        pwcca(x, y)
    x, y = make_views(300, 5, 3, seed=8, n_layers=3)
    x[1, 10, 2] = np.nan
    with pytest.raises(ValueError, match=r"layer\(s\) \[1\]"):
        pwcca(x, y)
    x[1, 10, 2] = np.inf
    with pytest.raises(ValueError, match=r"layer\(s\) \[1\]"):
        cca_score(x, y, n_splits=10)
    x[1, 10, 2] = 0.0
    with pytest.raises(ValueError, match="metric"):
        cca_score(x, y, metric="nope")
    with pytest.raises(ValueError, match="y must be"):
        cca_score(x, y[:-1])
    x[0] = 1.0  # constant layer: every eps pair fails -> error naming the layer, not NaN
    with pytest.raises(ValueError, match="layer 0"):
        cca_score(x, y, n_splits=10)


# ----------------------------------------------------------------------------- protocol


def test_assign_splits_stratified_and_seeded():
    labels = np.repeat(np.arange(5), [103, 50, 7, 20, 1])
    s = assign_splits(len(labels), labels=labels, n_splits=10, seed=1)
    assert s.dtype == np.int64 and s.min() >= 0 and s.max() < 10
    for c, size in enumerate([103, 50, 7, 20, 1]):
        per = np.bincount(s[labels == c], minlength=10)
        assert per.min() >= size // 10 and per.sum() == size
    assert (s == assign_splits(len(labels), labels=labels, n_splits=10, seed=1)).all()
    assert (s != assign_splits(len(labels), labels=labels, n_splits=10, seed=2)).any()
    flat = np.bincount(assign_splits(1005, n_splits=10, seed=0), minlength=10)
    assert flat.min() >= 100


def _oracle_protocol_check(res: CCAResult, x, y, split, metric="pwcca"):
    """Recompute every dev/test number the engine reports with the numpy oracle."""
    for layer, trials in enumerate(res.details["trials"]):
        assert len(trials) == 3
        tests = []
        for t in trials:
            dev, test = t["dev"], t["test"]
            tr = (split != dev) & (split != test)
            xl = x[layer] if x.ndim == 3 else x
            dev_scores = []
            for ex, ey, s in t["dev_scores"]:
                r = ref_pwcca(xl[split == dev], y[split == dev], (ex, ey),
                              fit=(xl[tr], y[tr]), metric=metric)
                close(s, r)
                dev_scores.append(r)
            assert len(t["dev_scores"]) == 6
            assert all(e in EPS_GRID[:3] for ex, ey, _ in t["dev_scores"] for e in (ex, ey))
            # the chosen pair is the best on dev (up to ties within the tolerance)
            chosen = [e[:2] for e in t["dev_scores"]].index(t["eps"])
            assert dev_scores[chosen] >= max(dev_scores) - RTOL * abs(max(dev_scores))
            assert t["dev_score"] == max(e[2] for e in t["dev_scores"])
            ref_test = ref_pwcca(xl[split == test], y[split == test], tuple(t["eps"]),
                                 fit=(xl[tr], y[tr]), metric=metric)
            close(t["test_score"], ref_test)
            tests.append(ref_test)
        close(res.scores[layer], np.mean(tests))
    pairs = {(t["dev"], t["test"]) for t in res.details["trials"][0]}
    flat = [s for p in pairs for s in p]
    assert len(set(flat)) == 6  # disjoint dev/test pairs


def test_cca_score_protocol_matches_oracle_frames():
    x, y = make_views(1500, 8, 5, seed=9, n_layers=3)
    res = cca_score(x, y, n_splits=10, n_trials=3, seed=4)
    split = assign_splits(1500, n_splits=10, seed=4)
    _oracle_protocol_check(res, x, y, split)
    assert res.metric == "pwcca" and len(res.scores) == 3
    json.loads(json.dumps(res.to_dict()))


def test_cca_score_protocol_one_hot_labels():
    x, y, labels = one_hot_views(2500, 14, 6, seed=10, n_layers=2)
    res = cca_score(x, y, labels=labels, n_splits=10, seed=2, metric="pwcca-centred")
    split = assign_splits(2500, labels=labels, n_splits=10, seed=2)
    _oracle_protocol_check(res, x, y, split, metric="pwcca-centred")
    assert all(d >= 1 for trials in res.details["dead_directions"] for d in trials)


def test_moments_path_equals_array_path_and_seed_matters():
    x, y = make_views(1200, 7, 4, seed=11, n_layers=2)
    split = assign_splits(1200, n_splits=10, seed=0)
    m = Moments(2, 7, 4, 10)
    for start in range(0, 1200, 97):  # a stream of small utterances
        m.update(torch.from_numpy(x[:, start:start + 97]).float(),
                 torch.from_numpy(y[start:start + 97]).float(), split[start:start + 97])
    a = cca_score_moments(m, seed=0)
    b = cca_score(x.astype(np.float32), y.astype(np.float32), seed=0)
    close(a.scores, b.scores, rtol=1e-9)
    c = cca_score_moments(m, seed=1)
    assert c.details["trials"][0][0]["test"] != a.details["trials"][0][0]["test"] or \
        c.details["trials"][0][0]["dev"] != a.details["trials"][0][0]["dev"]


def _ref_cka(x, y):
    xc, yc = x - x.mean(0), y - y.mean(0)
    kx, ky = xc @ xc.T, yc @ yc.T  # n x n Gram matrices
    return float((kx * ky).sum() / (np.linalg.norm(kx) * np.linalg.norm(ky)))


def test_cka_and_svcca_and_mean_cca():
    x, y = make_views(1000, 6, 4, seed=12, n_layers=2)
    split = assign_splits(1000, n_splits=10, seed=0)
    res = cca_score(x, y, metric="cka")
    for layer in range(2):
        want = [_ref_cka(x[layer][split == t["test"]], y[split == t["test"]])
                for t in res.details["trials"][layer]]
        close(res.scores[layer], np.mean(want))
    mean = cca_score(x, y, metric="mean-cca")
    _oracle_protocol_check(mean, x, y, split, metric="mean-cca")
    sv = cca_score(x, y, metric="svcca")
    for layer in range(2):
        for t in sv.details["trials"][layer]:
            dev, test = t["dev"], t["test"]
            tr = (split != dev) & (split != test)
            xs, ys = x[layer][tr], y[tr]
            bases = []
            for v in (xs, ys):
                w, vec = np.linalg.eigh(np.cov(v.T))
                w, vec = w[::-1], vec[:, ::-1]
                r = int(np.searchsorted(np.cumsum(w) / w.sum(), 0.99)) + 1
                bases.append(vec[:, :r])
            assert t["svcca_dims"] == [b.shape[1] for b in bases]
            bx, by = bases
            want = ref_pwcca(x[layer][split == test] @ bx, y[split == test] @ by,
                             tuple(t["eps"]), fit=(xs @ bx, ys @ by), metric="mean-cca")
            close(t["test_score"], want)
    assert set(METRICS) == {"pwcca", "pwcca-centred", "mean-cca", "svcca", "cka"}


def test_absent_class_in_a_split_and_duplicated_columns_never_nan():
    x, y, labels = one_hot_views(1500, 10, 7, seed=13, n_layers=2)
    x[0, :, 5] = x[0, :, 4]  # duplicated column
    rare = np.flatnonzero(labels == 3)[:4]
    keep = np.ones(len(labels), bool)
    keep[np.flatnonzero(labels == 3)[4:]] = False  # class 3 has 4 items: absent from most splits
    res = cca_score(x[:, keep], y[keep], labels=labels[keep])
    assert len(rare) == 4 and all(np.isfinite(res.scores))
    for metric in METRICS:
        r = cca_score(x[:, keep], y[keep], labels=labels[keep], metric=metric)
        assert all(np.isfinite(r.scores)), metric


def test_gram_schmidt_fallback_matches_qr_and_skips_dependent_variates():
    from layerprobe.cca import _orthonormal_products_skipping_dependent as products

    rng = np.random.default_rng(0)
    d = rng.normal(size=(4, 50))
    a = rng.normal(size=(3, 50))
    q, _ = np.linalg.qr(d.T)
    expected = np.abs(q.T @ a.T)
    got = products(torch.tensor(d @ d.T), torch.tensor(d @ a.T)).abs().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-8)
    dependent = np.vstack([d[:2], d[0] + 2 * d[1], d[2:]])  # third variate depends on the first two
    got = products(torch.tensor(dependent @ dependent.T), torch.tensor(dependent @ a.T)).numpy()
    assert np.all(got[2] == 0) and np.all(np.isfinite(got))
    np.testing.assert_allclose(np.abs(got[[0, 1, 3, 4]]), expected, rtol=1e-6)


def test_metrics_scored_together_equal_each_metric_alone():
    """pwcca, pwcca-centred and mean-cca share the fits in cca_score_metrics: every metric's
    scores, spread and details equal its own run's."""
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(1600, 4, generator=gen)
    x = torch.stack([z @ torch.randn(4, 12, generator=gen) * (layer + 1)
                     + torch.randn(1600, 12, generator=gen) for layer in range(3)])
    y = z @ torch.randn(4, 5, generator=gen) + torch.randn(1600, 5, generator=gen)
    mom = Moments(3, 12, 5, 20)
    mom.update(x, y, torch.from_numpy(assign_splits(1600, n_splits=20, seed=0)))
    metrics = ["pwcca", "mean-cca", "pwcca-centred", "cka", "svcca"]
    together = cca_score_metrics(mom, metrics, n_splits=10, n_seeds=2)
    assert list(together) == metrics
    for metric in metrics:
        alone = cca_score_moments(mom, metric=metric, n_splits=10, n_seeds=2)
        assert together[metric].scores == alone.scores, metric
        assert together[metric].std == alone.std, metric
        assert together[metric].details == alone.details, metric
    assert len(set(map(tuple, (together[m].scores for m in metrics)))) == len(metrics)
    with pytest.raises(ValueError, match="metric must be one of"):
        cca_score_metrics(mom, ["pwcca", "nope"])


@pytest.mark.parametrize("shape", [(5, 40, 6), (3, 6, 40)])
def test_thin_svd_split_over_threads_equals_one_thread(shape):
    """The host SVD splits a batch over torch's thread count (one LAPACK thread each): the same
    bits as one thread, and a thin SVD of each matrix (U^T U = I, U S V^T = m)."""
    from layerprobe.cca import _thin_svd

    m = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        u1, vh1 = _thin_svd(m)
        torch.set_num_threads(3)
        u3, vh3 = _thin_svd(m)
        assert torch.get_num_threads() == 3  # restored after the pinned LAPACK calls
    finally:
        torch.set_num_threads(old)
    assert torch.equal(u1, u3) and torch.equal(vh1, vh3)
    k = min(shape[1:])
    assert u1.shape == (shape[0], shape[1], k) and vh1.shape == (shape[0], k, shape[2])
    s = torch.linalg.svdvals(m)
    torch.testing.assert_close(u1 @ torch.diag_embed(s) @ vh1, m)
    torch.testing.assert_close(u1.mT @ u1, torch.eye(k, dtype=m.dtype).expand(shape[0], k, k))


def test_warm_up_runs_the_fits_library_paths_and_is_a_thread_on_cuda_only(monkeypatch):
    """The miniature protocol runs (on the CPU here); start_warm_up starts nothing on the CPU, and
    on CUDA a thread that finishes, once per device."""
    import layerprobe.cca as cca

    monkeypatch.setattr(cca, "_WARM_DEVICES", set())
    cca._warm_up(torch.device("cpu"))
    assert cca.start_warm_up("cpu") is None
    if torch.cuda.is_available():
        thread = cca.start_warm_up("cuda:0")
        thread.join(timeout=120)
        assert not thread.is_alive()
        assert cca.start_warm_up("cuda:0") is None  # warmed up already
