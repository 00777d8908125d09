"""`layerprobe synth`: festival/flite corpora with exact word and phone times."""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile

from layerprobe.corpus import load_corpus
from layerprobe.synth import (
    add_synth_arguments,
    check_alignment,
    generate_sentences,
    run_synth,
    synthesize_corpus,
)
from layerprobe.textgrids import read_textgrid

needs_festival = pytest.mark.skipif(shutil.which("festival") is None,
                                    reason="festival not installed (scripts/install_synth_deps.sh)")
SENTENCES = ["The old man saw a red boat near the river.",
             "Anna and Peter walked along the road again.",
             "Quickly, the happy dog found another's book!"]


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="layerprobe synth")
    add_synth_arguments(parser)
    return parser.parse_args(argv)


def digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def independent_check(audio: Path) -> None:
    """Tiers cover the audio within 20 ms and every word is a run of whole phones."""
    info = soundfile.info(str(audio))
    assert info.samplerate == 16000 and info.channels == 1
    duration = info.frames / info.samplerate
    grid = read_textgrid(audio.with_suffix(".TextGrid"))
    for name in ("words", "phones"):
        tier = grid.tiers[name]
        assert tier[0].start == 0 and abs(tier[-1].end - duration) <= 0.02
        assert all(a.end == pytest.approx(b.start) for a, b in zip(tier, tier[1:], strict=False))
    phones = [iv for iv in grid.tiers["phones"] if iv.text]
    for w in (iv for iv in grid.tiers["words"] if iv.text):
        inside = [p for p in phones if p.start >= w.start - 1e-6 and p.end <= w.end + 1e-6]
        assert inside and inside[0].start == pytest.approx(w.start)
        assert inside[-1].end == pytest.approx(w.end)
        assert sum(p.end - p.start for p in inside) == pytest.approx(w.end - w.start)
    # a phone interval never straddles a word boundary
    bounds = [b for w in grid.tiers["words"] for b in (w.start, w.end)]
    for p in phones:
        assert not any(p.start + 1e-6 < b < p.end - 1e-6 for b in bounds)


@needs_festival
def test_synth_cli_two_voices_deterministic(tmp_path: Path, capsys) -> None:
    sentences = tmp_path / "s.txt"
    sentences.write_text("# a comment\n" + "\n".join(SENTENCES) + "\n\n")
    argv = ["--voices", "slt_hts", "kal_diphone", "--sentences", str(sentences), "--seed", "1",
            "--no-progress"]
    assert run_synth(parse(["--out", str(tmp_path / "a"), *argv])) == 0
    assert "wrote 6 utterances" in capsys.readouterr().out
    assert run_synth(parse(["--out", str(tmp_path / "b"), *argv])) == 0
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    audio = sorted((tmp_path / "a").rglob("*.flac"))
    assert [p.relative_to(tmp_path / "a").as_posix() for p in audio] == [
        f"{v}/{v}_{i:05d}.flac" for v in ("kal_diphone", "slt_hts") for i in (1, 2, 3)]
    for path in audio:
        independent_check(path)
    corpus = load_corpus(tmp_path / "a", strict=True)
    assert {u.speaker for u in corpus.utterances} == {"slt_hts", "kal_diphone"}
    words = [w.label for w in corpus.utterances[2].words]
    assert words == ["quickly", "the", "happy", "dog", "found", "another's", "book"]
    phones = [p.label for p in corpus.utterances[0].words and corpus.utterances[0].phones][:3]
    assert phones == ["DH", "AH", "OW"]  # "the old": stress digits stripped, ax -> AH
    raw = read_textgrid(audio[0].with_suffix(".TextGrid")).tiers["phones"]
    assert [iv.text for iv in raw if iv.text][:3] == ["DH", "AH0", "OW1"]
    meta = json.loads((tmp_path / "a" / "synth.json").read_text())
    assert meta["utterances"] == 6 and meta["voices"] == ["slt_hts", "kal_diphone"]
    hts = soundfile.read(str(audio[3]))[0]
    assert np.abs(hts).max() > 0.05  # speech, not silence


@needs_festival
def test_synth_minutes_and_flite(tmp_path: Path) -> None:
    out = synthesize_corpus(tmp_path / "m", voices=["ked_diphone", "flite_slt"], minutes=0.2,
                            seed=3, progress=False)
    meta = json.loads((out / "synth.json").read_text())
    assert meta["seconds"] >= 0.2 * 60 - 1e-6 and meta["seconds"] < 0.2 * 60 + 10
    for voice in ("ked_diphone", "flite_slt"):
        files = sorted((out / voice).glob("*.flac"))
        assert files
        for path in files:
            independent_check(path)
    texts = (out / "transcripts.tsv").read_text().splitlines()[1:]
    first = generate_sentences(1, 3)[0]
    assert texts[0].split("\t")[3] == first


