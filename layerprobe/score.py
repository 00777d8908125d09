"""The scoring pipeline: one forward pass per utterance feeds every probe, layer and metric.

corpus + probes (items decided from alignments alone) ─┐
model (any source) → hidden states of all layers ──────┴→ pooled items → moment accumulators
(CCA metrics) and bounded feature buffers (MI, segment probes) → per-layer scores → Results.
"""

from __future__ import annotations

import platform
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

import layerprobe
from layerprobe.cca import cca_score_metrics, start_warm_up
from layerprobe.config import AnalysisConfig
from layerprobe.corpus import Corpus, CorpusWarning, load_audio, load_corpus
from layerprobe.distributed import Dist, init_distributed, resolve_device
from layerprobe.extract import iter_hidden_states
from layerprobe.labels import unique_labels
from layerprobe.linear import linear_accuracy
from layerprobe.memory import GB, MemoryPlan, ProbeShape, budget_from_gb, estimate, plan_passes
from layerprobe.mi import mi_score
from layerprobe.models import LayerModel, load
from layerprobe.probes import Probe, UtteranceTargets, build_probes, pool_spans
from layerprobe.registry import CCA_METRICS, SEGMENT_METRICS
from layerprobe.results import Result
from layerprobe.stats import Moments

MI_HELD_OUT_SPLITS = 2  # MI: k-means fit on all but the last two splits, scored on those
MI_PUBLISHED_CLUSTERS = {"phone": 500, "word": 5000}  # Pasad et al. 2023
MI_HELD_OUT_PER_CLUSTER = 10  # fewer held-out items per cluster: MI is biased toward 1
AUDIO_CACHE_BYTES = 2 * 2**30  # several models: decoded audio kept for the next model (~9 h)
SHARD_BLOCKS = 8  # utterances are dealt to ranks in at least this many blocks (8 ranks busy)
MAX_BLOCK_UTTERANCES = 64  # ... of at most this many utterances (the forward pass's read-ahead)


class ScoringWarning(UserWarning):
    """A probe or metric was left out of the results (the message says which and why)."""


def n_moment_slots(config: AnalysisConfig) -> int:
    """Slots of every probe's :class:`Moments`: one per shard id an item can carry
    (``n_splits * shards_per_split``; split seeds re-deal whole shards)."""
    return config.probe_config.n_shards


