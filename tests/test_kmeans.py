"""layerprobe.kmeans: blobs recovered, chunking and batching over layers change nothing, seeded."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from layerprobe.kmeans import (
    KMeansConfig,
    _cluster_sums,
    _cluster_sums_onehot,
    _kmeans_pp,
    _minibatch,
    _squared_distance_matrix,
    assign_chunked,
    kmeans_fit,
    kmeans_predict,
)


def _blobs(n=900, d=6, k=5, seed=0, spread=0.1):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=g) * 5
    labels = torch.randint(k, (n,), generator=g)
    return centres[labels] + spread * torch.randn(n, d, generator=g), labels


def _layers(n_layers=3, **kw):
    xs, labels = zip(*(_blobs(seed=i, **kw) for i in range(n_layers)), strict=True)
    return torch.stack(xs), torch.stack(labels)


@pytest.mark.parametrize("batch_size", [0, 128])
def test_recovers_well_separated_blobs(batch_size):
    x, labels = _layers()
    fit = kmeans_fit(x, 5, config=KMeansConfig(batch_size=batch_size, n_init=3), seed=0)
    ids = kmeans_predict(x, fit.centroids)
    assert fit.centroids.shape == (3, 5, 6) and ids.shape == (3, 900)
    for layer in range(3):
        assert adjusted_rand_score(labels[layer], ids[layer]) > 0.99
        # inertia is that of the returned centroids on the fitted rows
        d2 = torch.cdist(x[layer].double(), fit.centroids[layer].double()).pow(2).min(1).values
        assert fit.inertia[layer] == pytest.approx(float(d2.sum()), rel=1e-4)
    lean = kmeans_fit(x, 5, config=KMeansConfig(batch_size=batch_size, n_init=3), seed=0,
                      compute_inertia=False)  # the same fit without the last pass
    assert torch.equal(lean.centroids, fit.centroids) and lean.n_steps == fit.n_steps
    assert lean.inertia is None if batch_size else lean.inertia == fit.inertia  # Lloyd has it


def test_assignments_are_the_exact_nearest_centroid_and_chunking_changes_nothing():
    x, _ = _layers(n=700)
    centroids = torch.randn(3, 40, 6, generator=torch.Generator().manual_seed(1)) * 3
    whole, dist = assign_chunked(x, centroids, memory_mb=1024)
    chunked, dist_chunked = assign_chunked(x, centroids, memory_mb=1e-3)  # a few rows a chunk
    assert torch.equal(whole, chunked) and torch.equal(dist, dist_chunked)
    for size in (3 * 700 * 40, 10):  # a reused distance buffer; one too small is not used
        buffer = torch.full((size,), float("nan"))
        ids, d2 = assign_chunked(x, centroids, memory_mb=1024, buffer=buffer)
        assert torch.equal(ids, whole) and torch.equal(d2, dist)
        assert bool(torch.isnan(buffer).any()) == (size == 10)
    exact = torch.cdist(x.double(), centroids.double()).argmin(-1)
    assert torch.equal(whole, exact)
    ids_only, no_dist = assign_chunked(x, centroids, memory_mb=1e-3, distances=False)
    assert torch.equal(ids_only, whole) and no_dist.numel() == 0
    torch.testing.assert_close(dist, (x - centroids[torch.arange(3)[:, None], whole]).pow(2)
                               .sum(-1), rtol=0, atol=0)  # ||x − c||², not the expanded form
    for batch_size in (0, 64):
        config = KMeansConfig(batch_size=batch_size, n_init=2)
        small = KMeansConfig(batch_size=batch_size, n_init=2, memory_mb=1e-3,
                             seeding_memory_mb=1e-3)  # and the seeding without a matrix
        a = kmeans_fit(x, 8, config=config, seed=4)
        b = kmeans_fit(x, 8, config=small, seed=4)
        # the same assignments; cluster sums grouped by chunk: equal to float rounding
        torch.testing.assert_close(a.centroids, b.centroids, rtol=1e-5, atol=1e-5)
        assert torch.equal(kmeans_predict(x, a.centroids), kmeans_predict(x, b.centroids))


def test_cluster_sums_by_index_equal_the_one_hot_matmuls_used_off_the_cpu():
    x, _ = _layers(n=300)
    ids = torch.randint(9, (3, 300), generator=torch.Generator().manual_seed(0))
    ids[:, :9] = 8  # cluster 0..7 may be empty; 8 is not
    for dtype in (torch.float32, torch.float64):
        sums, counts = _cluster_sums(x, ids, 10, dtype, 256.0)
        sums_1h, counts_1h = _cluster_sums_onehot(x, ids, 10, dtype, 1e-3)  # a few rows a chunk
        torch.testing.assert_close(sums, sums_1h)
        assert torch.equal(counts, counts_1h) and (counts[:, 9] == 0).all()
        assert torch.equal(counts, torch.stack([torch.bincount(i, minlength=10) for i in ids])
                           .to(dtype))


def test_seeding_from_the_distance_matrix_equals_distances_per_step():
    """Greedy k-means++ picks the same rows whether the candidates' distances are rows of a
    precomputed [m, m] matrix (layers in groups that fit the memory budget) or computed per
    step."""
    x, _ = _layers(n_layers=3, n=60, k=8, spread=1.0)  # 3 x 29 candidates > 60 rows: matrix

    def gens():
        return [torch.Generator().manual_seed(s) for s in (0, 1, 2)]

    per_step = _kmeans_pp(x, 8, gens(), memory_mb=1e-3)  # no room for a matrix
    one_group = _kmeans_pp(x, 8, gens(), memory_mb=64.0)
    layer_groups = _kmeans_pp(x, 8, gens(), memory_mb=60 * 60 * 4 / 2**20)  # one layer a group
    assert per_step.shape == (3, 3, 8, 6)
    assert torch.equal(one_group, layer_groups)
    torch.testing.assert_close(one_group, per_step)
    # every centroid is a row of its layer
    rows = (one_group[:, :, :, None, :] == x[None, :, None, :, :]).all(-1).any(-1)
    assert rows.all()


def test_distance_matrix_from_its_upper_triangle_in_blocks():
    """The seeding's [m, m] matrix, computed as the upper triangle in row blocks and mirrored:
    the squared distances (symmetric, non-negative) whatever the block size."""
    x, _ = _layers(n_layers=2, n=50)
    whole = _squared_distance_matrix(x, block=64)  # one block
    for block in (1, 7, 50):
        blocks = _squared_distance_matrix(x, block=block)
        torch.testing.assert_close(blocks, whole, rtol=1e-5, atol=1e-3)
        torch.testing.assert_close(blocks, blocks.mT, rtol=1e-5, atol=1e-3)
        assert bool((blocks >= 0).all())
    exact = torch.cdist(x.double(), x.double()).pow(2).float()
    torch.testing.assert_close(whole, exact, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("batch_size,reassignment_ratio", [(0, 0.0), (64, 0.0), (64, 0.3)])
def test_batched_over_layers_equals_one_layer_at_a_time(batch_size, reassignment_ratio):
    x, _ = _layers(n=500, spread=1.5)  # overlapping blobs: layers converge at different steps
    config = KMeansConfig(batch_size=batch_size, n_init=2, reassignment_ratio=reassignment_ratio)
    batched = kmeans_fit(x, 7, config=config, seed=3)
    for layer in range(3):
        alone = kmeans_fit(x[layer], 7, config=config, seed=3)
        torch.testing.assert_close(alone.centroids[0], batched.centroids[layer], rtol=1e-5,
                                   atol=1e-5)
        assert alone.n_steps[0] == batched.n_steps[layer]
    assert len(set(batched.n_steps)) > 1  # the check above compared different stopping steps


@pytest.mark.parametrize("config", [KMeansConfig(), KMeansConfig(batch_size=64,
                                                                   reassignment_ratio=0.01)])
def test_seeded_and_deterministic_on_the_cpu(config):
    x, _ = _layers(n=400, spread=2.0)
    a = kmeans_fit(x, 6, config=config, seed=7)
    b = kmeans_fit(x, 6, config=config, seed=7)
    c = kmeans_fit(x, 6, config=config, seed=8)
    assert torch.equal(a.centroids, b.centroids) and a.inertia == b.inertia
    assert not torch.equal(a.centroids, c.centroids)


@pytest.mark.parametrize("reassignment_ratio", [0.0, 0.01])
def test_minibatch_reassigns_a_starved_centroid(reassignment_ratio):
    x, _ = _layers(n_layers=2, n=600, k=3)
    # two centroids in the data, the third far away: the nearest centroid of no row
    start = torch.stack([x[:, 0], x[:, 1], torch.full_like(x[:, 0], 1e3)], dim=1)
    assert not (kmeans_predict(x, start) == 2).any()
    config = KMeansConfig(batch_size=64, max_iter=5, reassignment_ratio=reassignment_ratio)
    centroids, _ = _minibatch(x, start, config, torch.Generator().manual_seed(0))
    taken = (kmeans_predict(x, centroids) == 2).sum(-1)
    if reassignment_ratio:  # moved onto a row of the data, and now takes rows
        assert (centroids[:, 2].abs().amax(-1) < x.abs().amax((1, 2))).all()
        assert (taken > 0).all()
    else:  # without reassignment it never moves
        assert torch.equal(centroids[:, 2], start[:, 2]) and (taken == 0).all()


def test_empty_clusters_are_refilled_and_duplicates_handled():
    x = torch.cat([torch.zeros(50, 2), torch.ones(50, 2)])  # 2 distinct points, 3 clusters
    fit = kmeans_fit(x, 3, config=KMeansConfig(batch_size=0), seed=0)
    assert torch.isfinite(fit.centroids).all()
    ids = kmeans_predict(x, fit.centroids[0])
    assert ids.shape == (100,) and len(set(ids.tolist())) >= 2


def test_sklearn_backend_and_errors():
    x, labels = _blobs(n=300)
    fit = kmeans_fit(x, 5, config=KMeansConfig(backend="sklearn", n_init=2), seed=0)
    assert adjusted_rand_score(labels, kmeans_predict(x, fit.centroids[0])) > 0.99
    lean = kmeans_fit(x, 5, config=KMeansConfig(backend="sklearn", n_init=2), seed=0,
                      compute_inertia=False)
    assert lean.inertia is None and torch.equal(lean.centroids, fit.centroids)
    with pytest.raises(ValueError, match="at least 400 rows"):
        kmeans_fit(x, 400)
    bad = torch.stack([x, x])
    bad[1, 3, 0] = float("nan")
    with pytest.raises(ValueError, match=r"layer\(s\) \[1\]"):
        kmeans_fit(bad, 2)
    with pytest.raises(ValueError, match="backend"):
        KMeansConfig(backend="faiss")
    with pytest.raises(ValueError, match="seeding_memory_mb must be > 0"):
        KMeansConfig(seeding_memory_mb=0)
    with pytest.raises(ValueError, match=r"\[L, n, d\]"):
        kmeans_fit(np.zeros(5), 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("batch_size", [0, 256])
def test_a_seed_gives_the_same_clusters_on_cpu_and_cuda(batch_size):
    """The random numbers come from host generators on either device: CUDA's clusters are the
    CPU's up to rounding, much closer than another seed's on the CPU."""
    x, _ = _layers(n_layers=2, n=3000, k=5, spread=2.0)  # overlapping: the seed matters
    config = KMeansConfig(batch_size=batch_size, n_init=2)
    cpu = kmeans_fit(x, 24, config=config, seed=1)
    cuda = kmeans_fit(x, 24, config=config, seed=1, device="cuda")
    other = kmeans_fit(x, 24, config=config, seed=2)
    for layer in range(2):
        ids = kmeans_predict(x[layer], cpu.centroids[layer])
        same = adjusted_rand_score(ids, kmeans_predict(x[layer], cuda.centroids[layer].cpu()))
        reseeded = adjusted_rand_score(ids, kmeans_predict(x[layer], other.centroids[layer]))
        assert same > 0.98 and same > reseeded + 0.05, (layer, same, reseeded)
