"""Batched layerwise CCA engine: PWCCA (reference-compatible), mean CCA, SVCCA and linear CKA.

Everything is computed from :class:`layerprobe.stats.Moments` (counts, sums, second moments per
split), batched over layers with ``torch.linalg`` in float64 on CPU or CUDA.

The fit follows the reference CCA class (google/svcca ``cca_core`` as modified in
ankitapasad/layerwise-analysis), step by step:

1. covariance of the fit set (``np.cov``: centred, divided by n - 1);
2. scale: Sxx = Cxx / max|Cxx|, Syy = Cyy / max|Cyy|, Sxy = Cxy / sqrt(max|Cxx| max|Cyy|);
3. prune dimensions whose scaled variance |diag| is < eps (eps_x for X, eps_y for Y);
4. ridge eps*I, pseudo-inverse (rcond 1e-15), inverse square root;
5. SVD of the whitened cross-covariance; ``proj_x = u^T Sxx^-1/2``, ``proj_y = vh Syy^-1/2``,
   k = min(kept dims of X, kept dims of Y).

Implementation notes (same numbers, cheaper): any whitening W with W^T (S + eps I) W = I gives the
same canonical directions as the symmetric inverse square root (up to signs, fixed below). For
eps far above pinv's cut-off (every grid value: eps > 10 * 1e-15 * kx) pinv is the inverse and the
X view is whitened with a Cholesky factor (a few times cheaper than eigh); otherwise (eps = 0,
Cholesky failure) one ``eigh`` per pruned covariance serves every eps (eps*I shifts the
eigenvalues), with pinv's cut-off, and a kept negative eigenvalue (NaN in the reference) fails
the pair. The thin SVD goes through a QR of the whitened cross-covariance.

Scoring a fit on a set (its own centred data, its own means): per direction
``rho_i = <p1_i, p2_i> / (|p1_i| |p2_i|)``; PWCCA weights on the view with fewer kept dimensions
(X if kx < ky else Y): ``D`` = variates plus the first k means of that view (the reference's
quirk), ``A`` = its first k (= all kept) raw dimensions, ``w_i = sum_j |<q_i, a_j>|`` with Q from
the QR of D^T. From moments: ``Q^T A^T = L^-1 (D A^T)`` with ``L L^T = D D^T`` (k x k Cholesky).

Deliberate, documented departures from the reference (see method.md and README, "Rounding-stable
fits"); each is the exact-arithmetic limit of the reference's fit, which rounding made noisy:

* Null directions: directions whose Rayleigh quotient in a view's scaled covariance is at most
  ``NULL_TOL`` of its largest entry (e.g. the normal of the hyperplane every LayerNorm output lies
  on) carry no cross-covariance in exact arithmetic; their float32 rounding noise, whitened by
  1/sqrt(eps), entered every canonical direction. They are found once per probe on all items
  (:func:`null_basis`), projected out of Sxx, Sxy, Syy and of the projections, and canonical
  pairs beyond the rank they leave are zero rows (structural zero correlations).
* Sign convention: each canonical pair is flipped so that the largest-|.| entry of its X-view
  loadings (train covariance of each kept dimension with the variate, ``proj_x @ Sxx``) is
  positive; loadings do not see null directions. The reference's signs come from LAPACK and
  change its PWCCA (the means quirk makes weights sign-dependent).
* Split seeds: the moments' slots may be shards; splits are unions of shards
  (:func:`shard_groups`), and ``n_seeds`` protocol runs on re-dealt shards give each score's
  spread (``std``).
* Dead directions: a canonical variate ``p_i = P_i (x - mean)`` whose variance on the scored set
  is at the rounding level of that set's covariance, ``P_i C P_i^T <= DEAD_TOL |P_i|^2 max|C|``
  (C: the set's centred cross-products of the kept dimensions; 0/0, e.g. the sum of centred
  one-hot columns), gets rho = 0 instead of rounding noise; the count is reported per trial
  (``dead_directions``). The rule is scale-free, so it holds for moments and raw data alike.
* An eps pair "fails" (is skipped, like the reference's ``LinAlgError``) when a view has no kept
  dimension, an eigenvalue kept by the pseudo-inverse is negative (NaN in the reference), a
  result is not finite, or the weights' Gram matrix is singular. A layer for which every trial
  fails raises a ``ValueError`` instead of returning NaN.
* Trials: the (dev, test) split pairs and the eps order are drawn once from ``seed`` and shared by
  all layers (the reference draws them per layer); a layer for which every eps pair of a trial
  fails moves on to the next (dev, test) pair, as the reference does.

Metrics (``METRICS``): ``pwcca`` (the reference's weights, used for the published numbers);
``pwcca-centred`` (weights from centred variates and centred dimensions, as the PWCCA paper
describes it; dead directions get weight 0); ``mean-cca`` (mean of rho over the k directions);
``svcca`` (each view reduced to the principal directions explaining 99% of its train-set
variance, then mean CCA with the same eps protocol); ``cka`` (linear CKA
``||Cxy||_F^2 / (||Cxx||_F ||Cyy||_F)`` on each trial's test split, no fit, mean over trials).
``pwcca``, ``pwcca-centred`` and ``mean-cca`` have the same fits; :func:`cca_score_metrics` computes
them once for all three (each metric's result equals its own run's).
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from layerprobe.registry import CCA_METRICS, FIT_SHARING_METRICS
from layerprobe.stats import CentredStats, Moments, _cpu_threads, as_tensor

__all__ = ["EPS_GRID", "METRICS", "CCAResult", "assign_splits", "cca_score",
           "cca_score_metrics", "cca_score_moments", "pwcca", "cca_similarity", "null_basis",
           "shard_groups", "start_warm_up", "trial_pairs"]

EPS_GRID: tuple[float, ...] = (1e-10, 1e-11, 1e-9, 1e-8, 1e-7, 1e-6, 1e-5)
METRICS: tuple[str, ...] = CCA_METRICS  # the names live in layerprobe.registry
N_PAIRS = 6  # eps pairs kept per trial (the first that work)
RCOND = 1e-15  # numpy.linalg.pinv's default cut-off
DEAD_TOL = 1e-11  # variate variance / (|direction|^2 max|C|) at or below which rho := 0
NULL_TOL = 1e-12  # eigenvalue / max|S| of a fit set's covariance at or below which it is null
DEPENDENT_TOL = 1e-10  # PWCCA weights: a variate whose Gram-Schmidt residual norm² is at most this
#                        fraction of its norm² is dependent on the earlier ones and gets weight 0
SVCCA_VARIANCE = 0.99
MIN_ITEMS_PER_DIMENSION = 3.0  # train items / (dx + dy) below which layer rankings were noise
SIGN_CONVENTION = ("each canonical pair is flipped so that the largest-|.| entry of its X-view "
                   "loadings (train covariance of each kept X dimension with the variate) is "
                   "positive")


@dataclass(frozen=True)
class CCAResult:
    """Per-layer scores of one metric and JSON-able details of the protocol."""

    metric: str
    scores: list[float]
    details: dict = field(default_factory=dict)
    std: list[float] | None = None  # per layer, over split seeds (None with one seed)

    def to_dict(self) -> dict:
        return {"metric": self.metric, "scores": [float(s) for s in self.scores],
                "std": self.std, "details": self.details}


# ---------------------------------------------------------------------------- fitting


@dataclass(frozen=True)
class _Fit:
    """Fitted projections of one eps pair for a group of layers sharing kept-dimension masks."""

    layers: list[int]  # indices into the stats' layers
    eps: tuple[float, float]
    mask_x: torch.Tensor  # [dx] bool
    mask_y: torch.Tensor  # [dy] bool
    proj_x: torch.Tensor  # [g, k, kx]
    proj_y: torch.Tensor  # [g, k, ky]
    ok: torch.Tensor  # [g] bool
    reason: list[str]  # per layer, "" when ok

    def select(self, js: Sequence[int]) -> _Fit:
        idx = torch.as_tensor(list(js), dtype=torch.long, device=self.proj_x.device)
        return _Fit([self.layers[j] for j in js], self.eps, self.mask_x, self.mask_y,
                    self.proj_x[idx], self.proj_y[idx], self.ok[idx],
                    [self.reason[j] for j in js])


def _inv_sqrt_diag(w: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Diagonal of pinv(W + eps)^(1/2) from eigenvalues w [..., k]; and a per-row failure flag."""
    lam = w + eps
    amax = lam.abs().amax(dim=-1, keepdim=True)
    keep = lam.abs() > RCOND * amax
    bad = (keep & (lam < 0)).any(dim=-1) | ~torch.isfinite(lam).all(dim=-1)
    d = torch.where(keep & (lam > 0), lam.clamp_min(torch.finfo(lam.dtype).tiny).rsqrt(),
                    torch.zeros_like(lam))
    return d, bad


