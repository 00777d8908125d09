"""Moment accumulators: against numpy sums, streaming = one pass, merge, persistence, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from layerprobe.stats import Moments, check_finite


def _data(L=3, n=500, dx=6, dy=4, seed=0, S=5):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((L, n, dx)) * 2 + 3
    y = rng.standard_normal((n, dy)) - 1
    return x, y, rng.integers(0, S, n)


def _field(m: Moments, k: str) -> torch.Tensor:
    """A statistic of every split, ``X^T X`` as full matrices whether stored packed or not."""
    if k == "xx":
        return torch.stack([m.xx_matrix(s) for s in range(m.n_splits)])
    m.flush()
    return getattr(m, k)


def _assert_equal_moments(a: Moments, b: Moments, rtol=1e-12):
    assert a.counts == b.counts
    for k in ("sum_x", "sum_y", "xx", "xy", "yy"):
        np.testing.assert_allclose(_field(a, k).cpu().numpy(), _field(b, k).cpu().numpy(),
                                   rtol=rtol, atol=1e-9)


def test_update_matches_numpy_per_split_and_centred():
    x, y, split = _data()
    m = Moments(3, 6, 4, 5, buffer_rows=7)  # tiny buffer: many partial flushes
    for s in range(0, 500, 33):
        m.update(x[:, s:s + 33], y[s:s + 33], split[s:s + 33])
    assert m.counts == np.bincount(split, minlength=5).tolist()
    for s in range(5):
        sel = split == s
        np.testing.assert_allclose(m.xx_matrix(s).numpy(), np.einsum("lni,lnj->lij", x[:, sel],
                                                                x[:, sel]), rtol=1e-12)
        np.testing.assert_allclose(m.xy[s].numpy(), np.einsum("lni,nj->lij", x[:, sel],
                                                                y[sel]), rtol=1e-12)
        np.testing.assert_allclose(m.yy[s].numpy(), y[sel].T @ y[sel], rtol=1e-12)
        np.testing.assert_allclose(m.sum_x[s].numpy(), x[:, sel].sum(1), rtol=1e-12)
    for splits in ([1], [0, 2], [0, 1, 2, 4]):  # the last goes through total minus the rest
        sel = np.isin(split, splits)
        c = m.centred(splits)
        assert c.n == sel.sum()
        for layer in range(3):
            cov = np.cov(x[layer, sel].T, y[sel].T) * (c.n - 1)
            np.testing.assert_allclose(c.cxx[layer].numpy(), cov[:6, :6], rtol=1e-9, atol=1e-9)
            np.testing.assert_allclose(c.cxy[layer].numpy(), cov[:6, 6:], rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(c.cyy.numpy(), cov[6:, 6:], rtol=1e-9, atol=1e-9)


def test_block_updates_equal_buffered_ones():
    """``block=True`` folds one split's rows in at once: same moments as buffering them, and
    rows of several splits are refused."""
    x, y, split = _data()
    buffered = Moments(3, 6, 4, 5, buffer_rows=64)
    blocks = Moments(3, 6, 4, 5, buffer_rows=64)
    for s in range(5):
        sel = split == s
        buffered.update(x[:, sel], y[sel], s)
        blocks.update(x[:, sel], y[sel], s, block=True)
        assert blocks._fill == 0  # nothing waits in the buffer
    _assert_equal_moments(blocks, buffered)
    with pytest.raises(ValueError, match="single split"):
        blocks.update(x[:, :10], y[:10], split[:10], block=True)


def test_float32_input_accumulates_in_float64():
    x, y, split = _data()
    x32, y32 = torch.from_numpy(x).float(), torch.from_numpy(y).float()
    m = Moments(3, 6, 4, 5)
    m.update(x32, y32, torch.from_numpy(split))
    ref = Moments(3, 6, 4, 5)
    ref.update(x32.double(), y32.double(), split)
    _assert_equal_moments(m, ref)
    assert m.xx.dtype == torch.float64
    m.update(x, y, split)  # float64 rows after float32 ones widen the buffer
    ref.update(x, y, split)
    _assert_equal_moments(m, ref)


def test_merge_equals_one_pass_and_state_dict_round_trip(tmp_path):
    x, y, split = _data(seed=1)
    whole = Moments(3, 6, 4, 5)
    whole.update(x, y, split)
    a, b = Moments(3, 6, 4, 5), Moments(3, 6, 4, 5)
    a.update(x[:, :200], y[:200], split[:200])
    b.update(x[:, 200:], y[200:], split[200:])
    _assert_equal_moments(a.merge(b), whole)
    _assert_equal_moments(a + b, whole)
    path = tmp_path / "m.pt"
    torch.save((a + b).state_dict(), path)
    back = Moments.from_state_dict(torch.load(path))
    _assert_equal_moments(back, whole)
    back.update(x[:, :10], y[:10], 2)  # keeps accumulating; one split id for all rows
    assert back.counts[2] == whole.counts[2] + 10
    with pytest.raises(ValueError, match="shapes differ"):
        a.merge(Moments(3, 6, 4, 4))
    with pytest.raises(ValueError, match="format"):
        Moments.from_state_dict({"format": "other"})


def test_update_errors_name_the_problem():
    x, y, split = _data()
    m = Moments(3, 6, 4, 5)
    with pytest.raises(ValueError, match=r"x must be \[3, n, 6\]"):
        m.update(x[:2], y, split)
    with pytest.raises(ValueError, match="y must be"):
        m.update(x, y[:-1], split)
    with pytest.raises(ValueError, match=r"split ids must lie in \[0, 5\)"):
        m.update(x, y, split + 1)
    with pytest.raises(ValueError, match="integers"):
        m.update(x, y, split.astype(float))
    x[2, 17, 1] = np.inf
    x[0, 3, 3] = np.nan
    with pytest.raises(ValueError, match=r"layer\(s\) \[0, 2\]"):
        m.update(x, y, split)
    with pytest.raises(ValueError, match=r"layer\(s\) \[0, 2\]"):  # a block: checked on its sums
        m.update(x[:, :20], y[:20], np.zeros(20, dtype=int), block=True)
    y[0, 0] = np.nan
    with pytest.raises(ValueError, match="y: non-finite"):
        m.update(x[:, :0], y[:0], split[:0]) or m.update(np.zeros((3, 500, 6)), y, split)
    with pytest.raises(ValueError, match="at least 2"):
        Moments(1, 2, 2, 3).centred([0])
    assert m.counts == [0] * 5  # failed updates add nothing


def test_check_finite_names_the_layers_and_lets_large_finite_values_pass():
    """The fast path (a sum per layer) must neither miss NaN/inf nor reject finite values whose
    float32 sum overflows."""
    x = torch.zeros(4, 5, 3)
    x[0] = 3e38  # finite; the layer's sum overflows to inf
    check_finite(x, name="feats", layered=True)
    check_finite(x[0], name="feats", layered=False)
    x[1, 2, 0] = float("nan")
    x[3, 0, 0], x[3, 1, 0] = float("inf"), -float("inf")  # their sum is NaN
    with pytest.raises(ValueError, match=r"feats: non-finite values \(NaN/inf\) in layer\(s\) "
                                         r"\[1, 3\]"):
        check_finite(x, name="feats", layered=True)
    with pytest.raises(ValueError, match="feats: non-finite"):
        check_finite(x[3], name="feats", layered=False)


def _blocks(n_blocks=12, L=2, dx=5, dy=3, S=4, seed=3):
    """Blocks of rows with very different scales (so float64 sums round differently by order)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_blocks):
        n = int(rng.integers(5, 40))
        scale = 10.0 ** rng.integers(-3, 6)
        x = (rng.standard_normal((L, n, dx)) * scale + 1).astype(np.float32).astype(np.float64)
        y = rng.standard_normal((n, dy)) * scale
        out.append((x, y, rng.integers(0, S, n)))
    return out


