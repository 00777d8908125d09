"""Pretraining data: the audio of a corpus, length-bucketed batches, random crops with labels.

Batches are limited by total audio seconds *including padding* (``batch_size × longest``) and
every utterance of a batch is cropped to the batch's shortest length (at most
``max_sample_seconds``) at a random frame boundary, as fairseq's HuBERT dataset does without
``pad_audio``: batches have no padding, so attention needs no mask. Length bucketing keeps the
cropped-away audio small. An utterance whose audio cannot be decoded is skipped with a warning
naming the file and counted (``AudioSet.failed``); it is not read again.

The order of batches is a pure function of (seed, iteration, epoch), so a run resumes from an
(epoch, position) pair; crops are drawn from a generator seeded by (seed, iteration, epoch,
position), so they need no saved state either. Under DDP, rank ``r`` of ``w`` takes batches
``r, r + w, ...`` of each epoch (the tail that cannot be shared evenly is dropped).
"""

from __future__ import annotations

import queue
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pretraining.config import DataConfig
from pretraining.model import conv_stack

SAMPLE_RATE = 16_000
CACHE_LIMIT_SECONDS = 3600.0  # corpora up to an hour are kept in memory once loaded


@dataclass(frozen=True)
class AudioItem:
    id: str
    path: Path
    duration: float  # seconds, from the file header


class AudioSet:
    """Utterances of a corpus with their audio, loaded with ``layerprobe.corpus.load_audio``."""

    def __init__(self, items: Sequence[AudioItem]):
        if not items:
            raise ValueError("no utterances to pretrain on")
        ids = [it.id for it in items]
        if len(set(ids)) != len(ids):
            raise ValueError("utterance ids are not unique")
        self.items = tuple(items)
        self.cache: dict[int, torch.Tensor] | None = (
            {} if sum(it.duration for it in items) <= CACHE_LIMIT_SECONDS else None)
        self.failed: dict[int, str] = {}  # index -> why its audio could not be read
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, config: DataConfig) -> AudioSet:
        """The utterances of ``config.path`` of at least ``min_seconds`` (seeded subset if
        ``max_utterances``)."""
        items = [it for it in list_audio(config.path) if it.duration >= config.min_seconds]
        if config.max_utterances and config.max_utterances < len(items):
            gen = torch.Generator().manual_seed(0)
            perm = torch.randperm(len(items), generator=gen)
            keep = sorted(perm[:config.max_utterances].tolist())
            items = [items[i] for i in keep]
        if not items:
            raise ValueError(f"{config.path or 'bundled corpus'}: no utterance of at least "
                             f"{config.min_seconds} s")
        return cls(items)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def ids(self) -> list[str]:
        return [it.id for it in self.items]

    @property
    def durations(self) -> list[float]:
        return [it.duration for it in self.items]

    def load(self, index: int) -> torch.Tensor:
        """Waveform of utterance ``index``: [n] float32 at 16 kHz."""
        if self.cache is not None and index in self.cache:
            return self.cache[index]
        from layerprobe.corpus import load_audio

        wave = load_audio(self.items[index].path, sample_rate=SAMPLE_RATE)
        if wave.dim() != 1:
            raise ValueError(f"{self.items[index].path}: expected mono audio, "
                             f"got {tuple(wave.shape)}")
        if self.cache is not None:
            self.cache[index] = wave
        return wave

    def try_load(self, index: int) -> torch.Tensor | None:
        """:meth:`load`, or None (with a warning naming the file, once) if it cannot be decoded."""
        if index in self.failed:
            return None
        try:
            return self.load(index)
        except ValueError as err:  # layerprobe.corpus.load_audio: "<path>: cannot read audio"
            with self._lock:
                self.failed[index] = str(err)
            warnings.warn(f"skipping utterance {self.items[index].id!r}: {err} "
                          f"({len(self.failed)} unreadable so far)", stacklevel=2)
            return None

    def subset(self, ids: Sequence[str]) -> AudioSet:
        """The utterances of ``ids`` (in this set's order), sharing nothing but the items."""
        wanted = set(ids)
        return AudioSet([it for it in self.items if it.id in wanted])


