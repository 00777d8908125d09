"""The results format and the figures drawn from it."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import matplotlib.image as mpimg
import pytest

from layerprobe.plots import natural_key, plot_layerwise
from layerprobe.results import (
    CSV_COLUMNS,
    RESULTS_FORMAT,
    Result,
    append_results,
    load_results,
    lock_path,
    merge_results,
    pool_runs,
    results_to_csv,
    save_csv,
    save_results,
)

ROOT = Path(__file__).resolve().parents[1]


def _result(label: str, probe: str = "word", metric: str = "pwcca", shift: float = 0.0) -> Result:
    layers = list(range(5))
    return Result(model=f"runs/{label}.pt", label=label, corpus="bundled", probe=probe,
                  metric=metric, layers=layers, scores=[0.1 * i + shift for i in layers],
                  details={"eps": [[1e-10, 1e-10]]}, meta={"schedule": "progressive"})


def test_round_trip(tmp_path):
    results = [_result("it1"), _result("it2", probe="fbank", shift=0.05)]
    path = save_results(results, tmp_path / "sub" / "r.json")
    assert json.loads(path.read_text())["format"] == RESULTS_FORMAT
    assert load_results(path) == results
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_result_rejects_mismatch_and_nan():
    with pytest.raises(ValueError, match="3 layers but 2 scores"):
        Result("m", "m", "c", "word", "pwcca", [0, 1, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="non-finite score at layers \\[1\\]"):
        Result("m", "m", "c", "word", "pwcca", [0, 1], [0.1, float("nan")])


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_results(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        load_results(bad)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="other.json: not a layerprobe results file"):
        load_results(other)
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"format": RESULTS_FORMAT, "results": [{"model": "m"}]}))
    with pytest.raises(ValueError, match="partial.json: result entry lacks"):
        load_results(partial)


def test_natural_order_of_iterations():
    assert sorted(["it10", "it2", "it1"], key=natural_key) == ["it1", "it2", "it10"]


@pytest.mark.parametrize("suffix", [".png", ".pdf"])
def test_plot_writes_a_figure(tmp_path, suffix):
    results = [_result(f"it{i}", probe=p, shift=0.02 * i)
               for i in (1, 2, 3) for p in ("fbank", "phone", "word")]
    out = plot_layerwise(results, tmp_path / f"fig{suffix}", title="demo")
    assert out.exists() and out.stat().st_size > 1000
    if suffix == ".png":
        image = mpimg.imread(out)
        assert image.shape[1] > image.shape[0]  # three panels side by side


def test_plot_rows_by_meta(tmp_path):
    results = []
    for schedule in ("original", "progressive"):
        for i in (1, 2):
            r = _result(f"it{i}")
            results.append(Result(**{**r.to_dict(), "meta": {"schedule": schedule}}))
    out = plot_layerwise(results, tmp_path / "rows.png", rows_by="schedule")
    image = mpimg.imread(out)
    assert image.shape[0] > image.shape[1] * 0.9  # two rows, one panel wide


def test_plot_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="no results"):
        plot_layerwise([], tmp_path / "x.png")
    with pytest.raises(ValueError, match="must be .png"):
        plot_layerwise([_result("a")], tmp_path / "x.jpg")


def test_load_names_the_file_for_a_bad_score(tmp_path):
    entry = _result("it1").to_dict()
    entry["scores"][2] = "x"
    path = tmp_path / "bad_score.json"
    path.write_text(json.dumps({"format": RESULTS_FORMAT, "results": [entry]}))
    with pytest.raises(ValueError, match="bad_score.json: result it1 \\(word/pwcca\\): could "
                       "not convert string to float: 'x'"):
        load_results(path)
    entry["scores"][2] = float("inf")
    path.write_text(json.dumps({"format": RESULTS_FORMAT, "results": [entry]}))
    with pytest.raises(ValueError, match="bad_score.json: .*non-finite score at layers \\[2\\]"):
        load_results(path)


def test_merge_replaces_same_model_label_probe_metric():
    a, b = _result("a"), _result("b")
    a_new = replace(a, scores=[0.5] * 5)
    a_mi = replace(a, metric="mi")
    merged, replaced = merge_results([a, b], [a_new, a_mi])
    assert merged == [a_new, b, a_mi] and replaced == 1
    other_model = replace(a, model="elsewhere/a.pt")
    assert merge_results([a], [other_model]) == ([a, other_model], 0)


def test_append_creates_merges_and_keeps_std(tmp_path):
    path = tmp_path / "r.json"
    with_std = replace(_result("a"), std=[0.01] * 5)
    assert append_results([with_std], path) == ([with_std], 0)
    merged, replaced = append_results([_result("b")], path)
    assert replaced == 0 and load_results(path) == merged == [with_std, _result("b")]
    assert load_results(path)[0].std == [0.01] * 5
    newer = replace(with_std, scores=[0.3] * 5)
    assert append_results([newer], path) == ([newer, _result("b")], 1)
    assert lock_path(path).exists()  # the sidecar lock stays (see results.locked)


def test_append_refuses_a_file_that_is_not_results(tmp_path):
    path = tmp_path / "notes.json"
    path.write_text("{}")
    with pytest.raises(ValueError, match="notes.json: not a layerprobe results file"):
        append_results([_result("a")], path)
    assert path.read_text() == "{}"


APPENDER = """
import sys
from layerprobe.results import Result, append_results
model, n = sys.argv[1], int(sys.argv[2])
for i in range(n):
    r = Result(model, model, "bundled", f"probe{i}", "pwcca", [0, 1], [0.1, 0.2 + i / 100])
    append_results([r], sys.argv[3])
