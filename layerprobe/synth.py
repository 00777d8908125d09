"""Synthetic aligned corpora: festival / flite speech with the synthesizer's word and phone times.

``layerprobe synth --out DIR --voices slt_hts kal_diphone … (--sentences FILE | --minutes M)``
writes ``DIR/<voice>/<voice>_<nnnnn>.flac`` (16 kHz) with a long-format TextGrid beside each
(tiers ``words`` and ``phones``, ARPAbet with stress digits, silence as empty intervals), plus
``transcripts.tsv`` and ``synth.json`` recording how it was made. Output is identical on every run
for the same arguments. Every utterance is checked before it is written: the segment times cover
the audio within 20 ms and every word is exactly a run of phones.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import random
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile
import torch
import torchaudio
from tqdm.auto import tqdm

from layerprobe.atomic import atomic_write_bytes
from layerprobe.phones import festival_to_arpabet
from layerprobe.textgrids import Interval, format_textgrid

SAMPLE_RATE = 16000
COVER_TOLERANCE = 0.02  # seconds between the last segment end and the audio end
FESTIVAL_PACKAGES = ("festival", "festvox-us-slt-hts", "festvox-kallpc16k", "festvox-kdlpc16k",
                     "festlex-cmu", "flite", "sox")
INSTALL_HINT = ("sudo apt-get update && sudo apt-get install -y --no-install-recommends "
                + " ".join(FESTIVAL_PACKAGES) + "   (or: scripts/install_synth_deps.sh)")


@dataclass(frozen=True)
class Voice:
    name: str
    engine: str  # "festival" | "flite"
    ident: str  # festival voice function or flite voice name
    package: str  # Debian package that provides it


VOICES: dict[str, Voice] = {v.name: v for v in (
    Voice("slt_hts", "festival", "voice_cmu_us_slt_arctic_hts", "festvox-us-slt-hts"),
    Voice("kal_diphone", "festival", "voice_kal_diphone", "festvox-kallpc16k"),
    Voice("ked_diphone", "festival", "voice_ked_diphone", "festvox-kdlpc16k"),
    Voice("flite_slt", "flite", "slt", "flite"),
    Voice("flite_rms", "flite", "rms", "flite"),
    Voice("flite_awb", "flite", "awb", "flite"),
)}
SPEED_RANGE = (0.5, 2.0)  # speed factors a voice variant ``NAME@SPEED`` may take
DEFAULT_VOICES = ("slt_hts", "kal_diphone", "ked_diphone")


class SynthError(RuntimeError):
    """The synthesizer is missing or failed, or its output does not check out."""


class SynthWarning(UserWarning):
    """A voice failed to synthesize and was left out of the corpus."""


def parse_voice(spec: str) -> tuple[Voice, float]:
    """``NAME`` or ``NAME@SPEED`` (a speed-perturbed variant, as Kaldi's speed perturbation:
    ``flite_rms@1.1`` is 10 % faster and higher) → (voice, speed factor)."""
    name, _, speed_text = spec.partition("@")
    if name not in VOICES:
        raise ValueError(f"unknown voice {name!r}; choose from {sorted(VOICES)} (optionally "
                         "with @SPEED, e.g. flite_rms@1.1)")
    if not speed_text:
        return VOICES[name], 1.0
    try:
        speed = float(speed_text)
    except ValueError:
        raise ValueError(f"voice {spec!r}: speed {speed_text!r} is not a number") from None
    if not SPEED_RANGE[0] <= speed <= SPEED_RANGE[1]:
        raise ValueError(f"voice {spec!r}: speed must lie in [{SPEED_RANGE[0]}, "
                         f"{SPEED_RANGE[1]}], got {speed}")
    return VOICES[name], speed


# ---------------------------------------------------------------------------------------------
# sentences: a small grammar over a modest vocabulary, so that word types repeat

_NAMES = ("anna", "peter", "maria", "john", "susan", "david", "laura", "thomas", "emma", "paul")
_ADJ = ("old", "young", "small", "large", "red", "green", "quiet", "happy", "dark", "bright",
        "cold", "warm", "heavy", "little", "tired", "clever", "brown", "white", "strange", "busy",
        "thin", "fresh")
_NOUNS = ("man", "woman", "child", "dog", "cat", "horse", "bird", "house", "garden", "river",
          "boat", "road", "window", "table", "letter", "book", "teacher", "farmer", "doctor",
          "city", "village", "forest", "hill", "train", "car", "door", "friend", "family",
          "kitchen", "market", "school", "apple", "bread", "water", "money", "picture", "song",
          "story", "morning", "evening", "boy", "toy", "shop", "fish", "treasure", "mouth")
_VT = ("saw", "found", "took", "watched", "painted", "carried", "opened", "helped", "followed",
       "bought", "sold", "cleaned", "moved", "liked", "called", "visited", "needed", "brought")
_VI = ("waited", "laughed", "walked", "slept", "stayed", "talked", "worked", "listened",
       "arrived", "returned", "smiled", "played")
_PREP = ("near", "behind", "under", "across", "beside", "inside", "along", "over", "from", "into")
_ADV = ("slowly", "quickly", "again", "today", "yesterday", "quietly", "together", "early",
        "later", "carefully")
_NUM = ("two", "three", "four", "five", "six", "seven", "ten", "twelve")


def _np(rng: random.Random) -> str:
    det = rng.choice(("the", "the", "a", "my", "her", "his", "our", "that"))
    noun = rng.choice(_NOUNS)
    if det == "a" and noun[0] in "aeiou":
        det = "an"
    if rng.random() < 0.5:
        adj = rng.choice(_ADJ)
        det = "an" if det in ("a", "an") and adj[0] in "aeiou" else ("a" if det == "an" else det)
        return f"{det} {adj} {noun}"
    return f"{det} {noun}"


def iter_sentences(seed: int = 0) -> Iterator[str]:
    """An endless deterministic stream of English sentences from a small grammar (~170 words)."""
    rng = random.Random(seed)
    templates = (
        lambda: f"{_np(rng)} {rng.choice(_VT)} {_np(rng)} {rng.choice(_PREP)} {_np(rng)}.",
        lambda: f"{rng.choice(_NAMES)} {rng.choice(_VT)} {_np(rng)} {rng.choice(_ADV)}.",
        lambda: f"{_np(rng)} {rng.choice(_VI)} {rng.choice(_PREP)} {_np(rng)}.",
        lambda: f"{rng.choice(_NAMES)} and {rng.choice(_NAMES)} {rng.choice(_VI)} "
                f"{rng.choice(_ADV)}.",
        lambda: f"{rng.choice(_ADV)} {_np(rng)} {rng.choice(_VT)} {rng.choice(_NUM)} "
                f"{rng.choice(_NOUNS)}s.",
        lambda: f"{rng.choice(_NAMES)} {rng.choice(_VI)} and {_np(rng)} {rng.choice(_VI)} "
                f"{rng.choice(_PREP)} {_np(rng)}.",
    )
    while True:
        s = rng.choice(templates)()
        yield s[0].upper() + s[1:]


def generate_sentences(n: int, seed: int = 0) -> list[str]:
    """The first ``n`` sentences of :func:`iter_sentences`."""
    return list(itertools.islice(iter_sentences(seed), n))


def read_sentences(path: str | Path) -> list[str]:
    """Non-empty lines of a UTF-8 text file (``#`` comments skipped)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"--sentences {path}: cannot read ({err})") from err
    sentences = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not sentences:
        raise ValueError(f"--sentences {path}: no sentences")
    return sentences


# ---------------------------------------------------------------------------------------------
# running the synthesizers


@dataclass(frozen=True)
class AlignedSpeech:
    """One synthesized sentence: 16 kHz audio and the synthesizer's own times (seconds)."""

    text: str
    audio: np.ndarray  # [n] float32
    words: tuple[tuple[str, float, float], ...]
    phones: tuple[tuple[str, float, float], ...]  # ARPAbet with stress, silences excluded
    segment_end: float  # end of the synthesizer's last segment (incl. final pause)


_SCHEME = r"""
(define (lp_seg fd seg stress)
  (format fd "P\t%s\t%f\t%f\t%s\n" (item.name seg) (item.feat seg "segment_start")
          (item.feat seg "end") stress))
(define (lp_dump utt wavfile alignfile)
  (if wavfile (utt.save.wave utt wavfile 'riff))
  (let ((fd (fopen alignfile "w")))
    (mapcar (lambda (w)
        (format fd "W\t%s\n" (item.name w))
        (mapcar (lambda (syl)
            (mapcar (lambda (seg) (lp_seg fd seg (item.feat syl "stress")))
                    (item.daughters syl)))
          (item.daughters (item.relation w 'SylStructure))))
      (utt.relation.items utt 'Word))
    (mapcar (lambda (seg) (format fd "S\t%s\t%f\t%f\n" (item.name seg)
                                  (item.feat seg "segment_start") (item.feat seg "end")))
      (utt.relation.items utt 'Segment))
    (fclose fd)))
"""


def _scheme_string(text: str) -> str:
    clean = "".join(c if c.isprintable() else " " for c in text)
    return '"' + clean.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _require(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        raise SynthError(f"{binary} is not installed; install the synthesizer with:\n  "
                         f"{INSTALL_HINT}")
    return path


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    err = proc.stderr.strip() + proc.stdout.strip()
    if proc.returncode != 0 or "SIOD ERROR" in err:
        raise SynthError(f"{what} failed (exit {proc.returncode}): {err[-800:]}")


@dataclass(frozen=True)
class _Word:
    name: str
    phones: tuple[tuple[str, float, float, int], ...]  # radio phone, start, end, stress


def _parse_festival(path: Path) -> tuple[list[_Word], list[tuple[str, float, float]]]:
    words: list[tuple[str, list[tuple[str, float, float, int]]]] = []
    segments = []
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.split("\t")
        if parts[0] == "W":
            words.append((parts[1], []))
        elif parts[0] == "P":
            words[-1][1].append((parts[1], float(parts[2]), float(parts[3]), int(float(parts[4]))))
        elif parts[0] == "S":
            segments.append((parts[1], float(parts[2]), float(parts[3])))
    merged: list[_Word] = []
    pending = ""
    for name, phones in words:  # festival gives "'s" of "another's" its own empty word
        if not phones:
            if merged:
                merged[-1] = _Word(merged[-1].name + name, merged[-1].phones)
            else:
                pending += name
            continue
        merged.append(_Word(pending + name, tuple(phones)))
        pending = ""
    return merged, segments


def _festival_analyse(voice: Voice, sentences: Sequence[str], tmp: Path,
                      with_audio: bool) -> list[tuple[list[_Word], list, Path | None]]:
    """Synthesize ``sentences`` in one festival process; words, segments and wav per sentence."""
    festival = _require("festival")
    lines = [_SCHEME, f"({voice.ident})"]
    outs = []
    for i, text in enumerate(sentences):
        wav = tmp / f"{i}.wav" if with_audio else None
        align = tmp / f"{i}.txt"
        wav_arg = f'"{wav.as_posix()}"' if wav else "nil"
        lines.append(f"(lp_dump (utt.synth (eval (list 'Utterance 'Text {_scheme_string(text)})))"
                     f' {wav_arg} "{align.as_posix()}")')
        outs.append((wav, align))
    script = tmp / "batch.scm"
    script.write_text("\n".join(lines) + "\n", encoding="utf-8")
    try:
        _run([festival, "-b", str(script)], f"festival voice {voice.name}")
    except SynthError as err:
        if "unbound variable" in str(err):
            raise SynthError(f"festival voice {voice.name} ({voice.ident}) is not installed; "
                             f"install {voice.package}:\n  {INSTALL_HINT}") from err
        raise
    results = []
    for (wav, align), text in zip(outs, sentences, strict=True):
        if not align.is_file() or (wav is not None and not wav.is_file()):
            raise SynthError(f"festival voice {voice.name} wrote no output for {text!r}")
        words, segments = _parse_festival(align)
        results.append((words, segments, wav))
    return results


def _read_wav_16k(path: Path) -> np.ndarray:
    data, sr = soundfile.read(str(path), dtype="float32", always_2d=True)
    wave = torch.from_numpy(np.ascontiguousarray(data.mean(axis=1)))
    if sr != SAMPLE_RATE:
        wave = torchaudio.functional.resample(wave, int(sr), SAMPLE_RATE)
    return wave.numpy().astype(np.float32)


def _festival_speech(voice: Voice, sentences: Sequence[str],
                     tmp: Path) -> list[AlignedSpeech | None]:
    out: list[AlignedSpeech | None] = []
    for text, (words, segments, wav) in zip(
            sentences, _festival_analyse(voice, sentences, tmp, True), strict=True):
        assert wav is not None
        out.append(_aligned(text, _read_wav_16k(wav), words, segments))
    return out


def _aligned(text: str, audio: np.ndarray, words: Sequence[_Word],
             segments: Sequence[tuple[str, float, float]]) -> AlignedSpeech | None:
    """Phones are the synthesizer's Segment relation; words span their first to last syllable
    segment. Festival's post-lexical rules add segments that belong to no syllable (the "r" of
    "early", "later"): each joins the word it touches. ``None`` if the result does not check out
    (see :func:`check_alignment`)."""
    stress = {(round(a, 6), round(b, 6)): st for w in words for _, a, b, st in w.phones}
    phones = tuple((festival_to_arpabet(p, stress.get((round(a, 6), round(b, 6)), 0)), a, b)
                   for p, a, b in segments if p != "pau")
    word_spans = _absorb_orphans(
        [[w.name.lower(), w.phones[0][1], w.phones[-1][2]] for w in words], phones)
    segment_end = segments[-1][2] if segments else 0.0
    n_end = int(round(segment_end * SAMPLE_RATE))
    if audio.shape[0] > n_end:  # diphone voices run ~25 ms past the final pause: trim it
        audio = audio[:n_end]
    speech = AlignedSpeech(text, audio, word_spans, phones, segment_end)
    if check_alignment(speech.words, speech.phones, segment_end, audio.shape[0] / SAMPLE_RATE):
        return None
    return speech


def _absorb_orphans(spans: list[list], phones: Sequence[tuple[str, float, float]],
                    ) -> tuple[tuple[str, float, float], ...]:
    """Extend a word over an adjacent phone that lies in no word (previous word first)."""
    for _, a, b in phones:
        if any(w[1] - 1e-6 <= a and b <= w[2] + 1e-6 for w in spans):
            continue
        before = [w for w in spans if abs(w[2] - a) < 1e-6]
        after = [w for w in spans if abs(w[1] - b) < 1e-6]
        if before:
            before[0][2] = b
        elif after:
            after[0][1] = a
    return tuple((w, a, b) for w, a, b in spans)


def _flite_segments(text: str, voice: Voice, wav: Path) -> list[tuple[str, float, float]]:
    flite = _require("flite")
    proc = subprocess.run([flite, "-voice", voice.ident, "-psdur", "-t", text, "-o", str(wav)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not wav.is_file():
        raise SynthError(f"flite voice {voice.name} failed on {text!r}: {proc.stderr[-400:]}")
    segments = []
    start = 0.0
    for tok in proc.stdout.split():
        name, _, end = tok.rpartition(":")
        segments.append((name, start, float(end)))
        start = float(end)
    return segments


def _is_vowel(radio_phone: str) -> bool:
    return festival_to_arpabet(radio_phone, 0)[-1:] == "0"


def _flite_speech(voice: Voice, sentences: Sequence[str],
                  tmp: Path) -> list[AlignedSpeech | None]:
    """flite prints segment times but not words: words come from festival's analysis of the same
    text (same CMU lexicon), matched phone by phone (vowels may differ: flite reduces some
    differently; flite's phone is kept); a sentence where the two disagree otherwise is skipped.
    """
    analysis = _festival_analyse(VOICES["kal_diphone"], sentences, tmp, False)
    out: list[AlignedSpeech | None] = []
    for i, (text, (words, fest_segments, _)) in enumerate(
            zip(sentences, analysis, strict=True)):
        wav = tmp / f"flite{i}.wav"
        segments = _flite_segments(text, voice, wav)
        spoken = [s for s in segments if s[0] != "pau"]
        fest = [s for s in fest_segments if s[0] != "pau"]
        if len(spoken) != len(fest) or any(
                a[0] != b[0] and not (_is_vowel(a[0]) and _is_vowel(b[0]))
                for a, b in zip(spoken, fest, strict=True)):
            out.append(None)
            continue
        position = {(round(a, 6), round(b, 6)): k for k, (_, a, b) in enumerate(fest)}
        timed = [_Word(w.name, tuple((*spoken[position[(round(a, 6), round(b, 6))]], st)
                                     for _, a, b, st in w.phones)) for w in words]
        out.append(_aligned(text, _read_wav_16k(wav), timed, segments))
    return out


def change_speed(speech: AlignedSpeech, speed: float) -> AlignedSpeech:
    """Speed perturbation (Kaldi's ``speed`` / sox ``speed``): the audio is resampled as if it
    had been recorded at ``speed`` × 16 kHz, so it lasts 1/``speed`` as long, with pitch and
    formants scaled by ``speed``; every time is divided by ``speed`` (alignments stay exact)."""
    if speed == 1.0:
        return speech
    wave = torchaudio.functional.resample(torch.from_numpy(speech.audio),
                                          round(SAMPLE_RATE * speed), SAMPLE_RATE)

    def scaled(items: tuple[tuple[str, float, float], ...]) -> tuple[tuple[str, float, float], ...]:
        return tuple((name, a / speed, b / speed) for name, a, b in items)

    return AlignedSpeech(speech.text, wave.numpy().astype(np.float32), scaled(speech.words),
                         scaled(speech.phones), speech.segment_end / speed)


def synthesize(voice: str, sentences: Sequence[str]) -> list[AlignedSpeech | None]:
    """Synthesize ``sentences`` with one voice (``NAME`` or ``NAME@SPEED``); ``None`` for a
    sentence whose times do not check out (flite: phones differ from festival's analysis, needed
    for word times)."""
    v, speed = parse_voice(voice)
    with tempfile.TemporaryDirectory(prefix="layerprobe-synth-") as tmp:
        if v.engine == "festival":
            out = _festival_speech(v, sentences, Path(tmp))
        else:
            out = _flite_speech(v, sentences, Path(tmp))
    return [None if s is None else change_speed(s, speed) for s in out]


# ---------------------------------------------------------------------------------------------
# checks and output


def check_alignment(words: Sequence[tuple[str, float, float]],
                    phones: Sequence[tuple[str, float, float]], segment_end: float,
                    duration: float, tolerance: float = COVER_TOLERANCE) -> list[str]:
    """Problems with one aligned utterance (empty list if fine).

    The synthesizer's segments must cover the audio within ``tolerance`` seconds, phones must be
    ordered and non-overlapping, and every word must be exactly a run of whole phones.
    """
    problems = []
    if abs(segment_end - duration) > tolerance:
        problems.append(f"segments end at {segment_end:.3f} s but the audio lasts "
                        f"{duration:.3f} s")
    for (p, a, b), nxt in zip(phones, [*phones[1:], None], strict=True):
        if b <= a:
            problems.append(f"phone {p} at {a:.3f} s is empty")
        if nxt is not None and nxt[1] < b - 1e-6:
            problems.append(f"phone {nxt[0]} at {nxt[1]:.3f} s overlaps {p}")
        if b > duration + tolerance:
            problems.append(f"phone {p} ends at {b:.3f} s, past the audio")
    starts = {round(a, 5) for _, a, _ in phones}
    ends = {round(b, 5) for _, _, b in phones}
    for w, a, b in words:
        inside = [p for p in phones if p[1] >= a - 1e-6 and p[2] <= b + 1e-6]
        if not inside or round(a, 5) not in starts or round(b, 5) not in ends:
            problems.append(f"word {w!r} ({a:.3f}–{b:.3f} s) is not a run of phones")
    covered = sum(1 for p in phones if any(p[1] >= a - 1e-6 and p[2] <= b + 1e-6
                                           for _, a, b in words))
    if covered != len(phones):
        problems.append(f"{len(phones) - covered} phone(s) outside every word")
    return problems


def _flac_bytes(audio: np.ndarray) -> bytes:
    buf = io.BytesIO()
    soundfile.write(buf, np.clip(audio, -1.0, 1.0), SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def write_utterance(speech: AlignedSpeech, out_dir: Path, utt_id: str) -> Path:
    """Write ``utt_id.flac`` and ``utt_id.TextGrid`` atomically; returns the audio path."""
    duration = speech.audio.shape[0] / SAMPLE_RATE
    clip = min  # the last phone may run past the audio by < tolerance (flite): clip it
    words = [Interval(a, clip(b, duration), w) for w, a, b in speech.words]
    phones = [Interval(a, clip(b, duration), p) for p, a, b in speech.phones]
    audio_path = out_dir / f"{utt_id}.flac"
    atomic_write_bytes(audio_path, _flac_bytes(speech.audio))
    atomic_write_bytes(out_dir / f"{utt_id}.TextGrid",
                       format_textgrid({"words": words, "phones": phones}, duration)
                       .encode("utf-8"))
    return audio_path


def _check_written(audio_path: Path) -> None:
    """Re-read what was written and check it (the corpus reader's view)."""
    from layerprobe.textgrids import read_textgrid

    duration = soundfile.info(str(audio_path)).frames / SAMPLE_RATE
    grid = read_textgrid(audio_path.with_suffix(".TextGrid"))
    words = [(iv.text, iv.start, iv.end) for iv in grid.tiers["words"] if iv.text]
    phones = [(iv.text, iv.start, iv.end) for iv in grid.tiers["phones"] if iv.text]
    problems = check_alignment(words, phones, grid.xmax, duration, tolerance=1e-3)
    for name in ("words", "phones"):
        tier = grid.tiers[name]
        if abs(tier[0].start) > 1e-6 or abs(tier[-1].end - duration) > COVER_TOLERANCE:
            problems.append(f"tier {name} covers {tier[0].start:.3f}–{tier[-1].end:.3f} s, "
                            f"audio {duration:.3f} s")
    if problems:
        raise SynthError(f"{audio_path}: " + "; ".join(problems))


SECONDS_PER_SENTENCE_GUESS = 2.8
CHUNK = 16
MAX_FAILED_CHUNKS = 3  # a voice whose sentences all fail the alignment check this often: error
VOICE_DONE = "voice.json"  # written in a voice's folder once all its utterances are written
TEXT_MODES = ("shared", "per-voice")


def _voice_sentences(voice_index: int, seed: int, text: str) -> Iterator[str]:
    """The grammar's sentence stream a voice reads: the same for every voice (``shared``), or
    one stream per voice (``per-voice``: seeded by the seed and the voice's position)."""
    return iter_sentences(seed if text == "shared" else seed * 1_000_003 + voice_index + 1)


def _synthesize_voice(voice: str, out: Path, texts: Sequence[str] | None,
                      pool: Iterator[str] | None, target: float | None,
                      bar: tqdm) -> tuple[list[tuple[str, ...]], int]:
    """Write one voice's utterances into ``out/voice``; returns (transcript rows, skipped)."""
    rows: list[tuple[str, ...]] = []
    skipped, seconds, n, start, failed_chunks = 0, 0.0, 0, 0, 0
    while True:
        if pool is not None:
            assert target is not None
            if seconds >= target:
                break
            need = max(1, min(CHUNK, int(np.ceil((target - seconds)
                                                 / SECONDS_PER_SENTENCE_GUESS))))
            chunk = [next(pool) for _ in range(need)]
        else:
            assert texts is not None
            if start >= len(texts):
                break
            chunk = list(texts[start:start + CHUNK])
            start += len(chunk)
        results = synthesize(voice, chunk)
        speeches = [r for r in results if r is not None]
        skipped += len(chunk) - len(speeches)
        failed_chunks = 0 if speeches else failed_chunks + 1
        if failed_chunks >= MAX_FAILED_CHUNKS:
            raise SynthError(f"voice {voice}: none of {failed_chunks * len(chunk)} sentences in "
                             "a row passed the alignment check (its segment times do not match "
                             "its audio)")
        for speech in speeches:
            if target is not None and seconds >= target:
                break
            n += 1
            utt_id = f"{voice}_{n:05d}"
            audio_path = write_utterance(speech, out / voice, utt_id)
            _check_written(audio_path)
            dur = speech.audio.shape[0] / SAMPLE_RATE
            seconds += dur
            rows.append((f"{voice}/{utt_id}", voice, f"{dur:.3f}", speech.text))
            bar.update(dur if target is not None else 1)
        if pool is None:
            bar.update(len(chunk) - len(speeches))
    return rows, skipped


def synthesize_corpus(
    out_dir: str | Path,
    *,
    voices: Sequence[str] = DEFAULT_VOICES,
    sentences: Sequence[str] | str | Path | None = None,
    minutes: float | None = None,
    seed: int = 0,
    text: str = "shared",
    progress: bool = True,
) -> Path:
    """Synthesize an aligned corpus into ``out_dir``; returns ``out_dir``.

    ``voices``: names, or ``NAME@SPEED`` for a speed-perturbed variant (:func:`change_speed`).
    ``sentences`` (a list or a text file, one per line): every voice reads every sentence.
    ``minutes``: about that much speech in total, split evenly over the voices, from the
    built-in grammar (seeded by ``seed``): every voice reads the same stream (``text="shared"``,
    so word types repeat across voices) or a stream of its own (``"per-voice"``).

    Resumable: a voice whose folder holds a finished ``voice.json`` for the same request is kept
    as it is, so an interrupted command continues with the next voice, and a finished corpus is
    a cache. A voice that fails to synthesize (e.g. its package is missing) is skipped with a
    warning naming it and recorded in ``synth.json``; only if every voice fails is it an error.
    """
    out = Path(out_dir)
    if not voices:
        raise ValueError("--voices: at least one voice is needed")
    for v in voices:
        parse_voice(v)
    if len(set(voices)) != len(voices):
        raise ValueError(f"--voices: duplicates in {list(voices)}")
    if (sentences is None) == (minutes is None):
        raise ValueError("give exactly one of --sentences and --minutes")
    if minutes is not None and minutes <= 0:
        raise ValueError(f"--minutes must be positive, got {minutes}")
    if text not in TEXT_MODES:
        raise ValueError(f"--text must be one of {list(TEXT_MODES)}, got {text!r}")
    _require("festival")  # every voice needs it (flite voices: for the word analysis)
    if isinstance(sentences, str | Path):
        sentence_list: list[str] | None = read_sentences(sentences)
    else:
        sentence_list = list(sentences) if sentences is not None else None
    out.mkdir(parents=True, exist_ok=True)
    target = None if minutes is None else minutes * 60.0 / len(voices)
    bar = tqdm(total=round(target * len(voices)) if target else
               len(sentence_list or []) * len(voices),
               unit="s" if target else "utt", desc="synthesizing", disable=not progress,
               bar_format="{l_bar}{bar}| {n:.0f}/{total_fmt} [{elapsed}<{remaining}]")
    rows: list[tuple[str, ...]] = []
    skipped = 0
    failed: dict[str, str] = {}
    for k, voice in enumerate(voices):
        request = {"voice": voice, "seed": seed, "text": text, "target_seconds": target,
                   "sentences": sentence_list}
        done = out / voice / VOICE_DONE
        if done.is_file():
            record = json.loads(done.read_text(encoding="utf-8"))
            if record.get("request") == request:
                rows += [tuple(r) for r in record["rows"]]
                skipped += int(record["skipped"])
                bar.update(sum(float(r[2]) for r in record["rows"]) if target
                           else len(sentence_list or []))
                continue
        pool = _voice_sentences(k, seed, text) if target else None
        try:
            voice_rows, voice_skipped = _synthesize_voice(voice, out, sentence_list, pool,
                                                          target, bar)
        except SynthError as err:
            failed[voice] = str(err)
            warnings.warn(f"voice {voice} failed to synthesize and is skipped: {err}",
                          SynthWarning, stacklevel=2)
            continue
        atomic_write_bytes(done, (json.dumps({"request": request, "rows": voice_rows,
                                              "skipped": voice_skipped}) + "\n").encode())
        rows += voice_rows
        skipped += voice_skipped
    bar.close()
    if not rows:
        raise SynthError(f"{out}: no utterance was synthesized"
                         + (f" (failed voices: {'; '.join(failed.values())})" if failed else ""))
    transcript = "id\tvoice\tseconds\ttext\n" + "".join("\t".join(r) + "\n" for r in rows)
    atomic_write_bytes(out / "transcripts.tsv", transcript.encode("utf-8"))
    meta = {"generator": "layerprobe synth", "voices": list(voices), "seed": seed,
            "minutes": minutes, "text": text,
            "sentences": None if sentence_list is None else len(sentence_list),
            "utterances": len(rows), "skipped_sentences": skipped, "failed_voices": failed,
            "seconds": round(sum(float(r[2]) for r in rows), 3), "sample_rate": SAMPLE_RATE,
            "command": _command(voices, sentences, minutes, seed, text)}
    atomic_write_bytes(out / "synth.json", (json.dumps(meta, indent=2) + "\n").encode("utf-8"))
    return out


def _command(voices: Sequence[str], sentences: object, minutes: float | None, seed: int,
             text: str) -> str:
    src = f"--minutes {minutes:g}" if minutes is not None else (
        f"--sentences {sentences}" if isinstance(sentences, str | Path) else "--sentences (list)")
    extra = f" --text {text}" if text != "shared" else ""
    return f"layerprobe synth --out DIR --voices {' '.join(voices)} {src} --seed {seed}{extra}"


# ---------------------------------------------------------------------------------------------
# CLI


def add_synth_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``layerprobe synth``."""
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--voices", nargs="+", default=list(DEFAULT_VOICES), metavar="VOICE",
                        help=f"voices (default: {' '.join(DEFAULT_VOICES)}; "
                             f"available: {', '.join(VOICES)}); NAME@SPEED for a "
                             "speed-perturbed variant, e.g. flite_rms@1.1")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--sentences", type=Path, help="text file, one sentence per line "
                                                    "(every voice reads all of them)")
    src.add_argument("--minutes", type=float, help="total minutes of speech from the built-in "
                                                   "sentence grammar, split over the voices")
    parser.add_argument("--seed", type=int, default=0, help="sentence grammar seed (default 0)")
    parser.add_argument("--text", choices=TEXT_MODES, default="shared",
                        help="with --minutes: every voice reads the same sentences (shared, the "
                        "default) or its own (per-voice)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_synth(args: argparse.Namespace) -> int:
    """``layerprobe synth``: returns the exit status (errors printed to stderr)."""
    try:
        out = synthesize_corpus(args.out, voices=args.voices, sentences=args.sentences,
                                minutes=args.minutes, seed=args.seed, text=args.text,
                                progress=not args.no_progress)
    except (SynthError, ValueError) as err:
        print(f"layerprobe synth: error: {err}", file=sys.stderr)
        return 1
    meta = json.loads((out / "synth.json").read_text(encoding="utf-8"))
    print(f"wrote {meta['utterances']} utterances ({meta['seconds'] / 60:.2f} min) to {out}"
          + (f"; {meta['skipped_sentences']} sentence(s) skipped" if meta["skipped_sentences"]
             else "")
          + (f"; voice(s) skipped: {', '.join(meta['failed_voices'])}" if meta["failed_voices"]
             else ""))
    return 0