def _thin_svd_host(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Thin ``(U, V^T)`` of host matrices ``m`` [g, a, b] by LAPACK (see :func:`_thin_svd`).

    A matrix whose SVD does not converge (LAPACK's error, e.g. for entries near overflow) gets
    NaN factors, so its eps pair fails like any other non-finite fit instead of failing every
    layer's."""
    try:
        return _thin_svd_batch(m)
    except torch.linalg.LinAlgError:
        if m.shape[0] == 1:
            a, b = m.shape[-2:]
            k = min(a, b)
            return (torch.full((1, a, k), torch.nan, dtype=m.dtype),
                    torch.full((1, k, b), torch.nan, dtype=m.dtype))
        parts = [_thin_svd_host(m[j:j + 1]) for j in range(m.shape[0])]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _thin_svd_batch(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if m.shape[-2] >= m.shape[-1]:
        q, r = torch.linalg.qr(m)
        ur, _, vh = torch.linalg.svd(r)
        return q @ ur, vh
    q, r = torch.linalg.qr(m.mT)
    u, _, vhr = torch.linalg.svd(r.mT)
    return u, vhr @ q.mT


_POOLS: dict[int, ThreadPoolExecutor] = {}
os.register_at_fork(after_in_child=_POOLS.clear)  # a forked child has none of the threads


def _lapack_pool(workers: int) -> ThreadPoolExecutor:
    """A lasting pool of ``workers`` threads, each running torch on one CPU thread."""
    if workers not in _POOLS:
        _POOLS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="layerprobe-lapack",
                                             initializer=torch.set_num_threads, initargs=(1,))
    return _POOLS[workers]


def _thin_svd(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Thin ``(U, V^T)`` of ``m`` [g, a, b]: a QR of the tall side, then the SVD of its square
    factor (torch's batched CPU SVD is slow for tall m). Computed by LAPACK on the host whatever
    the device, so both devices use the same algorithm: on an H200 torch's batched Jacobi SVD
    took 30 ms a call, two thirds of the fits' device time.

    torch runs a batch's LAPACK calls one after another, so the batch is split over up to
    ``torch.get_num_threads()`` threads, one LAPACK thread each (a matrix's result does not
    depend on the split). On an H200's 16-core host the QR + SVD of [13, 768, 80] had been ~20 ms
    a call, two thirds of the fits' host time; split, the warm fits of the engine benchmark went
    from 0.65 s to 0.31 s on an H100."""
    host = m.cpu()
    workers = min(torch.get_num_threads(), host.shape[0])
    with _cpu_threads(1):  # small LAPACK calls: see _cpu_threads
        if workers < 2:
            u, vh = _thin_svd_host(host)
        else:
            parts = list(_lapack_pool(workers).map(_thin_svd_host, host.tensor_split(workers)))
            u, vh = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    return u.to(m.device), vh.to(m.device)


def null_basis(s: torch.Tensor, *, tol: float = NULL_TOL, iterations: int = 3,
               block: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal bases of the numerical null spaces of symmetric PSD matrices ``s [g, d, d]``.

    A direction is null when its Rayleigh quotient is at most ``tol * max|s|`` (rounding level:
    e.g. the normal of the hyperplane every LayerNorm output lies on, ~3e-15 relative in float32
    features). Found by block inverse iteration through one Cholesky factor of ``s + shift I``
    (shift 1e-10 max|s|, far above rounding, far below any real variance), then Rayleigh-Ritz on
    the block; the block doubles while all of it is null. Returns ``basis [g, d, r]`` (columns
    past a layer's own count are zero) and ``count [g]``.
    """
    if s.ndim != 3 or s.shape[-1] != s.shape[-2]:
        raise ValueError(f"null_basis: expected [g, d, d], got {tuple(s.shape)}")
    g, d, _ = s.shape
    scale = s.abs().amax(dim=(-2, -1))
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    eye = torch.eye(d, dtype=s.dtype, device=s.device)
    shift = 1e-10 * scale
    chol, info = torch.linalg.cholesky_ex(s + shift[:, None, None] * eye)
    for _ in range(4):  # rounding made s indefinite beyond the shift: grow it where it failed
        if not bool((info != 0).any()):
            break
        shift = torch.where(info != 0, shift * 100, shift)
        chol, info = torch.linalg.cholesky_ex(s + shift[:, None, None] * eye)
    gen = torch.Generator().manual_seed(0)
    m = min(block, d)
    while True:
        r = torch.randn(d, m, generator=gen, dtype=s.dtype).to(s.device).expand(g, d, m)
        with _cpu_threads(1 if s.device.type == "cpu" else None):  # thin blocks: small calls
            for _ in range(iterations):
                r = torch.linalg.qr(torch.cholesky_solve(r, chol)).Q
            t = r.mT @ s @ r
            theta, w = torch.linalg.eigh(0.5 * (t + t.mT))
        count = ((theta <= tol * scale[:, None]) & (info == 0)[:, None]).sum(-1)
        if int(count.max()) < m or m == d:
            break
        m = min(2 * m, d)
    rmax = int(count.max())
    keep = torch.arange(rmax, device=s.device)[None, :] < count[:, None]
    return (r @ w)[:, :, :rmax] * keep[:, None, :].to(s.dtype), count


def _remove(a: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``a (I - N N^T)``: the rows of a without their components along basis N [..., d, r]."""
    if basis.shape[-1] == 0:
        return a
    return a - (a @ basis) @ basis.mT


class _Factors:
    """Scaled covariances of a fit set, deflated of their null directions, and the
    factorisations shared by every eps.

    Deflation: a direction that is null in the fit set's covariance (rounding level) carries no
    cross-covariance in exact arithmetic, but its rounding noise, whitened by 1/sqrt(eps), would
    enter every canonical direction. It is projected out of Sxx, Sxy and Syy, so its eigenvalue
    is exactly eps and its cross-covariance exactly 0: the exact-arithmetic limit of the fit."""

    def __init__(self, train: CentredStats, null_x: tuple[torch.Tensor, torch.Tensor] | None = None,
                 null_y: tuple[torch.Tensor, torch.Tensor] | None = None):
        """``null_x`` ``(basis [L, dx, r], count [L])`` / ``null_y`` ``(basis [dy, r], count)``:
        null directions found once on all items (a direction constant on every item is constant
        on the fit set: the LayerNorm hyperplane), used when no dimension is pruned; else each
        kept block's own are found."""
        self._null_x, self._null_y = null_x, null_y
        n = train.n
        cxx, cxy, cyy = train.cxx / (n - 1), train.cxy / (n - 1), train.cyy / (n - 1)
        xmax = cxx.abs().amax(dim=(-2, -1))
        ymax = cyy.abs().max()
        self.bad_scale = ~(torch.isfinite(xmax) & (xmax > 0))  # [L]
        self.bad_y = not bool(torch.isfinite(ymax) & (ymax > 0))
        sx = torch.where(self.bad_scale, torch.ones_like(xmax), xmax)
        sy = ymax if not self.bad_y else torch.ones_like(ymax)
        self.sxx = cxx / sx[:, None, None]
        self.syy = cyy / sy
        self.sxy = cxy / torch.sqrt(sx * sy)[:, None, None]
        # kept-dimension masks are decided on the host: no device sync per eps pair
        self.diag_x = torch.diagonal(self.sxx, dim1=-2, dim2=-1).abs().cpu()  # [L, dx]
        self.diag_y = torch.diagonal(self.syy).abs().cpu()  # [dy]
        self._x: dict = {}
        self._y: dict = {}
        self._xy: dict = {}
        self._eig_x: dict = {}
        self._white: dict = {}

    @staticmethod
    def _key(mask: torch.Tensor) -> bytes:
        return mask.cpu().numpy().tobytes()

    def _x_block(self, layers: list[int], mask_x: torch.Tensor):
        """Deflated kept block of Sxx [g, kx, kx], its null basis [g, kx, r] and null count."""
        key = (self._key(mask_x), tuple(layers))
        if key not in self._x:
            idx = torch.as_tensor(layers, device=self.sxx.device)
            sub = self.sxx.index_select(0, idx)
            if not bool(mask_x.all()):
                keep = mask_x.to(sub.device)
                sub = sub[:, keep][:, :, keep]
            if self._null_x is not None and bool(mask_x.all()):
                basis, count = (t.index_select(0, idx) for t in self._null_x)
                basis = basis[:, :, :int(count.max())] if basis.shape[-1] else basis
            else:
                basis, count = null_basis(sub)
            if basis.shape[-1]:
                sub = _remove(_remove(sub, basis).mT, basis)
                sub = 0.5 * (sub + sub.mT)
            self._x[key] = (sub, basis, count)
        return self._x[key]

    def _y_block(self, mask_y: torch.Tensor):
        """Deflated kept block of Syy, its null basis, null count and eigh (shared by every
        eps)."""
        key = self._key(mask_y)
        if key not in self._y:
            keep = mask_y.to(self.syy.device)
            sub = self.syy[keep][:, keep]
            if self._null_y is not None and bool(mask_y.all()):
                basis, count = self._null_y[0], int(self._null_y[1])
            else:
                basis, count = null_basis(sub[None])
                basis, count = basis[0], int(count[0])
            if basis.shape[-1]:
                sub = _remove(_remove(sub, basis).T, basis)
                sub = 0.5 * (sub + sub.T)
            with _cpu_threads(1 if sub.device.type == "cpu" else None):
                self._y[key] = (sub, basis, count, torch.linalg.eigh(sub))
        return self._y[key]

    def _cross(self, layers: list[int], mask_x: torch.Tensor, mask_y: torch.Tensor):
        """Deflated kept block of Sxy [g, kx, ky]."""
        key = (self._key(mask_x), tuple(layers), self._key(mask_y))
        if key not in self._xy:
            sxy = self.sxy.index_select(0, torch.as_tensor(layers, device=self.sxy.device))
            if not bool(mask_x.all()):
                sxy = sxy[:, mask_x.to(sxy.device)]
            if not bool(mask_y.all()):
                sxy = sxy[:, :, mask_y.to(sxy.device)]
            _, bx, _ = self._x_block(layers, mask_x)
            _, by, _, _ = self._y_block(mask_y)
            self._xy[key] = _remove(_remove(sxy.mT, bx).mT, by)
        return self._xy[key]

    def _white_x(self, layers: list[int], mask_x: torch.Tensor, eps_x: float, mask_y):
        """X-view whitening for one eps: ``("chol", L)`` with ``L L^T = Sxx + eps I`` when eps is
        far above pinv's cut-off (then pinv = inverse) and Cholesky succeeds, else
        ``("eig", V, d)`` from one cached eigh. Also ``K = W^T Sxy`` and a failure flag [g]."""
        kx = int(mask_x.sum())
        xkey = (self._key(mask_x), tuple(layers))
        key = (xkey, eps_x, self._key(mask_y))
        if key in self._white:
            return self._white[key]
        sxx, _, _ = self._x_block(layers, mask_x)
        sxy = self._cross(layers, mask_x, mask_y)
        if eps_x > 10 * RCOND * kx:
            chol, info = torch.linalg.cholesky_ex(
                sxx + eps_x * torch.eye(kx, dtype=sxx.dtype, device=sxx.device))
            if bool((info == 0).all()):
                k = torch.linalg.solve_triangular(chol, sxy, upper=False)
                bad = ~torch.isfinite(k).flatten(1).all(dim=1)
                self._white[key] = (("chol", chol), k, bad)
                return self._white[key]
        if xkey not in self._eig_x:
            self._eig_x[xkey] = torch.linalg.eigh(sxx)
        w, v = self._eig_x[xkey]
        d, bad = _inv_sqrt_diag(w, eps_x)
        k = d[:, :, None] * (v.mT @ sxy)
        self._white[key] = (("eig", v, d), k, bad)
        return self._white[key]

    def fit(self, eps_x: float, eps_y: float, layers: Sequence[int]) -> list[_Fit]:
        """Projections for one eps pair, grouped by identical kept-dimension masks."""
        mask_y = self.diag_y >= eps_y
        layers = list(layers)
        masks = self.diag_x[torch.as_tensor(layers)] >= eps_x
        uniq, inverse = torch.unique(masks, dim=0, return_inverse=True)
        fits = []
        for u in range(uniq.shape[0]):
            group = [layers[j] for j in torch.nonzero(inverse == u).flatten().tolist()]
            fits.append(self._fit_group(eps_x, eps_y, group, uniq[u], mask_y))
        return fits

    def _fit_group(self, eps_x, eps_y, layers, mask_x, mask_y) -> _Fit:
        g, kx, ky = len(layers), int(mask_x.sum()), int(mask_y.sum())
        dev = self.sxx.device
        idx = torch.as_tensor(layers, device=dev)
        if kx == 0 or ky == 0 or self.bad_y:
            why = "no kept dimension" if (kx == 0 or ky == 0) else "constant targets"
            empty = torch.zeros(g, 0, 0, dtype=self.sxx.dtype, device=dev)
            return _Fit(layers, (eps_x, eps_y), mask_x, mask_y, empty, empty,
                        torch.zeros(g, dtype=torch.bool, device=dev), [why] * g)
        white, kmat, bad_x = self._white_x(layers, mask_x, eps_x, mask_y)
        sxx, null_x, count_x = self._x_block(layers, mask_x)
        _, null_y, count_y, (wy, vy) = self._y_block(mask_y)
        dyi, bad_y = _inv_sqrt_diag(wy, eps_y)
        m = kmat @ (vy * dyi[None, :])  # whitened cross-covariance W_x^T Sxy W_y [g, kx, ky]
        bad = bad_x | bool(bad_y) | self.bad_scale.index_select(0, idx) \
            | ~torch.isfinite(m).flatten(1).all(dim=1)
        m = torch.where(bad[:, None, None], torch.zeros_like(m), m)
        u, vh = _thin_svd(m)  # [g, kx, k], [g, k, ky]
        if white[0] == "chol":
            proj_x = torch.linalg.solve_triangular(white[1].mT, u, upper=True).mT  # U^T L^-1
        else:
            _, v, d = white
            proj_x = (u.mT * d[:, None, :]) @ v.mT  # U^T diag(d) V^T
        proj_y = (vh * dyi[None, None, :]) @ vy.T  # [g, k, ky]
        # exact-arithmetic limit: no canonical direction has a component along a null direction,
        # and pairs beyond the rank left by the null directions (structural zero correlations,
        # e.g. the sum of centred one-hot columns) are zero rows: their variates are exactly 0
        proj_x, proj_y = _remove(proj_x, null_x), _remove(proj_y, null_y)
        k = proj_x.shape[1]
        rank = torch.minimum(kx - count_x, torch.full_like(count_x, ky - count_y))
        live = (torch.arange(k, device=dev)[None, :] < rank[:, None]).to(proj_x.dtype)
        proj_x, proj_y = proj_x * live[:, :, None], proj_y * live[:, :, None]
        # deterministic sign from the loadings (covariance of each kept X dimension with the
        # variate): its largest-|.| entry is positive. Loadings do not see null directions, so
        # rounding noise cannot flip a pair (raw coefficients can).
        loadings = proj_x @ sxx
        top = loadings.abs().argmax(dim=-1, keepdim=True)
        sign = torch.sign(torch.gather(loadings, -1, top))
        sign = torch.where(sign == 0, torch.ones_like(sign), sign)
        proj_x, proj_y = proj_x * sign, proj_y * sign
        bad = bad | ~(torch.isfinite(proj_x).flatten(1).all(1) & torch.isfinite(proj_y).flatten(1)
                      .all(1))
        reason = []
        bad_scale, bad_list = self.bad_scale.tolist(), bad.tolist()
        for j in range(g):
            if bad_scale[layers[j]]:
                reason.append("constant or non-finite layer")
            elif bad_list[j]:
                reason.append("negative or non-finite eigenvalue in the pseudo-inverse")
            else:
                reason.append("")
        return _Fit(layers, (eps_x, eps_y), mask_x, mask_y, proj_x, proj_y, ~bad, reason)


# ---------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class _Scored:
    score: torch.Tensor  # [g]
    dead: torch.Tensor  # [g] int
    ok: torch.Tensor  # [g] bool
    rho: torch.Tensor  # [g, k]


def _orthonormal_products_skipping_dependent(ddt: torch.Tensor, dat: torch.Tensor,
                                             tol: float = DEPENDENT_TOL) -> torch.Tensor:
    """``Q^T A^T`` for Gram-Schmidt on the variates, from their Gram ``ddt`` [k, k] and their
    products with the raw dimensions ``dat`` [k, m]; a variate whose residual norm² is at most
    ``tol`` × its norm² (dependent on the earlier ones) gets a zero row instead of failing.
    Equal to the Cholesky route when the variates are independent.

    One left-looking Cholesky pass, column by column: a dependent variate's column is left at
    the unit vector (its Gram row and column treated as zero, its diagonal as 1), which leaves
    every other variate's orthogonalisation unchanged. (It replaced refactoring the whole
    matrix after each dependent variate: up to k factorisations, 134 of the 395 s a word probe's
    fits took for 13 layers of 768-d against 500 words.)"""
    k = ddt.shape[0]
    chol = torch.zeros_like(ddt)
    norms = ddt.diagonal()
    skipped = torch.zeros(k, dtype=torch.bool, device=ddt.device)
    for j in range(k):
        column = ddt[j:, j] - chol[j:, :j] @ chol[j, :j]
        if not bool(column[0] > tol * norms[j]):
            chol[j, :j] = 0
            chol[j, j] = 1
            skipped[j] = True
            continue
        chol[j:, j] = column / column[0].sqrt()
    z = torch.linalg.solve_triangular(chol, dat, upper=False)
    z[skipped] = 0
    return z


def _score(fit: _Fit, data: CentredStats, metric: str) -> _Scored:
    """Score fitted projections on a set with its own means (batched over the fit's layers)."""
    dev = fit.proj_x.device
    g = len(fit.layers)
    if fit.proj_x.shape[-1] == 0:
        z = torch.zeros(g, dtype=fit.proj_x.dtype, device=dev)
        return _Scored(z, torch.zeros(g, dtype=torch.long, device=dev), fit.ok.clone(), z[:, None])
    idx = torch.as_tensor(fit.layers, device=dev)
    allx, ally = bool(fit.mask_x.all()), bool(fit.mask_y.all())  # host masks: no sync
    mx = None if allx else fit.mask_x.to(dev)
    my = None if ally else fit.mask_y.to(dev)
    all_layers = fit.layers == list(range(data.n_layers))
    cxx = data.cxx if all_layers else data.cxx.index_select(0, idx)  # no 13 x dx^2 copy
    cxy = data.cxy if all_layers else data.cxy.index_select(0, idx)
    cxx_max = data.max_abs_cxx.index_select(0, idx)
    cyy = data.cyy
    if not allx:
        cxx, cxy = cxx[:, mx][:, :, mx], cxy[:, mx]
    if not ally:
        cxy, cyy = cxy[:, :, my], cyy[my][:, my]
    px, py = fit.proj_x, fit.proj_y
    pcx = px @ cxx  # [g, k, kx]
    pcy = py @ cyy  # [g, k, ky]
    vx = (pcx * px).sum(-1)
    vy = (pcy * py).sum(-1)
    cov = ((px @ cxy) * py).sum(-1)
    # dead: the variate's variance is at the rounding level of the set's covariance
    # (Rayleigh quotient of the centred cross-products at the direction, relative to max |C|)
    dead_x = vx <= DEAD_TOL * (px * px).sum(-1) * cxx_max[:, None]
    dead_y = vy <= DEAD_TOL * (py * py).sum(-1) * data.max_abs_cyy
    dead = dead_x | dead_y
    denom = torch.sqrt(torch.where(dead, torch.ones_like(vx), vx * vy))
    rho = torch.where(dead, torch.zeros_like(cov), cov / denom)
    ok = fit.ok & torch.isfinite(rho).all(-1)
    if metric in ("mean-cca", "svcca"):
        score = rho.mean(-1)
    else:
        k = px.shape[1]
        x_view = px.shape[2] < py.shape[2]
        p, pc = (px, pcx) if x_view else (py, pcy)
        if x_view:
            mean = data.mean_x.index_select(0, idx)
            mean = mean if allx else mean[:, mx]
        else:
            mean = (data.mean_y if ally else data.mean_y[my]).expand(g, -1)
        dead_w = dead_x if x_view else dead_y
        ddt = pc @ p.mT  # centred variates' Gram, [g, k, k]
        dat = pc  # centred variates x raw dims = P C (columns: the k kept dims)
        if metric == "pwcca":
            outer = data.n * mean[:, :, None] * mean[:, None, :]
            ddt, dat = ddt + outer, dat + outer
        else:  # pwcca-centred: dead directions get no weight
            keep = (~dead_w).to(ddt.dtype)
            ddt = ddt * keep[:, :, None] * keep[:, None, :] + torch.diag_embed(1 - keep)
            dat = dat * keep[:, :, None]
        ddt = 0.5 * (ddt + ddt.mT)
        with _cpu_threads(1 if dev.type == "cpu" else None):  # k x k factors: small calls
            chol, info = torch.linalg.cholesky_ex(ddt)
            pivots = torch.diagonal(chol, dim1=-2, dim2=-1) ** 2
            dependent = (info != 0) | (pivots <= DEPENDENT_TOL
                                       * torch.diagonal(ddt, dim1=-2, dim2=-1)).any(-1)
            chol = torch.where(dependent[:, None, None],
                               torch.eye(k, dtype=chol.dtype, device=dev).expand(g, k, k), chol)
            z = torch.linalg.solve_triangular(chol, dat, upper=False)
            for j in torch.nonzero(dependent).flatten().tolist():
                # rank-deficient variates (e.g. a class absent from this split): Gram-Schmidt
                # that gives linearly dependent variates no basis vector (weight 0)
                z[j] = _orthonormal_products_skipping_dependent(ddt[j], dat[j])
        w = z.abs().sum(-1)
        wsum = w.sum(-1, keepdim=True)
        ok = ok & (wsum.squeeze(-1) > 0) & torch.isfinite(w).all(-1)
        score = (w / torch.where(wsum > 0, wsum, torch.ones_like(wsum)) * rho).sum(-1)
    ok = ok & torch.isfinite(score)
    return _Scored(score, dead.sum(-1), ok, rho)


# ---------------------------------------------------------------------------- direct API


def _as_layered(x, *, name: str) -> tuple[torch.Tensor, bool]:
    t = as_tensor(x, name=name)
    if t.ndim == 2:
        return t.unsqueeze(0), False
    if t.ndim == 3:
        return t, True
    raise ValueError(f"{name}: expected [n, dx] or [L, n, dx], got shape {tuple(t.shape)}")


def cca_similarity(x, y, *, eps=(0.0, 0.0), fit=None, metric: str = "pwcca",
                   device=None) -> float | np.ndarray:
    """One CCA fit (on ``fit=(x_fit, y_fit)``, default ``(x, y)``) scored on ``(x, y)``.

    ``metric`` is one of ``pwcca``, ``pwcca-centred``, ``mean-cca``. Raises ``ValueError``
    (naming the layer) where the reference would fail or give NaN.
    """
    if metric not in ("pwcca", "pwcca-centred", "mean-cca"):
        raise ValueError(f"cca_similarity: metric must be pwcca, pwcca-centred or mean-cca, "
                         f"got {metric!r}")
    ex, ey = (float(e) for e in eps)
    xs, layered = _as_layered(x, name="x")
    ys = as_tensor(y, name="y")
    if fit is None:
        xf, yf = xs, ys
    else:
        xf, _ = _as_layered(fit[0], name="fit[0]")
        yf = as_tensor(fit[1], name="fit[1]")
    L, n, dx = xs.shape
    if ys.ndim != 2 or ys.shape[0] != n:
        raise ValueError(f"y: expected [{n}, dy], got {tuple(ys.shape)}")
    if xf.shape[0] != L or xf.shape[2] != dx or yf.ndim != 2 or yf.shape[1] != ys.shape[1] \
            or yf.shape[0] != xf.shape[1]:
        raise ValueError(f"fit: shapes {tuple(xf.shape)}, {tuple(yf.shape)} do not match "
                         f"x {tuple(xs.shape)}, y {tuple(ys.shape)}")
    dy = ys.shape[1]
    nf = xf.shape[1]
    if nf <= max(dx, dy):
        raise ValueError(f"cca: the fit set has {nf} items but {dx} + {dy} dimensions; "
                         f"need more items than dimensions in each view")
    mom = Moments(L, dx, dy, 1 if fit is None else 2, device=device)
    if fit is None:
        mom.update(xs.to(torch.float64), ys.to(torch.float64), 0)
    else:
        mom.update(xf.to(torch.float64), yf.to(torch.float64), 0)
        mom.update(xs.to(torch.float64), ys.to(torch.float64), 1)
    train = mom.centred([0])
    data = train if fit is None else mom.centred([1])
    out = np.empty(L)
    with _cpu_threads(1 if mom.device.type == "cpu" and not _wide(mom) else None):
        fits = _Factors(train).fit(ex, ey, range(L))
    for f in fits:
        sc = _score(f, data, metric)
        for j, layer in enumerate(f.layers):
            if not bool(sc.ok[j]):
                why = f.reason[j] or "singular weights or non-finite score"
                raise ValueError(f"cca: layer {layer}: eps {(ex, ey)} failed ({why})")
            out[layer] = float(sc.score[j])
    return out if layered else float(out[0])


def pwcca(x, y, *, eps=(0.0, 0.0), fit=None) -> float | np.ndarray:
    """Reference PWCCA of ``(x, y)`` with projections learned on ``fit`` (default: ``(x, y)``).

    x ``[n, dx]`` (returns a float) or ``[L, n, dx]`` (one score per layer); y ``[n, dy]``.
    """
    return cca_similarity(x, y, eps=eps, fit=fit, metric="pwcca")


# ---------------------------------------------------------------------------- protocol


def assign_splits(n: int, *, labels=None, n_splits: int = 10, seed: int = 0) -> np.ndarray:
    """Split ids ``[n]`` in ``[0, n_splits)``, seeded.

    Each label's items (or all items, without labels) are shuffled and dealt cyclically into
    consecutive folds from a random starting fold, so every label is spread over the folds as
    evenly as possible (per-fold counts of a label differ by at most one), also over the folds
    ``id % m`` for any m dividing ``n_splits`` (shards dealt into splits, see shard_groups).
    """
    if n_splits < 2:
        raise ValueError(f"assign_splits: n_splits must be >= 2, got {n_splits}")
    lab = np.zeros(n, dtype=np.int64) if labels is None else np.asarray(labels)
    if lab.shape != (n,):
        raise ValueError(f"assign_splits: labels must have shape ({n},), got {lab.shape}")
    rng = np.random.default_rng(seed)
    split = np.empty(n, dtype=np.int64)
    for label in np.unique(lab):
        idx = np.flatnonzero(lab == label)
        idx = idx[rng.permutation(len(idx))]
        first = int(rng.integers(n_splits))
        split[idx] = (first + np.arange(len(idx))) % n_splits
    return split


def _candidates(n_splits: int, eps_grid: Sequence[float], seed: int):
    """(dev, test, eps pairs in trial order) for up to n_splits // 2 disjoint trials."""
    rng = np.random.default_rng(seed)
    remaining = list(range(n_splits))
    grid = [float(e) for e in eps_grid]
    first = [(a, b) for a in grid[:3] for b in grid[:3]]
    rest = [(a, b) for a in grid[3:] for b in grid[3:]]
    out = []
    for _ in range(n_splits // 2):
        i, j = rng.choice(len(remaining), size=2, replace=False)
        dev, test = remaining[i], remaining[j]
        remaining = [s for s in remaining if s not in (dev, test)]
        pairs = [first[k] for k in rng.permutation(len(first))] + \
            [rest[k] for k in rng.permutation(len(rest))]
        out.append((dev, test, pairs))
    return out


def trial_pairs(n_splits: int, seed: int) -> list[tuple[int, int]]:
    """The disjoint (dev, test) split pairs the protocol's trials take for ``seed``, in order
    (the linear-classification proxy uses the same ones)."""
    return [(dev, test) for dev, test, _ in _candidates(n_splits, EPS_GRID, seed)]


def items_per_dimension(moments: Moments, n_splits: int) -> float:
    """Train items of a trial (all but 2 of ``n_splits`` splits' share) per dimension dx + dy."""
    n = sum(moments.counts)
    return n * (n_splits - 2) / n_splits / (moments.dx + moments.dy)


def shard_groups(n_shards: int, n_splits: int, seed_index: int, seed: int = 0
                 ) -> list[list[int]]:
    """The shards of each split for one split seed: ``groups[j]`` lists split j's shards.

    Shards come in blocks of ``n_splits`` consecutive ids, and each block gives one shard to
    every split. Seed index 0 gives shard ``s`` to split ``s % n_splits`` (items dealt into
    consecutive shards, as :func:`assign_splits` deals them, are then stratified exactly as if
    dealt into the splits); every other seed index permutes each block independently (seeded), so
    splits are re-dealt unions of shards and no item is seen twice.
    """
    if n_splits < 2 or n_shards < n_splits or n_shards % n_splits:
        raise ValueError(f"shard_groups: {n_shards} shards cannot be dealt into {n_splits} "
                         f"splits (need a multiple of n_splits)")
    groups: list[list[int]] = [[] for _ in range(n_splits)]
    rng = np.random.default_rng([seed, seed_index])
    for block in range(n_shards // n_splits):
        order = np.arange(n_splits) if seed_index == 0 else rng.permutation(n_splits)
        for split, offset in enumerate(order.tolist()):
            groups[split].append(block * n_splits + offset)
    return groups


def _stats_to(stats: CentredStats, device) -> CentredStats:
    if device is None:
        return stats
    return CentredStats(stats.n, *(t.to(device=device, dtype=torch.float64) for t in
                                   (stats.mean_x, stats.mean_y, stats.cxx, stats.cxy, stats.cyy)))


def _run_trial(train: CentredStats, dev: CentredStats, test: CentredStats,
               pairs, metric: str, n_pairs: int, nulls: tuple | None = None) -> list[dict]:
    """Fit the eps pairs on train, choose on dev, score on test; one record per layer."""
    return _run_trials(train, dev, test, pairs, {metric: [True] * train.n_layers}, n_pairs,
                       nulls)[metric]


def _run_trials(train: CentredStats, dev: CentredStats, test: CentredStats, pairs,
                needs: dict[str, list[bool]], n_pairs: int, nulls: tuple | None = None
                ) -> dict[str, list[dict]]:
    """:func:`_run_trial` for several fit-based metrics sharing the fits: each eps pair is fitted
    once for the layers any metric still needs (``needs[metric][layer]``), then scored on dev per
    metric; each metric keeps its own first ``n_pairs`` working pairs and best fit, as alone.
    Records of layers a metric does not need are ``{}``."""
    L = train.n_layers
    factors = _Factors(train, *(nulls or (None, None)))
    n_ok = {m: [0] * L for m in needs}
    tried = {m: [[] for _ in range(L)] for m in needs}
    failed = {m: [[] for _ in range(L)] for m in needs}
    best: dict[str, list] = {m: [None] * L for m in needs}
    for ex, ey in pairs:
        wanted = {m: {layer for layer in range(L) if needs[m][layer] and n_ok[m][layer] < n_pairs}
                  for m in needs}
        active = sorted(set().union(*wanted.values()))
        if not active:
            break
        for fit in factors.fit(ex, ey, active):
            for m, want in wanted.items():
                js = [j for j, layer in enumerate(fit.layers) if layer in want]
                if not js:
                    continue
                f = fit if len(js) == len(fit.layers) else fit.select(js)
                sc = _score(f, dev, m)
                oks, values = sc.ok.tolist(), sc.score.tolist()  # one host sync per fit
                for j, layer in enumerate(f.layers):
                    if not oks[j]:
                        failed[m][layer].append([ex, ey, f.reason[j] or "singular weights"])
                        continue
                    value = values[j]
                    n_ok[m][layer] += 1
                    tried[m][layer].append([ex, ey, value])
                    if best[m][layer] is None or value > best[m][layer][0]:
                        best[m][layer] = (value, f, j)
    out = {}
    for m in needs:
        records: list[dict] = [{} for _ in range(L)]
        for layer in range(L):
            if needs[m][layer] and best[m][layer] is None:
                records[layer] = {"ok": False, "reason": "every eps pair failed",
                                  "failed_pairs": failed[m][layer]}
        by_fit: dict[int, tuple[_Fit, list[int]]] = {}
        for layer in range(L):
            if best[m][layer] is not None:
                _, f, j = best[m][layer]
                by_fit.setdefault(id(f), (f, []))[1].append(j)
        for f, js in by_fit.values():
            sub = f.select(js)
            sc = _score(sub, test, m)
            oks, values, dead = sc.ok.tolist(), sc.score.tolist(), sc.dead.tolist()
            for j, layer in enumerate(sub.layers):
                rec = {"eps": list(sub.eps), "dev_score": best[m][layer][0],
                       "dev_scores": tried[m][layer], "failed_pairs": failed[m][layer],
                       "dead_directions": int(dead[j]), "k": int(sub.proj_x.shape[1])}
                if oks[j]:
                    rec.update(ok=True, test_score=values[j])
                else:
                    rec.update(ok=False, reason="scoring the test split failed")
                records[layer] = rec
        out[m] = records
    return out


def _pca_basis(c: torch.Tensor, keep: float) -> torch.Tensor:
    """Columns: principal directions explaining ``keep`` of the variance of covariance c."""
    w, v = torch.linalg.eigh(c)
    w, v = w.flip(-1).clamp_min(0), v.flip(-1)
    total = w.sum()
    if not bool(total > 0):
        return v[:, :0]
    r = int(torch.searchsorted(torch.cumsum(w, 0) / total,
                               torch.tensor(keep, dtype=w.dtype, device=w.device))) + 1
    return v[:, : min(r, v.shape[1])]


def _reduce(stats: CentredStats, tx: torch.Tensor, ty: torch.Tensor) -> CentredStats:
    """Statistics of the reduced views x' = tx^T x, y' = ty^T y (one layer)."""
    return CentredStats(stats.n, stats.mean_x @ tx, stats.mean_y @ ty, tx.T @ stats.cxx @ tx,
                        tx.T @ stats.cxy @ ty, ty.T @ stats.cyy @ ty)


def _svcca_trial(train, dev, test, pairs, n_pairs) -> list[dict]:
    ty = _pca_basis(train.cyy, SVCCA_VARIANCE)
    records = []
    for layer in range(train.n_layers):
        one = [s.layer([layer]) for s in (train, dev, test)]
        tx = _pca_basis(one[0].cxx[0], SVCCA_VARIANCE)
        if tx.shape[1] == 0 or ty.shape[1] == 0:
            records.append({"ok": False, "reason": "a view has no variance"})
            continue
        red = [_reduce(s, tx, ty) for s in one]
        rec = _run_trial(*red, pairs, "svcca", n_pairs)[0]
        rec["svcca_dims"] = [int(tx.shape[1]), int(ty.shape[1])]
        records.append(rec)
    return records


def _cka_trial(test: CentredStats) -> list[dict]:
    num = (test.cxy ** 2).sum((-2, -1))
    den = torch.linalg.matrix_norm(test.cxx) * torch.linalg.matrix_norm(test.cyy)
    out = []
    for layer in range(test.n_layers):
        d, v = float(den[layer]), float(num[layer])
        if d > 0 and np.isfinite(v) and np.isfinite(d):
            out.append({"ok": True, "test_score": v / d})
        else:
            out.append({"ok": False, "reason": "constant view (zero norm)"})
    return out


def _warm_up(device: torch.device) -> None:
    """A miniature protocol (2 layers, 96-d vs 40-d, random items, wide enough for the same
    library paths as real fits: batched Cholesky, eigh, QR, triangular solves on the device, the
    host LAPACK pool)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 2000, 96, generator=gen, dtype=torch.float64)
    y = torch.randn(2000, 40, generator=gen, dtype=torch.float64) + x[0, :, :40]
    mom = Moments(2, 96, 40, 10, device=device)
    mom.update(x, y, torch.arange(2000) % 10)
    cca_score_metrics(mom, list(FIT_SHARING_METRICS), n_trials=1, device=device)


_WARM_DEVICES: set[torch.device] = set()  # devices whose warm-up has finished


def start_warm_up(device) -> threading.Thread | None:
    """On CUDA, run :func:`_warm_up` in a background thread and return it (``join`` it before
    the fits): the one-time start of cuSOLVER/cuBLAS and the host LAPACK pool (0.7 s on an
    H100, measured as the first call's fits minus warm ones) then overlaps the forward pass
    instead of adding to the first fits. None on the CPU (nothing to start) and on a device
    already warmed up (e.g. the second of several checkpoints)."""
    device = torch.device(device)
    if device.type != "cuda" or device in _WARM_DEVICES:
        return None

    def run() -> None:
        try:
            _warm_up(device)
            _WARM_DEVICES.add(device)
        except Exception as err:  # noqa: BLE001 - only a head start: the real fits report errors
            warnings.warn(f"the fits' warm-up on {device} failed ({err}); the first fits will "
                          "start the libraries themselves", RuntimeWarning, stacklevel=1)

    thread = threading.Thread(target=run, name="layerprobe-warm-up", daemon=True)
    thread.start()
    return thread


def cca_score_moments(moments: Moments, *, n_trials: int = 3, eps_grid=EPS_GRID, seed: int = 0,
                      metric: str = "pwcca", device=None, n_pairs: int = N_PAIRS,
                      n_splits: int | None = None, n_seeds: int = 1) -> CCAResult:
    """The held-out protocol on accumulated moments, all layers at once.

    Trials take disjoint (dev, test) split pairs (drawn from ``seed``) and fit on the other
    splits; the first ``n_pairs`` eps pairs that work (first-three-values block first, each block
    shuffled) are fitted, the best on dev is scored on test; a seed's score = mean test score
    over trials.

    The moments' slots are shards: ``n_splits`` (default: one shard per split) splits are unions
    of shards (:func:`shard_groups`). With ``n_seeds`` > 1 the protocol runs once per seed on
    re-dealt splits (needs at least 2 shards per split); scores are the mean over seeds and
    ``std`` their standard deviation (ddof 1), the protocol's own sampling spread.
    """
    out = cca_score_metrics(moments, [metric], n_trials=n_trials, eps_grid=eps_grid, seed=seed,
                            device=device, n_pairs=n_pairs, n_splits=n_splits,
                            n_seeds=n_seeds)[metric]
    if isinstance(out, ValueError):
        raise out
    return out


def cca_score_metrics(moments: Moments, metrics: Sequence[str], *, n_trials: int = 3,
                      eps_grid=EPS_GRID, seed: int = 0, device=None, n_pairs: int = N_PAIRS,
                      n_splits: int | None = None, n_seeds: int = 1,
                      on_trial: Callable[[], None] | None = None
                      ) -> dict[str, CCAResult | ValueError]:
    """:func:`cca_score_moments` for several metrics at once: ``pwcca``, ``pwcca-centred`` and
    ``mean-cca`` share each trial's fits (the same projections; only the scoring differs), so
    the fits are computed once, and each metric's scores equal its own run's. A metric that
    cannot be scored maps to its ``ValueError``; an error common to all (bad arguments, too few
    items) is raised. ``on_trial`` is called after each (split seed, trial), e.g. for progress."""
    metrics = list(dict.fromkeys(metrics))
    for metric in metrics:
        if metric not in METRICS:
            raise ValueError(f"cca_score_moments: metric must be one of {METRICS}, got "
                             f"{metric!r}")
    if not metrics:
        raise ValueError("cca_score_metrics: no metric given")
    n_splits = moments.n_splits if n_splits is None else int(n_splits)
    if n_seeds < 1:
        raise ValueError(f"cca_score_moments: n_seeds must be >= 1, got {n_seeds}")
    if n_seeds > 1 and moments.n_splits < 2 * n_splits:
        raise ValueError(f"cca_score_moments: {n_seeds} split seeds need at least 2 shards per "
                         f"split; the moments have {moments.n_splits} slots for {n_splits} "
                         "splits")
    per_dim = items_per_dimension(moments, n_splits)
    if any(m != "cka" for m in metrics) and per_dim < MIN_ITEMS_PER_DIMENSION:
        warnings.warn(f"cca: {per_dim:.1f} train items per dimension ({moments.dx} + {moments.dy}"
                      f" dimensions): below {MIN_ITEMS_PER_DIMENSION:g} the ranking of layers "
                      "was measured to be noise; read scores with their std, or use more data",
                      UserWarning, stacklevel=2)
    fitted = [m for m in metrics if m in FIT_SHARING_METRICS]
    runs: dict[str, list] = {m: [] for m in metrics}
    on_cpu = torch.device(device if device is not None else moments.device).type == "cpu"
    with _cpu_threads(1 if on_cpu and not _wide(moments) else None):
        nulls = _null_directions(moments, device) if fitted else None
        for index in range(n_seeds):
            groups = shard_groups(moments.n_splits, n_splits, index, seed)
            for m, run in _protocol(moments, groups, n_trials, eps_grid, seed + index, metrics,
                                    device, n_pairs, nulls, on_trial).items():
                runs[m].append(run)
    return {m: _combine_seeds(m, runs[m], per_dim, seed, moments.n_layers) for m in metrics}


WIDE_MIN_WORK = 2e9  # n_layers * dx^3 from which the CPU fits use torch's thread count


def _wide(moments: Moments) -> bool:
    """Whether the CPU fits run on torch's thread count (else one thread; small LAPACK calls
    always run on one, see :func:`_cpu_threads`). Only large ``[L, dx, dx]`` factorisations
    and products gain from the pool, and only on CPUs that are not oversubscribed; measured on
    2 cores, 13 layers: at dx 768 two threads took 5.0 s against 7.8 s on one when the
    machine was quiet, 11.9 s against 7.7 s with one busy process beside it, 23 s against 7.8 s
    beside another 2-thread torch process; at dx 256 (0.7 s on one thread) they were 8x slower
    beside it. Set ``torch.set_num_threads(1)`` (``--threads 1``) on a busy machine."""
    return moments.n_layers * moments.dx ** 3 >= WIDE_MIN_WORK


def _combine_seeds(metric: str, runs: list, per_dim: float, seed: int, n_layers: int
                   ) -> CCAResult | ValueError:
    """One metric's result over split seeds (mean, std), or the first seed's error."""
    for run in runs:
        if isinstance(run, ValueError):
            return run
        run.details["items_per_dimension"] = round(per_dim, 3)
    if len(runs) == 1:
        return runs[0]
    per_seed = np.array([r.scores for r in runs])  # [n_seeds, L]
    pooled = [[t for r in runs for t in r.details["test_scores"][layer]]
              for layer in range(n_layers)]
    details = {**runs[0].details,
               "spread": f"std over {len(runs)} split seeds (re-dealt shards, ddof 1)",
               "seed_scores": per_seed.tolist(),
               "std_trials": [float(np.std(t, ddof=1)) if len(t) > 1 else 0.0 for t in pooled],
               "seeds": [{"seed": seed + i, "chosen_eps": r.details["chosen_eps"],
                          "test_scores": r.details["test_scores"]}
                         for i, r in enumerate(runs)]}
    return CCAResult(metric=metric, scores=per_seed.mean(0).tolist(), details=details,
                     std=per_seed.std(0, ddof=1).tolist())


def _null_directions(moments: Moments, device) -> tuple | None:
    """Null directions of every layer's and of the targets' covariance over all items, found once
    for every trial and seed (a direction constant on all items is constant on any fit set)."""
    if sum(moments.counts) < 2:
        return None
    total = _stats_to(moments.centred(range(moments.n_splits)), device)
    return null_basis(total.cxx), tuple(t[0] for t in null_basis(total.cyy[None]))


def _protocol(moments: Moments, groups: list[list[int]], n_trials, eps_grid, seed,
              metrics: list[str], device, n_pairs, nulls: tuple | None = None,
              on_trial: Callable[[], None] | None = None
              ) -> dict[str, CCAResult | ValueError]:
    """One split seed's trials for every metric (fit-based metrics share the fits)."""
    S, L = len(groups), moments.n_layers
    if n_trials < 1 or 2 * n_trials > S:
        raise ValueError(f"cca_score_moments: n_trials={n_trials} needs at least {2 * n_trials} "
                         f"splits, the moments have {S}")
    if len(eps_grid) == 0 and any(m != "cka" for m in metrics):
        raise ValueError("cca_score_moments: eps_grid is empty")
    shard_counts = moments.counts
    counts = [sum(shard_counts[sh] for sh in group) for group in groups]

    def centred(splits: list[int]) -> CentredStats:
        return _stats_to(moments.centred([sh for j in splits for sh in groups[j]]), device)

    trials = {m: [[] for _ in range(L)] for m in metrics}
    skipped = {m: [[] for _ in range(L)] for m in metrics}
    for dev_s, test_s, pairs in _candidates(S, eps_grid, seed):
        todo = {m: [layer for layer in range(L) if len(trials[m][layer]) < n_trials]
                for m in metrics}
        union = sorted(set().union(*todo.values()))
        if not union:
            break
        train_s = [s for s in range(S) if s not in (dev_s, test_s)]
        n_train = sum(counts[s] for s in train_s)
        if any(m != "cka" for m in metrics) and n_train <= max(moments.dx, moments.dy):
            raise ValueError(f"cca: trial (dev {dev_s}, test {test_s}): the train splits hold "
                             f"{n_train} items for {moments.dx} + {moments.dy} dimensions; need "
                             f"more items than dimensions in each view")
        for s, name in ((dev_s, "dev"), (test_s, "test")):
            if counts[s] < 2:
                raise ValueError(f"cca: {name} split {s} holds {counts[s]} item(s); need >= 2")
        test = centred([test_s]).layer(union)
        train = dev = None
        if any(todo[m] for m in metrics if m != "cka"):
            train = centred(train_s).layer(union)
            dev = centred([dev_s]).layer(union)
        records: dict[str, list[dict]] = {}
        shared = {m: [layer in todo[m] for layer in union] for m in metrics
                  if m in FIT_SHARING_METRICS and todo[m]}
        if shared:
            sub = None
            if nulls is not None:
                idx = torch.as_tensor(union, device=nulls[0][0].device)
                sub = (tuple(t.index_select(0, idx) for t in nulls[0]), nulls[1])
            records.update(_run_trials(train, dev, test, pairs, shared, n_pairs, sub))
        if todo.get("svcca"):
            records["svcca"] = _svcca_trial(train, dev, test, pairs, n_pairs)
        if todo.get("cka"):
            records["cka"] = _cka_trial(test)
        for m, recs in records.items():
            for layer, rec in zip(union, recs, strict=True):
                if layer not in todo[m]:
                    continue
                rec = {"dev": dev_s, "test": test_s, **rec}
                (trials[m] if rec.pop("ok") else skipped[m])[layer].append(rec)
        if on_trial is not None:
            on_trial()
    return {m: _protocol_result(m, trials[m], skipped[m], n_trials, eps_grid, n_pairs, seed,
                                counts, moments.n_splits, S) for m in metrics}


def _protocol_result(metric: str, trials: list[list[dict]], skipped: list[list[dict]],
                     n_trials: int, eps_grid, n_pairs: int, seed: int, counts: list[int],
                     n_shards: int, S: int) -> CCAResult | ValueError:
    """A metric's scores (mean test score over trials) and details, or why a layer failed."""
    scores = []
    for layer in range(len(trials)):
        if len(trials[layer]) < n_trials:
            why = "; ".join(f"dev {r['dev']} test {r['test']}: {r.get('reason')}"
                            for r in skipped[layer])
            return ValueError(f"cca: layer {layer}: only {len(trials[layer])} of {n_trials} "
                              f"trials succeeded ({why})")
        scores.append(float(np.mean([r["test_score"] for r in trials[layer]])))
    details = {
        "protocol": {"n_splits": S, "n_trials": n_trials, "eps_grid": [float(e) for e in eps_grid],
                     "n_pairs": n_pairs, "seed": seed, "sign_convention": SIGN_CONVENTION,
                     "dead_tol": DEAD_TOL,
                     "weights": {"pwcca": "reference (first-k means added to the variates)",
                                 "pwcca-centred": "centred variates and dimensions"}.get(metric),
                     "svcca_variance": SVCCA_VARIANCE if metric == "svcca" else None},
        "n_per_split": counts,
        "n_shards": n_shards,
        "trials": trials,
        "skipped_trials": skipped,
        "test_scores": [[r["test_score"] for r in t] for t in trials],
        "chosen_eps": [[r.get("eps") for r in t] for t in trials],
        "dead_directions": [[r.get("dead_directions", 0) for r in t] for t in trials],
    }
    return CCAResult(metric=metric, scores=scores, details=details)


def cca_score(x, y, *, labels=None, n_splits: int = 10, n_trials: int = 3, eps_grid=EPS_GRID,
              seed: int = 0, device=None, metric: str = "pwcca", split=None,
              chunk_rows: int = 4096, n_seeds: int = 1, shards_per_split: int | None = None
              ) -> CCAResult:
    """Held-out protocol on arrays: x ``[L, n, dx]`` or ``[n, dx]``, y ``[n, dy]``.

    Items are dealt into ``n_splits * shards_per_split`` shards by :func:`assign_splits`
    (stratified by ``labels`` if given), or given as ``split`` (shard) ids in that range; with
    ``n_seeds`` > 1 (default 2 shards per split then) the spread over re-dealt splits is
    reported as ``std``."""
    xs, _ = _as_layered(x, name="x")
    ys = as_tensor(y, name="y")
    L, n, dx = xs.shape
    if ys.ndim != 2 or ys.shape[0] != n:
        raise ValueError(f"cca_score: y must be [{n}, dy], got {tuple(ys.shape)}")
    if shards_per_split is None:
        shards_per_split = 1 if n_seeds == 1 else 2
    if split is None:
        split = assign_splits(n, labels=labels, n_splits=n_splits * shards_per_split, seed=seed)
    split = torch.as_tensor(np.asarray(split), dtype=torch.int64)
    if split.shape != (n,):
        raise ValueError(f"cca_score: split must be [{n}], got {tuple(split.shape)}")
    n_shards = n_splits * shards_per_split
    mom = Moments(L, dx, ys.shape[1], n_shards, device=device, buffer_rows=chunk_rows)
    if split.numel() and (int(split.min()) < 0 or int(split.max()) >= n_shards):
        raise ValueError(f"cca_score: split ids must lie in [0, {n_shards}), got "
                         f"[{int(split.min())}, {int(split.max())}]")
    # rows of one shard at a time: blocks of chunk_rows go straight into one Gram matmul each,
    # gathered into one reused block (a fresh block per chunk costs more in page faults than
    # the copy itself: 8x, measured on the bar's case)
    order = torch.argsort(split, stable=True).to(xs.device)
    bounds = torch.bincount(split, minlength=n_shards).cumsum(0).tolist()
    block_x = xs.new_empty(L, min(chunk_rows, n), dx)
    block_y = ys.new_empty(min(chunk_rows, n), ys.shape[1])
    for s in range(n_shards):
        rows = order[(bounds[s - 1] if s else 0):bounds[s]]
        for start in range(0, rows.numel(), chunk_rows):
            idx = rows[start:start + chunk_rows]
            m = idx.numel()
            for layer in range(L):
                torch.index_select(xs[layer], 0, idx, out=block_x[layer, :m])
            torch.index_select(ys, 0, idx.to(ys.device), out=block_y[:m])
            mom.update(block_x[:, :m], block_y[:m], s, block=True)
    return cca_score_moments(mom, n_trials=n_trials, eps_grid=eps_grid, seed=seed, metric=metric,
                             device=device, n_splits=n_splits, n_seeds=n_seeds)
