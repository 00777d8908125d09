"""Probe targets: what each layer's pooled frames are compared with.

A probe is decided once from the corpus alignments (vocabulary, per-class caps, sampling, split of
every item); per utterance it gives *spans* of model frames plus targets, so one forward pass of a
model feeds every probe and every layer (:func:`pool_spans`).

- ``fbank``: 80 log-mel at 10 ms (the reference recipe), model frame t ↔ 10 ms frame
  round(t·100/frame_rate), on up to ``fbank_max_utterances`` seeded random utterances; frames get
  random splits.
- ``phone``: middle third of each phone segment, one-hot over the 39 ARPAbet phones.
- ``word``: whole word segments, one-hot over the ``word_vocab`` most frequent training words.
- ``word-embedding``: whole word segments, targets from a GloVe-format text file.
Segment items are capped per class (seeded sample) and dealt into ``n_splits * shards_per_split``
shards stratified by label (each class's shuffled items dealt into consecutive shards from a seeded
random start); split ``s % n_splits`` of shard ``s`` is the plain stratified split, and other split
seeds re-deal whole shards (:func:`layerprobe.cca.shard_groups`), so the protocol's spread over
seeds needs no second forward pass.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from layerprobe.cca import assign_splits
from layerprobe.corpus import Corpus, Segment
from layerprobe.extract import full_precision
from layerprobe.features import FBANK_DIM, fbank_frame_indices, log_mel_fbank
from layerprobe.phones import ARPABET39
from layerprobe.registry import OPTIONAL_PROBES, PROBES  # the names live in the registry

_EPS = 1e-6  # frame-boundary tolerance: 0.34 s × 50 Hz must give 17, not 17.000000000000004


@dataclass(frozen=True)
class ProbeConfig:
    phone_cap: int = 200
    word_cap: int = 15
    word_vocab: int = 500
    fbank_max_utterances: int = 500
    n_splits: int = 10
    shards_per_split: int = 2  # split seeds re-deal shards: >= 2 for a spread over seeds
    seed: int = 0
    word_embeddings: Path | None = None

    def __post_init__(self) -> None:
        for name in ("phone_cap", "word_cap", "word_vocab", "fbank_max_utterances"):
            if getattr(self, name) < 1:
                raise ValueError(f"[probes] {name} must be >= 1, got {getattr(self, name)}")
        if self.n_splits < 3:
            raise ValueError(f"[probes] n_splits must be >= 3 (train, dev, test), got "
                             f"{self.n_splits}")
        if self.shards_per_split < 1:
            raise ValueError(f"[probes] shards_per_split must be >= 1, got "
                             f"{self.shards_per_split}")
        if self.word_embeddings is not None and not isinstance(self.word_embeddings, Path):
            object.__setattr__(self, "word_embeddings", Path(self.word_embeddings))

    @property
    def n_shards(self) -> int:
        """Accumulator slots per probe: ``n_splits * shards_per_split``."""
        return self.n_splits * self.shards_per_split

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ProbeConfig:
        """From the ``[probes]`` table of an analysis config (``names`` is not ours: removed
        by the caller); unknown keys are an error; ``word_embeddings = ""`` means none."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"unknown key(s) {unknown} in [probes]; expected {sorted(fields)}")
        kw = dict(d)
        if "word_embeddings" in kw:
            kw["word_embeddings"] = Path(kw["word_embeddings"]) if kw["word_embeddings"] else None
        for name in fields - {"word_embeddings"}:
            if name in kw and (not isinstance(kw[name], int) or isinstance(kw[name], bool)):
                raise ValueError(f"[probes] {name} must be an integer, got {kw[name]!r}")
        return cls(**kw)


@dataclass(frozen=True)
class UtteranceTargets:
    spans: torch.Tensor  # [n_items, 2] int64 (start, end) in model frames, end exclusive
    y: torch.Tensor  # [n_items, dy] float32
    labels: torch.Tensor  # [n_items] int64 class id, -1 for frame-level probes
    split: torch.Tensor  # [n_items] int64 shard id in [0, n_shards); seed-0 split: id % n_splits


# ---------------------------------------------------------------------------------------------
# segments