def _feed(blocks, order, compensated, device="cpu", **kw) -> Moments:
    m = Moments(2, 5, 3, 4, compensated=compensated, device=device, **kw)
    for b in order:
        m.update(*blocks[b])
        m.flush()  # a block boundary: the same flushes whatever the order
    return m


@pytest.mark.parametrize("order_kind", ["reversed", "shuffled"])
def test_compensated_sums_do_not_depend_on_the_order_of_flushes_or_merges(order_kind):
    """The same flushes added in another order, or split over two accumulators merged (two
    ranks), give the same float64 bits when compensated; plain float64 sums do not (the check
    that the data can tell them apart), and both agree with the exact sum to rounding."""
    blocks = _blocks()
    forward = list(range(len(blocks)))
    other = forward[::-1] if order_kind == "reversed" else \
        list(np.random.default_rng(1).permutation(len(blocks)))
    fields = ("sum_x", "sum_y", "xx", "xy", "yy")
    a = _feed(blocks, forward, True)
    b = _feed(blocks, other, True)
    halves = _feed(blocks, forward[1::2], True).merge(_feed(blocks, forward[::2], True))
    for k in fields:
        assert torch.equal(getattr(a, k), getattr(b, k)), k
        assert torch.equal(getattr(a, k), getattr(halves, k)), k
    assert a.counts == halves.counts
    plain_a, plain_b = _feed(blocks, forward, False), _feed(blocks, other, False)
    assert any(not torch.equal(getattr(plain_a, k), getattr(plain_b, k)) for k in fields)
    _assert_equal_moments(a, plain_a)
    # exact reference: the same per-flush Grams summed with Python's correctly rounded fsum

    exact = np.zeros((4, 2, 5, 5))
    parts: dict = {}
    for x, _y, split in blocks:
        for s in range(4):
            sel = split == s
            if sel.any():
                parts.setdefault(s, []).append(np.einsum("lni,lnj->lij", x[:, sel], x[:, sel]))
    for s, grams in parts.items():
        stack = np.stack(grams)
        for idx in np.ndindex(stack.shape[1:]):
            exact[(s, *idx)] = math.fsum(stack[(slice(None), *idx)].tolist())
    np.testing.assert_allclose(_field(a, "xx").numpy(), exact, rtol=1e-15, atol=0)


