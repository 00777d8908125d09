"""The scoring pipeline and the command line, end to end on tiny models and the bundled corpus."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from layerprobe.cca import cca_score
from layerprobe.cli import main
from layerprobe.config import AnalysisConfig
from layerprobe.corpus import load_audio, load_corpus
from layerprobe.extract import iter_hidden_states
from layerprobe.models import load
from layerprobe.probes import build_probes, pool_spans
from layerprobe.results import load_results
from layerprobe.score import (
    MI_HELD_OUT_PER_CLUSTER,
    mi_cluster_rule,
    mi_train_mask,
    score_model,
    score_models,
    summary_table,
)
from tests.model_fixtures import save_hf_folder, save_native_from_hf, tiny_hf_model

CONFIG = AnalysisConfig(
    max_utterances=40, device="cpu", metrics=("pwcca", "mi"), n_trials=2,
    phone_clusters=8, word_clusters=8, batch_seconds=20.0,
)


@pytest.fixture(scope="module")
def model_specs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    model = tiny_hf_model("hubert", seed=0)
    return {"hf": str(save_hf_folder(model, folder / "hf")),
            "native": str(save_native_from_hf(model, folder / "native.pt"))}


@pytest.fixture(scope="module")
def corpus():
    return load_corpus(None, max_utterances=CONFIG.max_utterances, seed=CONFIG.seed)


@pytest.fixture(scope="module")
def native_results(model_specs, corpus):
    return score_model(model_specs["native"], corpus, CONFIG, progress=False)


def test_every_probe_metric_and_layer(native_results):
    keys = {(r.probe, r.metric) for r in native_results}
    assert keys == {(p, m) for p in ("fbank", "phone", "word") for m in ("pwcca", "mi")} - {
        ("fbank", "mi")}
    for r in native_results:
        assert r.layers == [0, 1, 2]
        assert all(np.isfinite(r.scores))
        assert all(-1e-9 <= s <= 1 + 1e-9 for s in r.scores), (r.probe, r.metric, r.scores)
        assert r.meta["n_layers"] == 2 and r.meta["model_source"] == "layerprobe"
        assert set(r.meta["timings"]) >= {"read", "forward", "statistics", "cca"}


def test_same_weights_same_scores_from_every_source(model_specs, corpus, native_results):
    hf = score_model(model_specs["hf"], corpus, CONFIG, progress=False)
    for a, b in zip(native_results, hf, strict=True):
        assert (a.probe, a.metric) == (b.probe, b.metric)
        np.testing.assert_allclose(a.scores, b.scores, rtol=1e-4, atol=1e-6)


def test_streamed_statistics_equal_scoring_the_stacked_items(model_specs, corpus):
    """The pipeline (batched forward, streamed moments) equals CCA on explicitly stacked items."""
    config = CONFIG.replace(probes=("phone",), metrics=("pwcca",))
    streamed = score_model(model_specs["native"], corpus, config, progress=False)[0]
    model = load(model_specs["native"])
    probe = build_probes(corpus, ("phone",), config.probe_config)["phone"]
    waves = {i: load_audio(u.audio_path) for i, u in enumerate(corpus.utterances)}
    # the same batches as the pipeline: layers of a random tiny model are nearly collinear, so
    # CCA with eps = 1e-10 amplifies even the 1e-6 differences that padding makes
    hidden_states = dict(iter_hidden_states(model, waves.items(),
                                            batch_seconds=config.batch_seconds))
    xs, ys, splits = [], [], []
    for index in sorted(hidden_states):
        wave = waves[index]
        targets = probe.targets(index, wave, model.num_frames(wave.shape[-1]), model.frame_rate)
        xs.append(pool_spans(hidden_states[index], targets.spans))
        ys.append(targets.y)
        splits.append(targets.split)
    x = torch.cat(xs, dim=1).double()
    y = torch.cat(ys).double()
    split = torch.cat(splits).numpy()
    direct = cca_score(x, y, split=split, n_trials=config.n_trials, seed=config.seed,
                       n_seeds=config.n_seeds,
                       shards_per_split=config.probe_config.shards_per_split)
    assert streamed.details["n_items"] == x.shape[1]
    # float64 sums in another order: ~1e-16 relative; the fits are rounding-stable
    np.testing.assert_allclose(streamed.scores, direct.scores, rtol=1e-6)
    np.testing.assert_allclose(streamed.std, direct.std, rtol=1e-4, atol=1e-9)


def test_compare_uses_the_same_items(model_specs, corpus):
    config = CONFIG.replace(probes=("word",), metrics=("pwcca",))
    results = score_models([model_specs["native"], model_specs["hf"]], corpus, config,
                           labels=["ours", "hf"], progress=False)
    assert [r.label for r in results] == ["ours", "hf"]
    assert results[0].details["n_items"] == results[1].details["n_items"]


def test_cli_score_plot_and_compare(model_specs, tmp_path, capsys):
    out = tmp_path / "r.json"
    code = main(["score", model_specs["native"], "--probe", "word", "--probe", "fbank",
                 "--max-utterances", "40", "--device", "cpu", "--out", str(out),
                 "--no-progress", "--label", "tiny"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "tiny:word/pwcca" in printed and "tiny:word/pwcca: best layer" in printed
    results = load_results(out)
    assert {r.probe for r in results} == {"word", "fbank"}
    figure = tmp_path / "fig.png"
    assert main(["plot", str(out), "-o", str(figure)]) == 0
    assert figure.stat().st_size > 1000
    compared = tmp_path / "cmp.png"
    assert main(["compare", model_specs["native"], model_specs["hf"], "--labels", "ours,hf",
                 "--probe", "phone", "--max-utterances", "40", "--device", "cpu",
                 "--no-progress", "-o", str(compared)]) == 0
    assert compared.exists()
    assert {r.label for r in load_results(compared.with_suffix(".json"))} == {"ours", "hf"}


def test_cli_errors_name_the_problem_and_write_nothing(tmp_path, capsys, model_specs):
    out = tmp_path / "r.json"
    missing = tmp_path / "nope.pt"
    assert main(["score", str(missing), "--out", str(out), "--no-progress"]) == 1
    assert "nope.pt" in capsys.readouterr().err
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    assert main(["score", str(broken), "--out", str(out), "--no-progress"]) == 1
    assert "broken.pt" in capsys.readouterr().err
    assert main(["score", model_specs["native"], "--data", str(tmp_path / "nodata"),
                 "--out", str(out), "--no-progress"]) == 1
    assert "nodata" in capsys.readouterr().err
    assert not out.exists()
    bad_json = tmp_path / "bad.json"
    bad_json.write_text(json.dumps({"format": "x"}))
    assert main(["plot", str(bad_json), "-o", str(tmp_path / "f.png")]) == 1
    assert "bad.json" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["score"])
    assert info.value.code == 2


def test_cli_keeps_what_it_could_score_and_says_what_it_could_not(model_specs, tmp_path, capsys):
    out = tmp_path / "r.json"
    code = main(["score", model_specs["native"], "--probe", "word", "--probe", "fbank",
                 "--max-utterances", "3", "--device", "cpu", "--out", str(out), "--no-progress"])
    assert code == 1
    err = capsys.readouterr().err
    assert "native: probe 'word'" in err and "items" in err  # names the model
    assert {r.probe for r in load_results(out)} == {"fbank"}


def test_cli_shows_corpus_warnings_and_skips_audio_shorter_than_the_receptive_field(
        model_specs, tmp_path):
    import shutil

    import soundfile as sf

    from layerprobe.textgrids import Interval, write_textgrid

    good = load_corpus(None, max_utterances=1).utterances[0]
    data = tmp_path / "corpus"
    data.mkdir()
    shutil.copy(good.audio_path, data / "good.flac")
    shutil.copy(good.alignment_path, data / "good.TextGrid")
    sf.write(data / "short.wav", np.zeros(30, dtype="float32"), 16000)  # < 60-sample field
    write_textgrid(data / "short.TextGrid", {"words": [Interval(0.0, 0.0019, "a")],
                                             "phones": [Interval(0.0, 0.0019, "AH0")]}, 0.0019)
    out = tmp_path / "r.json"
    with pytest.warns(UserWarning, match="short.wav: 30 samples, shorter than the model's "
                      "receptive field"):
        code = main(["score", model_specs["native"], "--data", str(data), "--probe", "fbank",
                     "--device", "cpu", "--out", str(out), "--no-progress"])
    assert code == 0
    assert load_results(out)[0].meta["n_utterances"] == 1


def test_cli_strict_stops_at_the_first_bad_utterance(model_specs, tmp_path, capsys):
    import shutil

    from layerprobe.textgrids import Interval, write_textgrid

    good = load_corpus(None, max_utterances=1).utterances[0]
    data = tmp_path / "corpus"
    data.mkdir()
    for stem in ("good", "bad"):
        shutil.copy(good.audio_path, data / f"{stem}.flac")
    shutil.copy(good.alignment_path, data / "good.TextGrid")
    write_textgrid(data / "bad.TextGrid", {"words": [Interval(0.0, 0.5, "a")]}, good.duration)
    args = ["score", model_specs["native"], "--data", str(data), "--probe", "fbank",
            "--device", "cpu", "--out", str(tmp_path / "r.json"), "--no-progress"]
    with pytest.warns(UserWarning, match="bad.TextGrid.*no tier 'phones'"):
        assert main(args) == 0
    assert main([*args, "--strict"]) == 1
    assert "bad.TextGrid" in capsys.readouterr().err


def test_mi_results_carry_the_spread_over_kmeans_seeds(native_results):
    for r in native_results:
        if r.metric != "mi":
            continue
        seeds = np.asarray(r.details["seed_scores"])
        assert seeds.shape == (CONFIG.n_seeds, len(r.layers))
        np.testing.assert_allclose(r.scores, seeds.mean(0), rtol=1e-12)
        np.testing.assert_allclose(r.std, seeds.std(0, ddof=1), rtol=1e-12)
        assert r.details["spread"] == "k-means seeds"
        assert r.details["n_clusters_rule"] == "config: " + (
            "word_clusters = 8" if r.probe == "word" else "phone_clusters = 8")


def test_mi_cluster_counts_from_the_data_and_a_warning_for_every_biased_probe(model_specs,
                                                                              corpus):
    config = CONFIG.replace(probes=("phone", "word"), metrics=("mi",), phone_clusters=0,
                            word_clusters=0, n_seeds=1)
    assert mi_cluster_rule("phone", 4000, config)[0] == 400
    assert mi_cluster_rule("word", 100_000, config)[0] == 5000
    assert mi_cluster_rule("word", 7, config)[0] == 2
    import warnings

    for clusters in (0, 200):  # from the data (not biased here), then explicit and biased
        config = config.replace(phone_clusters=clusters, word_clusters=clusters)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            results = score_model(model_specs["native"], corpus, config, progress=False)
        biased = [str(w.message) for w in caught if "biased" in str(w.message)]
        for r in results:
            k, held_out = r.details["n_clusters"], r.details["n_test"]
            if clusters == 0:
                assert r.details["n_clusters_rule"].startswith("from the data")
                assert k == max(2, min(500 if r.probe == "phone" else 5000,
                                       held_out // MI_HELD_OUT_PER_CLUSTER))
            else:
                assert r.details["n_clusters_rule"].startswith("config")
                assert r.details["biased"]  # kept as asked, with the warning
            assert r.details["biased"] == (held_out < MI_HELD_OUT_PER_CLUSTER * k)
            assert r.details["biased"] == any(f"probe {r.probe!r}" in m for m in biased)
    assert mi_train_mask(np.arange(10), 10).tolist() == [True] * 8 + [False] * 2


def test_summary_table_names_the_model_of_every_best_layer(native_results):
    line = next(x for x in summary_table(native_results).splitlines() if "best layer" in x)
    assert all(f"{r.label}:{r.probe}/{r.metric}: best layer" in line for r in native_results)


def test_cli_scores_many_checkpoints_into_one_file(model_specs, tmp_path, capsys):
    import shutil

    for it in ("it1", "it2"):
        (tmp_path / "run" / it).mkdir(parents=True)
        shutil.copy(model_specs["native"], tmp_path / "run" / it / "ckpt.pt")
    out = tmp_path / "all.json"
    code = main(["score", str(tmp_path / "run" / "it1" / "ckpt.pt"),
                 str(tmp_path / "run" / "it2" / "ckpt.pt"), "--probe", "phone",
                 "--max-utterances", "40", "--device", "cpu", "--out", str(out), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    results = load_results(out)
    assert [r.label for r in results] == ["it1", "it2"]  # the shortest telling path endings
    assert results[0].scores == results[1].scores  # same weights, same items
    assert main(["score", model_specs["native"], model_specs["hf"], "--label", "x",
                 "--no-progress"]) == 1
    assert "--label names one model" in capsys.readouterr().err


def test_cli_many_checkpoints_resume_after_an_interruption(model_specs, tmp_path, capsys,
                                                             monkeypatch):
    import shutil

    import layerprobe.score as score_module

    models = []
    for it in ("it1", "it2", "it3"):
        (tmp_path / "run" / it).mkdir(parents=True)
        models.append(str(shutil.copy(model_specs["native"], tmp_path / "run" / it / "ckpt.pt")))
    out = tmp_path / "all.json"
    args = ["score", *models, "--probe", "phone", "--max-utterances", "40", "--device", "cpu",
            "--out", str(out), "--no-progress"]
    real, scored = score_module._score_one, []

    def interrupted_at_it3(model, *a, **k):
        if model.endswith("it3/ckpt.pt"):
            raise KeyboardInterrupt
        scored.append(model)
        return real(model, *a, **k)

    monkeypatch.setattr(score_module, "_score_one", interrupted_at_it3)
    assert main(args) == 130
    partial = tmp_path / "all.json.partial"
    assert not out.exists() and [r.label for r in load_results(partial)] == ["it1", "it2"]
    first = load_results(partial)
    # another configuration: the finished models are not comparable, so resuming refuses
    assert main([*args, "--resume", "--seed", "7"]) == 1
    assert "all.json.partial: 'it1' was scored with another configuration (differs in " \
        "probe_config.seed)" in capsys.readouterr().err
    monkeypatch.setattr(score_module, "_score_one", lambda model, *a, **k: (
        scored.append(model), real(model, *a, **k))[1])
    assert main([*args, "--resume"]) == 0
    assert scored == models  # it1 and it2 once, it3 after resuming
    results = load_results(out)
    assert [r.label for r in results] == ["it1", "it2", "it3"]
    assert [r.scores for r in results[:2]] == [r.scores for r in first]
    assert results[2].scores == results[0].scores  # same weights, same items
    assert not partial.exists()


def _corpus_with_corrupt_flac(tmp_path):
    import shutil

    data = tmp_path / "corpus"
    data.mkdir()
    utterances = load_corpus(None, max_utterances=6).utterances
    for u in utterances:
        shutil.copy(u.audio_path, data / u.audio_path.name)
        shutil.copy(u.alignment_path, data / u.alignment_path.name)
    bad = data / utterances[-1].audio_path.name
    raw = bytearray(bad.read_bytes())
    start = len(raw) // 3  # the header stays valid: the corpus check passes
    raw[start:] = np.random.default_rng(0).integers(0, 256, len(raw) - start,
                                                    dtype=np.uint8).tobytes()
    bad.write_bytes(bytes(raw))
    return data, bad


def test_cli_skips_an_undecodable_flac_with_a_warning_and_strict_stops(model_specs, tmp_path,
                                                                       capsys):
    data, bad = _corpus_with_corrupt_flac(tmp_path)
    out = tmp_path / "r.json"
    args = ["score", model_specs["native"], "--data", str(data), "--probe", "fbank",
            "--device", "cpu", "--out", str(out), "--no-progress"]
    with pytest.warns(UserWarning, match=f"{bad.name}: cannot read audio.*skipped"):
        assert main(args) == 0
    meta = load_results(out)[0].meta
    assert meta["n_unreadable"] == 1 and meta["unreadable"] == [str(bad)]
    assert meta["n_utterances"] == 5
    out.unlink()
    assert main([*args, "--strict"]) == 1
    assert bad.name in capsys.readouterr().err
    assert not out.exists()


def test_cli_mi_backend_sklearn(model_specs, tmp_path):
    out = tmp_path / "r.json"
    assert main(["score", model_specs["native"], "--probe", "phone", "--metric", "mi",
                 "--mi-backend", "sklearn", "--max-utterances", "20", "--device", "cpu",
                 "--out", str(out), "--no-progress"]) == 0
    (result,) = load_results(out)
    assert result.details["kmeans"]["backend"] == "sklearn"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_scoring_twice_on_cuda_gives_the_same_scores(model_specs, corpus):
    """A seed gives the same scores every run on CUDA too: pooling without atomics, k-means
    cluster sums by one-hot matmuls, compensated moments."""
    config = CONFIG.replace(device="cuda")
    first, second = (score_model(model_specs["native"], corpus, config, progress=False)
                     for _ in range(2))
    assert [(r.probe, r.metric) for r in first] == [(r.probe, r.metric) for r in second]
    for a, b in zip(first, second, strict=True):
        assert a.scores == b.scores and a.std == b.std, (a.probe, a.metric)