def phone_span(start: float, end: float, rate: float) -> tuple[int, int]:
    """Middle third of a segment in frames at ``rate`` Hz, [a, b) (method.md; >= 1 frame)."""
    s = math.floor(start * rate + _EPS)
    e = math.ceil(end * rate - _EPS)
    offset = (e - s + 1) // 3
    a, b = s + offset, e - offset
    return (a, b) if b > a else (a, a + 1)


def word_span(start: float, end: float, rate: float) -> tuple[int, int]:
    """Whole segment in frames at ``rate`` Hz: [floor(start·rate), ceil(end·rate)), >= 1 frame."""
    s = math.floor(start * rate + _EPS)
    e = math.ceil(end * rate - _EPS)
    return (s, e) if e > s else (s, s + 1)


def clip_spans(spans: torch.Tensor, n_frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip [start, end) spans to ``n_frames`` keeping >= 1 frame; returns (spans, kept mask).

    A span that starts at or after ``n_frames`` is dropped.
    """
    keep = spans[:, 0] < n_frames
    out = spans[keep].clone()
    out[:, 1] = out[:, 1].clamp(max=n_frames)
    return out, keep


def pool_spans(hidden: torch.Tensor, spans: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden[:, start:end]`` for each span: ``[L, T, D]`` → ``[L, n_items, D]``.

    On the CPU the frames are summed by ``index_add_`` (in frame order); on other devices by one
    matmul with the ``[n_items, T]`` span-membership matrix (TF32 off), because CUDA's
    ``index_add_`` adds with atomics in a varying order, which made pooled features, and the phone
    and word scores, differ between two runs of the same command (4e-4 on an H100)."""
    if hidden.dim() != 3:
        raise ValueError(f"pool_spans: hidden must be [L, T, D], got {tuple(hidden.shape)}")
    if spans.dim() != 2 or spans.shape[1] != 2:
        raise ValueError(f"pool_spans: spans must be [n, 2], got {tuple(spans.shape)}")
    n_frames = hidden.shape[1]
    spans = spans.to(device=hidden.device, dtype=torch.int64)
    start, end = spans[:, 0], spans[:, 1]
    if spans.numel() and (bool((start < 0).any()) or bool((end <= start).any())
                          or int(end.max()) > n_frames):
        raise ValueError(f"pool_spans: spans must satisfy 0 <= start < end <= {n_frames}")
    lengths = end - start
    if spans.shape[0] == 0:
        return hidden.new_zeros(hidden.shape[0], 0, hidden.shape[2])
    if bool((lengths == 1).all()):
        return hidden[:, start]
    if hidden.device.type != "cpu":
        return _pool_by_matmul(hidden, start, end)
    item = torch.repeat_interleave(torch.arange(spans.shape[0], device=hidden.device), lengths)
    first = torch.repeat_interleave(start - torch.cumsum(lengths, 0) + lengths, lengths)
    frame = first + torch.arange(item.shape[0], device=hidden.device)
    sums = hidden.new_zeros(hidden.shape[0], spans.shape[0], hidden.shape[2])
    sums.index_add_(1, item, hidden[:, frame])
    return sums / lengths.to(hidden.dtype)[None, :, None]


def _pool_by_matmul(hidden: torch.Tensor, start: torch.Tensor, end: torch.Tensor
                    ) -> torch.Tensor:
    """:func:`pool_spans` as one matmul with the span-membership matrix (no atomics)."""
    frames = torch.arange(hidden.shape[1], device=hidden.device)
    member = ((frames >= start[:, None]) & (frames < end[:, None])).to(hidden.dtype)
    with full_precision(hidden.device):
        sums = torch.matmul(member, hidden)
    return sums / (end - start).to(hidden.dtype)[None, :, None]


# ---------------------------------------------------------------------------------------------
# probes


class Probe:
    """Targets of one probe for every utterance of the corpus it was built from."""

    name: str
    level: Literal["frame", "segment"]
    dy: int
    classes: tuple[str, ...]

    def targets(self, utt_index: int, waveform: torch.Tensor, n_frames: int,
                frame_rate: float) -> UtteranceTargets:
        raise NotImplementedError

    @property
    def n_items(self) -> int | None:
        """Items over the corpus (None for frame probes: it depends on the model's frame count)."""
        return None


def _empty(dy: int) -> UtteranceTargets:
    return UtteranceTargets(torch.zeros(0, 2, dtype=torch.int64), torch.zeros(0, dy),
                            torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64))


