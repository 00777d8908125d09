"""Corpus reading: TextGrid formats, silence/stress handling, layouts, bad inputs."""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile
import textgrid as tgpkg
import torch

from layerprobe.corpus import (
    CorpusError,
    CorpusWarning,
    bundled_corpus_path,
    load_audio,
    load_corpus,
)
from layerprobe.phones import ARPABET39
from layerprobe.textgrids import Interval, format_textgrid, read_textgrid

SR = 16000


def write_wav(path: Path, seconds: float, sr: int = SR, channels: int = 1) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(path)))
    data = 0.1 * rng.standard_normal((int(seconds * sr), channels)).astype(np.float32)
    soundfile.write(str(path), data, sr)


def short_textgrid(tiers: dict[str, list[tuple[float, float, str]]], xmax: float) -> str:
    """Short ("chronological-free") TextGrid text, written independently of layerprobe."""
    out = ['File type = "ooTextFile"', 'Object class = "TextGrid"', "", "0", str(xmax),
           "<exists>", str(len(tiers))]
    for name, ivs in tiers.items():
        out += ['"IntervalTier"', f'"{name}"', "0", str(xmax), str(len(ivs))]
        for a, b, t in ivs:
            out += [str(a), str(b), '"' + t.replace('"', '""') + '"']
    return "\n".join(out) + "\n"


def long_textgrid(tiers: dict[str, list[tuple[float, float, str]]], xmax: float) -> str:
    """Long format written with the textgrid package (an independent writer)."""
    grid = tgpkg.TextGrid(minTime=0, maxTime=xmax)
    for name, ivs in tiers.items():
        tier = tgpkg.IntervalTier(name=name, minTime=0, maxTime=xmax)
        for a, b, t in ivs:
            tier.add(a, b, t)
        grid.append(tier)
    with tempfile.TemporaryDirectory() as tmp:
        grid.write(f"{tmp}/g.TextGrid")
        return Path(f"{tmp}/g.TextGrid").read_text(encoding="utf-8")


WORDS = [(0.0, 0.2, ""), (0.2, 0.6, "Hello"), (0.6, 0.7, "sp"), (0.7, 1.1, "world"),
         (1.1, 1.2, "")]
PHONES = [(0.0, 0.2, "sil"), (0.2, 0.3, "HH"), (0.3, 0.4, "AH0"), (0.4, 0.5, "L"),
          (0.5, 0.6, "OW1"), (0.6, 0.7, "sp"), (0.7, 0.8, "W"), (0.8, 0.95, "ER1"),
          (0.95, 1.0, "l"), (1.0, 1.1, "D"), (1.1, 1.2, "<eps>")]


@pytest.mark.parametrize("fmt", ["long", "short"])
def test_textgrid_formats_match_textgrid_package(tmp_path: Path, fmt: str) -> None:
    tiers = {"words": WORDS, "phones": PHONES}
    text = long_textgrid(tiers, 1.2) if fmt == "long" else short_textgrid(tiers, 1.2)
    path = tmp_path / f"a_{fmt}.TextGrid"
    path.write_text(text, encoding="utf-8")
    ours = read_textgrid(path)
    ref = tgpkg.TextGrid.fromFile(str(path))
    assert ours.xmax == pytest.approx(1.2)
    for tier in ref.tiers:
        got = [(iv.start, iv.end, iv.text) for iv in ours.tiers[tier.name]]
        want = [(float(iv.minTime), float(iv.maxTime), iv.mark) for iv in tier.intervals]
        assert [t for _, _, t in got] == [t for _, _, t in want]
        assert np.allclose([g[:2] for g in got], [w[:2] for w in want], atol=1e-9)


def test_own_writer_roundtrip_through_textgrid_package(tmp_path: Path) -> None:
    path = tmp_path / "w.TextGrid"
    segs = [Interval(0.25, 0.5, 'say "hi"'), Interval(0.5, 0.75, "x")]
    path.write_text(format_textgrid({"words": segs}, 1.0), encoding="utf-8")
    ref = tgpkg.TextGrid.fromFile(str(path))
    marks = [(float(iv.minTime), float(iv.maxTime), iv.mark) for iv in ref.tiers[0]]
    assert marks == [(0.0, 0.25, ""), (0.25, 0.5, 'say "hi"'), (0.5, 0.75, "x"), (0.75, 1.0, "")]


def make_corpus(root: Path, n: int = 3, fmt: str = "long") -> Path:
    for i in range(n):
        write_wav(root / f"spk{i % 2}" / f"utt{i}.wav", 1.2)
        text = (long_textgrid if fmt == "long" else short_textgrid)(
            {"words": WORDS, "phones": PHONES}, 1.2)
        (root / f"spk{i % 2}" / f"utt{i}.TextGrid").write_text(text, encoding="utf-8")
    return root


