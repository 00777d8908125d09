"""The scoring pipeline: one forward pass per utterance feeds every probe, layer and metric.

corpus + probes (items decided from alignments alone) ─┐
model (any source) → hidden states of all layers ──────┴→ pooled items → moment accumulators
(CCA metrics) and bounded feature buffers (MI, segment probes) → per-layer scores → Results.
"""

from __future__ import annotations

import platform
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

import layerprobe
from layerprobe.cca import cca_score_moments
from layerprobe.config import CCA_METRICS, AnalysisConfig
from layerprobe.corpus import Corpus, load_audio, load_corpus
from layerprobe.extract import iter_hidden_states
from layerprobe.mi import mi_score
from layerprobe.models import LayerModel, load, resolve_device
from layerprobe.probes import Probe, UtteranceTargets, build_probes, pool_spans
from layerprobe.results import Result
from layerprobe.stats import Moments

MI_HELD_OUT_SPLITS = 2  # MI: k-means fit on all but the last two splits, scored on those


class ScoringWarning(UserWarning):
    """A probe or metric was left out of the results (the message says which and why)."""


@dataclass
class _ProbeState:
    """What one probe accumulates while the corpus streams past."""

    probe: Probe
    moments: Moments | None = None
    mi_features: list[torch.Tensor] | None = None
    mi_labels: list[torch.Tensor] | None = None
    mi_splits: list[torch.Tensor] | None = None
    n_items: int = 0


def resolve_corpus(corpus: Corpus | str | Path | None, config: AnalysisConfig) -> Corpus:
    """A loaded corpus as is; else read ``corpus`` (or the config's, or the bundled one)."""
    if isinstance(corpus, Corpus):
        return corpus
    source = corpus if corpus is not None else (config.corpus or None)
    return load_corpus(source, word_tier=config.word_tier, phone_tier=config.phone_tier,
                       max_utterances=config.max_utterances or None, strict=config.strict,
                       seed=config.seed)


def model_label(spec: str | Path | LayerModel) -> str:
    """A short name for a model: the run/iteration folder for checkpoints, else the spec."""
    if isinstance(spec, LayerModel):
        return spec.name
    path = Path(spec)
    if path.suffix == ".pt":
        return f"{path.parent.name}/{path.stem}" if path.parent.name else path.stem
    return str(spec)


