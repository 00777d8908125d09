"""Pretraining targets: MFCC or layer features, k-means, labels at the model frame rate.

- MFCC: kaldi-compatible 13 coefficients (torchaudio ``compliance.kaldi.mfcc``, 25 ms / 10 ms,
  no energy, as fairseq's ``dump_mfcc_feature.py``) + deltas + delta-deltas → 39-d at 100 Hz.
  Model frame ``t`` (hop 320 samples) takes MFCC frame ``t * 320 // 160 = 2t``, as fairseq maps
  100 Hz labels onto 50 Hz features.
- Layer features: layer ``L`` of the previous checkpoint with the project's convention (0 = input
  of the first transformer block, ``i`` = output of block ``i``), read by the scoring path's
  loader and extractor (``layerprobe.models.load`` + ``layerprobe.extract.iter_hidden_states``:
  length-bucketed padded batches with masked group norm, long utterances cut into exactly
  overlapping chunks so every frame is produced), run only up to block ``L``.
- Unreadable audio (a file that fails to decode) is skipped with a warning naming it, and listed
  in ``Labels.skipped``; the training stream then leaves that utterance out.
- k-means: :mod:`layerprobe.kmeans` (torch, on the run's device; the same implementation as MI)
  with fairseq's mini-batch settings, fitted on a random fraction of the utterances (all their
  frames); every utterance is then labelled by the nearest centroid.
- Labels: one int tensor per utterance of exactly ``num_frames(n_samples)`` frames, in
  ``RUN_DIR/it{i}/labels.pt`` (written atomically, with the centroids).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchaudio

from layerprobe.atomic import atomic_torch_save
from layerprobe.fault_points import fault_point
from layerprobe.kmeans import kmeans_fit, kmeans_predict
from pretraining.config import KMeansConfig
from pretraining.model import num_frames, receptive_field
from pretraining.schedules import Iteration

LABELS_FORMAT = "pretraining-labels-v1"
SAMPLE_RATE = 16_000
MFCC_HOP = 160


def mfcc_features(waveform: torch.Tensor) -> torch.Tensor:
    """[n] float32 16 kHz → [T, 39] MFCC + Δ + ΔΔ at 100 Hz (T = 1 + (n - 400) // 160)."""
    if waveform.dim() != 1:
        raise ValueError(f"mfcc_features expects a 1-d waveform, got shape {tuple(waveform.shape)}")
    if waveform.numel() < 400:
        raise ValueError(f"waveform of {waveform.numel()} samples is shorter than one 25 ms frame")
    mfcc = torchaudio.compliance.kaldi.mfcc(waveform.float()[None], sample_frequency=SAMPLE_RATE,
                                            use_energy=False)  # [T, 13]
    mfcc = mfcc.transpose(0, 1)  # [13, T]
    deltas = torchaudio.functional.compute_deltas(mfcc)
    ddeltas = torchaudio.functional.compute_deltas(deltas)
    return torch.cat([mfcc, deltas, ddeltas], dim=0).transpose(0, 1).contiguous()


def subsample_to_model_rate(features: torch.Tensor, n_frames: int, model_hop: int,
                            *, feature_hop: int = MFCC_HOP) -> torch.Tensor:
    """Feature frames ``t * model_hop // feature_hop`` for model frames ``t < n_frames``."""
    index = torch.arange(n_frames) * model_hop // feature_hop
    if n_frames and int(index[-1]) >= features.shape[0]:
        raise ValueError(f"{features.shape[0]} feature frames cannot cover {n_frames} model frames")
    return features[index]


class LayerFeatures:
    """Layer ``layer`` of a ``layerprobe-hubert-v1`` checkpoint, through layerprobe's extractor.

    The checkpoint is loaded with ``layerprobe.models.load`` and its transformer cut after block
    ``layer`` (blocks above it are never run); :meth:`iter` extracts batches of utterances with
    ``layerprobe.extract.iter_hidden_states`` (utterances longer than ``max_chunk_seconds`` are
    cut into exactly overlapping chunks: every frame is produced).
    """

    def __init__(self, ckpt: str | Path, layer: int, *, device: str | torch.device = "cpu",
                 max_chunk_seconds: float = 100.0, batch_seconds: float = 200.0):
        from layerprobe.models import load
        from layerprobe.models.wav2vec2 import TorchaudioLayerModel

        model = load(ckpt, device=device)
        if not isinstance(model, TorchaudioLayerModel):
            raise ValueError(f"{ckpt}: not a layerprobe pretraining checkpoint")
        n_layers = model.n_layers
        if not 0 <= layer <= n_layers:
            raise ValueError(f"{ckpt}: supervision layer {layer} outside 0..{n_layers}")
        transformer = model.model.encoder.transformer
        transformer.layers = transformer.layers[:layer]  # stop at the supervision layer
        model.n_layers = layer
        self.model, self.layer = model, layer
        self.max_chunk_seconds, self.batch_seconds = max_chunk_seconds, batch_seconds

    def iter(self, waveforms: Iterable[tuple[Any, torch.Tensor]]
             ) -> Iterator[tuple[Any, torch.Tensor]]:
        """``(key, [num_frames(n), D] float32 on the CPU)`` per ``(key, waveform [n])``, in the
        extractor's order (by length within its read-ahead window)."""
        from layerprobe.extract import iter_hidden_states

        for key, states in iter_hidden_states(self.model, waveforms,
                                              batch_seconds=self.batch_seconds,
                                              max_chunk_seconds=self.max_chunk_seconds):
            yield key, states[self.layer].float().cpu()

    def __call__(self, waveform: torch.Tensor) -> torch.Tensor:
        """[n] → [num_frames(n), D] float32 on the CPU."""
        return next(self.iter([(0, waveform)]))[1]


def mfcc_frame_features(waveform: torch.Tensor, model_args: dict[str, Any]) -> torch.Tensor:
    """MFCC target features at the model frame rate: [num_frames(n), 39]."""
    _, hop = receptive_field(model_args)
    return subsample_to_model_rate(mfcc_features(waveform),
                                   num_frames(model_args, waveform.numel()), hop)


def fit_kmeans(features: torch.Tensor, n_clusters: int, config: KMeansConfig, seed: int, *,
               device: str | torch.device | None = None) -> torch.Tensor:
    """k-means on [n, d] features (layerprobe.kmeans, fairseq's settings) → centroids [k, d]
    float32 on the CPU."""
    if features.ndim != 2:
        raise ValueError(f"k-means features must be [n, d], got shape {tuple(features.shape)}")
    if features.shape[0] < n_clusters:
        raise ValueError(f"k-means with {n_clusters} clusters needs at least {n_clusters} frames, "
                         f"got {features.shape[0]}: raise kmeans_fraction or use fewer clusters")
    fit = kmeans_fit(features.float(), n_clusters, config=config, seed=seed, device=device,
                     compute_inertia=False)  # as fairseq's compute_labels=False
    return fit.centroids[0].cpu()


def nearest_centroid(features: torch.Tensor, centroids: torch.Tensor, *,
                     memory_mb: float = 256.0) -> torch.Tensor:
    """Nearest centroid of every row: [n, d], [k, d] → [n] int64 (chunked, float32 distances,
    as k-means assigns them)."""
    return kmeans_predict(features.float(), centroids.to(features.device).float(),
                          memory_mb=memory_mb).cpu()


@dataclass(frozen=True)
class Labels:
    """Per-utterance cluster ids at the model frame rate for one iteration."""

    iteration: int
    source: str
    layer: int | None
    clusters: int
    labels: dict[str, torch.Tensor]  # utterance id → [n_frames] int64
    centroids: torch.Tensor  # [clusters, d]
    skipped: tuple[str, ...] = ()  # utterances whose audio could not be read (no labels)
    seconds: float = 0.0  # how long the label stage took

    def to_payload(self) -> dict:
        return {"format": LABELS_FORMAT, "iteration": self.iteration, "source": self.source,
                "layer": self.layer, "clusters": self.clusters, "centroids": self.centroids,
                "labels": {k: v.to(torch.int32) for k, v in self.labels.items()},
                "skipped": list(self.skipped), "seconds": self.seconds}

    @classmethod
    def load(cls, path: str | Path) -> Labels:
        from pretraining.storage import UnreadableFile, read_torch

        remedy = "delete it (and the iteration's label_stage.json) and --resume to redo the " \
                 "label stage"
        payload = read_torch(path, "labels file", remedy)
        if not isinstance(payload, dict) or payload.get("format") != LABELS_FORMAT:
            raise UnreadableFile(f"{path}: not a {LABELS_FORMAT} file; {remedy}")
        return cls(iteration=payload["iteration"], source=payload["source"],
                   layer=payload["layer"], clusters=payload["clusters"],
                   labels={k: v.long() for k, v in payload["labels"].items()},
                   centroids=payload["centroids"], skipped=tuple(payload.get("skipped", ())),
                   seconds=float(payload.get("seconds", 0.0)))

    def save(self, path: str | Path) -> Path:
        return atomic_torch_save(self.to_payload(), path)


def fit_subset(n_utterances: int, fraction: float, seed: int) -> list[int]:
    """Sorted indices of the utterances k-means is fitted on (at least one)."""
    k = max(1, round(fraction * n_utterances))
    gen = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n_utterances, generator=gen)[:k].tolist())


