"""Analysis configs: TOML loading, validation, and the shipped files."""

from __future__ import annotations

from pathlib import Path

import pytest

from layerprobe.config import AnalysisConfig

CONFIG_DIR = Path(__file__).resolve().parents[1] / "analysis_configs"


def test_defaults_follow_the_published_protocol():
    config = AnalysisConfig()
    assert config.probes == ("fbank", "phone", "word")
    assert config.n_trials == 3
    assert config.probe_config.n_splits == 10


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.toml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    config = AnalysisConfig.from_toml(path)
    assert set(config.probes) <= {"fbank", "phone", "word", "word-embedding"}
    assert config.n_trials >= 1


def test_toml_sections(tmp_path):
    path = tmp_path / "a.toml"
    path.write_text(
        '[corpus]\npath = "corpus"\nmax_utterances = 7\n'
        '[probes]\nnames = ["word"]\nword_cap = 3\nseed = 11\n'
        '[cca]\nmetrics = ["pwcca", "cka"]\nn_trials = 2\nexact_sums = false\n'
        '[mi]\nword_clusters = 20\n'
        '[model]\nbatch_seconds = 5.0\ndevice = "cpu"\n'
    )
    config = AnalysisConfig.from_toml(path)
    assert config.corpus == "corpus" and config.max_utterances == 7
    assert config.probes == ("word",) and config.probe_config.word_cap == 3
    assert config.seed == 11 and config.metrics == ("pwcca", "cka") and config.n_trials == 2
    assert config.word_clusters == 20 and config.batch_seconds == 5.0 and config.device == "cpu"
    assert not config.exact_sums and AnalysisConfig().exact_sums


def test_replace_reaches_probe_fields():
    config = AnalysisConfig().replace(seed=5, word_cap=2, device="cpu")
    assert config.seed == 5 and config.probe_config.word_cap == 2 and config.device == "cpu"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[corpus]\nfoo = 1\n", r"unknown key\(s\) \['foo'\] in \[corpus\]"),
        ("[extra]\n", r"unknown section\(s\) \['extra'\]"),
        ('[cca]\nmetric = "nope"\n', "unknown metric"),
        ("[corpus\n", "invalid TOML"),
        ('[model]\nbf16 = "yes"\n', "bf16 = 'yes' must be true or false"),
        ('[mi]\nbatch_size = "big"\n', r"\[mi\]: batch_size = 'big' must be an integer"),
        ("[cca]\nn_seeds = true\n", "n_seeds = True must be an integer"),
        ("[cca]\nexact_sums = 1\n", "exact_sums = 1 must be true or false"),
    ],
)
def test_bad_config_names_file_and_problem(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as info:
        AnalysisConfig.from_toml(path)
    assert "bad.toml" in str(info.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.toml"):
        AnalysisConfig.from_toml(tmp_path / "nope.toml")
