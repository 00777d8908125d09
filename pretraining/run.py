"""A pretraining run end to end: plan → per iteration (targets, training, checkpoint, profile).

Run folder::

    RUN_DIR/config.json   the resolved config      RUN_DIR/plan.json    the resolved plan
    RUN_DIR/state.pt      the resume state (model, optimizer, scheduler, RNG, data position)
    RUN_DIR/it{i}/labels.pt   targets of iteration i
    RUN_DIR/it{i}/label_stage.json   its label stage: seconds (features + k-means), skipped files,
                              teacher quality of the targets on the probe corpus
    RUN_DIR/it{i}/steps/step{s}.pt   learning-curve checkpoints (``[profile] every_steps``)
    RUN_DIR/it{i}/ckpt.pt     final checkpoint of iteration i (``layerprobe score`` reads it)
    RUN_DIR/it{i}/probe.json  its layerwise scores; it{i}/curve.json with the step checkpoints'
    RUN_DIR/profile.json, profile.png, autoencoder.json   all iterations so far
    RUN_DIR/curve.json, curve.png   learning curves over cumulative steps

Phases are marked by files written atomically: ``labels.pt`` (targets done),
``label_stage.json`` (their quality measured), ``ckpt.pt`` (training done), ``probe.json``
(profiled), so ``--resume`` redoes only what is missing; an iteration in training continues from
``state.pt``. Labels and model initialisation are seeded,
so a resumed run ends in the same state as an uninterrupted one.

Initialisation across iterations (``[train] init_from_previous``): false by default, as in
fairseq HuBERT, where every iteration trains a fresh model. When true, iteration i > 1 starts
from iteration i − 1's weights (conv stack, encoder, mask embedding) with a freshly initialised
prediction head (``final_proj`` and ``label_embeddings``), since cluster ids are not comparable
across k-means runs. Whether Vielzeuf (2024) continued is not known.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch

from layerprobe.distributed import Dist, destroy_distributed, init_distributed
from pretraining.config import PretrainConfig
from pretraining.data import AudioSet, BatchStream
from pretraining.model import (
    build_model,
    load_checkpoint,
    model_args,
    reset_prediction_head,
    save_checkpoint,
)
from pretraining.schedules import Iteration, Plan, plan_from_config
from pretraining.storage import UnreadableFile, read_json, read_torch
from pretraining.targets import Labels, compute_labels
from pretraining.train import STATE_FORMAT, seed_all, train_iteration

# config keys that may differ when resuming (they do not change the trained weights)
RESUME_FREE = {("train", "log_every"), ("train", "save_every"), ("train", "device"),
               ("train", "num_threads"), ("train", "compile"), ("train", "max_bad_steps"),
               ("train", "max_oom_batches")}
# keys a resume may change to get past a fault (a diverged or out-of-memory run): the training
# from the resume point on follows the new values; config.json records them and the change
RESUME_ADJUSTABLE = {("train", "lr"), ("train", "warmup_fraction"), ("train", "grad_clip"),
                     ("train", "batch_seconds"), ("train", "grad_accum")}


@dataclass(frozen=True)
class RunSummary:
    run_dir: Path
    plan: Plan
    completed: tuple[int, ...]  # iterations with a final checkpoint
    stopped_early: bool
    seconds: float


def _write_json(path: Path, data: Any) -> None:
    from layerprobe.atomic import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=1) + "\n")


def _config_differences(old: dict, new: dict, keys: set | None = None) -> list[str]:
    """``[section] key: old → new`` for the keys that differ (only ``keys``, if given; else all
    but the profile's, :data:`RESUME_FREE` and :data:`RESUME_ADJUSTABLE`)."""
    diffs = []
    for section in sorted(set(old) | set(new)):
        a, b = old.get(section, {}), new.get(section, {})
        if not isinstance(a, dict) or not isinstance(b, dict):
            continue  # e.g. the "resumed_with" history
        for key in sorted(set(a) | set(b)):
            if keys is not None and (section, key) not in keys:
                continue
            if keys is None and (section == "profile" or (section, key) in RESUME_FREE
                                 or (section, key) in RESUME_ADJUSTABLE):
                continue
            if a.get(key) != b.get(key):
                diffs.append(f"[{section}] {key}: {a.get(key)!r} → {b.get(key)!r}")
    return diffs


def prepare_run_dir(run_dir: Path, config: PretrainConfig, plan: Plan, resume: bool,
                    dist_info: Dist) -> None:
    """Create the run folder, or check on ``resume`` that it holds the same plan and config."""
    plan_path, config_path = run_dir / "plan.json", run_dir / "config.json"
    if not dist_info.main:  # rank 0 checks and creates; the others wait for it
        dist_info.barrier()
        return
    if plan_path.is_file():
        if resume:  # temporary files of writes a kill interrupted (the targets are intact)
            for stale in run_dir.rglob(".*.tmp"):
                stale.unlink(missing_ok=True)
        if not resume:
            raise ValueError(f"{run_dir}: already holds a run; pass --resume to continue it or "
                             f"choose another --out")
        old = Plan.from_dict(read_json(plan_path, "plan", "it is written when a run starts: "
                                       "delete the run folder to start again"))
        if old != plan:
            raise ValueError(f"{run_dir}: --resume with a different plan;\nsaved:\n{old.format()}"
                             f"\nnow:\n{plan.format()}")
        saved = read_json(config_path, "pretraining config",
                          "it is written when a run starts: delete the run folder to start again")
        diffs = _config_differences(saved, config.to_dict())
        if diffs:
            raise ValueError(f"{run_dir}: --resume with a different config: " + "; ".join(diffs))
        changed = _config_differences(saved, config.to_dict(), RESUME_ADJUSTABLE)
        if changed:
            warnings.warn(f"{run_dir}: resuming with " + "; ".join(changed) + " (training "
                          "from the resume point on follows the new values)", UserWarning,
                          stacklevel=2)
            history = [*saved.get("resumed_with", []),
                       {"changes": changed, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}]
            _write_json(config_path, {**config.to_dict(), "resumed_with": history})
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_json(config_path, config.to_dict())
        _write_json(plan_path, plan.to_dict())
    dist_info.barrier()


def _load_state(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    remedy = ("delete it to restart the unfinished iteration from its first step (finished "
              "iterations are kept)")
    state = read_torch(path, "resume state", remedy)
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise UnreadableFile(f"{path}: not a {STATE_FORMAT} resume state; {remedy}")
    return state


def iteration_model(config: PretrainConfig, it: Iteration, run_dir: Path
                    ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A seeded fresh model for iteration ``it`` (or the previous one's weights, new head)."""
    args = model_args(config.model.preset, it.clusters, config.model.overrides)
    seed_all(config.train.seed * 1_000 + it.index)
    model = build_model(args)
    if config.train.init_from_previous and it.index > 1:
        previous, prev_args, _ = load_checkpoint(run_dir / f"it{it.index - 1}" / "ckpt.pt")
        if {k: v for k, v in prev_args.items() if k != "num_classes"} != \
                {k: v for k, v in args.items() if k != "num_classes"}:
            raise ValueError(f"iteration {it.index}: init_from_previous needs the same "
                             f"architecture as iteration {it.index - 1}")
        state = {k: v for k, v in previous.state_dict().items()
                 if not k.startswith("logit_generator")}
        model.load_state_dict(state, strict=False)
        reset_prediction_head(model, it.clusters, seed=config.train.seed * 1_000 + it.index)
    return model.train(), args


def _save_snapshot(it_dir: Path, args: dict[str, Any], model: torch.nn.Module,
                   meta: dict[str, Any], offset: int, step: int, stats: dict[str, Any]) -> None:
    """A learning-curve checkpoint ``it{i}/steps/step{step}.pt`` (``offset``: the steps of the
    earlier iterations)."""
    save_checkpoint(it_dir / "steps" / f"step{step:07d}.pt", args, model.state_dict(),
                    {**meta, "step": step, "cumulative_step": offset + step,
                     "train_stats": stats})


def _label_stage(config: PretrainConfig, it: Iteration, run_dir: Path, audio: AudioSet,
                 probe_args: dict[str, Any], device: torch.device,
                 log: Callable[[str], None]) -> None:
    """Targets of iteration ``it`` (``labels.pt``), then their teacher quality on the probe
    corpus; ``label_stage.json`` marks both done. Labels are saved first, so a failure of the
    quality measurement (e.g. a probe corpus without phone tiers) loses no k-means work:
    ``--resume`` measures it again from the saved labels."""
    it_dir = run_dir / f"it{it.index}"
    labels_path = it_dir / "labels.pt"
    previous = run_dir / f"it{it.index - 1}" / "ckpt.pt" if it.index > 1 else None
    if labels_path.is_file():
        labels = Labels.load(labels_path)
    else:
        tic = time.perf_counter()
        labels = compute_labels(audio.ids, audio.load, it, probe_args, config.kmeans,
                                previous_ckpt=previous, seed=config.train.seed * 1_000 + it.index,
                                device=device, log=log)
        labels = replace(labels, seconds=time.perf_counter() - tic)
        log(f"iteration {it.index}: label stage {labels.seconds:.1f} s")
        labels.save(labels_path)
    quality = None
    if config.profile.enabled and config.profile.teacher_quality:
        from pretraining.profile import probe_corpus
        from pretraining.teacher import teacher_quality

        tic = time.perf_counter()
        quality = teacher_quality(labels, it, probe_args, config.kmeans,
                                  probe_corpus(config.profile, str(device)),
                                  previous_ckpt=previous, device=str(device), log=log)
        quality["seconds"] = round(time.perf_counter() - tic, 3)
    _write_json(it_dir / "label_stage.json", {
        "seconds": labels.seconds, "targets": it.target_name, "device": str(device),
        "utterances": len(labels.labels), "skipped": list(labels.skipped),
        "audio_seconds": sum(audio.durations), "teacher_quality": quality})


def run_pretraining(config: PretrainConfig, run_dir: str | Path, *, resume: bool = False,
                    stop_at: tuple[int, int] | None = None,
                    log: Callable[[str], None] = print) -> RunSummary:
    """Run (or, with ``resume``, continue) every iteration of the config's plan in ``run_dir``.

    ``stop_at=(iteration, step)`` stops after that step's state is saved, as a kill would.
    Under ``torchrun`` the process group is destroyed on the way out: left to the interpreter's
    exit, gloo's threads can abort a rank ("terminate called without an active exception") after
    training has finished.
    """
    if config.train.num_threads:
        torch.set_num_threads(config.train.num_threads)
    dist_info, device = init_distributed(config.train.device)
    try:
        return _run_plan(config, Path(run_dir), dist_info, device, resume=resume,
                         stop_at=stop_at, log=log)
    finally:
        destroy_distributed(dist_info)


def _run_plan(config: PretrainConfig, run_dir: Path, dist_info: Dist, device: torch.device, *,
              resume: bool, stop_at: tuple[int, int] | None,
              log: Callable[[str], None]) -> RunSummary:
    """The body of :func:`run_pretraining`, inside the process group."""
    started = time.time()
    plan = plan_from_config(config.schedule)
    probe_args = model_args(config.model.preset, 2, config.model.overrides)
    n_layers = probe_args["encoder_num_layers"]
    too_high = [it.layer for it in plan.iterations if it.layer is not None and it.layer > n_layers]
    if too_high:
        raise ValueError(f"supervision layer(s) {too_high} above the model's {n_layers} layers "
                         f"(preset {config.model.preset!r})")
    if dist_info.main:
        log(plan.format())
    prepare_run_dir(run_dir, config, plan, resume, dist_info)
    audio = AudioSet.from_config(config.data)
    if dist_info.main:
        log(f"data: {len(audio)} utterances, {sum(audio.durations) / 60:.1f} min of audio; "
            f"device {device}, {dist_info.world_size} process(es)")
    state_path = run_dir / "state.pt"
    state = _load_state(state_path) if resume else None
    completed: list[int] = []
    for it in plan.iterations:
        it_dir = run_dir / f"it{it.index}"
        ckpt = it_dir / "ckpt.pt"
        if not ckpt.is_file():
            labels_path = it_dir / "labels.pt"
            if not (it_dir / "label_stage.json").is_file() and dist_info.main:
                _label_stage(config, it, run_dir, audio, probe_args, device, log)
            dist_info.barrier()
            labels = Labels.load(labels_path)
            train_audio = audio.subset(list(labels.labels)) if labels.skipped else audio
            model, args = iteration_model(config, it, run_dir)
            seed_all(config.train.seed * 1_000 + it.index * 10 + 7 + dist_info.rank * 100_003)
            stream = BatchStream(train_audio, labels.labels, args,
                                 batch_seconds=config.train.batch_seconds,
                                 max_sample_seconds=config.data.max_sample_seconds,
                                 seed=config.train.seed, iteration=it.index,
                                 rank=dist_info.rank, world_size=dist_info.world_size)
            resume_state = state if state is not None and state["iteration"] == it.index else None
            stop = stop_at[1] if stop_at is not None and stop_at[0] == it.index else None
            offset = sum(p.steps for p in plan.iterations[:it.index - 1])
            meta = {"iteration": it.index, "step": it.steps, "cumulative_step": offset + it.steps,
                    "schedule": plan.schedule, "plan": asdict(it), "targets": it.target_name,
                    "run": run_dir.name, "seed": config.train.seed, "torch": str(torch.__version__),
                    "config": config.to_dict()}
            every = config.profile.every_steps if config.profile.enabled else 0

            snapshot = partial(_save_snapshot, it_dir, args, model, meta, offset)
            if every and it.index == 1 and dist_info.main and resume_state is None:
                snapshot(0, {})  # the random-init model: where every curve starts
            stats = train_iteration(model, stream, iteration=it.index, steps=it.steps,
                                    config=config.train, device=device, state_path=state_path,
                                    resume=resume_state, dist_info=dist_info, stop_at_step=stop,
                                    snapshot_every=every, on_snapshot=snapshot, log=log)
            if stop is not None and stop < it.steps:
                return RunSummary(run_dir, plan, tuple(completed), True, time.time() - started)
            if dist_info.main:
                save_checkpoint(ckpt, args, model.state_dict(), {**meta, "train_stats": stats})
                log(f"iteration {it.index}: wrote {ckpt}")
            dist_info.barrier()
        completed.append(it.index)
        if config.profile.enabled and dist_info.main and not (it_dir / "probe.json").is_file():
            from pretraining.profile import profile_iteration

            profile_iteration(run_dir, it.index, len(plan.iterations), config.profile,
                              device=str(device), log=log,
                              meta={"schedule": plan.schedule, "run": run_dir.name,
                                    "seed": config.train.seed})
        dist_info.barrier()
    return RunSummary(run_dir, plan, tuple(completed), False, time.time() - started)