@pytest.mark.parametrize("fmt", ["long", "short"])
def test_silence_and_stress_handling(tmp_path: Path, fmt: str) -> None:
    corpus = load_corpus(make_corpus(tmp_path / "c", fmt=fmt))
    assert len(corpus.utterances) == 3 and not corpus.warnings
    utt = corpus.utterances[0]
    assert utt.id == "spk0/utt0" and utt.speaker == "spk0"
    assert utt.duration == pytest.approx(1.2)
    assert [w.label for w in utt.words] == ["hello", "world"]
    assert [p.label for p in utt.phones] == ["HH", "AH", "L", "OW", "W", "ER", "L", "D"]
    assert utt.phones[1].start == pytest.approx(0.3) and utt.phones[1].end == pytest.approx(0.4)
    assert all(p.label in ARPABET39 for p in utt.phones)


def test_unknown_phones_reported(tmp_path: Path) -> None:
    write_wav(tmp_path / "c" / "a.wav", 1.0)
    (tmp_path / "c" / "a.TextGrid").write_text(short_textgrid(
        {"words": [(0, 0.5, "hi")], "phones": [(0, 0.25, "HH"), (0.25, 0.5, "QQ2")]}, 1.0))
    with pytest.warns(CorpusWarning, match="QQ"):
        corpus = load_corpus(tmp_path / "c")
    assert [p.label for p in corpus.utterances[0].phones] == ["HH"]
    assert any("unknown phones" in w and "'QQ2'" in w for w in corpus.warnings)


def bad_inputs(root: Path) -> dict[str, str]:
    """One bad utterance of each kind plus a good one; returns stem -> expected reason."""
    make_corpus(root, n=1)
    write_wav(root / "tierless.wav", 1.0)
    (root / "tierless.TextGrid").write_text(short_textgrid({"words": [(0, 0.5, "hi")]}, 1.0))
    write_wav(root / "late.wav", 1.0)
    (root / "late.TextGrid").write_text(short_textgrid(
        {"words": [(0, 1.3, "hi")], "phones": [(0, 1.3, "HH")]}, 1.3))
    write_wav(root / "overlap.wav", 1.0)
    (root / "overlap.TextGrid").write_text(short_textgrid(
        {"words": [(0, 0.5, "hi"), (0.4, 0.8, "there")], "phones": [(0, 0.8, "HH")]}, 1.0))
    write_wav(root / "empty.wav", 1.0)
    (root / "empty.TextGrid").write_text(short_textgrid(
        {"words": [(0, 0.5, "hi"), (0.5, 0.5, "there")], "phones": [(0, 0.5, "HH")]}, 1.0))
    (root / "broken.wav").write_bytes(b"RIFF not really audio")
    (root / "broken.TextGrid").write_text(short_textgrid(
        {"words": [(0, 0.5, "hi")], "phones": [(0, 0.5, "HH")]}, 1.0))
    return {"tierless": "no tier 'phones'", "late": "past the end of the audio",
            "overlap": "overlaps", "empty": "empty word", "broken": "cannot read audio"}


def test_bad_inputs_skipped_with_warnings_and_summary(tmp_path: Path) -> None:
    expected = bad_inputs(tmp_path / "c")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        corpus = load_corpus(tmp_path / "c")
    messages = [str(w.message) for w in caught if issubclass(w.category, CorpusWarning)]
    assert [u.id for u in corpus.utterances] == ["spk0/utt0"]
    for stem, reason in expected.items():
        hits = [m for m in messages if f"{stem}." in m]
        assert hits and reason in hits[0], (stem, hits)
    assert "skipped 5 of 6 utterances" in messages[-1]
    assert corpus.warnings[-1] == messages[-1]


@pytest.mark.parametrize("stem", ["tierless", "late", "overlap", "empty", "broken"])
def test_strict_raises_on_bad_input(tmp_path: Path, stem: str) -> None:
    root = tmp_path / "c"
    reason = bad_inputs(root)[stem]
    for other in ("tierless", "late", "overlap", "empty", "broken"):
        if other != stem:
            for f in root.glob(f"{other}.*"):
                f.unlink()
    with pytest.raises(CorpusError, match=reason) as err:
        load_corpus(root, strict=True)
    assert stem in str(err.value)


def test_no_usable_utterance_is_an_error(tmp_path: Path) -> None:
    write_wav(tmp_path / "c" / "a.wav", 1.0)
    with pytest.raises(CorpusError, match="no usable utterance.*no alignment"), \
            pytest.warns(CorpusWarning):
        load_corpus(tmp_path / "c")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="no audio files"):
        load_corpus(tmp_path / "empty")
    with pytest.raises(CorpusError, match="no such file"):
        load_corpus(tmp_path / "missing")


def test_custom_tier_names_and_missing_tier(tmp_path: Path) -> None:
    write_wav(tmp_path / "c" / "a.wav", 1.0)
    (tmp_path / "c" / "a.TextGrid").write_text(short_textgrid(
        {"W": [(0, 0.5, "hi")], "P": [(0, 0.5, "HH")]}, 1.0))
    corpus = load_corpus(tmp_path / "c", word_tier="W", phone_tier="P")
    assert corpus.utterances[0].words[0].label == "hi"
    with pytest.raises(CorpusError, match="no tier 'words'"):
        load_corpus(tmp_path / "c", strict=True)