class FbankProbe(Probe):
    def __init__(self, n_utterances: int, config: ProbeConfig) -> None:
        self.name, self.level, self.dy, self.classes = "fbank", "frame", FBANK_DIM, ()
        self.n_shards = config.n_shards
        self.seed = config.seed
        rng = np.random.default_rng([config.seed, 1])
        k = min(config.fbank_max_utterances, n_utterances)
        self.utterances = frozenset(np.sort(rng.choice(n_utterances, k, replace=False)).tolist())

    def targets(self, utt_index: int, waveform: torch.Tensor, n_frames: int,
                frame_rate: float) -> UtteranceTargets:
        if utt_index not in self.utterances or n_frames <= 0:
            return _empty(self.dy)
        fb = log_mel_fbank(waveform.reshape(-1).float().cpu())
        idx = fbank_frame_indices(n_frames, frame_rate, fb.shape[0])
        t = torch.arange(idx.shape[0], dtype=torch.int64)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + utt_index)
        split = torch.randint(self.n_shards, (t.shape[0],), generator=gen)
        return UtteranceTargets(torch.stack([t, t + 1], 1), fb[idx],
                                torch.full_like(t, -1), split)


@dataclass(frozen=True)
class _Item:
    start: float
    end: float
    label: int
    split: int


class SegmentProbe(Probe):
    """Segment items (phones or words) sampled once from the alignments."""

    def __init__(self, name: str, classes: Sequence[str], items: Sequence[Sequence[_Item]],
                 middle_third: bool, targets: torch.Tensor | None = None) -> None:
        self.name, self.level, self.classes = name, "segment", tuple(classes)
        self.items = tuple(tuple(u) for u in items)
        self.middle_third = middle_third
        self.table = targets if targets is not None else torch.eye(len(self.classes))
        self.dy = int(self.table.shape[1])

    @property
    def n_items(self) -> int:
        return sum(len(u) for u in self.items)

    def targets(self, utt_index: int, waveform: torch.Tensor, n_frames: int,
                frame_rate: float) -> UtteranceTargets:
        items = self.items[utt_index]
        if not items or n_frames <= 0:
            return _empty(self.dy)
        span = phone_span if self.middle_third else word_span
        spans = torch.tensor([span(it.start, it.end, frame_rate) for it in items],
                             dtype=torch.int64)
        spans, keep = clip_spans(spans, n_frames)
        labels = torch.tensor([it.label for it in items], dtype=torch.int64)[keep]
        split = torch.tensor([it.split for it in items], dtype=torch.int64)[keep]
        return UtteranceTargets(spans, self.table[labels].float(), labels, split)


def _train_utterances(corpus: Corpus) -> list[int]:
    train = [i for i, u in enumerate(corpus.utterances) if u.split in (None, "", "train")]
    return train or list(range(len(corpus.utterances)))


def _sample_segments(corpus: Corpus, tokens: Sequence[Sequence[tuple[Segment, int]]],
                     n_classes: int, cap: int, config: ProbeConfig,
                     salt: int) -> list[list[_Item]]:
    """Cap each class at ``cap`` tokens (seeded), deal stratified shards; items per utterance."""
    flat = [(u, seg, label) for u, toks in enumerate(tokens) for seg, label in toks]
    labels = np.array([f[2] for f in flat], dtype=np.int64)
    rng = np.random.default_rng([config.seed, salt])
    chosen = []
    for c in range(n_classes):
        idx = np.flatnonzero(labels == c)
        chosen.append(idx if len(idx) <= cap else np.sort(rng.choice(idx, cap, replace=False)))
    keep = np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)
    split = assign_splits(len(keep), labels=labels[keep], n_splits=config.n_shards,
                          seed=config.seed + salt)
    out: list[list[_Item]] = [[] for _ in tokens]
    for k, s in zip(keep.tolist(), split.tolist(), strict=True):
        u, seg, label = flat[k]
        out[u].append(_Item(seg.start, seg.end, label, s))
    return out