def readable(indices: Iterable[int], load: Callable[[int], torch.Tensor],
             utterance_ids: Sequence[str], skipped: list[str]
             ) -> Iterator[tuple[int, torch.Tensor]]:
    """``(i, load(i))``; an utterance whose audio fails to decode (``ValueError`` naming the
    file) is skipped with a warning and its id appended to ``skipped``."""
    for i in indices:
        try:
            wave = load(i)
        except ValueError as err:
            skipped.append(utterance_ids[i])
            warnings.warn(f"skipping utterance {utterance_ids[i]!r}: {err} "
                          f"({len(skipped)} unreadable so far)", stacklevel=2)
            continue
        yield i, wave


def utterance_features(indices: Sequence[int], load: Callable[[int], torch.Tensor],
                       utterance_ids: Sequence[str], model_args: dict[str, Any],
                       extractor: LayerFeatures | None, skipped: list[str]
                       ) -> Iterator[tuple[int, torch.Tensor]]:
    """``(i, [num_frames(n_i), d])`` target features of the readable utterances of ``indices``
    (MFCC one at a time; layer features in batches, in the extractor's order)."""
    items = readable(indices, load, utterance_ids, skipped)
    if extractor is None:
        for i, wave in items:
            fault_point("labels-features")
            yield i, mfcc_frame_features(wave, model_args)
        return
    lengths: dict[int, int] = {}

    def remember() -> Iterator[tuple[int, torch.Tensor]]:
        for i, wave in items:
            lengths[i] = wave.numel()
            yield i, wave

    for i, feats in extractor.iter(remember()):
        n = num_frames(model_args, lengths.pop(i))
        if feats.shape[0] != n:
            raise ValueError(f"utterance {utterance_ids[i]!r}: layer features have "
                             f"{feats.shape[0]} frames, the model {n}")
        yield i, feats


