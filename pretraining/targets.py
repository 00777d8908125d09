"""Pretraining targets: MFCC or layer features, k-means, labels at the model frame rate.

- MFCC: kaldi-compatible 13 coefficients (torchaudio ``compliance.kaldi.mfcc``, 25 ms / 10 ms,
  no energy, as fairseq's ``dump_mfcc_feature.py``) + deltas + delta-deltas → 39-d at 100 Hz.
  Model frame ``t`` (hop 320 samples) takes MFCC frame ``t * 320 // 160 = 2t``, as fairseq maps
  100 Hz labels onto 50 Hz features.
- Layer features: layer ``L`` of the previous checkpoint with the project's convention (0 = input
  of the first transformer block, ``i`` = output of block ``i``), eval mode, no masking, one
  utterance at a time (padding would change the group-norm of the conv stack), in chunks.
- k-means: :mod:`layerprobe.kmeans` (torch, on the run's device; the same implementation as MI)
  with fairseq's mini-batch settings, fitted on a random fraction of the utterances (all their
  frames); every utterance is then labelled by the nearest centroid.
- Labels: one int tensor per utterance of exactly ``num_frames(n_samples)`` frames, in
  ``RUN_DIR/it{i}/labels.pt`` (written atomically, with the centroids).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchaudio

from layerprobe.atomic import atomic_torch_save
from layerprobe.kmeans import kmeans_fit, kmeans_predict
from pretraining.config import KMeansConfig
from pretraining.model import load_checkpoint, num_frames, receptive_field
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
    """Layer ``layer`` of a ``layerprobe-hubert-v1`` checkpoint, per utterance."""

    def __init__(self, ckpt: str | Path, layer: int, *, device: str | torch.device = "cpu",
                 max_chunk_seconds: float = 100.0):
        model, args, _ = load_checkpoint(ckpt, device=device)
        n_layers = args["encoder_num_layers"]
        if not 0 <= layer <= n_layers:
            raise ValueError(f"{ckpt}: supervision layer {layer} outside 0..{n_layers}")
        self.wav2vec2 = model.wav2vec2.eval()
        self.args, self.layer, self.device = args, layer, torch.device(device)
        self.max_chunk = int(max_chunk_seconds * SAMPLE_RATE)

    @torch.no_grad()
    def _forward(self, waveform: torch.Tensor) -> torch.Tensor:
        w2v = self.wav2vec2
        x, _ = w2v.feature_extractor(waveform[None].to(self.device), None)
        x, _ = w2v.encoder._preprocess(x, None)
        transformer = w2v.encoder.transformer
        if self.layer == 0:
            return transformer._preprocess(x)[0]
        return transformer.get_intermediate_outputs(x, None, num_layers=self.layer)[-1][0]

    def __call__(self, waveform: torch.Tensor) -> torch.Tensor:
        """[n] → [num_frames(n), D] float32 on CPU (chunks joined; each chunk >= 1 frame)."""
        field, _ = receptive_field(self.args)
        step = self.max_chunk
        chunks = [waveform[s:s + step] for s in range(0, waveform.numel(), step)]
        if len(chunks) > 1 and chunks[-1].numel() < field:
            chunks[-2] = torch.cat([chunks[-2], chunks.pop()])
        return torch.cat([self._forward(c).float().cpu() for c in chunks])


def frame_features(waveform: torch.Tensor, model_args: dict[str, Any],
                   extractor: LayerFeatures | None) -> torch.Tensor:
    """Target features at the model frame rate: MFCC (``extractor`` None) or layer features."""
    n = num_frames(model_args, waveform.numel())
    if extractor is None:
        _, hop = receptive_field(model_args)
        return subsample_to_model_rate(mfcc_features(waveform), n, hop)
    feats = extractor(waveform)
    if feats.shape[0] < n:
        raise ValueError(f"layer features have {feats.shape[0]} frames, the model {n}")
    return feats[:n]


def fit_kmeans(features: torch.Tensor, n_clusters: int, config: KMeansConfig, seed: int, *,
               device: str | torch.device | None = None) -> torch.Tensor:
    """k-means on [n, d] features (layerprobe.kmeans, fairseq's settings) → centroids [k, d]
    float32 on the CPU."""
    if features.ndim != 2:
        raise ValueError(f"k-means features must be [n, d], got shape {tuple(features.shape)}")
    if features.shape[0] < n_clusters:
        raise ValueError(f"k-means with {n_clusters} clusters needs at least {n_clusters} frames, "
                         f"got {features.shape[0]}: raise kmeans_fraction or use fewer clusters")
    fit = kmeans_fit(features.float(), n_clusters, config=config, seed=seed, device=device)
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

    def to_payload(self) -> dict:
        return {"format": LABELS_FORMAT, "iteration": self.iteration, "source": self.source,
                "layer": self.layer, "clusters": self.clusters, "centroids": self.centroids,
                "labels": {k: v.to(torch.int32) for k, v in self.labels.items()}}

    @classmethod
    def load(cls, path: str | Path) -> Labels:
        payload = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(payload, dict) or payload.get("format") != LABELS_FORMAT:
            raise ValueError(f"{path}: not a {LABELS_FORMAT} file")
        return cls(iteration=payload["iteration"], source=payload["source"],
                   layer=payload["layer"], clusters=payload["clusters"],
                   labels={k: v.long() for k, v in payload["labels"].items()},
                   centroids=payload["centroids"])

    def save(self, path: str | Path) -> Path:
        return atomic_torch_save(self.to_payload(), path)


def fit_subset(n_utterances: int, fraction: float, seed: int) -> list[int]:
    """Sorted indices of the utterances k-means is fitted on (at least one)."""
    k = max(1, round(fraction * n_utterances))
    gen = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n_utterances, generator=gen)[:k].tolist())


def compute_labels(utterance_ids: Sequence[str], load: Callable[[int], torch.Tensor],
                   iteration: Iteration, model_args: dict[str, Any], config: KMeansConfig, *,
                   previous_ckpt: str | Path | None, seed: int, device: str | torch.device = "cpu",
                   log: Callable[[str], None] = print) -> Labels:
    """Fit k-means on a fraction of the utterances and label every utterance.

    ``load(i)`` returns utterance ``i``'s waveform; ``model_args`` are those of the model that
    will be trained (they fix the frame count); ``previous_ckpt`` is needed for layer targets.
    """
    extractor = None
    if iteration.source == "layer":
        if previous_ckpt is None:
            raise ValueError(f"iteration {iteration.index}: layer targets need a previous "
                             "checkpoint")
        extractor = LayerFeatures(previous_ckpt, int(iteration.layer), device=device,
                                  max_chunk_seconds=config.max_chunk_seconds)
    subset = fit_subset(len(utterance_ids), iteration.kmeans_fraction, seed)
    feats = {i: frame_features(load(i), model_args, extractor) for i in subset}
    fit_data = torch.cat([feats[i] for i in subset])
    log(f"iteration {iteration.index}: k-means with {iteration.clusters} clusters on "
        f"{fit_data.shape[0]} frames of {iteration.target_name} ({len(subset)} utterances)")
    centroids = fit_kmeans(fit_data, iteration.clusters, config, seed, device=device)
    labels = {}
    for i, uid in enumerate(utterance_ids):
        f = feats[i] if i in feats else frame_features(load(i), model_args, extractor)
        labels[uid] = nearest_centroid(f, centroids, memory_mb=config.memory_mb)
    return Labels(iteration=iteration.index, source=iteration.source, layer=iteration.layer,
                  clusters=iteration.clusters, labels=labels, centroids=centroids)