def build_phone_probe(corpus: Corpus, config: ProbeConfig) -> SegmentProbe:
    index = {p: i for i, p in enumerate(ARPABET39)}
    tokens = [[(s, index[s.label]) for s in u.phones if s.label in index]
              for u in corpus.utterances]
    items = _sample_segments(corpus, tokens, len(ARPABET39), config.phone_cap, config, 2)
    return SegmentProbe("phone", ARPABET39, items, middle_third=True)


def word_vocabulary(corpus: Corpus, size: int) -> tuple[str, ...]:
    """The ``size`` most frequent words of the training part (ties alphabetical)."""
    counts = Counter(w.label for i in _train_utterances(corpus)
                     for w in corpus.utterances[i].words)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return tuple(w for w, _ in ranked[:size])


def read_word_embeddings(path: Path, words: set[str]) -> dict[str, np.ndarray]:
    """Vectors of ``words`` from a GloVe-format text file (``word v1 v2 …`` per line)."""
    if not path.is_file():
        raise ValueError(f"word embeddings {path}: no such file")
    found: dict[str, np.ndarray] = {}
    dim = None
    with path.open(encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, start=1):
            parts = line.rstrip().split(" ")
            if len(parts) < 2:
                continue
            if dim is None:
                dim = len(parts) - 1
            word = parts[0].lower()
            if word not in words or word in found:
                continue
            if len(parts) - 1 != dim:
                raise ValueError(f"word embeddings {path}:{n}: {len(parts) - 1} values, "
                                 f"expected {dim}")
            try:
                found[word] = np.asarray(parts[1:], dtype=np.float32)
            except ValueError as err:
                raise ValueError(f"word embeddings {path}:{n}: not a number ({err})") from err
    if dim is None:
        raise ValueError(f"word embeddings {path}: empty file")
    return found


def build_word_probe(corpus: Corpus, config: ProbeConfig,
                     embeddings: Path | None = None) -> SegmentProbe:
    vocab = word_vocabulary(corpus, config.word_vocab)
    table = None
    name = "word"
    if embeddings is not None:
        vectors = read_word_embeddings(embeddings, set(vocab))
        vocab = tuple(w for w in vocab if w in vectors)
        if not vocab:
            raise ValueError(f"word embeddings {embeddings}: none of the corpus words found")
        table = torch.from_numpy(np.stack([vectors[w] for w in vocab]))
        name = "word-embedding"
    index = {w: i for i, w in enumerate(vocab)}
    tokens = [[(s, index[s.label]) for s in u.words if s.label in index]
              for u in corpus.utterances]
    items = _sample_segments(corpus, tokens, len(vocab), config.word_cap, config,
                             4 if table is not None else 3)
    return SegmentProbe(name, vocab, items, middle_third=False, targets=table)


def build_probes(corpus: Corpus, names: Sequence[str], config: ProbeConfig) -> dict[str, Probe]:
    """Build the named probes (decided from alignments only), in the order given."""
    out: dict[str, Probe] = {}
    for name in names:
        if name == "fbank":
            out[name] = FbankProbe(len(corpus.utterances), config)
        elif name == "phone":
            out[name] = build_phone_probe(corpus, config)
        elif name == "word":
            out[name] = build_word_probe(corpus, config)
        elif name == "word-embedding":
            if config.word_embeddings is None:
                raise ValueError("probe 'word-embedding' needs [probes] word_embeddings = FILE "
                                 "(GloVe text format)")
            out[name] = build_word_probe(corpus, config, config.word_embeddings)
        else:
            raise ValueError(f"unknown probe {name!r}; choose from "
                             f"{list(PROBES + OPTIONAL_PROBES)}")
        probe = out[name]
        if isinstance(probe, SegmentProbe) and probe.n_items == 0:
            raise ValueError(f"probe {name!r}: corpus {corpus.name!r} has no {name} segments "
                             "(check the alignment tiers)")
    return out
