"""The memory estimate of a scoring run, the plan that fits a budget, and the early refusal."""

from __future__ import annotations

import pytest
import torch

from layerprobe.config import AnalysisConfig
from layerprobe.corpus import load_corpus
from layerprobe.memory import (
    GB,
    Estimate,
    MemoryBudgetError,
    ProbeShape,
    estimate,
    moments_bytes,
    plan_passes,
)
from layerprobe.models import load
from layerprobe.probes import build_probes
from layerprobe.score import _Plan, memory_plan, score_model
from layerprobe.stats import Moments
from tests.model_fixtures import save_native_from_hf, tiny_hf_model


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("compensated", [True, False])
def test_moments_bytes_are_what_the_accumulator_allocates(packed, compensated):
    m = Moments(3, 10, 4, 6, compensated=compensated, packed=packed)
    held = sum(t.numel() * t.element_size() for t in (m.sum_x, m.sum_y, m.xx, m.xy, m.yy))
    held += sum(t.numel() * t.element_size() for t in m._lo.values() if t is not None)
    assert moments_bytes(3, 10, 4, 6, compensated=compensated, packed=packed) == held


def _estimate() -> Estimate:
    shapes = [ProbeShape("fbank", 80, 0), ProbeShape("phone", 39, 8000),
              ProbeShape("word", 500, 7500)]
    return estimate(13, 768, shapes, n_slots=20, compensated=True, packed=True,
                    model_bytes=380_000_000, frames_per_batch=3000)


def test_a_base_model_estimate_counts_the_moments_of_every_probe():
    est = _estimate()
    # the word probe's moments: 20 shards x 13 layers x (768*769/2 + 768*500) float64, doubled
    word = 20 * (13 * (768 * 769 // 2 + 768 * 500 + 768) + 500 * 500 + 500) * 8 * 2
    assert est.moments["word"] == word
    assert est.peak() > sum(est.moments.values()) + est.model
    assert "moments fbank" in est.describe() and "GB" in est.describe()


def test_plan_is_one_pass_when_it_fits_probes_in_turn_when_not_and_a_refusal_otherwise():
    est = _estimate()
    everything = plan_passes(est, est.peak() + 1)
    assert everything.passes == (("fbank", "phone", "word"),)
    alone = max(est.peak([p]) for p in est.moments)
    tight = plan_passes(est, alone + 1)
    assert len(tight.passes) > 1 and sorted(p for g in tight.passes for p in g) == \
        ["fbank", "phone", "word"]
    assert all(est.peak(g) <= alone + 1 for g in tight.passes)
    assert "passes over the corpus" in tight.describe()
    with pytest.raises(MemoryBudgetError, match=r"probe 'word' alone, more than the memory "
                                                r"budget of 2\.0 GB"):
        plan_passes(est, 2 * GB)
    assert plan_passes(est, None).passes == (("fbank", "phone", "word"),)  # budget unknown


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    return str(save_native_from_hf(tiny_hf_model("hubert", seed=0),
                                   tmp_path_factory.mktemp("m") / "native.pt"))


CONFIG = AnalysisConfig(max_utterances=30, device="cpu", metrics=("pwcca", "mi"), n_trials=2,
                        phone_clusters=6, word_clusters=6, batch_seconds=20.0)


def test_scores_are_the_same_bits_when_the_probes_are_accumulated_in_turn(native):
    corpus = load_corpus(None, max_utterances=CONFIG.max_utterances, seed=CONFIG.seed)
    plan = _Plan(corpus, build_probes(corpus, CONFIG.probes, CONFIG.probe_config))
    lines: list[str] = []
    one = memory_plan(load(native), plan, CONFIG, torch.device("cpu"), log=lines.append)
    assert len(one.passes) == 1 and "memory: about" in lines[0]
    alone = max(one.estimate.peak([p]) for p in CONFIG.probes)
    whole = score_model(native, corpus, CONFIG, progress=False)
    split = score_model(native, corpus, CONFIG.replace(memory_gb=(alone + 1) / GB),
                        progress=False)
    assert {len(r.meta["memory"]["passes"]) for r in split} == {3}
    assert whole[0].meta["memory"]["passes"] == [["fbank", "phone", "word"]]
    assert [(r.probe, r.metric, r.scores, r.std) for r in split] == \
        [(r.probe, r.metric, r.scores, r.std) for r in whole]


def test_a_run_that_cannot_fit_stops_before_reading_audio(native, tmp_path, capsys, monkeypatch):
    from layerprobe import score as score_module
    from layerprobe.cli import main

    def no_reading(*args, **kwargs):
        raise AssertionError("audio was read")

    monkeypatch.setattr(score_module, "_read", no_reading)
    out = tmp_path / "r.json"
    code = main(["score", native, "--memory-gb", "0.2", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and not out.exists()
    assert "more than the memory budget of 0.2 GB" in err and "--memory-gb" in err