def score_model(
    model: LayerModel | str | Path,
    corpus: Corpus | str | Path | None = None,
    config: AnalysisConfig | None = None,
    *,
    label: str | None = None,
    progress: bool = True,
    skip_failed: bool = False,
) -> list[Result]:
    """Score every layer of ``model`` on ``corpus`` for each probe and metric of ``config``.

    A probe/metric that cannot be scored (e.g. fewer items than dimensions) raises a ValueError,
    or, with ``skip_failed``, is left out with a :class:`ScoringWarning` naming it and why.
    """
    config = config or AnalysisConfig()
    started = time.time()
    device = resolve_device(config.device)
    if not isinstance(model, LayerModel):
        model_spec = str(model)
        model = load(model, device=device, fairseq_pretrained=config.fairseq_pretrained or None)
    else:
        model_spec = model.name
        model = model.to(device)
    corpus = resolve_corpus(corpus, config)
    probes = build_probes(corpus, config.probes, config.probe_config)
    states = {name: _ProbeState(probe) for name, probe in probes.items()}
    want_mi = "mi" in config.metrics
    cca_metrics = [m for m in config.metrics if m in CCA_METRICS]
    n_splits = config.probe_config.n_splits
    n_shards = config.probe_config.n_shards

    pending: dict[int, dict[str, UtteranceTargets]] = {}
    audio_seconds = 0.0
    timings = {"read": 0.0, "forward": 0.0, "statistics": 0.0, "cca": 0.0, "mi": 0.0}
    too_short: list[str] = []

    def waveforms() -> Iterator[tuple[int, torch.Tensor]]:
        nonlocal audio_seconds
        for index, utt in enumerate(corpus.utterances):
            tic = time.perf_counter()
            wave = load_audio(utt.audio_path)
            if wave.shape[-1] < model.receptive_field:
                too_short.append(str(utt.audio_path))
                warnings.warn(f"{utt.audio_path}: {wave.shape[-1]} samples, shorter than the "
                              f"model's receptive field ({model.receptive_field} samples): "
                              "skipped", UserWarning, stacklevel=2)
                continue
            n_frames = model.num_frames(int(wave.shape[-1]))
            targets = {
                name: probe.targets(index, wave, n_frames, model.frame_rate)
                for name, probe in probes.items()
            }
            targets = {name: t for name, t in targets.items() if t.spans.shape[0] > 0}
            timings["read"] += time.perf_counter() - tic
            if not targets:
                continue  # no probe samples this utterance: skip its forward pass
            pending[index] = targets
            audio_seconds += wave.shape[-1] / 16000
            yield index, wave

    dtype = torch.bfloat16 if config.bf16 else None
    stream = iter_hidden_states(
        model,
        waveforms(),
        batch_seconds=config.batch_seconds,
        max_chunk_seconds=config.max_chunk_seconds,
        dtype=dtype,
    )
    bar = tqdm(stream, total=len(corpus.utterances), desc=f"scoring {label or model_spec}",
               unit="utt", disable=not progress)
    n_utterances = 0
    loop_start = time.perf_counter()
    for index, hidden in bar:
        n_utterances += 1
        tic = time.perf_counter()
        for name, targets in pending.pop(index).items():
            _accumulate(states[name], hidden, targets, n_shards, want_mi,
                        utterance=corpus.utterances[index].id)
        _synchronize(device)
        timings["statistics"] += time.perf_counter() - tic
    bar.close()
    loop = time.perf_counter() - loop_start
    timings["forward"] = max(loop - timings["read"] - timings["statistics"], 0.0)

    layers = list(range(model.n_layers + 1))
    meta = {
        "layerprobe": layerprobe.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "model_source": model.source,
        "n_layers": model.n_layers,
        "dim": model.dim,
        "frame_rate": model.frame_rate,
        "n_utterances": n_utterances,
        "audio_seconds": round(audio_seconds, 3),
        "config": config.to_dict(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    label = label or model_label(model_spec)
    results: list[Result] = []
    for name, state in states.items():
        for metric in (*cca_metrics, *(["mi"] if want_mi and state.probe.level == "segment"
                                       else [])):
            tic = time.perf_counter()
            try:
                if state.n_items == 0:
                    short = (f"; {len(too_short)} utterance(s) shorter than the model's "
                             f"receptive field of {model.receptive_field} samples, e.g. "
                             f"{too_short[0]}" if too_short else "")
                    raise ValueError(f"no items in corpus {corpus.name!r} "
                                     f"(check its alignments and tier names{short})")
                if metric == "mi":
                    results.append(_mi_result(state, config, n_splits, layers, model_spec,
                                              label, corpus.name, meta, started))
                else:
                    assert state.moments is not None
                    cca = cca_score_moments(state.moments, n_trials=config.n_trials,
                                            seed=config.seed, metric=metric, device=device,
                                            n_splits=n_splits, n_seeds=config.n_seeds)
                    results.append(Result(
                        model=model_spec, label=label, corpus=corpus.name, probe=name,
                        metric=metric, layers=layers, scores=[float(s) for s in cca.scores],
                        std=cca.std,
                        details={**cca.details, "n_items": state.n_items},
                        meta={**meta, "seconds": round(time.time() - started, 3)},
                    ))
            except ValueError as err:
                message = f"probe {name!r}, metric {metric!r}: {err}"
                if not skip_failed:
                    raise ValueError(message) from err
                warnings.warn(message, ScoringWarning, stacklevel=2)
            timings["mi" if metric == "mi" else "cca"] += time.perf_counter() - tic
    timings = {k: round(v, 3) for k, v in timings.items()}
    return [replace(r, meta={**r.meta, "timings": timings}) for r in results]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _accumulate(
    state: _ProbeState,
    hidden: torch.Tensor,
    targets: UtteranceTargets,
    n_splits: int,
    want_mi: bool,
    *,
    utterance: str,
) -> None:
    """Pool one utterance's hidden states to the probe's items and add them to the statistics."""
    if hidden.shape[1] < int(targets.spans[:, 1].max()):
        raise ValueError(
            f"utterance {utterance}: probe {state.probe.name!r} asks for frame "
            f"{int(targets.spans[:, 1].max())} but the model gave {hidden.shape[1]} frames"
        )
    pooled = pool_spans(hidden, targets.spans.to(hidden.device))
    if state.moments is None:
        state.moments = Moments.empty(
            hidden.shape[0], hidden.shape[-1], state.probe.dy, n_splits, device=hidden.device
        )
    state.moments.update(pooled, targets.y.to(hidden.device), targets.split.to(hidden.device))
    state.n_items += int(pooled.shape[1])
    if want_mi and state.probe.level == "segment":
        if state.mi_features is None:
            state.mi_features, state.mi_labels, state.mi_splits = [], [], []
        state.mi_features.append(pooled.float().cpu())
        state.mi_labels.append(targets.labels.cpu())
        state.mi_splits.append(targets.split.cpu())


def _mi_result(
    state: _ProbeState,
    config: AnalysisConfig,
    n_splits: int,
    layers: list[int],
    model_spec: str,
    label: str,
    corpus_name: str,
    meta: dict,
    started: float,
) -> Result:
    """Cluster each layer's segment features and score MI against the segment labels."""
    assert state.mi_features is not None and state.mi_labels is not None
    assert state.mi_splits is not None
    features = torch.cat(state.mi_features, dim=1).numpy()
    labels = torch.cat(state.mi_labels).numpy()
    split = torch.cat(state.mi_splits).numpy()
    train = split % n_splits < n_splits - MI_HELD_OUT_SPLITS
    name = state.probe.name
    n_clusters = config.word_clusters if name.startswith("word") else config.phone_clusters
    n_held_out = int((~train).sum())
    if min(n_clusters, int(train.sum())) > n_held_out:
        warnings.warn(f"probe {name!r}: MI with {min(n_clusters, int(train.sum()))} clusters for "
                      f"{n_held_out} held-out items is biased toward 1 (most items get a cluster "
                      "of their own); use fewer clusters ([mi] in the analysis config)",
                      UserWarning, stacklevel=3)
    batch_size = 4000 if name.startswith("word") else 1500
    mi = mi_score(features, labels, train, n_clusters=n_clusters, batch_size=batch_size,
                  seed=config.seed, max_iter=config.mi_max_iter)
    return Result(
        model=model_spec, label=label, corpus=corpus_name, probe=name, metric="mi",
        layers=layers, scores=[float(s) for s in mi.scores],
        details={**mi.details, "n_items": int(labels.shape[0]),
                 "held_out_splits": MI_HELD_OUT_SPLITS, "n_train": int(train.sum())},
        meta={**meta, "seconds": round(time.time() - started, 3)},
    )


def score_models(
    models: Sequence[LayerModel | str | Path],
    corpus: Corpus | str | Path | None = None,
    config: AnalysisConfig | None = None,
    *,
    labels: Sequence[str] | None = None,
    progress: bool = True,
    skip_failed: bool = False,
) -> list[Result]:
    """Score several models on exactly the same items (one corpus and probe plan, same seed)."""
    config = config or AnalysisConfig()
    if labels is not None and len(labels) != len(models):
        raise ValueError(f"{len(labels)} labels for {len(models)} models")
    corpus = resolve_corpus(corpus, config)
    results: list[Result] = []
    for i, model in enumerate(models):
        label = labels[i] if labels is not None else None
        results.extend(score_model(model, corpus, config, label=label, progress=progress,
                                   skip_failed=skip_failed))
    return results


def summary_table(results: Sequence[Result]) -> str:
    """A per-layer table: one row per layer, one column per (label, probe, metric)."""
    if not results:
        return "(no results)"
    columns = [f"{r.label}:{r.probe}/{r.metric}" for r in results]
    n_layers = max(len(r.layers) for r in results)
    width = max(10, *(len(c) for c in columns))
    lines = ["layer  " + "  ".join(c.rjust(width) for c in columns)]
    for i in range(n_layers):
        cells = [
            f"{r.scores[i]:.4f}".rjust(width) if i < len(r.scores) else "".rjust(width)
            for r in results
        ]
        lines.append(f"{i:>5}  " + "  ".join(cells))
    best = [f"{r.probe}/{r.metric}: best layer {int(np.argmax(r.scores))}" for r in results]
    lines.append("; ".join(best))
    return "\n".join(lines)
