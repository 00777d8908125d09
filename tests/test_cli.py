"""The command line: outputs checked before work, --append, --csv/export, labels, warnings, help."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import pytest

import layerprobe.score
from layerprobe import cli
from layerprobe.labels import unique_labels
from layerprobe.results import RESULTS_FORMAT, Result, load_results, save_results


def _fake_results(model, label: str, score: float = 0.5) -> list[Result]:
    return [Result(model=str(model), label=label, corpus="bundled", probe=probe, metric="pwcca",
                   layers=[0, 1, 2], scores=[0.1, score, 0.2]) for probe in ("fbank", "word")]


@pytest.fixture
def fake_scoring(monkeypatch):
    """score_model/score_models that return at once and record what they were asked."""
    calls: list[tuple[str, str]] = []

    def score_model(model, corpus=None, config=None, *, label=None, **kwargs):
        label = label or str(model)
        calls.append((str(model), label))
        return _fake_results(model, label, score=0.5 + 0.01 * len(calls))

    def score_models(models, corpus=None, config=None, *, labels=None, **kwargs):
        labels = labels or [None] * len(models)
        return [r for m, lbl in zip(models, labels, strict=True)
                for r in score_model(m, label=lbl)]

    monkeypatch.setattr(layerprobe.score, "score_model", score_model)
    monkeypatch.setattr(layerprobe.score, "score_models", score_models)
    return calls


@pytest.fixture
def no_scoring(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("scoring started although the output cannot be written")

    monkeypatch.setattr(layerprobe.score, "score_model", refuse)
    monkeypatch.setattr(layerprobe.score, "score_models", refuse)


# --- item 2: outputs are checked before any work, messages name the user's path ---------------

def test_unwritable_out_fails_before_scoring_and_names_the_users_path(tmp_path, monkeypatch,
                                                                       capsys, no_scoring):
    def refuse(*, prefix, suffix, dir):  # a read-only folder, as root sees it never
        raise PermissionError(1, "Operation not permitted", os.path.join(dir, prefix + "x.tmp"))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    out = tmp_path / "ro" / "r.json"
    assert cli.main(["score", "m.pt", "--out", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert f"{out}: cannot write (Operation not permitted)" in err
    assert ".tmp" not in err
    assert cli.main(["compare", "a.pt", "b.pt", "-o", str(tmp_path / "ro" / "c.png")]) == 1
    assert "c.json: cannot write" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--out", "--csv", "--plot"])
def test_every_output_is_checked_first(tmp_path, capsys, no_scoring, flag):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    bad = blocker / ("out.png" if flag == "--plot" else "out.json")
    args = ["score", "m.pt", "--out", str(tmp_path / "r.json")] if flag != "--out" else \
        ["score", "m.pt"]
    assert cli.main([*args, flag, str(bad)]) == 1
    assert f"{bad}: cannot write" in capsys.readouterr().err


def test_a_figure_format_we_cannot_write_fails_before_scoring(tmp_path, capsys, no_scoring):
    assert cli.main(["score", "m.pt", "--out", str(tmp_path / "r.json"), "--plot",
                     str(tmp_path / "f.jpg")]) == 1
    assert f"{tmp_path / 'f.jpg'}: figure must be .png, .pdf or .svg" in capsys.readouterr().err
    assert cli.main(["compare", "a.pt", "b.pt", "-o", str(tmp_path / "c.gif")]) == 1
    assert "c.gif: figure must be" in capsys.readouterr().err


def test_threads_sets_torchs_pool_and_rejects_zero(tmp_path, capsys, no_scoring):
    import torch

    before = torch.get_num_threads()
    try:
        assert cli.main(["score", "m.pt", "--out", str(tmp_path / "r.json"), "--threads",
                         "0"]) == 1
        assert "--threads must be >= 1, got 0" in capsys.readouterr().err
        with contextlib.suppress(AssertionError):  # set before the (refused) scoring
            cli.main(["score", "m.pt", "--out", str(tmp_path / "r.json"), "--threads", "1"])
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_append_to_a_broken_results_file_fails_before_scoring(tmp_path, capsys, no_scoring):
    out = tmp_path / "r.json"
    out.write_text("{oops")
    assert cli.main(["score", "m.pt", "--out", str(out), "--append"]) == 1
    assert f"{out}: not valid JSON" in capsys.readouterr().err


# --- item 3: --append merges, replacing an existing file is said ---------------------------------

def test_append_merges_models_and_replaces_the_same_one(tmp_path, capsys, fake_scoring):
    out = tmp_path / "r.json"
    assert cli.main(["score", "runs/a/it1/ckpt.pt", "--out", str(out), "--append"]) == 0
    assert cli.main(["score", "runs/b/it1/ckpt.pt", "--out", str(out), "--append"]) == 0
    merged = load_results(out)  # other model: both kept, the new one's label unique in the file
    assert sorted((r.model, r.label, r.probe) for r in merged) == [
        (m, lbl, p) for m, lbl in (("runs/a/it1/ckpt.pt", "it1"), ("runs/b/it1/ckpt.pt", "b/it1"))
        for p in ("fbank", "word")]
    capsys.readouterr()
    assert cli.main(["score", "runs/a/it1/ckpt.pt", "--out", str(out), "--append"]) == 0
    assert "4 result(s) in the file, 2 replaced" in capsys.readouterr().out
    again = [r for r in load_results(out) if r.model == "runs/a/it1/ckpt.pt"]
    assert [(r.label, r.scores[1]) for r in again] == [("it1", 0.53)] * 2  # the third run's


def test_overwriting_without_append_is_said(tmp_path, capsys, fake_scoring):
    out = tmp_path / "r.json"
    assert cli.main(["score", "a.pt", "--out", str(out)]) == 0
    assert "replaced" not in capsys.readouterr().err
    with pytest.warns(UserWarning, match=f"^replaced the existing {out} \\(--append merges"):
        assert cli.main(["score", "b.pt", "--out", str(out)]) == 0
    assert {r.model for r in load_results(out)} == {"b.pt"}


# --- item 5: default labels --------------------------------------------------------------------

def test_unique_labels():
    assert unique_labels(["runs/demo/it1/ckpt.pt", "runs/p5/it1/ckpt.pt"]) == ["demo/it1", "p5/it1"]
    assert unique_labels(["runs/demo/it3/ckpt.pt"]) == ["it3"]
    assert unique_labels(["a/x/y.pt", "b/x/y.pt", "c/z/y.pt"]) == ["a/x/y", "b/x/y", "z/y"]
    assert unique_labels(["facebook/hubert-base-ls960", "path/to/hf_folder/"]) == \
        ["hubert-base-ls960", "hf_folder"]
    assert unique_labels(["m.pt", "m.pt"]) == ["m", "m (2)"]
    assert unique_labels(["ckpt.pt"]) == ["ckpt"]


def test_compare_default_labels_are_unique(tmp_path, capsys, fake_scoring):
    out = tmp_path / "c.png"
    assert cli.main(["compare", "runs/demo/it1/ckpt.pt", "runs/p5/it1/ckpt.pt", "-o", str(out),
                     "--no-progress"]) == 0
    assert [label for _, label in fake_scoring] == ["demo/it1", "p5/it1"]
    assert {r.label for r in load_results(tmp_path / "c.json")} == {"demo/it1", "p5/it1"}
    assert out.exists()


# --- item 7: plot errors name the file; --rows-by checked; warnings; help; progress bars ------

def test_plot_errors_name_the_file(tmp_path, capsys):
    entry = _fake_results("m.pt", "m")[0].to_dict()
    entry["scores"][1] = "x"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": RESULTS_FORMAT, "results": [entry]}))
    assert cli.main(["plot", str(bad), "-o", str(tmp_path / "f.png")]) == 1
    err = capsys.readouterr().err
    assert f"{bad}: result m (fbank/pwcca): could not convert string to float: 'x'" in err


def test_plot_rows_by_run_and_unknown_field(tmp_path, capsys):
    demo = save_results(_fake_results("it1/ckpt.pt", "it1"), tmp_path / "demo" / "profile.json")
    p5 = save_results(_fake_results("it1/ckpt.pt", "it1"), tmp_path / "p5" / "profile.json")
    fig = tmp_path / "f.png"
    assert cli.main(["plot", str(demo), str(p5), "-o", str(fig), "--rows-by", "nonsense"]) == 1
    assert "rows by 'nonsense': not a meta field of these results with plain values; valid " \
        "fields: run" in capsys.readouterr().err
    assert not fig.exists()
    assert cli.main(["plot", str(demo), str(p5), "-o", str(fig), "--rows-by", "run"]) == 0
    assert fig.exists()


WARNER = """
import warnings
from layerprobe import cli
with cli.cli_warnings():
    warnings.warn("corpus has 3 bad files", UserWarning, stacklevel=1)
