"""Praat TextGrid I/O: long and short text formats, as Montreal Forced Aligner writes them.

The reader keeps every interval as written (zero-length and inverted ones included) so that the
corpus reader can report them; the ``textgrid`` package silently drops those, so it serves as
the independent reference in the tests instead.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from layerprobe.atomic import atomic_write_bytes


@dataclass(frozen=True)
class Interval:
    start: float
    end: float
    text: str


@dataclass(frozen=True)
class TextGridData:
    xmin: float
    xmax: float
    tiers: dict[str, tuple[Interval, ...]]  # interval tiers only, by name


# A Praat text file is a stream of numbers and quoted strings; everything else (keys, "item [1]:",
# "<exists>", comments after "!") is decoration. Bracketed indices are removed before tokenizing.
_TOKEN = re.compile(r'"((?:[^"]|"")*)"|([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)')
_BRACKETS = re.compile(r"\[\s*\d*\s*\]")


def _decode(raw: bytes) -> str:
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return raw.decode("utf-16")
    if raw.startswith(codecs.BOM_UTF8):
        return raw[3:].decode("utf-8")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _tokens(text: str) -> list[str | float]:
    out: list[str | float] = []
    for line in text.splitlines():
        line = _BRACKETS.sub(" ", line)
        for match in _TOKEN.finditer(line):
            if match.group(1) is not None:
                out.append(match.group(1).replace('""', '"'))
            else:
                out.append(float(match.group(2)))
    return out


def read_textgrid(path: str | Path) -> TextGridData:
    """Parse a long- or short-format TextGrid; ``ValueError`` naming the file if it is malformed."""
    path = Path(path)
    try:
        text = _decode(path.read_bytes())
    except OSError as err:
        raise ValueError(f"{path}: cannot read TextGrid ({err.strerror or err})") from err
    toks = _tokens(text)
    pos = 0

    def take(kind: type) -> float | str:
        nonlocal pos
        if pos >= len(toks):
            raise ValueError(f"{path}: TextGrid ends early")
        tok = toks[pos]
        pos += 1
        if kind is float and not isinstance(tok, float):
            raise ValueError(f"{path}: expected a number in the TextGrid, found {tok!r}")
        if kind is str and not isinstance(tok, str):
            raise ValueError(f"{path}: expected a string in the TextGrid, found {tok!r}")
        return tok

    if len(toks) < 2 or toks[0] != "ooTextFile" or toks[1] != "TextGrid":
        raise ValueError(f"{path}: not a text TextGrid (no 'ooTextFile'/'TextGrid' header)")
    pos = 2
    xmin, xmax = float(take(float)), float(take(float))
    n_tiers = int(take(float))
    tiers: dict[str, tuple[Interval, ...]] = {}
    for _ in range(n_tiers):
        kind, name = str(take(str)), str(take(str))
        take(float)
        take(float)
        size = int(take(float))
        if kind == "IntervalTier":
            intervals = []
            for _ in range(size):
                start, end, label = float(take(float)), float(take(float)), str(take(str))
                intervals.append(Interval(start, end, label))
            tiers.setdefault(name, tuple(intervals))
        elif kind == "TextTier":
            for _ in range(size):
                take(float)
                take(str)
        else:
            raise ValueError(f"{path}: unknown tier class {kind!r}")
    return TextGridData(xmin, xmax, tiers)


def _quote(text: str) -> str:
    return '"' + text.replace('"', '""') + '"'


def fill_gaps(segments: Sequence[Interval], xmax: float) -> list[Interval]:
    """Intervals covering [0, xmax]: ``segments`` (sorted, non-overlapping) plus empty gaps."""
    out: list[Interval] = []
    t = 0.0
    for seg in segments:
        if seg.start > t + 1e-9:
            out.append(Interval(t, seg.start, ""))
        out.append(seg)
        t = seg.end
    if xmax > t + 1e-9:
        out.append(Interval(t, xmax, ""))
    return out


def format_textgrid(tiers: Mapping[str, Sequence[Interval]], xmax: float) -> str:
    """Long-format TextGrid text (MFA layout); tiers' gaps are filled with empty intervals."""
    lines = ['File type = "ooTextFile"', 'Object class = "TextGrid"', "",
             "xmin = 0 ", f"xmax = {xmax:.6f} ", "tiers? <exists> ", f"size = {len(tiers)} ",
             "item []: "]
    for i, (name, segments) in enumerate(tiers.items(), start=1):
        intervals = fill_gaps(segments, xmax)
        lines += [f"    item [{i}]:", '        class = "IntervalTier" ',
                  f"        name = {_quote(name)} ", "        xmin = 0 ",
                  f"        xmax = {xmax:.6f} ", f"        intervals: size = {len(intervals)} "]
        for j, iv in enumerate(intervals, start=1):
            lines += [f"        intervals [{j}]:", f"            xmin = {iv.start:.6f} ",
                      f"            xmax = {iv.end:.6f} ", f"            text = {_quote(iv.text)} "]
    return "\n".join(lines) + "\n"


def write_textgrid(path: str | Path, tiers: Mapping[str, Sequence[Interval]], xmax: float) -> None:
    """Write a long-format TextGrid atomically."""
    atomic_write_bytes(path, format_textgrid(tiers, xmax).encode("utf-8"))