def test_librispeech_tree_with_parallel_alignments(tmp_path: Path) -> None:
    audio = tmp_path / "LibriSpeech" / "dev-clean"
    aligns = tmp_path / "LibriSpeech" / "dev-clean-alignments"
    for stem in ("84-121123-0000", "84-121123-0001", "174-50561-0000"):
        spk, ch, _ = stem.split("-")
        write_wav(audio / spk / ch / f"{stem}.flac", 1.2)
        (aligns / spk).mkdir(parents=True, exist_ok=True)
        (aligns / spk / f"{stem}.TextGrid").write_text(
            long_textgrid({"words": WORDS, "phones": PHONES}, 1.2))
    corpus = load_corpus(audio)
    assert [u.id for u in corpus.utterances] == ["174-50561-0000", "84-121123-0000",
                                                 "84-121123-0001"]
    assert [u.speaker for u in corpus.utterances] == ["174", "84", "84"]
    assert corpus.utterances[0].alignment_path == aligns / "174" / "174-50561-0000.TextGrid"
    moved = tmp_path / "elsewhere"
    aligns.rename(moved)
    assert len(load_corpus(audio, alignments=moved).utterances) == 3


@pytest.mark.parametrize("kind", ["tsv", "tsv-header", "jsonl"])
def test_manifest(tmp_path: Path, kind: str) -> None:
    make_corpus(tmp_path / "c", n=2)
    rows = [("c/spk0/utt0.wav", "c/spk0/utt0.TextGrid", "alice", "train"),
            ("c/spk1/utt1.wav", "c/spk1/utt1.TextGrid", "bob", "test")]
    if kind == "jsonl":
        path = tmp_path / "m.jsonl"
        path.write_text("".join(json.dumps(dict(zip(("audio", "alignment", "speaker", "split"),
                                                   r, strict=True))) + "\n" for r in rows))
    else:
        path = tmp_path / "m.tsv"
        head = "split\talignment\taudio\tspeaker\n" if kind == "tsv-header" else ""
        order = (3, 1, 0, 2) if head else (0, 1, 2, 3)
        path.write_text(head + "".join("\t".join(r[i] for i in order) + "\n" for r in rows))
    corpus = load_corpus(path)
    assert [(u.id, u.speaker, u.split) for u in corpus.utterances] == [
        ("utt0", "alice", "train"), ("utt1", "bob", "test")]
    assert corpus.utterances[1].words[1].label == "world"


def test_max_utterances_is_a_seeded_subset(tmp_path: Path) -> None:
    root = make_corpus(tmp_path / "c", n=8)
    a = [u.id for u in load_corpus(root, max_utterances=3, seed=1).utterances]
    b = [u.id for u in load_corpus(root, max_utterances=3, seed=1).utterances]
    all_ids = [u.id for u in load_corpus(root).utterances]
    assert a == b and len(a) == 3 and a == [i for i in all_ids if i in a]
    others = {tuple(u.id for u in load_corpus(root, max_utterances=3, seed=s).utterances)
              for s in range(6)}
    assert len(others) > 1


def test_load_audio_downmix_and_resample(tmp_path: Path) -> None:
    sr = 22050
    t = np.arange(int(0.5 * sr)) / sr
    left = 0.5 * np.sin(2 * np.pi * 440 * t)
    right = 0.1 * np.sin(2 * np.pi * 440 * t)
    soundfile.write(str(tmp_path / "s.wav"), np.stack([left, right], 1), sr, subtype="FLOAT")
    wave = load_audio(tmp_path / "s.wav")
    assert wave.dtype == torch.float32 and wave.dim() == 1
    assert wave.shape[0] == pytest.approx(0.5 * SR, abs=1)
    t16 = np.arange(wave.shape[0]) / SR
    want = 0.3 * np.sin(2 * np.pi * 440 * t16)
    mid = slice(400, -400)
    assert np.abs(wave.numpy()[mid] - want[mid]).max() < 5e-3
    with pytest.raises(ValueError, match="cannot read audio"):
        (tmp_path / "bad.flac").write_bytes(b"nope")
        load_audio(tmp_path / "bad.flac")


def test_bundled_corpus() -> None:
    assert bundled_corpus_path().is_dir()
    corpus = load_corpus(None)
    assert corpus.name == "bundled" and not corpus.warnings
    assert len({u.speaker for u in corpus.utterances}) >= 3
    assert 180 < corpus.duration < 600
    phones = {p.label for u in corpus.utterances for p in u.phones}
    assert phones == set(ARPABET39)
    size = sum(f.stat().st_size for f in bundled_corpus_path().rglob("*") if f.is_file())
    assert size < 10 * 2**20