warnings.warn("after the command", UserWarning, stacklevel=1)
"""


def test_warnings_print_one_line_without_python_source(tmp_path):
    root = Path(__file__).resolve().parents[1]
    script = tmp_path / "warner.py"
    script.write_text(WARNER)
    done = subprocess.run([sys.executable, str(script)], cwd=root, capture_output=True,
                          text=True, env={"PYTHONPATH": str(root)}, timeout=120)
    lines = done.stderr.splitlines()
    assert lines[0] == "layerprobe: warning: corpus has 3 bad files"
    assert "warner.py:6: UserWarning: after the command" in lines[1]  # Python's format is back
    assert lines[2].strip().startswith("warnings.warn(")  # ... with its source line
    assert len(lines) == 3
    assert cli.format_warning(UserWarning("x")) == "layerprobe: warning: x\n"


def test_cli_warnings_still_reach_pytest_warns():
    with pytest.warns(UserWarning, match="recorded"), cli.cli_warnings():
        warnings.warn("recorded", UserWarning, stacklevel=1)


def test_every_command_has_a_description():
    parser = cli.build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert set(commands) >= {"score", "plot", "compare", "export", "synth", "pretrain"}
    for name, sub in commands.items():
        assert sub.description and len(sub.description) > 40, name


def test_no_progress_hides_the_transformers_loading_bar(tmp_path, capfd):
    from model_fixtures import save_hf_folder, tiny_hf_model
    from transformers.utils import logging as transformers_logging

    from layerprobe.models.huggingface import huggingface_layer_model, loading_progress

    folder = save_hf_folder(tiny_hf_model(), tmp_path / "hf")
    enabled = transformers_logging.is_progress_bar_enabled()
    capfd.readouterr()
    with loading_progress(False):
        huggingface_layer_model(folder)
    assert "Loading weights" not in capfd.readouterr().err
    assert transformers_logging.is_progress_bar_enabled() == enabled  # restored
    if enabled:  # the bar this test hides is really there otherwise
        huggingface_layer_model(folder)
        assert "Loading weights" in capfd.readouterr().err


def test_uncached_hub_id_without_network_fails_at_once(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from layerprobe.models import load

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy",
                "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(ValueError, match="not in the local Hugging Face cache and the hub is out "
                       "of reach: cannot reach http://127.0.0.1:9") as caught:
        load("someone/absent-model")
    assert "huggingface-cli download someone/absent-model" in str(caught.value)


# --- item 8: CSV ---------------------------------------------------------------------------------

def test_score_csv_and_export(tmp_path, capsys, fake_scoring):
    out, table = tmp_path / "r.json", tmp_path / "r.csv"
    assert cli.main(["score", "a.pt", "--out", str(out), "--csv", str(table)]) == 0
    rows = list(csv.DictReader(table.open()))
    assert len(rows) == 2 * 3 and {r["probe"] for r in rows} == {"fbank", "word"}
    assert [r["layer"] for r in rows[:3]] == ["0", "1", "2"] and rows[0]["std"] == ""
    exported = tmp_path / "e.csv"
    assert cli.main(["export", str(out), "--csv", str(exported)]) == 0
    assert exported.read_text() == table.read_text()
    capsys.readouterr()
    assert cli.main(["export", str(out), "--csv", "-"]) == 0
    assert capsys.readouterr().out == table.read_text()


def test_export_names_a_missing_file(tmp_path, capsys):
    missing = tmp_path / "missing.json"
    assert cli.main(["export", str(missing), "--csv", str(tmp_path / "x.csv")]) == 1
    assert f"{missing}: no such results file" in capsys.readouterr().err
    assert not Path(tmp_path / "x.csv").exists()
