"""Reading aligned speech corpora: audio plus word and phone alignments.

A corpus is one of
- a directory tree of audio files with a TextGrid beside each (same stem);
- a LibriSpeech-style tree (``SPK/CH/SPK-CH-UTT.flac``) with its TextGrids in a parallel tree
  (``alignments=`` or found next to it: ``DIR/alignments``, ``DIR-alignments``, ``DIR_alignments``,
  ``PARENT/alignments/NAME``), matched by file stem;
- a manifest (``.tsv`` or ``.jsonl``): audio path, alignment path, optional speaker and split;
  relative paths are relative to the manifest. A TSV may start with a header naming its columns
  (``audio``, ``alignment``, ``speaker``, ``split``, ``id``, any order); without one the columns
  are ``audio, alignment, speaker, split``.

Silence marks are dropped, stress digits stripped and phones folded onto the 39 ARPAbet phones.
A bad utterance (unreadable audio, missing tier, intervals past the end of the audio, overlapping
or empty words) is skipped with a :class:`CorpusWarning` naming the file and the reason, and a
summary at the end; ``strict=True`` raises on the first one instead.
"""

from __future__ import annotations

import json
import re
import warnings
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile
import torch
import torchaudio

from layerprobe.phones import is_silence, normalize_phone
from layerprobe.textgrids import Interval, read_textgrid

SAMPLE_RATE = 16000
AUDIO_SUFFIXES = (".flac", ".wav", ".ogg", ".opus", ".mp3", ".aiff", ".aif", ".au", ".sph")
END_TOLERANCE = 0.05  # seconds an interval may run past the end of the audio
MANIFEST_SUFFIXES = (".tsv", ".jsonl")
_LIBRI_STEM = re.compile(r"^(\d+)-(\d+)-(\d+)$")


class CorpusWarning(UserWarning):
    """A problem with one utterance of a corpus (the utterance is skipped)."""


class CorpusError(ValueError):
    """A corpus that cannot be used (or a bad utterance under ``strict=True``)."""


@dataclass(frozen=True)
class Segment:
    label: str
    start: float  # seconds
    end: float


@dataclass(frozen=True)
class Utterance:
    id: str
    audio_path: Path
    alignment_path: Path | None
    speaker: str | None
    split: str | None
    duration: float  # seconds, from the audio header
    words: tuple[Segment, ...]
    phones: tuple[Segment, ...]


@dataclass(frozen=True)
class Corpus:
    name: str
    root: Path
    utterances: tuple[Utterance, ...]
    warnings: tuple[str, ...]

    @property
    def duration(self) -> float:
        """Total audio in seconds."""
        return float(sum(u.duration for u in self.utterances))


@dataclass(frozen=True)
class _Entry:
    """An utterance before its files are read."""

    id: str
    audio: Path
    alignment: Path | None
    speaker: str | None
    split: str | None