def test_compensated_state_round_trip_and_merge_with_plain():
    blocks = _blocks(n_blocks=4)
    m = _feed(blocks, range(4), True, buffer_rows=9)
    back = Moments.from_state_dict(m.state_dict())
    assert back.compensated
    for k in ("xx", "xy", "sum_x"):
        assert torch.equal(getattr(back, k), getattr(m, k))
        assert torch.equal(back._lo[k], m._lo[k])
    state = m.state_dict()
    del state["xx_lo"]
    with pytest.raises(ValueError, match="xx_lo is missing"):
        Moments.from_state_dict(state)
    plain = _feed(blocks, range(4), False)
    _assert_equal_moments(m.merge(plain), plain.merge(plain))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compensated_sums_on_cuda_do_not_depend_on_the_order():
    """The whole-array TwoSum of CUDA: the same bits in any order and after a merge, equal to the
    CPU's chunked one to rounding."""
    blocks = _blocks()
    a = _feed(blocks, range(len(blocks)), True, device="cuda")
    b = _feed(blocks, reversed(range(len(blocks))), True, device="cuda")
    halves = _feed(blocks, range(0, 12, 2), True, device="cuda").merge(
        _feed(blocks, range(1, 12, 2), True, device="cuda"))
    cpu = _feed(blocks, range(len(blocks)), True)
    for k in ("sum_x", "sum_y", "xx", "xy", "yy"):
        assert torch.equal(getattr(a, k), getattr(b, k)), k
        assert torch.equal(getattr(a, k), getattr(halves, k)), k
        np.testing.assert_allclose(_field(a, k).cpu().numpy(), _field(cpu, k).numpy(),
                                   rtol=1e-14, atol=0)


@pytest.mark.parametrize("compensated", [True, False])
def test_packed_gram_gives_the_same_statistics_in_half_the_memory(compensated):
    """X^T X kept as its upper triangle (the CPU default): the same centred statistics to the
    bit as full storage, about half the memory, through merges and a state round trip."""
    blocks = _blocks(n_blocks=5)
    packed = _feed(blocks, range(5), compensated, packed=True)
    full = _feed(blocks, range(5), compensated, packed=False)
    assert packed.packed and not full.packed
    assert packed.xx.numel() == 4 * 2 * 15 and full.xx.numel() == 4 * 2 * 25
    for splits in ([0], [1, 3], [0, 1, 2]):
        a, b = packed.centred(splits), full.centred(splits)
        for name in ("mean_x", "cxx", "cxy", "cyy"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
    back = Moments.from_state_dict(packed.state_dict())
    assert back.packed and torch.equal(back.xx, packed.xx)
    merged = packed.merge(packed)
    assert torch.equal(merged.centred([0, 1]).cxx, full.merge(full).centred([0, 1]).cxx)
    with pytest.raises(ValueError, match="packed"):
        packed.merge(full)
    assert Moments(1, 3, 2, 2).packed and not Moments(1, 3, 2, 2, packed=False).packed
