"""Benchmark of the CCA engine: full held-out PWCCA protocol vs the float64 Gram floor and the
plain per-layer path (one covariance per fit, like the reference code).

Default size: 13 layers x 40,000 frames x 768-d against 80-d targets, streamed as utterances of
100-800 frames (float32, as the pipeline gives them). In one run it times

* the Gram floor: ``Z^T Z`` per layer in float64 for ``Z = [X_layer, Y]`` (40,000 x 848);
* the engine: ``Moments.update`` per utterance + ``cca_score_moments`` (10 splits, 3 trials,
  6 eps pairs each);
* the per-layer path: per layer and trial, ``np.cov`` of the train frames for every eps pair,
  pinv / eigh / SVD fits and explicit dev/test scoring (numpy float64), timed on
  ``--ref-layers`` layers x 1 trial and extrapolated to all layers x 3 trials.

It prints the ratios, the peak resident memory and the engine's vs the per-layer path's test
scores for the timed trials. Usage: ``python benchmarks/cca_engine.py [--frames 40000 ...]``.
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch

from layerprobe.cca import (
    EPS_GRID,
    assign_splits,
    cca_score,
    cca_score_metrics,
    cca_score_moments,
    start_warm_up,
)
from layerprobe.registry import FIT_SHARING_METRICS
from layerprobe.stats import Moments


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def make_data(n_layers: int, n: int, dx: int, dy: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 32, generator=g)
    y = z @ torch.randn(32, dy, generator=g) + torch.randn(n, dy, generator=g) \
        + 2.0 * torch.randn(dy, generator=g)
    x = torch.empty(n_layers, n, dx)
    for layer in range(n_layers):
        w = torch.randn(32, dx, generator=g) * (0.3 + 0.1 * layer)
        x[layer] = z @ w + torch.randn(n, dx, generator=g) + torch.randn(dx, generator=g)
    return x, y


# --------------------------------------------------------------- the plain per-layer path


def _inv_sqrt(a):
    w, v = np.linalg.eigh(np.linalg.pinv(a))
    return v @ np.diag(np.sqrt(w)) @ v.T


def ref_fit(x, y, ex, ey):
    nx = x.shape[1]
    cov = np.cov(x.T, y.T)
    sxx, sxy, syy = cov[:nx, :nx], cov[:nx, nx:], cov[nx:, nx:]
    xmax, ymax = np.abs(sxx).max(), np.abs(syy).max()
    sxx, syy, sxy = sxx / xmax, syy / ymax, sxy / np.sqrt(xmax * ymax)
    xi, yi = np.abs(np.diag(sxx)) >= ex, np.abs(np.diag(syy)) >= ey
    ixx = _inv_sqrt(sxx[xi][:, xi] + ex * np.eye(xi.sum()))
    iyy = _inv_sqrt(syy[yi][:, yi] + ey * np.eye(yi.sum()))
    u, _, vh = np.linalg.svd(ixx @ sxy[xi][:, yi] @ iyy)
    px, py = u.T @ ixx, vh @ iyy
    for i in range(min(len(px), len(py))):  # the engine's sign convention
        if px[i, np.argmax(np.abs(px[i]))] < 0:
            px[i], py[i] = -px[i], -py[i]
    return px, py, xi, yi


def ref_score(fit, x, y):
    px, py, xi, yi = fit
    xv, yv = x.T[xi], y.T[yi]
    mx, my = xv.mean(1, keepdims=True), yv.mean(1, keepdims=True)
    k = min(len(px), len(py))
    p1, p2 = px[:k] @ (xv - mx), py[:k] @ (yv - my)
    rho = (p1 * p2).sum(1) / np.sqrt((p1 * p1).sum(1) * (p2 * p2).sum(1))
    view, means, p = (xv, mx, p1) if len(px) < len(py) else (yv, my, p2)
    q, _ = np.linalg.qr((p + means[:k]).T)
    w = np.abs(q.T @ view[:k].T).sum(1)
    return float(np.sum(w / w.sum() * rho))


def per_layer_trial(x, y, split, dev, test, pairs):
    """One trial of the reference protocol for one layer (x, y float64 numpy)."""
    tr = (split != dev) & (split != test)
    best, best_fit = -np.inf, None
    for ex, ey in pairs:
        fit = ref_fit(x[tr], y[tr], ex, ey)
        s = ref_score(fit, x[split == dev], y[split == dev])
        if s > best:
            best, best_fit = s, fit
    return ref_score(best_fit, x[split == test], y[split == test])


# --------------------------------------------------------------- main


def profile_fits(mom: Moments, device: str) -> None:
    """torch.profiler tables of one run of the protocol fits: by device time and by host time,
    and the number of host syncs (``aten::_local_scalar_dense``, ``aten::item``)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.device(device).type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        cca_score_moments(mom, metric="pwcca", device=device)
        if cuda:
            torch.cuda.synchronize()
    events = prof.key_averages()
    syncs = sum(e.count for e in events if e.key in ("aten::_local_scalar_dense", "aten::item"))
    print(f"\n--- protocol fits under torch.profiler: {syncs} host syncs ---")
    if cuda:
        print(events.table(sort_by="self_device_time_total", row_limit=20))
    print(events.table(sort_by="cpu_time_total", row_limit=25))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=13)
    ap.add_argument("--frames", type=int, default=40_000)
    ap.add_argument("--dx", type=int, default=768)
    ap.add_argument("--dy", type=int, default=80)
    ap.add_argument("--ref-layers", type=int, default=1, help="layers timed on the per-layer path")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--warm-up", action="store_true",
                    help="CUDA: start the fits' libraries in a background thread during the "
                         "accumulation, as scoring does (layerprobe.cca.start_warm_up)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--array", action="store_true",
                    help="also time the array entry point cca_score on a float64 [L, n, dx] array")
    ap.add_argument("--metrics", action="store_true",
                    help="also time the fit-based metrics alone vs sharing the fits")
    ap.add_argument("--profile", action="store_true",
                    help="torch.profiler tables of the protocol fits (after the timed run)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads for the whole run (default: torch's)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    L, n, dx, dy = a.layers, a.frames, a.dx, a.dy
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {a.device}; "
          f"{L} layers x {n} frames x {dx}-d vs {dy}-d")
    x, y = make_data(L, n, dx, dy, a.seed)
    split = assign_splits(n, n_splits=10, seed=a.seed)
    print(f"data: {x.numel() * 4 / 1e9:.2f} GB float32; peak RSS so far {peak_rss_gb():.2f} GB")

    # 1. Gram floor: float64 Z^T Z per layer (conversion not timed)
    floor = 0.0
    dev = torch.device(a.device)
    for layer in range(L):
        z = torch.cat([x[layer], y], dim=1).to(dev, torch.float64)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        g = z.T @ z
        if dev.type == "cuda":
            torch.cuda.synchronize()
        floor += time.perf_counter() - t
        del z, g
    print(f"Gram floor (float64 [X,Y]^T [X,Y], {dx + dy}-d, {L} layers): {floor:.2f} s")

    # 2. engine: stream utterances, then the protocol
    rng = np.random.default_rng(a.seed)
    bounds = np.cumsum(rng.integers(100, 800, size=n // 100 + 1))
    bounds = np.concatenate([[0], bounds[bounds < n], [n]])
    split_t = torch.from_numpy(split)
    rss0 = peak_rss_gb()
    t0 = time.perf_counter()
    warm_up = start_warm_up(a.device) if a.warm_up else None
    mom = Moments(L, dx, dy, 10, device=a.device)
    for s, e in zip(bounds[:-1], bounds[1:], strict=True):
        mom.update(x[:, s:e], y[s:e], split_t[s:e])
    mom.flush()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t1 = time.perf_counter()
    if warm_up is not None:
        warm_up.join()
        print(f"waited {time.perf_counter() - t1:.2f} s for the warm-up after the accumulation "
              "(counted in the fits below)")
    res = cca_score_moments(mom, metric="pwcca", device=a.device)
    t2 = time.perf_counter()
    engine = t2 - t0
    print(f"engine: {len(bounds) - 1} utterances; accumulate {t1 - t0:.2f} s + protocol fits "
          f"{t2 - t1:.2f} s = {engine:.2f} s; moments "
          f"{sum(t.numel() * t.element_size() for t in (mom.xx, mom.xy, mom.yy)) / 1e9:.2f} GB; "
          f"peak RSS {peak_rss_gb():.2f} GB (before: {rss0:.2f} GB)")
    print(f"engine scores: {np.round(res.scores, 4).tolist()}")
    if dev.type == "cuda":  # the first call also starts cuSOLVER/cuBLAS: time the fits again
        t = time.perf_counter()
        cca_score_moments(mom, metric="pwcca", device=a.device)
        torch.cuda.synchronize()
        warm = time.perf_counter() - t
        print(f"protocol fits again (warm, the libraries started): {warm:.2f} s = "
              f"{warm / (t1 - t0):.2f} x accumulate; engine / Gram floor, warm fits: "
              f"{(t1 - t0 + warm) / floor:.2f}")
    if a.metrics:
        fitted = list(FIT_SHARING_METRICS)
        t = time.perf_counter()
        alone = {m: cca_score_moments(mom, metric=m, device=a.device) for m in fitted}
        separate = time.perf_counter() - t
        t = time.perf_counter()
        together = cca_score_metrics(mom, fitted, device=a.device)
        shared = time.perf_counter() - t
        same = all(together[m].scores == alone[m].scores for m in fitted)
        print(f"{', '.join(fitted)}: one protocol each {separate:.2f} s, sharing the fits "
              f"{shared:.2f} s ({separate / shared:.2f}x); scores identical: {same}")
    if a.profile:
        profile_fits(mom, a.device)
    if a.array:
        x64, y64 = x.double(), y.double()
        t = time.perf_counter()
        arr = cca_score(x64, y64, split=split, device=a.device)
        array_time = time.perf_counter() - t
        del x64, y64
        diff = np.abs(np.subtract(arr.scores, res.scores)).max()
        print(f"array entry cca_score (float64 array): {array_time:.2f} s = "
              f"{array_time / floor:.2f} x Gram floor (streaming engine: {engine / floor:.2f} x); "
              f"max |score diff| vs streaming {diff:.1e}")

    # 3. per-layer path on a few layers, one trial each (the engine's first trial)
    per_trial, diffs = [], []
    if a.ref_layers < 1:
        print(f"RATIOS: engine / Gram floor = {engine / floor:.2f} (target <= 2)")
        return
    for layer in range(min(a.ref_layers, L)):
        xl = x[layer].double().numpy()
        yl = y.double().numpy()
        rec = res.details["trials"][layer][0]
        pairs = [tuple(p[:2]) for p in rec["dev_scores"]]
        t = time.perf_counter()
        s = per_layer_trial(xl, yl, split, rec["dev"], rec["test"], pairs)
        per_trial.append(time.perf_counter() - t)
        diffs.append(abs(s - rec["test_score"]) / abs(s))
        print(f"per-layer path, layer {layer}, trial 1: {per_trial[-1]:.2f} s; test PWCCA "
              f"{s:.8f} vs engine {rec['test_score']:.8f} (rel. diff {diffs[-1]:.1e})")
    ref_total = float(np.mean(per_trial)) * L * 3
    print(f"per-layer path extrapolated to {L} layers x 3 trials: {ref_total:.1f} s "
          f"(timed {len(per_trial)} layer(s) x 1 trial)")
    print(f"RATIOS: engine / Gram floor = {engine / floor:.2f} (target <= 2); "
          f"per-layer path / engine = {ref_total / engine:.1f}x (target >= 40); "
          f"max rel. score diff = {max(diffs):.1e}; peak RSS {peak_rss_gb():.2f} GB")
    assert EPS_GRID  # the protocol's grid (documented in layerprobe.cca)


if __name__ == "__main__":
    main()