class _BadUtterance(Exception):
    def __init__(self, path: Path, reason: str, kind: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.kind = kind


def bundled_corpus_path() -> Path:
    """The synthetic aligned corpus that ships in the package (the default ``--data``)."""
    return Path(__file__).resolve().parent / "data" / "corpus"


def load_audio(path: str | Path, *, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Read an audio file as a mono float32 tensor ``[n]`` at ``sample_rate`` (stereo averaged)."""
    path = Path(path)
    try:
        data, sr = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (OSError, RuntimeError, soundfile.LibsndfileError) as err:
        raise ValueError(f"{path}: cannot read audio ({err})") from err
    wave = torch.from_numpy(np.ascontiguousarray(data.mean(axis=1), dtype=np.float32))
    if sr != sample_rate:
        wave = torchaudio.functional.resample(wave, int(sr), sample_rate)
    return wave.contiguous()


def audio_duration(path: str | Path) -> float:
    """Duration in seconds from the audio header; ``ValueError`` naming the file if unreadable."""
    try:
        info = soundfile.info(str(path))
    except (OSError, RuntimeError, soundfile.LibsndfileError) as err:
        raise ValueError(f"{path}: cannot read audio ({err})") from err
    if info.samplerate <= 0 or info.frames <= 0:
        raise ValueError(f"{path}: audio has no samples")
    return info.frames / info.samplerate


# ---------------------------------------------------------------------------------------------
# finding utterances


def _audio_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file()
                  and not p.name.startswith("."))


def _alignment_root(root: Path, alignments: Path | None) -> Path | None:
    if alignments is not None:
        if not alignments.is_dir():
            raise CorpusError(f"alignments {alignments}: not a directory")
        return alignments
    for cand in (root / "alignments", root.parent / f"{root.name}-alignments",
                 root.parent / f"{root.name}_alignments", root.parent / "alignments" / root.name):
        if cand.is_dir():
            return cand
    return None


def _speaker_of(audio: Path, root: Path) -> str | None:
    match = _LIBRI_STEM.match(audio.stem)
    if match:
        return match.group(1)
    rel = audio.relative_to(root)
    return rel.parts[0] if len(rel.parts) > 1 else None


def _tree_entries(root: Path, alignments: Path | None) -> list[_Entry]:
    audio_files = _audio_files(root)
    if not audio_files:
        raise CorpusError(
            f"corpus {root}: no audio files found (looked for {', '.join(AUDIO_SUFFIXES)})")
    align_root = _alignment_root(root, alignments)
    index: dict[str, Path] = {}
    if align_root is not None:
        for tg in sorted(align_root.rglob("*.TextGrid")):
            index.setdefault(tg.stem, tg)
    entries = []
    for audio in audio_files:
        beside = audio.with_suffix(".TextGrid")
        alignment = beside if beside.is_file() else index.get(audio.stem)
        rel = audio.relative_to(root).with_suffix("")
        utt_id = audio.stem if _LIBRI_STEM.match(audio.stem) else rel.as_posix()
        entries.append(_Entry(utt_id, audio, alignment, _speaker_of(audio, root), None))
    return entries


def _manifest_rows(path: Path) -> list[dict[str, str]]:
    text = path.read_text(encoding="utf-8")
    rows: list[dict[str, str]] = []
    if path.suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise CorpusError(f"{path}:{n}: invalid JSON ({err.msg})") from err
                if not isinstance(row, dict):
                    raise CorpusError(f"{path}:{n}: expected a JSON object per line")
                rows.append({k: str(v) for k, v in row.items() if v is not None})
        return rows
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    columns = ["audio", "alignment", "speaker", "split"]
    header = {"audio", "audio_path", "path", "alignment", "alignment_path", "textgrid"}
    if lines and header & {c.strip().lower() for c in lines[0].split("\t")}:
        columns = [c.strip().lower() for c in lines[0].split("\t")]
        lines = lines[1:]
    for line in lines:
        rows.append({c: v.strip() for c, v in zip(columns, line.split("\t"), strict=False)
                     if v.strip()})
    return rows


def _manifest_entries(path: Path) -> list[_Entry]:
    entries = []
    for n, row in enumerate(_manifest_rows(path), start=1):
        audio_key = next((k for k in ("audio", "audio_path", "path") if k in row), None)
        if audio_key is None:
            raise CorpusError(f"{path}: row {n} has no audio path (columns: {sorted(row)})")
        audio = path.parent / row[audio_key]
        align = row.get("alignment") or row.get("alignment_path") or row.get("textgrid")
        alignment = path.parent / align if align else None
        if alignment is None and audio.with_suffix(".TextGrid").is_file():
            alignment = audio.with_suffix(".TextGrid")
        utt_id = row.get("id") or audio.stem
        entries.append(_Entry(utt_id, audio, alignment, row.get("speaker"), row.get("split")))
    if not entries:
        raise CorpusError(f"manifest {path}: no rows")
    return entries


# ---------------------------------------------------------------------------------------------
# reading one utterance


def _tier(tiers: dict[str, tuple[Interval, ...]], name: str, path: Path) -> tuple[Interval, ...]:
    if name in tiers:
        return tiers[name]
    for key, value in tiers.items():  # MFA multi-speaker files: "SPEAKER - words"
        if key.lower() == name.lower() or key.lower().endswith(f" - {name.lower()}"):
            return value
    raise _BadUtterance(path, f"no tier {name!r} (tiers: {sorted(tiers)})", "missing tier")


def _check_tier(intervals: tuple[Interval, ...], duration: float, path: Path, tier: str) -> None:
    for iv in intervals:
        if iv.end > duration + END_TOLERANCE:
            raise _BadUtterance(
                path, f"tier {tier!r}: interval {iv.text!r} ends at {iv.end:.3f} s, past the end "
                f"of the audio ({duration:.3f} s)", "past end of audio")
        if iv.start < -1e-6:
            raise _BadUtterance(path, f"tier {tier!r}: interval {iv.text!r} starts before 0",
                                "negative time")


def _words(intervals: tuple[Interval, ...], path: Path) -> tuple[Segment, ...]:
    words = []
    prev_end = -np.inf
    for iv in intervals:
        if is_silence(iv.text):
            if iv.start < prev_end - 1e-6:
                raise _BadUtterance(path, f"overlapping interval at {iv.start:.3f} s in the word "
                                          "tier", "overlapping words")
            prev_end = max(prev_end, iv.end)
            continue
        if iv.end - iv.start <= 1e-6:
            raise _BadUtterance(path, f"empty word {iv.text!r} at {iv.start:.3f}–{iv.end:.3f} s",
                                "empty word")
        if iv.start < prev_end - 1e-6:
            raise _BadUtterance(path, f"word {iv.text!r} at {iv.start:.3f} s overlaps the "
                                      f"previous interval (ends {prev_end:.3f} s)",
                                "overlapping words")
        prev_end = iv.end
        words.append(Segment(iv.text.strip().lower(), iv.start, iv.end))
    return tuple(words)


def _phones(intervals: tuple[Interval, ...], path: Path,
            unknown: Counter[str]) -> tuple[Segment, ...]:
    phones = []
    prev_end = -np.inf
    for iv in intervals:
        if iv.start < prev_end - 1e-6:
            raise _BadUtterance(path, f"overlapping phone intervals at {iv.start:.3f} s",
                                "overlapping phones")
        prev_end = max(prev_end, iv.end)
        if is_silence(iv.text) or iv.end - iv.start <= 1e-6:
            continue
        phone = normalize_phone(iv.text)
        if phone is None:
            unknown[iv.text.strip()] += 1
            continue
        phones.append(Segment(phone, iv.start, iv.end))
    return tuple(phones)


def read_utterance(entry: _Entry, word_tier: str, phone_tier: str,
                   unknown: Counter[str]) -> Utterance:
    """Read one utterance's header and alignment; raises ``_BadUtterance`` with the reason."""
    if entry.alignment is None:
        raise _BadUtterance(entry.audio, "no alignment (no TextGrid beside it or in the "
                                         "alignment tree)", "no alignment")
    if not entry.alignment.is_file():
        raise _BadUtterance(entry.alignment, "alignment file not found", "no alignment")
    try:
        duration = audio_duration(entry.audio)
    except ValueError as err:
        raise _BadUtterance(entry.audio, str(err).split(": ", 1)[-1], "unreadable audio") from err
    try:
        grid = read_textgrid(entry.alignment)
    except ValueError as err:
        raise _BadUtterance(entry.alignment, str(err).split(": ", 1)[-1],
                            "unreadable TextGrid") from err
    word_iv = _tier(grid.tiers, word_tier, entry.alignment)
    phone_iv = _tier(grid.tiers, phone_tier, entry.alignment)
    _check_tier(word_iv, duration, entry.alignment, word_tier)
    _check_tier(phone_iv, duration, entry.alignment, phone_tier)
    words = _words(word_iv, entry.alignment)
    phones = _phones(phone_iv, entry.alignment, unknown)
    return Utterance(entry.id, entry.audio, entry.alignment, entry.speaker, entry.split,
                     duration, words, phones)


# ---------------------------------------------------------------------------------------------


def _entries(source: Path, alignments: Path | None) -> tuple[list[_Entry], Path]:
    if source.is_dir():
        return _tree_entries(source, alignments), source
    if source.is_file():
        if source.suffix.lower() not in MANIFEST_SUFFIXES:
            raise CorpusError(f"corpus {source}: a file corpus must be a manifest "
                              f"({' or '.join(MANIFEST_SUFFIXES)})")
        return _manifest_entries(source), source.parent
    raise CorpusError(f"corpus {source}: no such file or directory")


def _select(entries: list[_Entry], max_utterances: int | None, seed: int) -> Iterable[int]:
    order = np.arange(len(entries))
    if max_utterances is not None and max_utterances < len(entries):
        order = np.random.default_rng(seed).permutation(len(entries))
    return order.tolist()


def load_corpus(
    source: str | Path | None = None,
    *,
    word_tier: str = "words",
    phone_tier: str = "phones",
    strict: bool = False,
    max_utterances: int | None = None,
    seed: int = 0,
    alignments: str | Path | None = None,
) -> Corpus:
    """Read a corpus (directory tree, LibriSpeech tree + alignment tree, or manifest).

    ``None`` (or ``""``) is the bundled synthetic corpus. ``max_utterances`` keeps a seeded random
    subset of the usable utterances, in corpus order.
    """
    if max_utterances is not None and max_utterances < 1:
        raise ValueError(f"max_utterances must be >= 1 or None, got {max_utterances}")
    path = bundled_corpus_path() if source in (None, "") else Path(source).expanduser()
    align = Path(alignments).expanduser() if alignments else None
    entries, root = _entries(path, align)
    ids = Counter(e.id for e in entries)
    dup = [i for i, c in ids.items() if c > 1]
    if dup:
        raise CorpusError(f"corpus {path}: duplicate utterance ids, e.g. {dup[:3]}")
    unknown: Counter[str] = Counter()
    kept: dict[int, Utterance] = {}
    problems: list[str] = []
    kinds: Counter[str] = Counter()
    for i in _select(entries, max_utterances, seed):
        if max_utterances is not None and len(kept) >= max_utterances:
            break
        try:
            kept[i] = read_utterance(entries[i], word_tier, phone_tier, unknown)
        except _BadUtterance as bad:
            if strict:
                raise CorpusError(f"{bad} (strict mode)") from None
            message = f"skipping utterance {entries[i].id}: {bad}"
            problems.append(message)
            kinds[bad.kind] += 1
            warnings.warn(message, CorpusWarning, stacklevel=2)
    messages = list(problems)
    if unknown:
        listing = ", ".join(f"{p!r} ×{n}" for p, n in unknown.most_common())
        messages.append(f"corpus {path}: unknown phones dropped (not in the 39 ARPAbet set): "
                        f"{listing}")
        warnings.warn(messages[-1], CorpusWarning, stacklevel=2)
    n_read = len(kept) + len(problems)
    if problems:
        summary = ", ".join(f"{n} {k}" for k, n in kinds.most_common())
        messages.append(f"corpus {path}: skipped {len(problems)} of {n_read} utterances "
                        f"({summary})")
        warnings.warn(messages[-1], CorpusWarning, stacklevel=2)
    if not kept:
        reasons = "; ".join(problems[:3]) or "nothing to read"
        raise CorpusError(f"corpus {path}: no usable utterance ({len(problems)} skipped: "
                          f"{reasons})")
    utterances = tuple(kept[i] for i in sorted(kept))
    name = "bundled" if source in (None, "") else path.stem if path.is_file() else path.name
    return Corpus(name=name, root=root, utterances=utterances, warnings=tuple(messages))