def list_audio(source: str | Path | None) -> list[AudioItem]:
    """Audio of a pretraining corpus; no alignments needed.

    ``source`` is empty (the bundled corpus), a folder (every audio file below it; id = relative
    path without suffix), a fairseq manifest (``.tsv`` whose first line is the root folder and
    whose rows start with a relative audio path), or a layerprobe corpus manifest.
    """
    from layerprobe.corpus import AUDIO_SUFFIXES, audio_duration, bundled_corpus_path, load_corpus

    root = bundled_corpus_path() if not source else Path(source).expanduser()
    if root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.is_file()
                       and p.suffix.lower() in AUDIO_SUFFIXES and not p.name.startswith("."))
        if not files:
            raise ValueError(f"{root}: no audio files ({', '.join(AUDIO_SUFFIXES)}) below it")
        return [AudioItem(str(p.relative_to(root).with_suffix("")), p, audio_duration(p))
                for p in files]
    if not root.is_file():
        raise FileNotFoundError(f"{root}: no such pretraining corpus")
    lines = root.read_text(encoding="utf-8").splitlines()
    if root.suffix == ".tsv" and lines and Path(lines[0].strip()).is_dir():
        base = Path(lines[0].strip())
        rels = [line.split("\t")[0] for line in lines[1:] if line.strip()]
        return [AudioItem(str(Path(r).with_suffix("")), base / r, audio_duration(base / r))
                for r in rels]
    corpus = load_corpus(root)
    return [AudioItem(u.id, Path(u.audio_path), float(u.duration)) for u in corpus.utterances]


def bucket_batches(durations: Sequence[float], batch_seconds: float, max_seconds: float,
                   seed: int) -> list[list[int]]:
    """Greedy length-sorted batches with ``len(batch) × longest ≤ batch_seconds``, shuffled.

    Durations above ``max_seconds`` count as ``max_seconds`` (they are cropped). An utterance
    longer than ``batch_seconds`` forms a batch alone.
    """
    gen = torch.Generator().manual_seed(seed)
    tiebreak = torch.rand(len(durations), generator=gen).tolist()
    eff = [min(d, max_seconds) for d in durations]
    order = sorted(range(len(eff)), key=lambda i: (eff[i], tiebreak[i]))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:  # ascending: the newest utterance is the longest in its batch
        if current and (len(current) + 1) * eff[i] > batch_seconds:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    perm = torch.randperm(len(batches), generator=gen).tolist()
    return [batches[p] for p in perm]


def epoch_seed(seed: int, iteration: int, epoch: int) -> int:
    return (seed * 1_000_003 + iteration * 10_007 + epoch) % (2**63)


@dataclass
class Batch:
    waveforms: torch.Tensor  # [B, n] float32, every row n valid samples (no padding)
    labels: torch.Tensor  # [B, T] int64, T = num_frames(n)
    seconds: float  # audio seconds in the batch (B × n / 16 kHz)
    state_after: dict[str, int] = field(default_factory=dict)  # stream position after it
    skipped: tuple[int, ...] = ()  # utterances of the batch whose audio could not be read

    @property
    def lengths(self) -> torch.Tensor:
        """[B] int64 samples (all equal)."""
        return torch.full((self.waveforms.shape[0],), self.waveforms.shape[1], dtype=torch.long)

    def pin_memory(self) -> Batch:
        return Batch(self.waveforms.pin_memory(), self.labels.pin_memory(), self.seconds,
                     self.state_after, self.skipped)

    def to(self, device: torch.device, non_blocking: bool = False) -> Batch:
        return Batch(self.waveforms.to(device, non_blocking=non_blocking),
                     self.labels.to(device, non_blocking=non_blocking), self.seconds,
                     self.state_after, self.skipped)


