"""Streaming, mergeable sufficient statistics of ``[X_layer, Y]`` per split, for all layers.

A :class:`Moments` accumulator holds, for every split ``s`` and layer ``l``, the item count, the
sums of ``x`` and ``y`` and the raw (uncentred) second moments ``X^T X``, ``X^T Y`` and ``Y^T Y``
(``Y^T Y`` once per split: the targets are shared by all layers). Every CCA fit and score in
:mod:`layerprobe.cca` is computed from these numbers, so frames are seen once and memory does not
depend on the number of items. Accumulators over disjoint data add up (:meth:`Moments.merge`).

Memory: ``n_splits * n_layers * (dx^2 + dx*dy) * 8`` bytes in float64, e.g. 10 splits x 13 layers
x 768-d vs 80-d = 0.68 GB, plus a buffer of ``buffer_rows`` items (float32 unless float64 is
given; 4096 x 13 x 768 x 4 bytes = 0.16 GB) and its sorted copy while flushing. ``packed=True``
(the default on the CPU, where memory is short) keeps each ``X^T X`` as its upper triangle,
``dx (dx + 1) / 2`` numbers instead of ``dx^2`` (0.37 GB in the example): the Gram of a flush is
computed whole, as before, and its triangle added; readers get the mirrored full matrix. The
CPU's float64 GEMM computes ``X^T X`` exactly symmetric, so this changes no bit of a score.

``compensated=True`` keeps every float64 sum as an unevaluated pair ``hi + lo`` (Neumaier's
compensated summation: each flush's Gram is added with an exact TwoSum, the rounding error going
to ``lo``), which doubles the memory. The sums are then exact to ~1e-32 relative, so the order in
which flushes (or processes, :meth:`Moments.merge`) are added no longer shows in the rounded
statistics: the same flushes added in any order give the same float64 bits (unless an entry lies
within ~1e-16 of its own rounding boundary). This is what makes scores of utterances shared out
over any number of ranks equal those of one process (:mod:`layerprobe.score`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["CentredStats", "Moments", "as_tensor"]

_STATE_FORMAT = "layerprobe-moments-v2"  # v2: compensation terms (v1 read as plain sums)
_SUM_FIELDS = ("sum_x", "sum_y", "xx", "xy", "yy")
_CHUNK = 1 << 16  # elements per step of the CPU's compensated additions (stays in cache)


def _two_sum_add_(hi: torch.Tensor, lo: torch.Tensor, b: torch.Tensor) -> None:
    """``hi + lo += b`` in place without rounding error: ``hi`` becomes ``fl(hi + b)`` and the
    exact rounding error of that sum (Knuth's TwoSum, 6 flops) is added to ``lo``. On the CPU in
    chunks that stay in cache (whole-array passes over 60 MB slots are 10x slower here)."""
    if hi.shape != b.shape or lo.shape != hi.shape:
        raise ValueError(f"_two_sum_add_: shapes {tuple(hi.shape)}, {tuple(lo.shape)}, "
                         f"{tuple(b.shape)} differ")
    h, low, add = hi.view(-1), lo.view(-1), b.reshape(-1)
    step = h.numel() if hi.device.type != "cpu" else _CHUNK
    total = torch.empty(min(step, h.numel()), dtype=hi.dtype, device=hi.device)
    part = torch.empty_like(total)
    err = torch.empty_like(total)
    for start in range(0, h.numel(), step):
        a, c = h[start:start + step], add[start:start + step]
        m = a.numel()
        s, bv, e = total[:m], part[:m], err[:m]
        torch.add(a, c, out=s)  # s = fl(a + c)
        torch.sub(s, a, out=bv)  # the part of s that came from c
        torch.sub(c, bv, out=e)  # c's lost bits ...
        torch.sub(s, bv, out=bv)
        a.sub_(bv)  # ... and a's lost bits (a is overwritten by s below)
        e.add_(a)
        low[start:start + m].add_(e)
        a.copy_(s)


def as_tensor(a, *, name: str, device=None) -> torch.Tensor:
    """Torch view of a numpy array / tensor / nested list (no copy when possible)."""
    t = a if isinstance(a, torch.Tensor) else torch.as_tensor(np.asarray(a))
    return t.to(device) if device is not None else t


def check_finite(t: torch.Tensor, *, name: str, layered: bool) -> None:
    """Raise a ValueError naming the layers (or the argument) that hold NaN/inf. A sum per layer
    first (one read: NaN/inf make it non-finite); only when one is not finite (or overflowed)
    the elementwise test, which names the layers (it is 25x slower on [13, 20000, 768])."""
    if not t.is_floating_point():
        return
    if bool(torch.isfinite(t.flatten(1).sum(1) if layered and t.ndim > 1 else t.sum()).all()):
        return
    if layered:
        bad = (~torch.isfinite(t)).flatten(1).any(dim=1)
        if bool(bad.any()):
            layers = torch.nonzero(bad).flatten().tolist()
            raise ValueError(f"{name}: non-finite values (NaN/inf) in layer(s) {layers}")
    elif not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name}: non-finite values (NaN/inf)")


@contextmanager
def _cpu_threads(n: int | None):
    """Temporarily limit torch's CPU thread pool (restored afterwards).

    The fits are hundreds of small LAPACK calls (QR/SVD of 768 x 80, k x k Cholesky); with MKL's
    OpenMP pool they become up to 100x slower when the CPU is oversubscribed (measured here:
    SVD of 4 x 80 x 80 takes 1 s with 2 threads on a loaded 2-core machine, 6 ms with 1), and at
    these sizes one thread loses little when it is not."""
    old = torch.get_num_threads()
    if n is not None and n != old:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@dataclass(frozen=True)
class CentredStats:
    """Centred statistics of one set of items (a union of splits), all layers.

    ``cxx = sum (x - mean_x)(x - mean_x)^T`` etc. (not divided by n); ``np.cov`` = ``c / (n - 1)``.
    """

    n: int
    mean_x: torch.Tensor  # [L, dx]
    mean_y: torch.Tensor  # [dy]
    cxx: torch.Tensor  # [L, dx, dx]
    cxy: torch.Tensor  # [L, dx, dy]
    cyy: torch.Tensor  # [dy, dy]

    @property
    def n_layers(self) -> int:
        return int(self.cxx.shape[0])

    @functools.cached_property
    def max_abs_cxx(self) -> torch.Tensor:
        """max |cxx| per layer [L] (computed once: every fit and score of a trial needs it)."""
        return self.cxx.abs().amax(dim=(-2, -1))

    @functools.cached_property
    def max_abs_cyy(self) -> torch.Tensor:
        return self.cyy.abs().max()

    def layer(self, index: Sequence[int] | torch.Tensor) -> CentredStats:
        """The same statistics restricted to some layers (``self`` when that is all of them)."""
        idx = torch.as_tensor(index, dtype=torch.long, device=self.cxx.device)
        if idx.tolist() == list(range(self.n_layers)):
            return self
        return CentredStats(self.n, self.mean_x[idx], self.mean_y, self.cxx[idx],
                            self.cxy[idx], self.cyy)


class Moments:
    """Per-split count, sums and second moments of ``[X_layer, Y]`` for all layers (mergeable).

    Rows passed to :meth:`update` are buffered (``buffer_rows`` items, float32 unless given in
    float64) and folded in, sorted by split, with one batched float64 matmul over layers per split
    when the buffer is full; every reader flushes the buffer first. ``compensated``: the sums are
    kept as ``hi + lo`` pairs (module docstring): twice the memory, and the result does not depend
    on the order in which flushes or merged accumulators are added.
    """

    def __init__(self, n_layers: int, dx: int, dy: int, n_splits: int, *,
                 dtype: torch.dtype = torch.float64, device=None, buffer_rows: int = 4096,
                 compensated: bool = False, packed: bool | None = None):
        for name, v in (("n_layers", n_layers), ("dx", dx), ("dy", dy), ("n_splits", n_splits),
                        ("buffer_rows", buffer_rows)):
            if int(v) < 1:
                raise ValueError(f"Moments: {name} must be >= 1, got {v}")
        if not dtype.is_floating_point:
            raise ValueError(f"Moments: dtype must be floating point, got {dtype}")
        self.n_layers, self.dx, self.dy, self.n_splits = int(n_layers), int(dx), int(dy), \
            int(n_splits)
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.buffer_rows = int(buffer_rows)
        kw = {"dtype": dtype, "device": self.device}
        S, L = self.n_splits, self.n_layers
        self.count = torch.zeros(S, dtype=torch.int64, device=self.device)
        self.sum_x = torch.zeros(S, L, dx, **kw)
        self.sum_y = torch.zeros(S, dy, **kw)
        # packed: X^T X as its upper triangle (module docstring); None: on the CPU
        self.packed = self.device.type == "cpu" if packed is None else bool(packed)
        rows, cols = torch.triu_indices(dx, dx, device=self.device)
        self._triu = rows * dx + cols if self.packed else None  # flat indices of the triangle
        self._tril = cols * dx + rows if self.packed else None  # ... and of its mirror
        self.xx = torch.zeros(S, L, self._triu.numel(), **kw) if self.packed \
            else torch.zeros(S, L, dx, dx, **kw)
        self.xy = torch.zeros(S, L, dx, dy, **kw)
        self.yy = torch.zeros(S, dy, dy, **kw)
        self.compensated = bool(compensated)
        # compensation terms: the exact value of a sum is hi + lo (None when not compensated)
        self._lo = {k: torch.zeros_like(getattr(self, k)) if self.compensated else None
                    for k in _SUM_FIELDS}
        self._gram: torch.Tensor | None = None  # [L, dx, dx] scratch of a flush's Gram
        self._settled = True  # hi == fl(hi + lo) for every compensated sum
        self._buf_x: torch.Tensor | None = None  # [S, L, buffer_rows, dx], allocated lazily
        self._buf_y: torch.Tensor | None = None
        self._buf_s: torch.Tensor | None = None
        self._fill = 0
        self._total: tuple | None = None  # cached sums over all splits
        self._threads = torch.get_num_threads()  # for the Gram matmuls (set at creation)

    # ------------------------------------------------------------------ accumulation
    def update(self, x, y, split, *, block: bool = False) -> None:
        """Add items: x ``[L, n, dx]`` (or ``[n, dx]`` when L = 1), y ``[n, dy]``, split ``[n]``
        ints in ``[0, n_splits)`` (or one int for all rows). Rows are copied (callers may reuse
        their buffers). ``block``: the rows are one split's, folded in at once with one Gram
        matmul instead of being buffered (done anyway for ``buffer_rows`` rows or more)."""
        x = as_tensor(x, name="x", device=self.device)
        y = as_tensor(y, name="y", device=self.device)
        if x.ndim == 2 and self.n_layers == 1:
            x = x.unsqueeze(0)
        if x.ndim != 3 or x.shape[0] != self.n_layers or x.shape[2] != self.dx:
            raise ValueError(f"Moments.update: x must be [{self.n_layers}, n, {self.dx}], "
                             f"got {tuple(x.shape)}")
        n = int(x.shape[1])
        if y.ndim != 2 or y.shape != (n, self.dy):
            raise ValueError(f"Moments.update: y must be [{n}, {self.dy}], got {tuple(y.shape)}")
        split_t = as_tensor(split, name="split", device=self.device)
        if split_t.ndim == 0:
            split_t = split_t.expand(n)
        if split_t.shape != (n,) or split_t.is_floating_point() or split_t.is_complex():
            raise ValueError(f"Moments.update: split must be [{n}] integers, "
                             f"got {tuple(split_t.shape)} {split_t.dtype}")
        split_t = split_t.to(torch.int64)
        if n == 0:
            return
        if int(split_t.min()) < 0 or int(split_t.max()) >= self.n_splits:
            raise ValueError(f"Moments.update: split ids must lie in [0, {self.n_splits}), got "
                             f"[{int(split_t.min())}, {int(split_t.max())}]")
        check_finite(y, name="Moments.update: y", layered=False)
        single = bool((split_t == split_t[0]).all())
        if block and not single:
            raise ValueError("Moments.update: block=True needs rows of a single split")
        if (block or n >= self.buffer_rows) and single:
            # a block of one split: fold it in directly (no buffer copy, one big Gram); its row
            # sums, computed there first, serve as the finiteness check
            self.end_block()
            with _cpu_threads(1 if self.device.type == "cpu" else None):
                self._add_block(x, y, int(split_t[0]), check=True)
            return
        if x.is_floating_point() and not bool(torch.isfinite(x.sum(dim=1)).all()):
            check_finite(x, name="Moments.update: x", layered=True)  # names the layers
        buf_dtype = self.dtype if x.dtype in (torch.float64, self.dtype) else torch.float32
        if self._buf_x is not None and \
                torch.promote_types(buf_dtype, self._buf_x.dtype) != self._buf_x.dtype:
            self.end_block()  # float64 rows after float32 ones: widen the buffer
            self._buf_x = None
        if self._buf_x is None:
            R = self.buffer_rows
            self._buf_x = torch.empty(self.n_layers, R, self.dx, dtype=buf_dtype,
                                      device=self.device)
            self._buf_y = torch.empty(R, self.dy, dtype=self.dtype, device=self.device)
            self._buf_s = torch.empty(R, dtype=torch.int64, device=self.device)
        with _cpu_threads(1 if self.device.type == "cpu" else None):
            self._append(x, y, split_t, n)

    def _append(self, x: torch.Tensor, y: torch.Tensor, split_t: torch.Tensor, n: int) -> None:
        done = 0
        while done < n:
            take = min(n - done, self.buffer_rows - self._fill)
            end = self._fill + take
            self._buf_x[:, self._fill:end].copy_(x[:, done:done + take])
            self._buf_y[self._fill:end].copy_(y[done:done + take])
            self._buf_s[self._fill:end].copy_(split_t[done:done + take])
            self._fill = end
            done += take
            if self._fill == self.buffer_rows:
                self._flush()

    def flush(self) -> None:
        """Fold the buffered rows into the statistics: rows are sorted by split, then one batched
        float64 matmul over layers per split present (compensated: then every sum rounded to its
        nearest float64, the remainder kept in its ``lo`` term)."""
        self.end_block()
        self._settle()

    def _settle(self) -> None:
        """Compensated sums: ``hi, lo = fl(hi + lo), (hi + lo) - fl(hi + lo)`` (exact), so that
        readers see the correctly rounded sums in the plain fields."""
        if self._settled or not self.compensated:
            return
        with _cpu_threads(self._threads):
            for name in _SUM_FIELDS:
                hi, lo = getattr(self, name), self._lo[name]
                for s in range(hi.shape[0]):
                    rest = lo[s].clone()
                    lo[s].zero_()
                    _two_sum_add_(hi[s], lo[s], rest)
        self._settled = True
        self._total = None

    def _flush(self) -> None:
        """Gathers and sums run on one CPU thread (small ops: MKL/OpenMP's pool makes them very
        slow on an oversubscribed CPU); the Gram matmuls use the caller's thread count."""
        m = self._fill
        if m == 0:
            return
        self._fill = 0
        self._total = None
        split = self._buf_s[:m]
        order = torch.argsort(split, stable=True)
        counts = torch.bincount(split, minlength=self.n_splits).tolist()
        L, R = self.n_layers, self.buffer_rows
        flat = (torch.arange(L, device=self.device)[:, None] * R + order[None, :]).reshape(-1)
        xs_all = self._buf_x.reshape(L * R, self.dx).index_select(0, flat).view(L, m, self.dx)
        ys_all = self._buf_y.index_select(0, order)
        start = 0
        for s, c in enumerate(counts):
            if c == 0:
                continue
            self._add_block(xs_all[:, start:start + c], ys_all[start:start + c], s)
            start += c

    def _add_block(self, x: torch.Tensor, y: torch.Tensor, s: int, check: bool = False) -> None:
        """Add rows x ``[L, c, dx]``, y ``[c, dy]`` of split ``s`` (the Gram matmuls and row sums
        use the caller's thread count); ``check``: raise on non-finite x before changing any
        statistic."""
        xs = x.to(self.dtype)
        ys = y.to(self.dtype)
        with _cpu_threads(self._threads):
            row_sums = xs.sum(dim=1)
            if check and not bool(torch.isfinite(row_sums).all()):
                check_finite(x, name="Moments.update: x", layered=True)  # names the layers
            if not self.compensated and not self.packed:
                self.xx[s].baddbmm_(xs.mT, xs)
                self.xy[s].add_(torch.matmul(xs.mT, ys))
            else:
                if self._gram is None:
                    self._gram = torch.empty(self.n_layers, self.dx, self.dx, dtype=self.dtype,
                                             device=self.device)
                torch.bmm(xs.mT, xs, out=self._gram)
                gram = self._pack(self._gram)
                cross = torch.matmul(xs.mT, ys)
                if not self.compensated:
                    self.xx[s].add_(gram)
                    self.xy[s].add_(cross)
        self.count[s] += xs.shape[1]
        self._total = None
        if not self.compensated:
            self.yy[s].addmm_(ys.T, ys)
            self.sum_x[s].add_(row_sums)
            self.sum_y[s].add_(ys.sum(dim=0))
            return
        self._settled = False
        with _cpu_threads(self._threads):  # elementwise passes over whole slots: all threads
            for name, part in (("xx", gram), ("xy", cross), ("yy", ys.T @ ys),
                               ("sum_x", row_sums), ("sum_y", ys.sum(dim=0))):
                _two_sum_add_(getattr(self, name)[s], self._lo[name][s], part)

    def _pack(self, gram: torch.Tensor) -> torch.Tensor:
        """``[L, dx, dx]`` → its storage form (the upper triangle ``[L, T]`` when packed)."""
        if not self.packed:
            return gram
        return gram.reshape(gram.shape[0], -1).index_select(1, self._triu)

    def _unpack(self, xx: torch.Tensor) -> torch.Tensor:
        """Stored ``X^T X`` ``[L, T]`` (packed) or ``[L, dx, dx]`` → the full ``[L, dx, dx]``."""
        if not self.packed:
            return xx
        full = xx.new_empty(xx.shape[0], self.dx * self.dx)
        full[:, self._triu] = xx
        full[:, self._tril] = xx
        return full.view(xx.shape[0], self.dx, self.dx)

    def xx_matrix(self, split: int) -> torch.Tensor:
        """``X^T X`` of one split, all layers, as full matrices ``[L, dx, dx]``."""
        self.flush()
        return self._unpack(self.xx[split])

    def end_block(self) -> None:
        """Fold the buffered rows in now: a boundary that does not depend on what comes next
        (with compensated sums, blocks folded in whole give the same bits in any order, on any
        process)."""
        with _cpu_threads(1 if self.device.type == "cpu" else None):
            self._flush()

    # ------------------------------------------------------------------ combination
    def all_reduce_(self) -> None:
        """Sum this accumulator over the ranks of the default ``torch.distributed`` process
        group, in place on every rank: each field gathered slot by slot (bounded memory) and added
        in rank order (compensated: with an exact TwoSum, the ``lo`` terms added too), so every
        rank, and every rank count for compensated sums, gets the same bits."""
        import torch.distributed as dist

        self.flush()
        world = dist.get_world_size()

        def gathered(t: torch.Tensor) -> list[torch.Tensor]:
            parts = [torch.empty_like(t) for _ in range(world)]
            dist.all_gather(parts, t.contiguous())
            return parts

        for slot in range(self.n_splits):
            parts = gathered(self.count[slot:slot + 1])
            self.count[slot] = sum(int(p) for p in parts)
            for name in _SUM_FIELDS:
                hi = getattr(self, name)[slot]
                his = gathered(hi)
                hi.copy_(his[0])
                if not self.compensated:
                    for part in his[1:]:
                        hi += part
                    continue
                lo = self._lo[name][slot]
                los = gathered(lo)
                lo.copy_(los[0])
                for part_hi, part_lo in zip(his[1:], los[1:], strict=True):
                    _two_sum_add_(hi, lo, part_hi)
                    lo.add_(part_lo)
        self._settled = not self.compensated
        self._total = None
        self.flush()

    def _check_compatible(self, other: Moments) -> None:
        mine = (self.n_layers, self.dx, self.dy, self.n_splits, self.packed)
        theirs = (other.n_layers, other.dx, other.dy, other.n_splits, other.packed)
        if mine != theirs:
            raise ValueError(f"Moments.merge: shapes differ (n_layers, dx, dy, n_splits, "
                             f"packed) {mine} vs {theirs}")

    def merge(self, other: Moments) -> Moments:
        """A new accumulator equal to one pass over both data sets."""
        if not isinstance(other, Moments):
            raise TypeError(f"Moments.merge: expected Moments, got {type(other).__name__}")
        self._check_compatible(other)
        self.flush()
        other.flush()
        out = Moments(self.n_layers, self.dx, self.dy, self.n_splits, dtype=self.dtype,
                      device=self.device, buffer_rows=self.buffer_rows,
                      compensated=self.compensated, packed=self.packed)
        out.count.copy_(self.count + other.count.to(self.device))
        for name in _SUM_FIELDS:
            a, b = getattr(self, name), getattr(other, name).to(device=self.device,
                                                                 dtype=self.dtype)
            if not self.compensated:
                getattr(out, name).copy_(a + b)
                continue
            getattr(out, name).copy_(a)
            out._lo[name].copy_(self._lo[name])
            _two_sum_add_(getattr(out, name), out._lo[name], b)
            if other.compensated:
                out._lo[name].add_(other._lo[name].to(device=self.device, dtype=self.dtype))
        out._settled = not self.compensated
        out.flush()
        return out

    __add__ = merge

    @property
    def counts(self) -> list[int]:
        """Items per split."""
        self.flush()
        return [int(c) for c in self.count.tolist()]

    def centred(self, splits: Sequence[int]) -> CentredStats:
        """Centred statistics of the union of ``splits`` (computed from the sums)."""
        self.flush()
        idx = sorted({int(s) for s in splits})
        if not idx or idx[0] < 0 or idx[-1] >= self.n_splits:
            raise ValueError(f"Moments.centred: splits must be a non-empty subset of "
                             f"[0, {self.n_splits}), got {list(splits)}")
        n = int(self.count[idx].sum())
        if n < 2:
            raise ValueError(f"Moments.centred: splits {idx} hold {n} item(s); need at least 2")
        sx, sy, gxx, gxy, gyy = self._sums(idx)  # fresh tensors: centred in place
        gxx = self._unpack(gxx)
        mx, my = sx / n, sy / n
        cxx = gxx.baddbmm_(sx[:, :, None], mx[:, None, :], alpha=-1)
        cxy = gxy.baddbmm_(sx[:, :, None], my.expand(len(sx), 1, -1), alpha=-1)
        cyy = gyy.addr_(sy, my, alpha=-1)
        cxx = torch.add(cxx, cxx.mT).mul_(0.5)
        cyy = torch.add(cyy, cyy.T).mul_(0.5)
        return CentredStats(n, mx, my, cxx, cxy, cyy)

    def _sums(self, idx: list[int]) -> tuple[torch.Tensor, ...]:
        """Raw sums over splits idx, as new tensors (as total minus the rest when that is fewer
        additions)."""
        names = ("sum_x", "sum_y", "xx", "xy", "yy")
        rest = [s for s in range(self.n_splits) if s not in idx]
        if len(rest) + 1 < len(idx):
            if self._total is None:
                self._total = tuple(getattr(self, k).sum(0) for k in names)
            out = []
            for k, tot in zip(names, self._total, strict=True):
                t = tot.clone()
                for s in rest:
                    t -= getattr(self, k)[s]
                out.append(t)
            return tuple(out)
        out = []
        for k in names:
            a = getattr(self, k)
            t = a[idx[0]].clone()
            for s in idx[1:]:
                t += a[s]
            out.append(t)
        return tuple(out)

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict:
        """Plain dict of CPU tensors and ints (``torch.save``-able)."""
        self.flush()
        lo = {f"{k}_lo": v.detach().cpu().clone() for k, v in self._lo.items() if v is not None}
        return {"format": _STATE_FORMAT, "n_layers": self.n_layers, "dx": self.dx,
                "dy": self.dy, "n_splits": self.n_splits, "buffer_rows": self.buffer_rows,
                "compensated": self.compensated, "packed": self.packed,
                **{k: getattr(self, k).detach().cpu().clone()
                   for k in ("count", *_SUM_FIELDS)}, **lo}

    @classmethod
    def from_state_dict(cls, d: dict, *, device=None) -> Moments:
        """Inverse of :meth:`state_dict`."""
        if d.get("format") not in (_STATE_FORMAT, "layerprobe-moments-v1"):
            raise ValueError(f"Moments.from_state_dict: format {d.get('format')!r} is not "
                             f"{_STATE_FORMAT!r}")
        out = cls(d["n_layers"], d["dx"], d["dy"], d["n_splits"], dtype=d["xx"].dtype,
                  device=device, buffer_rows=d.get("buffer_rows", 4096),
                  compensated=bool(d.get("compensated", False)),
                  packed=bool(d.get("packed", False)))
        wanted = [("count", out.count), *((k, getattr(out, k)) for k in _SUM_FIELDS)]
        if out.compensated:
            wanted += [(f"{k}_lo", out._lo[k]) for k in _SUM_FIELDS]
        for k, target in wanted:
            if k not in d:
                raise ValueError(f"Moments.from_state_dict: {k} is missing")
            if tuple(d[k].shape) != tuple(target.shape):
                raise ValueError(f"Moments.from_state_dict: {k} has shape {tuple(d[k].shape)}, "
                                 f"expected {tuple(target.shape)}")
            target.copy_(d[k])
        out._total = None
        return out

    def __repr__(self) -> str:
        return (f"Moments(n_layers={self.n_layers}, dx={self.dx}, dy={self.dy}, "
                f"n_splits={self.n_splits}, counts={self.counts}, device={self.device}, "
                f"compensated={self.compensated})")
