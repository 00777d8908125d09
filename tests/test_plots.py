"""Figures: --rows-by validation, runs derived from files, colour scales per run."""

from __future__ import annotations

from dataclasses import replace

import matplotlib.image as mpimg
import pytest

from layerprobe.plots import _colours, plot_layerwise, results_of_files, row_fields
from layerprobe.results import Result, save_results


def _run_results(iterations: int, schedule: str) -> list[Result]:
    return [Result(model=f"it{i}/ckpt.pt", label=f"it{i}", corpus="bundled", probe="word",
                   metric="pwcca", layers=[0, 1, 2], scores=[0.1 * i, 0.2, 0.3],
                   meta={"iteration": i, "schedule": schedule, "config": {"seed": 0}})
            for i in range(1, iterations + 1)]


@pytest.fixture
def two_runs(tmp_path):
    demo = save_results(_run_results(3, "progressive"), tmp_path / "runs" / "demo" / "profile.json")
    p5 = save_results(_run_results(5, "progressive"), tmp_path / "runs" / "p5" / "profile.json")
    return demo, p5


def test_files_get_a_run_and_colliding_labels_are_told_apart(two_runs):
    results = results_of_files(two_runs)
    assert [r.meta["run"] for r in results] == ["demo"] * 3 + ["p5"] * 5
    assert [r.label for r in results] == [f"demo/it{i}" for i in (1, 2, 3)] + \
        [f"p5/it{i}" for i in range(1, 6)]
    by_run = results_of_files(two_runs, rows_by="run")
    assert [r.label for r in by_run] == [f"it{i}" for i in (1, 2, 3)] + \
        [f"it{i}" for i in range(1, 6)]
    assert [r.label for r in results_of_files(two_runs[:1])] == ["it1", "it2", "it3"]


def test_run_in_meta_wins_and_files_in_one_folder_are_named_by_file(tmp_path):
    a = save_results([replace(r, meta={"run": "mine"}) for r in _run_results(1, "x")],
                     tmp_path / "a.json")
    b = save_results(_run_results(1, "x"), tmp_path / "b.json")
    results = results_of_files([a, b])
    assert [r.meta["run"] for r in results] == ["mine", "b"]
    assert [r.label for r in results] == ["mine/it1", "b/it1"]


def test_each_run_gets_its_own_colour_scale():
    single = _colours(["it1", "it2", "it3"])
    assert len(set(single.values())) == 3
    mixed = _colours(["demo/it1", "demo/it2", "p5/it1", "p5/it2"])
    assert mixed["demo/it1"] != mixed["p5/it1"]
    # demo: one hue family (blues: blue > red), p5 another (oranges: red > blue)
    assert all(mixed[f"demo/it{i}"][2] > mixed[f"demo/it{i}"][0] for i in (1, 2))
    assert mixed["p5/it2"][0] > mixed["p5/it2"][2]


def test_rows_by_run_draws_a_row_per_run(two_runs, tmp_path):
    results = results_of_files(two_runs, rows_by="run")
    out = plot_layerwise(results, tmp_path / "runs.png", rows_by="run")
    image = mpimg.imread(out)
    assert image.shape[0] > image.shape[1] * 0.9  # two rows, one panel wide


def test_rows_by_rejects_unknown_fields_listing_valid_ones(two_runs, tmp_path):
    results = results_of_files(two_runs)
    assert row_fields(results) == ["iteration", "run", "schedule"]  # not the config dict
    with pytest.raises(ValueError, match="rows by 'nonsense': .*valid fields: iteration, run, "
                       "schedule"):
        plot_layerwise(results, tmp_path / "x.png", rows_by="nonsense")
    with pytest.raises(ValueError, match="'config'"):
        plot_layerwise(results, tmp_path / "x.png", rows_by="config")
    assert not (tmp_path / "x.png").exists()


def test_one_label_for_several_models_in_a_file_is_told_apart(tmp_path):
    a, b = _run_results(1, "x")[0], _run_results(1, "x")[0]
    path = save_results([replace(a, model="runs/demo/it1/ckpt.pt"),
                         replace(b, model="runs/p5/it1/ckpt.pt")], tmp_path / "r.json")
    assert [r.label for r in results_of_files([path])] == ["demo/it1", "p5/it1"]


def test_the_spread_is_drawn_as_a_band_around_each_curve(tmp_path, monkeypatch):
    import matplotlib.axes

    bands = []
    original = matplotlib.axes.Axes.fill_between

    def record(self, x, low, high, **kw):
        bands.append((list(x), list(low), list(high)))
        return original(self, x, low, high, **kw)

    monkeypatch.setattr(matplotlib.axes.Axes, "fill_between", record)
    with_std = replace(_run_results(1, "p")[0], std=[0.01, 0.02, 0.05])
    without = replace(_run_results(2, "p")[1], label="no-spread")
    plot_layerwise([with_std, without], tmp_path / "f.png")
    assert len(bands) == 1  # a result without std draws no band
    x, low, high = bands[0]
    assert x == [0, 1, 2]
    assert low == pytest.approx([0.09, 0.18, 0.25]) and high == pytest.approx([0.11, 0.22, 0.35])


def test_the_footer_says_what_each_band_is_a_std_over(tmp_path, monkeypatch):
    import matplotlib.figure

    texts = []
    original = matplotlib.figure.Figure.text

    def record(self, x, y, s, **kw):
        texts.append(s)
        return original(self, x, y, s, **kw)

    monkeypatch.setattr(matplotlib.figure.Figure, "text", record)
    seeds = replace(_run_results(1, "p")[0], std=[0.01, 0.02, 0.05])
    pooled = replace(seeds, label="pooled", details={"runs": ["a", "b", "c"],
                                                     "spread": "std over 3 runs (ddof 1)"})
    plot_layerwise([pooled], tmp_path / "a.png")
    assert texts[-1] == "bands: ±1 std over 3 runs (ddof 1)"
    plot_layerwise([pooled, seeds], tmp_path / "b.png")
    assert texts[-1] == ("bands: ±1 std over 3 runs (ddof 1); std over seeds (split seeds for "
                         "CCA, k-means seeds for MI)")
    texts.clear()
    plot_layerwise([replace(seeds, std=None)], tmp_path / "c.png")
    assert not [t for t in texts if t.startswith("bands")]