def collate(waves: Sequence[torch.Tensor], labels: Sequence[torch.Tensor], model_args: dict,
            max_samples: int, gen: torch.Generator) -> Batch:
    """Crop every waveform to the batch's shortest length (at most ``max_samples``) at a random
    frame boundary, with its labels; stack. No padding."""
    if not waves:
        raise ValueError("collate: empty batch")
    stack = conv_stack(model_args)  # once: the prefetch thread holds the GIL per utterance
    hop = stack.stride
    for w, lab in zip(waves, labels, strict=True):
        expected = stack.num_frames(w.numel())
        if lab.numel() != expected:
            raise ValueError(f"labels have {lab.numel()} frames but the audio gives {expected}")
    n = min(max_samples, min(w.numel() for w in waves))
    t = stack.num_frames(n)
    if t < 1:
        raise ValueError(f"collate: the shortest utterance ({n} samples) gives no frame")
    wav = torch.empty(len(waves), n)
    lab = torch.empty(len(waves), t, dtype=torch.long)
    for b, (w, y) in enumerate(zip(waves, labels, strict=True)):
        start = hop * int(torch.randint(0, (w.numel() - n) // hop + 1, (1,), generator=gen))
        wav[b] = w[start:start + n]
        lab[b] = y[start // hop:start // hop + t]
    return Batch(wav, lab, float(wav.numel()) / SAMPLE_RATE)


class BatchStream:
    """Endless batches for one iteration; the position is ``(epoch, index)`` within rank's share."""

    def __init__(self, audio: AudioSet, labels: dict[str, torch.Tensor], model_args: dict, *,
                 batch_seconds: float, max_sample_seconds: float, seed: int, iteration: int,
                 rank: int = 0, world_size: int = 1, epoch: int = 0, position: int = 0):
        missing = [uid for uid in audio.ids if uid not in labels]
        if missing:
            raise ValueError(f"no labels for {len(missing)} utterance(s), e.g. {missing[0]!r}")
        self.audio, self.labels, self.model_args = audio, labels, model_args
        self.batch_seconds, self.max_seconds = batch_seconds, max_sample_seconds
        self.seed, self.iteration, self.rank, self.world_size = seed, iteration, rank, world_size
        self.epoch, self.position = epoch, position
        self._batches: list[list[int]] | None = None

    def _epoch_batches(self) -> list[list[int]]:
        if self._batches is None:
            s = epoch_seed(self.seed, self.iteration, self.epoch)
            allb = bucket_batches(self.audio.durations, self.batch_seconds, self.max_seconds, s)
            share = len(allb) // self.world_size
            if share == 0:
                raise ValueError(f"{len(allb)} batches cannot be shared by {self.world_size} ranks")
            self._batches = allb[self.rank:share * self.world_size:self.world_size]
        return self._batches

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def __next__(self) -> Batch:
        batches = self._epoch_batches()
        if self.position >= len(batches):
            self.epoch, self.position, self._batches = self.epoch + 1, 0, None
            batches = self._epoch_batches()
        index = batches[self.position]
        gen = torch.Generator().manual_seed(
            epoch_seed(self.seed, self.iteration, self.epoch) * 7919 % (2**63)
            + self.position * 131 + self.rank)
        self.position += 1
        items = self.audio.items  # not .ids: a list of the whole corpus per batch
        waves = {i: self.audio.try_load(i) for i in index}
        good = [i for i in index if waves[i] is not None]
        if not good:  # every utterance of the batch is unreadable: take the next batch
            return next(self)
        batch = collate([waves[i] for i in good], [self.labels[items[i].id] for i in good],
                        self.model_args, int(self.max_seconds * SAMPLE_RATE), gen)
        batch.state_after = self.state()
        batch.skipped = tuple(i for i in index if waves[i] is None)
        return batch

    def __iter__(self) -> BatchStream:
        return self


class Prefetcher:
    """Batches of a stream prepared by a background thread (``depth`` ahead), in pinned memory
    and copied to ``device`` without blocking. Resume from the consumed batch's ``state_after``,
    not from the stream (which runs ahead)."""

    def __init__(self, stream: BatchStream, device: torch.device, depth: int = 2):
        if depth < 1:
            raise ValueError(f"Prefetcher: depth must be >= 1, got {depth}")
        self.stream, self.device = stream, device
        self.pin = device.type == "cuda"
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, daemon=True, name="batch-prefetch")
        self._thread.start()

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                batch = next(self.stream)
                item: Batch | BaseException = batch.pin_memory() if self.pin else batch
            except BaseException as err:  # handed to the consumer, which re-raises it
                item = err
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return

    def __next__(self) -> Batch:
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item.to(self.device, non_blocking=self.pin)

    def __iter__(self) -> Prefetcher:
        return self

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