def target_extractor(iteration: Iteration, previous_ckpt: str | Path | None,
                     config: KMeansConfig, device: str | torch.device) -> LayerFeatures | None:
    """The layer-feature extractor of an iteration with layer targets (None for MFCC)."""
    if iteration.source != "layer":
        return None
    if previous_ckpt is None:
        raise ValueError(f"iteration {iteration.index}: layer targets need a previous checkpoint")
    return LayerFeatures(previous_ckpt, int(iteration.layer), device=device,
                         max_chunk_seconds=config.max_chunk_seconds)


def label_utterances(indices: Sequence[int], load: Callable[[int], torch.Tensor],
                     utterance_ids: Sequence[str], model_args: dict[str, Any],
                     extractor: LayerFeatures | None, centroids: torch.Tensor,
                     config: KMeansConfig, skipped: list[str]
                     ) -> Iterator[tuple[int, torch.Tensor]]:
    """``(i, [num_frames(n_i)] int64 cluster ids)`` of the readable utterances of ``indices``:
    an iteration's targets for any audio (its features, nearest centroid)."""
    for i, feats in utterance_features(indices, load, utterance_ids, model_args, extractor,
                                       skipped):
        yield i, nearest_centroid(feats, centroids, memory_mb=config.memory_mb)


def compute_labels(utterance_ids: Sequence[str], load: Callable[[int], torch.Tensor],
                   iteration: Iteration, model_args: dict[str, Any], config: KMeansConfig, *,
                   previous_ckpt: str | Path | None, seed: int, device: str | torch.device = "cpu",
                   log: Callable[[str], None] = print) -> Labels:
    """Fit k-means on a fraction of the utterances and label every utterance.

    ``load(i)`` returns utterance ``i``'s waveform (a ``ValueError`` skips it); ``model_args``
    are those of the model that will be trained (they fix the frame count); ``previous_ckpt`` is
    needed for layer targets.
    """
    extractor = target_extractor(iteration, previous_ckpt, config, device)
    skipped: list[str] = []
    subset = fit_subset(len(utterance_ids), iteration.kmeans_fraction, seed)
    feats = dict(utterance_features(subset, load, utterance_ids, model_args, extractor,
                                    skipped))
    if not feats:
        raise ValueError(f"iteration {iteration.index}: no readable utterance to fit k-means on")
    fault_point("labels-kmeans")
    fit_data = torch.cat([feats[i] for i in subset if i in feats])
    log(f"iteration {iteration.index}: k-means with {iteration.clusters} clusters on "
        f"{fit_data.shape[0]} frames of {iteration.target_name} ({len(feats)} utterances)")
    centroids = fit_kmeans(fit_data, iteration.clusters, config, seed, device=device)
    labels = {utterance_ids[i]: nearest_centroid(f, centroids, memory_mb=config.memory_mb)
              for i, f in feats.items()}
    fitted = set(subset)
    rest = [i for i in range(len(utterance_ids)) if i not in fitted]
    for i, ids in label_utterances(rest, load, utterance_ids, model_args, extractor, centroids,
                                   config, skipped):
        fault_point("labels-assign")
        labels[utterance_ids[i]] = ids
    if skipped:
        log(f"iteration {iteration.index}: {len(skipped)} unreadable utterance(s) skipped, "
            f"e.g. {skipped[0]!r}")
    ordered = {uid: labels[uid] for uid in utterance_ids if uid in labels}
    return Labels(iteration=iteration.index, source=iteration.source, layer=iteration.layer,
                  clusters=iteration.clusters, labels=ordered, centroids=centroids,
                  skipped=tuple(skipped))
