"""The results format and the figures drawn from it."""

from __future__ import annotations

import json

import matplotlib.image as mpimg
import pytest

from layerprobe.plots import natural_key, plot_layerwise
from layerprobe.results import RESULTS_FORMAT, Result, load_results, save_results


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