def test_missing_synthesizer_error(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    status = run_synth(parse(["--out", str(tmp_path / "x"), "--minutes", "0.1"]))
    err = capsys.readouterr().err
    assert status == 1 and "festival is not installed" in err and "apt-get install" in err


def test_argument_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown voice"):
        synthesize_corpus(tmp_path, voices=["nobody"], minutes=1)
    with pytest.raises(ValueError, match="exactly one of"):
        synthesize_corpus(tmp_path, voices=["kal_diphone"])
    with pytest.raises(SystemExit):
        parse(["--out", "x", "--minutes", "1", "--sentences", "y"])


def test_check_alignment_finds_problems() -> None:
    phones = [("HH", 0.1, 0.2), ("AY", 0.2, 0.4)]
    assert check_alignment([("hi", 0.1, 0.4)], phones, 0.5, 0.5) == []
    assert "audio lasts" in check_alignment([("hi", 0.1, 0.4)], phones, 0.5, 0.55)[0]
    assert "not a run of phones" in check_alignment([("hi", 0.1, 0.3)], phones, 0.5, 0.5)[0]
    assert "outside every word" in check_alignment([("hi", 0.1, 0.2)], phones, 0.5, 0.5)[-1]
    assert "overlaps" in check_alignment([("hi", 0.1, 0.4)],
                                         [("HH", 0.1, 0.25), ("AY", 0.2, 0.4)], 0.5, 0.5)[0]


def test_sentence_grammar_deterministic() -> None:
    a = generate_sentences(50, 7)
    assert a == generate_sentences(50, 7) and a != generate_sentences(50, 8)
    vocab = {w.strip(".,").lower() for s in a for w in s.split()}
    assert len(vocab) < 220 and all(s[0].isupper() and s.endswith(".") for s in a)


def test_speed_variant_scales_audio_and_times_together() -> None:
    from layerprobe.synth import AlignedSpeech, change_speed, parse_voice

    audio = np.sin(np.arange(16000) * 0.05).astype(np.float32)
    speech = AlignedSpeech("hi", audio, (("hi", 0.1, 0.9),), (("HH", 0.1, 0.4), ("AY1", 0.4, 0.9)),
                           1.0)
    fast = change_speed(speech, 1.25)
    assert fast.audio.shape[0] == pytest.approx(16000 / 1.25, abs=1)
    assert fast.words == (("hi", 0.08, 0.72),)
    assert fast.phones[1] == ("AY1", pytest.approx(0.32), pytest.approx(0.72))
    assert fast.segment_end == pytest.approx(0.8)
    assert change_speed(speech, 1.0) is speech
    assert parse_voice("flite_rms@0.9")[1] == 0.9 and parse_voice("kal_diphone")[1] == 1.0
    for bad, message in (("flite_rms@fast", "not a number"), ("flite_rms@3", "must lie in"),
                         ("nobody@1.1", "unknown voice")):
        with pytest.raises(ValueError, match=message):
            parse_voice(bad)


@needs_festival
def test_a_failing_voice_is_skipped_with_a_warning_and_a_rerun_reuses_finished_voices(
        tmp_path: Path, monkeypatch) -> None:
    import layerprobe.synth as synth

    real = synth.synthesize

    def broken(voice, sentences):
        if voice.startswith("flite_rms"):
            raise synth.SynthError("flite voice flite_rms failed: simulated")
        return real(voice, sentences)

    monkeypatch.setattr(synth, "synthesize", broken)
    with pytest.warns(synth.SynthWarning, match="voice flite_rms@1.1 failed to synthesize"):
        out = synthesize_corpus(tmp_path / "c", voices=["kal_diphone@0.9", "flite_rms@1.1"],
                                minutes=0.1, seed=2, progress=False)
    meta = json.loads((out / "synth.json").read_text())
    assert list(meta["failed_voices"]) == ["flite_rms@1.1"] and meta["utterances"] > 0
    first = digest(out / "kal_diphone@0.9")
    calls = []
    monkeypatch.setattr(synth, "synthesize", lambda v, s: calls.append(v) or real(v, s))
    synthesize_corpus(tmp_path / "c", voices=["kal_diphone@0.9", "flite_rms@1.1"], minutes=0.1,
                      seed=2, progress=False)
    assert calls and set(calls) == {"flite_rms@1.1"}  # the finished voice was not redone
    assert digest(out / "kal_diphone@0.9") == first
    assert json.loads((out / "synth.json").read_text())["failed_voices"] == {}
    load_corpus(out, strict=True)