def utterance_blocks(n_utterances: int) -> list[range]:
    """Consecutive blocks of utterance indices, the units dealt to ranks (block ``b`` to rank
    ``b % W``): ``ceil(n / SHARD_BLOCKS)`` utterances each, at most ``MAX_BLOCK_UTTERANCES``.

    They depend on the corpus alone, not on the number of ranks: each block is batched for the
    forward pass and folded into the moments as one unit, so with compensated sums
    (``[cca] exact_sums``) a block contributes the same float64 numbers whichever rank ran it and
    the scores do not depend on the rank count."""
    if n_utterances < 0:
        raise ValueError(f"utterance_blocks: n_utterances must be >= 0, got {n_utterances}")
    size = max(1, min(MAX_BLOCK_UTTERANCES, -(-n_utterances // SHARD_BLOCKS)))
    return [range(start, min(start + size, n_utterances))
            for start in range(0, n_utterances, size)]


def mi_train_mask(shard_ids: np.ndarray, n_splits: int) -> np.ndarray:
    """MI's k-means train items (True) and held-out items (False) from the items' shard ids
    (the first split seed's split of shard ``s`` is ``s % n_splits``)."""
    return np.asarray(shard_ids) % n_splits < n_splits - MI_HELD_OUT_SPLITS


def mi_cluster_rule(probe: str, n_held_out: int, config: AnalysisConfig) -> tuple[int, str]:
    """MI's cluster count for ``probe`` and the rule that gave it.

    The config's ``phone_clusters`` / ``word_clusters`` when set (> 0); else the published count
    (500 phones, 5000 words) capped so that every cluster has on average at least
    ``MI_HELD_OUT_PER_CLUSTER`` held-out items: ``max(2, min(published, held_out // 10))``.
    """
    kind = "word" if probe.startswith("word") else "phone"
    chosen = config.word_clusters if kind == "word" else config.phone_clusters
    if chosen > 0:
        return chosen, f"config: {kind}_clusters = {chosen}"
    published = MI_PUBLISHED_CLUSTERS[kind]
    k = max(2, min(published, n_held_out // MI_HELD_OUT_PER_CLUSTER))
    return k, (f"from the data: max(2, min({published}, held-out items {n_held_out} // "
               f"{MI_HELD_OUT_PER_CLUSTER}))")


@dataclass
class _ProbeState:
    """What one probe accumulates while the corpus streams past (this rank's share)."""

    probe: Probe
    moments: Moments
    items: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(
        default_factory=dict)  # utterance index -> (pooled [L, n, d], labels [n], shard [n])
    n_items: int = 0


@dataclass(frozen=True)
class _Extracted:
    """An utterance on its way through the forward pass, carrying its probe targets."""

    index: int
    targets: dict[str, UtteranceTargets]


@dataclass
class _Plan:
    """What every model of one command shares: corpus, probes, cached targets and audio."""

    corpus: Corpus
    probes: dict[str, Probe]
    targets: dict[tuple[int, int, float], dict[str, UtteranceTargets]] = field(
        default_factory=dict)
    audio: dict[int, torch.Tensor] = field(default_factory=dict)
    audio_bytes: int = 0
    unreadable: dict[int, str] = field(default_factory=dict)  # index -> reason


def resolve_corpus(corpus: Corpus | str | Path | None, config: AnalysisConfig) -> Corpus:
    """A loaded corpus as is; else read ``corpus`` (or the config's, or the bundled one)."""
    if isinstance(corpus, Corpus):
        return corpus
    source = corpus if corpus is not None else (config.corpus or None)
    return load_corpus(source, word_tier=config.word_tier, phone_tier=config.phone_tier,
                       max_utterances=config.max_utterances or None, strict=config.strict,
                       seed=config.seed)


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
    return score_models([model], corpus, config, labels=None if label is None else [label],
                        progress=progress, skip_failed=skip_failed)


def score_models(
    models: Sequence[LayerModel | str | Path],
    corpus: Corpus | str | Path | None = None,
    config: AnalysisConfig | None = None,
    *,
    labels: Sequence[str] | None = None,
    progress: bool = True,
    skip_failed: bool = False,
    dist_info: Dist | None = None,
    on_model: Callable[[list[Result]], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> list[Result]:
    """Score several models on exactly the same items: the corpus is read and the probes are
    built once, every model streams the same utterances (audio decoded once when it fits
    ``AUDIO_CACHE_BYTES``). ``on_model`` gets each model's results as soon as they are
    computed (in one process; under torchrun with several ranks nothing is passed before the
    end), e.g. to save them so that an interrupted run loses no finished model. ``log`` gets
    each model's memory estimate and plan before its forward pass (:func:`memory_plan`).

    Under ``torchrun`` with ``W`` ranks the models are shared out whole first: model ``i`` of the
    first ``W * (n // W)`` runs on rank ``i % W`` exactly as in one process (no communication;
    every rank fits its own CCA and k-means). Each of the ``n % W`` models left over is scored by
    all ranks, each taking whole blocks of utterances (:func:`utterance_blocks`, block ``b`` on
    rank ``b % W``); the moments are summed slot by slot in rank order and the MI items gathered
    and put back in utterance order. MI is then exactly the single-process value, and so are the
    CCA scores with ``[cca] exact_sums`` (the default: compensated float64 sums, in which the
    order of the blocks does not show; without it they differ by the float64 summation order,
    amplified by the conditioning of the fits). Rank 0 returns every result, in model
    order; the other ranks return ``[]``. ``dist_info`` (default: from ``torchrun``'s
    environment) says which ranks take part; ``Dist()`` scores in this process alone.
    """
    config = config or AnalysisConfig()
    if not models:
        raise ValueError("score_models: no models given")
    if labels is not None and len(labels) != len(models):
        raise ValueError(f"{len(labels)} labels for {len(models)} models")
    if labels is None:  # the CLI's default too: the shortest path endings that tell them apart
        labels = unique_labels([m.name if isinstance(m, LayerModel) else str(m) for m in models])
    if dist_info is None:
        dist_info, device = init_distributed(config.device)
    else:  # e.g. Dist() on rank 0 of a training job: score in this process alone
        device = resolve_device(config.device, dist_info.local_rank)
    corpus = resolve_corpus(corpus, config)
    plan = _Plan(corpus, build_probes(corpus, config.probes, config.probe_config))
    world, n = dist_info.world_size, len(models)
    whole = n - n % world  # models scored whole, one rank each
    mine = [i for i in range(whole) if i % world == dist_info.rank]
    per_model: dict[int, list[Result]] = {}
    for i in [*mine, *range(whole, n)]:
        sharded = i >= whole
        per_model[i] = _score_one(
            models[i], plan, config, device, dist_info if sharded else Dist(),
            label=labels[i],
            progress=progress and dist_info.main, skip_failed=skip_failed,
            keep_audio=i + 1 < n, log=log if dist_info.main else None)
        if on_model is not None and world == 1:
            on_model(per_model[i])
    if world > 1 and whole:
        gathered = dist_info.gather_object({i: per_model[i] for i in mine})
        if not dist_info.main:
            return []
        assert gathered is not None
        for part in gathered:
            per_model.update(part)
    if not dist_info.main:
        return []
    return [r for i in range(n) for r in per_model[i]]


def _load_model(model: LayerModel | str | Path, device: torch.device,
                config: AnalysisConfig) -> tuple[LayerModel, str]:
    if isinstance(model, LayerModel):
        return model.to(device), model.name
    return load(model, device=device, fairseq_pretrained=config.fairseq_pretrained or None), \
        str(model)


def _read(plan: _Plan, index: int, strict: bool, keep: bool) -> torch.Tensor | None:
    """Utterance ``index``'s audio (cached when ``keep``); None (with a warning naming the file)
    if it cannot be decoded, or a ValueError with ``strict``."""
    if index in plan.audio:
        return plan.audio[index]
    if index in plan.unreadable:
        return None
    path = plan.corpus.utterances[index].audio_path
    try:
        wave = load_audio(path)
    except ValueError as err:
        if strict:
            raise
        plan.unreadable[index] = str(err)
        warnings.warn(f"{err}: skipped", CorpusWarning, stacklevel=3)
        return None
    if keep and plan.audio_bytes + wave.numel() * 4 <= AUDIO_CACHE_BYTES:
        plan.audio[index] = wave
        plan.audio_bytes += wave.numel() * 4
    return wave


def _targets(plan: _Plan, index: int, wave: torch.Tensor, n_frames: int, frame_rate: float
             ) -> dict[str, UtteranceTargets]:
    """Every probe's targets for one utterance at the model's frame count (computed once per
    frame count and rate, shared by every model)."""
    key = (index, n_frames, frame_rate)
    if key not in plan.targets:
        targets = {name: probe.targets(index, wave, n_frames, frame_rate)
                   for name, probe in plan.probes.items()}
        plan.targets[key] = {name: t for name, t in targets.items() if t.spans.shape[0] > 0}
    return plan.targets[key]


TIMINGS = ("read", "forward", "statistics", "reduce", "cca", "mi", "linear")


@dataclass
class _Pass:
    """What one pass over the corpus gathered for some probes (reduced over the ranks)."""

    states: dict[str, _ProbeState]
    n_utterances: int = 0
    audio_seconds: float = 0.0
    too_short: list[str] = field(default_factory=list)
    unreadable: list[tuple[int, str]] = field(default_factory=list)


def _score_one(model_spec_or_model: LayerModel | str | Path, plan: _Plan, config: AnalysisConfig,
               device: torch.device, dist_info: Dist, *, label: str, progress: bool,
               skip_failed: bool, keep_audio: bool,
               log: Callable[[str], None] | None = None) -> list[Result]:
    """Every probe and metric of one model: load it, fit its memory plan, stream the corpus once
    per pass (normally one) into the probes' statistics, score them."""
    started = time.time()
    model, model_spec = _load_model(model_spec_or_model, device, config)
    memory = memory_plan(model, plan, config, device, log=log)
    cca_metrics = [m for m in config.metrics if m in CCA_METRICS]
    timings = dict.fromkeys(TIMINGS, 0.0)
    # CUDA: the fits' libraries start in the background while the forward pass runs
    warm_up = start_warm_up(device) if cca_metrics and dist_info.main else None
    results: list[Result] = []
    meta: dict | None = None
    for k, probes in enumerate(memory.passes):
        several = len(memory.passes) > 1
        gathered = _stream(model, plan, config, device, dist_info, probes, timings,
                           label=label + (f" (pass {k + 1}/{len(memory.passes)})" if several
                                          else ""),
                           progress=progress, keep_audio=keep_audio or k + 1 < len(memory.passes),
                           warn=k == 0)
        if warm_up is not None:
            tic = time.perf_counter()
            warm_up.join()
            timings["cca"] += time.perf_counter() - tic  # what the warm-up did not hide
            warm_up = None
        if not dist_info.main:
            continue
        if meta is None:
            meta = _run_meta(model, plan, config, device, dist_info, gathered, memory)
        results += _probe_results(gathered, model, plan, config, device, meta, timings,
                                  model_spec=model_spec, label=label, started=started,
                                  skip_failed=skip_failed, progress=progress)
        del gathered  # the next pass's statistics take the freed memory
    if not dist_info.main:
        return []
    timings = {key: round(v, 3) for key, v in timings.items()}
    return [replace(r, meta={**r.meta, "timings": timings}) for r in results]


def memory_plan(model: LayerModel, plan: _Plan, config: AnalysisConfig, device: torch.device,
                *, log: Callable[[str], None] | None = None) -> MemoryPlan:
    """The estimate of what scoring ``model`` holds in memory and the passes that fit the
    budget (:mod:`layerprobe.memory`; CPU runs only: on CUDA the statistics live on the device),
    passed to ``log``; a :class:`~layerprobe.memory.MemoryBudgetError` at once if it cannot
    fit."""
    n_states = model.n_layers + 1
    shapes = [ProbeShape(name, probe.dy,
                         int(probe.n_items or 0) if segment_metrics(name, probe, config) else 0)
              for name, probe in plan.probes.items()]
    model_bytes = sum(t.numel() * t.element_size()
                      for t in (*model.parameters(), *model.buffers()))
    est = estimate(n_states, model.dim, shapes, n_slots=n_moment_slots(config),
                          compensated=config.exact_sums, packed=device.type == "cpu",
                          model_bytes=model_bytes,
                          frames_per_batch=int(config.batch_seconds * model.frame_rate))
    budget = budget_from_gb(config.memory_gb) if device.type == "cpu" else None
    chosen = plan_passes(est, budget)
    if log is not None:
        log(f"{model.name}: {chosen.describe()}")
    return chosen


def _stream(model: LayerModel, plan: _Plan, config: AnalysisConfig, device: torch.device,
            dist_info: Dist, probes: Sequence[str], timings: dict[str, float], *, label: str,
            progress: bool, keep_audio: bool, warn: bool) -> _Pass:
    """One pass over this rank's blocks of the corpus: each utterance's hidden states pooled
    into ``probes``' statistics; then the ranks' shares combined."""
    corpus = plan.corpus
    n_layers = model.n_layers + 1
    keep = {name: bool(segment_metrics(name, plan.probes[name], config)) for name in probes}
    # created up front: a rank that sees no items still takes part in the reduction
    gathered = _Pass({name: _ProbeState(plan.probes[name],
                                         Moments(n_layers, model.dim, plan.probes[name].dy,
                                                 n_moment_slots(config), device=device,
                                                 compensated=config.exact_sums))
                      for name in probes})
    blocks = [block for b, block in enumerate(utterance_blocks(len(corpus.utterances)))
              if b % dist_info.world_size == dist_info.rank]
    read_before, statistics_before = timings["read"], timings["statistics"]

    def waveforms(block: range) -> Iterator[tuple[_Extracted, torch.Tensor]]:
        for index in block:
            tic = time.perf_counter()
            wave = _read(plan, index, config.strict, keep_audio)
            if wave is None:
                timings["read"] += time.perf_counter() - tic
                continue
            if wave.shape[-1] < model.receptive_field:
                path = corpus.utterances[index].audio_path
                gathered.too_short.append(str(path))
                if warn:
                    warnings.warn(f"{path}: {wave.shape[-1]} samples, shorter than the "
                                  f"model's receptive field ({model.receptive_field} samples): "
                                  "skipped", UserWarning, stacklevel=2)
                continue
            n_frames = model.num_frames(int(wave.shape[-1]))
            targets = {name: t for name, t in _targets(plan, index, wave, n_frames,
                                                         model.frame_rate).items()
                       if name in gathered.states}
            timings["read"] += time.perf_counter() - tic
            if not targets:
                continue  # no probe samples this utterance: skip its forward pass
            gathered.audio_seconds += wave.shape[-1] / 16000
            yield _Extracted(index, targets), wave

    bar = tqdm(total=sum(len(block) for block in blocks), desc=f"scoring {label}", unit="utt",
               disable=not progress)
    loop_start = time.perf_counter()
    for block in blocks:  # each block batched and folded in alone: the same on any rank
        stream = iter_hidden_states(model, waveforms(block), batch_seconds=config.batch_seconds,
                                    max_chunk_seconds=config.max_chunk_seconds,
                                    dtype=torch.bfloat16 if config.bf16 else None,
                                    read_ahead=MAX_BLOCK_UTTERANCES)
        for item, hidden in stream:
            gathered.n_utterances += 1
            bar.update(1)
            tic = time.perf_counter()
            for name, targets in item.targets.items():
                _accumulate(gathered.states[name], hidden, targets, keep[name],
                            index=item.index, utterance=corpus.utterances[item.index].id)
            _synchronize(device)
            timings["statistics"] += time.perf_counter() - tic
        tic = time.perf_counter()
        for state in gathered.states.values():
            state.moments.end_block()
        _synchronize(device)
        timings["statistics"] += time.perf_counter() - tic
    bar.close()
    loop = time.perf_counter() - loop_start
    timings["forward"] += max(loop - (timings["read"] - read_before)
                              - (timings["statistics"] - statistics_before), 0.0)
    tic = time.perf_counter()
    counts = _reduce(gathered.states, dist_info, any(keep.values()),
                     (gathered.n_utterances, gathered.audio_seconds, len(gathered.too_short),
                      gathered.too_short[:1], sorted(plan.unreadable.items())))
    timings["reduce"] += time.perf_counter() - tic
    n_utterances, audio_seconds, n_short, short_examples, unreadable = counts
    gathered.n_utterances, gathered.audio_seconds = n_utterances, audio_seconds
    gathered.too_short = short_examples + [""] * (n_short - len(short_examples))
    gathered.unreadable = unreadable
    return gathered


def _run_meta(model: LayerModel, plan: _Plan, config: AnalysisConfig, device: torch.device,
              dist_info: Dist, gathered: _Pass, memory: MemoryPlan) -> dict:
    """How a model's results were made (every result of it carries this)."""
    return {
        "layerprobe": layerprobe.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "world_size": dist_info.world_size,
        "model_source": model.source,
        "n_layers": model.n_layers,
        "dim": model.dim,
        "frame_rate": model.frame_rate,
        "n_utterances": gathered.n_utterances,
        "n_unreadable": len(gathered.unreadable),
        "unreadable": [str(plan.corpus.utterances[i].audio_path)
                       for i, _ in gathered.unreadable],
        "n_too_short": len(gathered.too_short),
        "audio_seconds": round(gathered.audio_seconds, 3),
        "memory": {"estimate_gb": round(memory.peak / GB, 2),
                   "budget_gb": None if memory.budget is None else round(memory.budget / GB, 2),
                   "passes": [list(p) for p in memory.passes]},
        "config": config.to_dict(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _probe_results(gathered: _Pass, model: LayerModel, plan: _Plan, config: AnalysisConfig,
                   device: torch.device, meta: dict, timings: dict[str, float], *,
                   model_spec: str, label: str, started: float, skip_failed: bool,
                   progress: bool) -> list[Result]:
    """Every metric of every probe of a pass; a probe/metric that cannot be scored raises, or
    with ``skip_failed`` is left out with a :class:`ScoringWarning`."""
    cca_metrics = [m for m in config.metrics if m in CCA_METRICS]
    layers = list(range(model.n_layers + 1))
    results: list[Result] = []
    for name, state in gathered.states.items():
        shared: dict = {}  # the probe's CCA metrics, computed together on first use (shared fits)
        for metric in (*cca_metrics, *segment_metrics(name, state.probe, config)):
            tic = time.perf_counter()
            try:
                if state.n_items == 0:
                    n_short = len(gathered.too_short)
                    short = (f"; {n_short} utterance(s) shorter than the model's receptive "
                             f"field of {model.receptive_field} samples, e.g. "
                             f"{gathered.too_short[0]}" if n_short else "")
                    raise ValueError(f"no items in corpus {plan.corpus.name!r} "
                                     f"(check its alignments and tier names{short})")
                common = {"model": model_spec, "label": label, "corpus": plan.corpus.name,
                          "probe": name, "layers": layers}
                if metric == "mi":
                    results.append(_mi_result(state, config, device, common, meta, started))
                elif metric == "linear-accuracy":
                    results.append(_linear_result(state, config, device, common, meta,
                                                  started))
                else:
                    if not shared:
                        shared.update(_cca_fits(state, cca_metrics, config, device,
                                                f"fits {label}: {name}", progress))
                    cca = shared[metric]
                    if isinstance(cca, ValueError):
                        raise cca
                    results.append(Result(
                        **common, metric=metric, scores=[float(s) for s in cca.scores],
                        std=cca.std,
                        details={**cca.details, "n_items": state.n_items},
                        meta={**meta, "seconds": round(time.time() - started, 3)},
                    ))
            except ValueError as err:
                message = f"{label}: probe {name!r}, metric {metric!r}: {err}"
                if not skip_failed:
                    raise ValueError(message) from err
                warnings.warn(message, ScoringWarning, stacklevel=2)
            timings[_TIMING_OF.get(metric, "cca")] += time.perf_counter() - tic
    return results


def _cca_fits(state: _ProbeState, metrics: list[str], config: AnalysisConfig,
              device: torch.device, desc: str, progress: bool) -> dict:
    """A probe's CCA metrics from its statistics (shared fits), with a progress bar over the
    protocol's trials."""
    with tqdm(total=config.n_seeds * config.n_trials, desc=desc, unit="trial",
              disable=not progress, leave=False) as bar:
        return cca_score_metrics(state.moments, metrics, n_trials=config.n_trials,
                                 seed=config.seed, device=device,
                                 n_splits=config.probe_config.n_splits, n_seeds=config.n_seeds,
                                 on_trial=lambda: bar.update(1))


def segment_metrics(name: str, probe: Probe, config: AnalysisConfig) -> list[str]:
    """The metrics of ``config`` that need a probe's pooled items: MI for every segment probe,
    the linear proxy for the probes of ``[linear] probes``."""
    if probe.level != "segment":
        return []
    return [m for m in config.metrics if m in SEGMENT_METRICS
            and (m != "linear-accuracy" or name in config.linear_probes)]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_TIMING_OF = {"mi": "mi", "linear-accuracy": "linear"}  # other metrics: "cca"


def _reduce(states: dict[str, _ProbeState], dist_info: Dist, keep_items: bool, counts: tuple
            ) -> tuple:
    """Combine the ranks' shares on rank 0, in rank order: moments summed field by field and
    split slot by split slot (float64, compensated ones with their ``lo`` terms), pooled items
    and counts gathered. Returns the combined counts (on rank 0; this rank's on the others)."""
    if not dist_info.enabled:
        return counts
    for state in states.values():
        state.moments.all_reduce_()
        gathered = dist_info.gather_object(
            (state.n_items, state.items if keep_items else {}))
        if dist_info.main:
            assert gathered is not None
            state.n_items = sum(n for n, _ in gathered)
            state.items = {k: v for _, items in gathered for k, v in items.items()}
    gathered_counts = dist_info.gather_object(counts)
    if not dist_info.main:
        return counts
    assert gathered_counts is not None
    n_utt = sum(c[0] for c in gathered_counts)
    seconds = sum(c[1] for c in gathered_counts)
    n_short = sum(c[2] for c in gathered_counts)
    examples = [e for c in gathered_counts for e in c[3]]
    unreadable = sorted(u for c in gathered_counts for u in c[4])
    return n_utt, seconds, n_short, examples, unreadable


def _accumulate(
    state: _ProbeState,
    hidden: torch.Tensor,
    targets: UtteranceTargets,
    keep_items: bool,
    *,
    index: int,
    utterance: str,
) -> None:
    """Pool one utterance's hidden states to the probe's items and add them to the statistics."""
    if hidden.shape[1] < int(targets.spans[:, 1].max()):
        raise ValueError(
            f"utterance {utterance}: probe {state.probe.name!r} asks for frame "
            f"{int(targets.spans[:, 1].max())} but the model gave {hidden.shape[1]} frames"
        )
    pooled = pool_spans(hidden, targets.spans.to(hidden.device))
    state.moments.update(pooled, targets.y.to(hidden.device), targets.split.to(hidden.device))
    state.n_items += int(pooled.shape[1])
    if keep_items and state.probe.level == "segment":
        state.items[index] = (pooled.float().cpu(), targets.labels.cpu(), targets.split.cpu())


def _pooled_items(state: _ProbeState) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """A segment probe's kept items in utterance order (whatever the batching or the number of
    ranks): features ``[L, n, d]``, labels ``[n]``, shard ids ``[n]``."""
    order = sorted(state.items)
    features = torch.cat([state.items[i][0] for i in order], dim=1)
    labels = torch.cat([state.items[i][1] for i in order]).numpy()
    split = torch.cat([state.items[i][2] for i in order]).numpy()
    return features, labels, split


def _linear_result(state: _ProbeState, config: AnalysisConfig, device: torch.device,
                   common: dict, meta: dict, started: float) -> Result:
    """Held-out accuracy of a linear classifier of the segment labels, per layer, on the CCA
    protocol's splits and seeds (:func:`layerprobe.linear.linear_accuracy`): one trial per split
    seed, its first (dev, test) pair (the fits cost ~20x the CCA fits per trial)."""
    features, labels, split = _pooled_items(state)
    result = linear_accuracy(features, labels, split, n_splits=config.probe_config.n_splits,
                             n_trials=1, n_seeds=config.n_seeds, seed=config.seed,
                             device=device)
    return Result(**common, metric="linear-accuracy", scores=[float(s) for s in result.scores],
                  std=result.std, details={**result.details, "n_items": int(labels.shape[0])},
                  meta={**meta, "seconds": round(time.time() - started, 3)})


def _mi_result(state: _ProbeState, config: AnalysisConfig, device: torch.device, common: dict,
               meta: dict, started: float) -> Result:
    """Cluster each layer's segment features (items in utterance order, whatever the batching or
    the number of ranks) and score MI against the segment labels."""
    features, labels, split = _pooled_items(state)
    train = mi_train_mask(split, config.probe_config.n_splits)
    name = state.probe.name
    n_held_out = int((~train).sum())
    n_clusters, rule = mi_cluster_rule(name, n_held_out, config)
    k = min(n_clusters, int(train.sum()))
    if n_held_out < MI_HELD_OUT_PER_CLUSTER * k:
        warnings.warn(f"probe {name!r}: MI with {k} clusters for {n_held_out} held-out items "
                      f"(fewer than {MI_HELD_OUT_PER_CLUSTER} per cluster) is biased toward 1; "
                      "use fewer clusters ([mi] in the analysis config) or more items",
                      UserWarning, stacklevel=3)
    mi = mi_score(features, labels, train, n_clusters=n_clusters, kmeans=config.mi_kmeans,
                  seed=config.seed, n_seeds=config.n_seeds, device=device)
    return Result(
        **common, metric="mi", scores=[float(s) for s in mi.scores], std=mi.std,
        details={**mi.details, "n_items": int(labels.shape[0]), "n_clusters_rule": rule,
                 "held_out_splits": MI_HELD_OUT_SPLITS,
                 "biased": n_held_out < MI_HELD_OUT_PER_CLUSTER * k},
        meta={**meta, "seconds": round(time.time() - started, 3)},
    )


def summary_table(results: Sequence[Result]) -> str:
    """A per-layer table: one row per layer, one column per (label, probe, metric); scores with
    a spread print as ``score±std``, and each best layer names the layers within that spread."""
    if not results:
        return "(no results)"
    columns = [f"{r.label}:{r.probe}/{r.metric}" for r in results]
    n_layers = max(len(r.layers) for r in results)
    width = max(14 if any(r.std for r in results) else 10, *(len(c) for c in columns))

    def cell(r: Result, i: int) -> str:
        if i >= len(r.scores):
            return ""
        return f"{r.scores[i]:.4f}" + (f"±{r.std[i]:.4f}" if r.std is not None else "")

    lines = ["layer  " + "  ".join(c.rjust(width) for c in columns)]
    for i in range(n_layers):
        lines.append(f"{i:>5}  " + "  ".join(cell(r, i).rjust(width) for r in results))
    lines.append("; ".join(f"{r.label}:{r.probe}/{r.metric}: {_best_layer(r)}" for r in results))
    if any(r.std is not None for r in results):
        lines.append("(±: std over seeds; layers closer than their spread cannot be ordered)")
    return "\n".join(lines)


def _best_layer(r: Result) -> str:
    """``best layer i``, and the layers whose score is within the spread of the difference."""
    best = int(np.argmax(r.scores))
    if r.std is None:
        return f"best layer {r.layers[best]}"
    close = [r.layers[i] for i in range(len(r.scores)) if i != best
             and r.scores[best] - r.scores[i] <= (r.std[best] ** 2 + r.std[i] ** 2) ** 0.5]
    tied = f" (within spread: {', '.join(map(str, close))})" if close else ""
    return f"best layer {r.layers[best]}{tied}"
