"""Rounding stability of the CCA fits and the spread over split seeds (issue #8).

LayerNorm outputs lie on a hyperplane, so each layer's covariance has a null direction whose
float32 rounding noise, whitened by 1/sqrt(eps), used to enter every canonical direction and flip
the sign of pairs. The engine deflates null directions and takes signs from the loadings: relative
feature noise of 1e-7 must move no score by more than 1e-5, noise of 1e-6 by no more than 1e-4.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from layerprobe.cca import METRICS, cca_score, null_basis, shard_groups


def layer_norm_views(n=3000, d=40, n_classes=25, layers=3, seed=0, dense_y=False):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_classes, n)
    centroids = rng.standard_normal((n_classes, d))
    xs = []
    for layer in range(layers):
        z = centroids[labels] @ rng.standard_normal((d, d)) * (0.3 + 0.3 * layer) \
            + rng.standard_normal((n, d)) + 2 * rng.standard_normal(d)
        xs.append(torch.nn.functional.layer_norm(torch.from_numpy(z).float(), (d,)))
    x = torch.stack(xs)
    if dense_y:  # fbank-like: dense targets correlated with the classes
        y = centroids[labels] @ rng.standard_normal((d, 12)) + rng.standard_normal((n, 12))
        return x, y, None
    return x, np.eye(n_classes)[labels], labels


def perturbed(x: torch.Tensor, sigma: float, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return x * (1 + sigma * torch.randn(x.shape, generator=g))


@pytest.mark.parametrize("dense_y", [False, True], ids=["one-hot", "dense"])
@pytest.mark.parametrize("metric", METRICS)
def test_feature_noise_moves_scores_by_less_than_its_bound(metric, dense_y):
    x, y, labels = layer_norm_views(dense_y=dense_y)
    base = np.array(cca_score(x, y, labels=labels, metric=metric).scores)
    for sigma, bound in ((1e-7, 1e-5), (1e-6, 1e-4)):
        moved = np.array(cca_score(perturbed(x, sigma), y, labels=labels, metric=metric).scores)
        assert np.abs(moved - base).max() <= bound, (sigma, moved - base)


def test_null_basis_finds_the_layer_norm_hyperplane_and_nothing_else():
    x, _, _ = layer_norm_views(layers=2)
    xc = (x - x.mean(1, keepdim=True)).double()
    cov = xc.mT @ xc / x.shape[1]
    basis, count = null_basis(cov)
    assert count.tolist() == [1, 1]
    normal = torch.ones(x.shape[-1], dtype=torch.float64) / x.shape[-1] ** 0.5
    assert torch.allclose((basis[:, :, 0] @ normal).abs(), torch.ones(2, dtype=torch.float64),
                          atol=1e-6)
    full = torch.randn(2, 500, 30, dtype=torch.float64)
    _, none = null_basis(full.mT @ full)
    assert none.tolist() == [0, 0]
    dup = torch.randn(1, 400, 6, dtype=torch.float64)
    dup = torch.cat([dup, dup[:, :, :2]], dim=-1)  # two duplicated columns: two null directions
    basis, count = null_basis(dup.mT @ dup, block=1)  # the block grows until it holds both
    assert count.tolist() == [2]
    assert torch.allclose(basis.mT @ basis, torch.eye(2, dtype=torch.float64), atol=1e-10)
    with pytest.raises(ValueError, match="expected"):
        null_basis(torch.zeros(3, 4))


def test_shard_groups_deal_every_shard_once_and_seed_zero_is_the_plain_split():
    plain = shard_groups(30, 10, 0)
    assert plain == [[j, 10 + j, 20 + j] for j in range(10)]
    for index in (1, 2):
        groups = shard_groups(30, 10, index, seed=5)
        assert sorted(s for g in groups for s in g) == list(range(30))
        for g in groups:  # one shard from each block of 10
            assert sorted(s // 10 for s in g) == [0, 1, 2]
        assert groups == shard_groups(30, 10, index, seed=5)
    assert shard_groups(30, 10, 1) != shard_groups(30, 10, 2)
    with pytest.raises(ValueError, match="multiple"):
        shard_groups(25, 10, 0)


def test_seeds_give_a_spread_and_the_mean_of_seed_scores():
    x, y, labels = layer_norm_views(n=2500)
    res = cca_score(x, y, labels=labels, n_seeds=3)
    per_seed = np.array(res.details["seed_scores"])
    assert per_seed.shape == (3, 3)
    np.testing.assert_allclose(res.scores, per_seed.mean(0), rtol=1e-12)
    np.testing.assert_allclose(res.std, per_seed.std(0, ddof=1), rtol=1e-12)
    assert all(s > 0 for s in res.std)  # re-dealt splits change the scores
    assert len(res.details["std_trials"]) == 3 and "split seeds" in res.details["spread"]
    one = cca_score(x, y, labels=labels)
    assert one.std is None
    with pytest.raises(ValueError, match="shards per split"):
        cca_score(x, y, labels=labels, n_seeds=2, shards_per_split=1)


def test_autoencoder_index_reports_its_spread_over_split_seeds():
    from layerprobe.autoencoder import autoencoder_index, format_index
    from layerprobe.results import Result

    seeds = [[0.5, 0.8, 0.4], [0.5, 0.9, 0.5], [0.4, 0.7, 0.3]]
    word = Result(model="m", label="it1", corpus="c", probe="word", metric="pwcca",
                  layers=[0, 1, 2], scores=list(np.mean(seeds, 0)),
                  std=list(np.std(seeds, 0, ddof=1)), details={"seed_scores": seeds})
    fbank = Result(model="m", label="it1", corpus="c", probe="fbank", metric="pwcca",
                   layers=[0, 1, 2], scores=[0.9, 0.5, 0.6])
    (row,) = autoencoder_index([word, fbank])
    drops = [(max(c) - c[-1]) / max(c) for c in seeds]
    assert row["word_drop_std"] == pytest.approx(np.std(drops, ddof=1))
    assert row["fbank_rise_std"] is None  # no per-seed curves: no spread claimed
    assert "±" in format_index([row])


def test_summary_table_prints_the_spread_and_the_layers_it_cannot_order():
    from layerprobe.results import Result
    from layerprobe.score import summary_table

    r = Result(model="m", label="a", corpus="c", probe="word", metric="pwcca", layers=[0, 1, 2],
               scores=[0.50, 0.70, 0.69], std=[0.01, 0.01, 0.01])
    table = summary_table([r])
    assert "0.7000±0.0100" in table
    assert "a:word/pwcca: best layer 1 (within spread: 2)" in table
    plain = summary_table([Result(**{**r.to_dict(), "std": None})])
    assert "±" not in plain and "best layer 1" in plain and "within" not in plain


def test_seeds_without_shards_are_refused_with_a_clear_message():
    from layerprobe.config import AnalysisConfig

    with pytest.raises(ValueError, match="shards_per_split >= 2"):
        AnalysisConfig().replace(shards_per_split=1)
    assert AnalysisConfig(n_seeds=1).replace(shards_per_split=1).n_seeds == 1


def test_weight_noise_moves_pipeline_scores_by_less_than_its_bound():
    """3e-8 relative noise on a random post-LN HuBERT's weights moves its features by ~1e-7..1e-6
    (through the conv front end); the scores of every CCA metric must move by <= 1e-4."""
    from layerprobe.config import AnalysisConfig
    from layerprobe.models.huggingface import HuggingFaceLayerModel
    from layerprobe.score import score_model
    from tests.model_fixtures import tiny_hf_model

    config = AnalysisConfig(probes=("fbank", "phone"), metrics=METRICS, max_utterances=30,
                            n_seeds=1, device="cpu")

    def scores(noise: float) -> dict:
        model = tiny_hf_model("hubert", seed=3, conv_bias=True)
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1 + noise * torch.randn(p.shape, generator=g))
        layer_model = HuggingFaceLayerModel(model.eval(), name="tiny")
        return {(r.probe, r.metric): np.array(r.scores)
                for r in score_model(layer_model, None, config, progress=False)}

    base, moved = scores(0.0), scores(3e-8)
    assert base.keys() == moved.keys() and len(base) == 2 * len(METRICS)
    deltas = {key: np.abs(moved[key] - base[key]).max() for key in base}
    assert max(deltas.values()) > 0  # the noise reached the scores
    for key, delta in deltas.items():
        assert delta <= 1e-4, (key, delta)