"""


def test_concurrent_appends_keep_every_result(tmp_path):
    path = tmp_path / "shared.json"
    n = 15
    procs = [subprocess.Popen([sys.executable, "-c", APPENDER, model, str(n), str(path)],
                              cwd=ROOT, env={"PYTHONPATH": str(ROOT)})
             for model in ("first.pt", "second.pt")]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    keys = {(r.model, r.probe) for r in load_results(path)}
    assert keys == {(m, f"probe{i}") for m in ("first.pt", "second.pt") for i in range(n)}


def test_csv_has_a_row_per_model_probe_metric_layer(tmp_path):
    results = [replace(_result("a"), std=[0.0, 0.1, 0.2, 0.3, 0.4]),
               _result("b", probe="phone", metric="mi")]
    rows = list(csv.DictReader(io.StringIO(results_to_csv(results))))
    assert tuple(rows[0]) == CSV_COLUMNS and len(rows) == 10
    assert rows[3] == {"model": "runs/a.pt", "label": "a", "corpus": "bundled", "probe": "word",
                       "metric": "pwcca", "layer": "3", "score": repr(0.1 * 3),
                       "std": "0.3"}
    assert rows[7]["probe"] == "phone" and rows[7]["metric"] == "mi" and rows[7]["std"] == ""
    assert [float(r["score"]) for r in rows[5:]] == results[1].scores
    path = save_csv(results, tmp_path / "r.csv")
    assert path.read_text() == results_to_csv(results)


def test_pool_runs_gives_the_mean_and_the_spread_over_runs(tmp_path, capsys):
    import numpy as np

    from layerprobe.autoencoder import autoencoder_index, word_drop
    from layerprobe.cli import main

    rng = np.random.default_rng(0)
    runs = []
    for name in ("s0", "s1", "s2"):
        results = [replace(_result("it1", shift=float(rng.normal(0, 0.01))),
                           scores=[float(v) for v in rng.uniform(0.1, 0.9, 5)]),
                   _result("it1", probe="fbank", shift=float(rng.normal(0, 0.01)))]
        runs.append((name, results))
    pooled = pool_runs(runs)
    assert [(r.label, r.probe) for r in pooled] == [("it1", "word"), ("it1", "fbank")]
    curves = np.array([[r.scores for r in rs][0] for _, rs in runs])
    np.testing.assert_allclose(pooled[0].scores, curves.mean(0), rtol=0, atol=1e-15)
    np.testing.assert_allclose(pooled[0].std, curves.std(0, ddof=1), rtol=0, atol=1e-15)
    assert pooled[0].details["runs"] == ["s0", "s1", "s2"]
    (row,) = autoencoder_index(pooled)  # the index's spread is over runs
    per_run = [word_drop(list(c)) for c in curves]
    assert row["word_drop_std"] == pytest.approx(np.std(per_run, ddof=1))
    with pytest.raises(ValueError, match=r"s1: not the same results as s0 \(missing"):
        pool_runs([runs[0], ("s1", runs[1][1][:1])])
    shorter = replace(runs[1][1][0], layers=[0, 1, 2, 3], scores=runs[1][1][0].scores[:4])
    with pytest.raises(ValueError, match=r"s1: \('it1', 'word', 'pwcca'\) has layers"):
        pool_runs([runs[0], ("s1", [shorter, runs[1][1][1]])])
    with pytest.raises(ValueError, match="at least 2 runs"):
        pool_runs(runs[:1])
    files = [save_results(rs, tmp_path / name / "profile.json") for name, rs in runs]
    assert main(["pool", *map(str, files), "--out", str(tmp_path / "pooled.json")]) == 0
    out = capsys.readouterr().out
    assert "± : std over 3 runs" in out
    # the command names each run by its file
    assert load_results(tmp_path / "pooled.json") == \
        pool_runs([(str(f), rs) for f, (_, rs) in zip(files, runs, strict=True)])
    save_results(runs[1][1][:1], files[1])
    assert main(["pool", *map(str, files), "--out", str(tmp_path / "pooled.json")]) == 1
    assert f"{files[1]}: not the same results as {files[0]}" in capsys.readouterr().err
