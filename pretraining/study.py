"""The schedule study: every schedule × several training seeds at one step budget, on a corpus of
synthetic voices, profiled on a voice pretraining never heard; pooled into one summary.

``layerprobe study --out DIR`` (or ``scripts/schedule_study.sh``) runs, resumably:

1. the corpora (``layerprobe synth``, cached in ``DIR/corpus/``): the training voices and the
   held-out voice;
2. the input baseline: ``input:log-mel`` scored on the held-out voice (``DIR/baselines.json``);
3. the runs ``DIR/<schedule>/seed<S>/`` (each a resumable pretraining run; a finished one is
   kept), with learning-curve checkpoints whose first (step 0) is the random-init baseline;
4. per schedule, the runs pooled over seeds (``DIR/<schedule>/profile.json``, …);
5. ``DIR/summary.json`` and the figures in ``DIR/figures/`` (also the committed
   ``figures/study/``): per schedule and iteration the autoencoder index, best-layer phone proxy
   accuracy and PWCCA, target PNMI and masked accuracy, each as mean and std over seeds; the
   baselines; the learning targets of the study's scale, checked; every difference between
   schedules with its ratio to the training-seed std.

``--smoke`` runs the same steps at toy scale (tiny model, a minute of audio, a few steps) in a
few minutes: it checks the machinery, not the science.
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from layerprobe.atomic import atomic_write_text
from layerprobe.results import Result, load_results, save_results
from pretraining.config import SCHEDULES, PretrainConfig, resolve_config

TRAIN_VOICES = ("flite_slt", "flite_rms", "flite_awb", "kal_diphone", "slt_hts",
                "flite_slt@0.9", "flite_rms@0.9", "flite_awb@1.1", "kal_diphone@1.1",
                "slt_hts@1.1")
HELD_OUT_VOICE = "ked_diphone"  # a speaker no training voice shares
SUMMARY_FORMAT = "layerprobe-study-v1"
REQUIRED_SEED_RATIO = 3.0  # a difference is a finding when it exceeds 3 training-seed stds


@dataclass(frozen=True)
class StudyPlan:
    """What a study runs: corpora, config, schedules, seeds."""

    config: PretrainConfig
    schedules: tuple[str, ...]
    seeds: tuple[int, ...]
    iterations: int  # N of uniform / progressive / progressive-cluster (original: 2)
    train_minutes: float
    held_out_minutes: float
    train_voices: tuple[str, ...] = TRAIN_VOICES
    held_out_voice: str = HELD_OUT_VOICE

    def run_config(self, schedule: str, seed: int, out: Path) -> PretrainConfig:
        """The config of one run: the schedule, its iteration count, the seed and the corpora."""
        iterations = 2 if schedule == "original" else self.iterations
        return self.config.with_changes(
            schedule={"name": schedule, "iterations": iterations},
            train={"seed": seed},
            data={"path": str(out / "corpus" / "train")},
            profile={"corpus": str(out / "corpus" / "heldout")})


def study_plan(config: str | Path = "study", *, smoke: bool = False, seeds: int = 3,
               iterations: int = 3, schedules: Sequence[str] = SCHEDULES) -> StudyPlan:
    """The plan of a study (``smoke``: the toy scale of ``configs/study_smoke.toml``)."""
    unknown = [s for s in schedules if s not in SCHEDULES]
    if unknown:
        raise ValueError(f"unknown schedule(s) {unknown}; choose from {list(SCHEDULES)}")
    if seeds < 2:
        raise ValueError(f"a study needs at least 2 training seeds for a spread, got {seeds}")
    if iterations < 3:
        raise ValueError(f"the multi-iteration schedules need N >= 3 here, got {iterations}")
    cfg = PretrainConfig.from_toml(resolve_config("study_smoke" if smoke else config))
    return StudyPlan(config=cfg, schedules=tuple(schedules), seeds=tuple(range(seeds)),
                     iterations=iterations, train_minutes=1.0 if smoke else 120.0,
                     held_out_minutes=1.0 if smoke else 15.0,
                     train_voices=TRAIN_VOICES[:2] if smoke else TRAIN_VOICES)


def build_corpora(plan: StudyPlan, out: Path, *, progress: bool = True) -> None:
    """The training and held-out corpora (``layerprobe synth``; cached and resumable)."""
    from layerprobe.synth import synthesize_corpus

    synthesize_corpus(out / "corpus" / "train", voices=plan.train_voices,
                      minutes=plan.train_minutes, seed=0, text="per-voice", progress=progress)
    synthesize_corpus(out / "corpus" / "heldout", voices=[plan.held_out_voice],
                      minutes=plan.held_out_minutes, seed=1000, progress=progress)


def score_baselines(plan: StudyPlan, out: Path, *, log: Callable[[str], None]) -> list[Result]:
    """The log-mel input scored like a model on the held-out voice (cached)."""
    path = out / "baselines.json"
    if path.is_file():
        return load_results(path)
    from layerprobe.distributed import Dist
    from layerprobe.score import score_models
    from pretraining.profile import analysis_config

    config = plan.run_config(plan.schedules[0], plan.seeds[0], out)
    cfg = analysis_config(config.profile, "cpu")
    log("baseline: scoring the log-mel input on the held-out voice")
    results = score_models(["input:log-mel"], cfg.corpus, cfg, labels=["log-mel input"],
                           dist_info=Dist(), progress=False)
    save_results(results, path)
    return results


def run_all(plan: StudyPlan, out: Path, *, log: Callable[[str], None] = print) -> None:
    """Every run of the plan, in order; a finished run is kept, an interrupted one resumed."""
    from pretraining.run import run_pretraining

    # seed by seed: an interrupted study has every schedule at the same number of seeds
    runs = [(schedule, seed) for seed in plan.seeds for schedule in plan.schedules]
    for k, (schedule, seed) in enumerate(runs, start=1):
        run_dir = out / schedule / f"seed{seed}"
        timing = run_dir / "time.json"
        record = json.loads(timing.read_text()) if timing.is_file() else {"invocations": []}
        if record.get("completed"):
            continue
        log(f"study: run {k}/{len(runs)}: {schedule}, seed {seed}")
        tic = time.time()
        summary = run_pretraining(plan.run_config(schedule, seed, out), run_dir,
                                  resume=(run_dir / "plan.json").is_file(), log=log)
        record["invocations"].append(round(time.time() - tic, 1))
        record["completed"] = not summary.stopped_early
        atomic_write_text(timing, json.dumps(record, indent=1) + "\n")


def pool_schedules(plan: StudyPlan, out: Path, *, log: Callable[[str], None]) -> None:
    """Per schedule, the runs' profiles pooled over seeds (``DIR/<schedule>/profile.json``)."""
    from pretraining.profile import pool_seed_runs

    for schedule in plan.schedules:
        pool_seed_runs([out / schedule / f"seed{s}" for s in plan.seeds], out / schedule,
                       log=log)


# ------------------------------------------------------------------------------- the summary


def mean_std(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean and std (ddof 1) of the defined values, with their count."""
    xs = [float(v) for v in values if v is not None]
    return {"mean": statistics.fmean(xs) if xs else None,
            "std": statistics.stdev(xs) if len(xs) > 1 else None, "n": len(xs)}


def seed_ratio(a: dict[str, Any], b: dict[str, Any]) -> float | None:
    """(mean of b − mean of a) / pooled training-seed std, sqrt((sd_a² + sd_b²) / 2)."""
    if a["mean"] is None or b["mean"] is None or a["std"] is None or b["std"] is None:
        return None
    pooled = math.sqrt((a["std"] ** 2 + b["std"] ** 2) / 2)
    return (b["mean"] - a["mean"]) / pooled if pooled > 0 else math.inf


def _find(results: Sequence[Result], label: str, probe: str, metric: str) -> Result | None:
    return next((r for r in results if r.label == label and r.probe == probe
                 and r.metric == metric), None)


def _best(r: Result | None) -> float | None:
    return max(r.scores) if r is not None else None


def run_measures(run_dir: Path, metric: str) -> dict[int, dict[str, Any]]:
    """Per iteration of one run: the measures the summary pools (from its results files)."""
    from layerprobe.autoencoder import fbank_rise, word_drop

    results = load_results(run_dir / "profile.json")
    out: dict[int, dict[str, Any]] = {}
    for label in dict.fromkeys(r.label for r in results):
        first = next(r for r in results if r.label == label)
        word = _find(results, label, "word", metric)
        fbank = _find(results, label, "fbank", metric)
        quality = first.meta.get("targets_quality") or {}
        out[int(first.meta["iteration"])] = {
            "word_drop": word_drop(word.scores) if word else None,
            "fbank_rise": fbank_rise(fbank.scores) if fbank else None,
            "phone_proxy_best": _best(_find(results, label, "phone", "linear-accuracy")),
            "phone_pwcca_best": _best(_find(results, label, "phone", metric)),
            "word_pwcca_best": _best(word),
            "target_pnmi": quality.get("pnmi"),
            "target_phone_purity": quality.get("phone_purity"),
            "acc_masked": first.meta.get("acc_masked"),
            "cumulative_step": first.meta.get("cumulative_step"),
        }
    return out


MEASURES = ("word_drop", "fbank_rise", "phone_proxy_best", "phone_pwcca_best", "word_pwcca_best",
            "target_pnmi", "target_phone_purity", "acc_masked")


def random_init_measures(run_dir: Path, metric: str) -> dict[str, Any]:
    """The run's step-0 checkpoint (random init) from its learning curve, if it has one."""
    path = run_dir / "curve.json"
    if not path.is_file():
        return {}
    results = load_results(path)
    return {"phone_proxy_best": _best(_find(results, "it1@0", "phone", "linear-accuracy")),
            "phone_pwcca_best": _best(_find(results, "it1@0", "phone", metric))}


def summarise(plan: StudyPlan, out: Path) -> dict[str, Any]:
    """The study's summary (module docstring); every number with its std over seeds."""
    metric = "pwcca-centred" if "pwcca-centred" in plan.config.profile.metrics \
        else plan.config.profile.metrics[0]
    per_run = {(s, seed): run_measures(out / s / f"seed{seed}", metric)
               for s in plan.schedules for seed in plan.seeds}
    schedules: dict[str, Any] = {}
    for s in plan.schedules:
        iterations = sorted(per_run[(s, plan.seeds[0])])
        schedules[s] = {f"it{i}": {m: mean_std([per_run[(s, seed)].get(i, {}).get(m)
                                               for seed in plan.seeds]) for m in MEASURES}
                        for i in iterations}
        schedules[s]["final_iteration"] = f"it{iterations[-1]}"
    baselines = load_results(out / "baselines.json")
    # the step-0 model depends on the preset and the seed only: one per seed
    random = [random_init_measures(out / plan.schedules[0] / f"seed{seed}", metric)
              for seed in plan.seeds]
    base = {"log_mel": {"phone_proxy": _best(_find(baselines, "log-mel input", "phone",
                                                   "linear-accuracy")),
                        "phone_pwcca": _best(_find(baselines, "log-mel input", "phone",
                                                   metric))},
            "random_init": {m: mean_std([r.get(m) for r in random])
                            for m in ("phone_proxy_best", "phone_pwcca_best")}}
    times = {f"{s}/seed{seed}": json.loads((out / s / f"seed{seed}" / "time.json").read_text())
             for s in plan.schedules for seed in plan.seeds
             if (out / s / f"seed{seed}" / "time.json").is_file()}
    corpus = {name: json.loads((out / "corpus" / name / "synth.json").read_text())
              for name in ("train", "heldout")}
    return {
        "format": SUMMARY_FORMAT,
        "metric": metric,
        "scale": {"preset": plan.config.model.preset, "total_steps":
                  plan.config.schedule.total_steps, "iterations_multi": plan.iterations,
                  "batch_seconds": plan.config.train.batch_seconds,
                  "first_layer": plan.config.schedule.first_layer,
                  "last_layer": plan.config.schedule.last_layer,
                  "first_clusters": plan.config.schedule.first_clusters,
                  "last_clusters": plan.config.schedule.last_clusters,
                  "lr": plan.config.train.lr, "seeds": list(plan.seeds)},
        "corpus": {name: {k: c.get(k) for k in ("voices", "seconds", "utterances", "seed",
                                                 "text", "failed_voices")}
                   for name, c in corpus.items()},
        "baselines": base,
        "schedules": schedules,
        "targets": learning_targets(schedules, base),
        "comparisons": compare_schedules(schedules),
        "run_seconds": times,
        "spread": "mean and std (ddof 1) over training seeds; ratios: difference / "
                  "sqrt((sd_a^2 + sd_b^2) / 2)",
    }


def learning_targets(schedules: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """The study scale's learning targets, checked on the original schedule (the schedule every
    study has; the others' first iteration is the same recipe with other step counts)."""
    name = "original" if "original" in schedules else next(iter(schedules))
    it1, it2 = schedules[name]["it1"], schedules[name].get("it2")
    out: dict[str, Any] = {"schedule": name}
    log_mel = base["log_mel"]["phone_proxy"]
    if it1["phone_proxy_best"]["mean"] is not None and log_mel is not None:
        gain = it1["phone_proxy_best"]["mean"] - log_mel
        out["proxy_gain_over_log_mel"] = {"value": gain, "target": 0.10, "met": gain >= 0.10}
    random = base["random_init"]["phone_pwcca_best"]["mean"]
    best = max((schedules[name][k]["phone_pwcca_best"]["mean"] or 0.0)
               for k in schedules[name] if k.startswith("it"))
    if random:
        out["phone_pwcca_over_random"] = {"value": best / random, "target": 3.0,
                                          "met": best / random >= 3.0}
    if it2 is not None:
        for key, measure in (("pnmi_it2_over_it1", "target_pnmi"),
                             ("phone_pwcca_it2_over_it1", "phone_pwcca_best"),
                             ("phone_proxy_it2_over_it1", "phone_proxy_best")):
            ratio = seed_ratio(it1[measure], it2[measure])
            out[key] = {"difference": None if it2[measure]["mean"] is None else
                        it2[measure]["mean"] - it1[measure]["mean"],
                        "seed_std_ratio": ratio, "target": REQUIRED_SEED_RATIO,
                        "met": ratio is not None and ratio > REQUIRED_SEED_RATIO}
    return out


def compare_schedules(schedules: dict[str, Any]) -> list[dict[str, Any]]:
    """Every pair of schedules on every measure of their final iterations: the difference and
    its ratio to the training-seed std (a finding when |ratio| > 3)."""
    rows = []
    for a, b in itertools.combinations(schedules, 2):
        fa, fb = schedules[a][schedules[a]["final_iteration"]], \
            schedules[b][schedules[b]["final_iteration"]]
        for measure in MEASURES:
            ratio = seed_ratio(fa[measure], fb[measure])
            if ratio is None:
                continue
            rows.append({"a": a, "b": b, "measure": measure,
                         "a_mean": fa[measure]["mean"], "b_mean": fb[measure]["mean"],
                         "difference": fb[measure]["mean"] - fa[measure]["mean"],
                         "seed_std_ratio": ratio,
                         "finding": abs(ratio) > REQUIRED_SEED_RATIO})
    return rows


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as a table (mean ± std over seeds) and the targets, for the terminal."""
    def cell(ms: dict[str, Any]) -> str:
        if ms["mean"] is None:
            return "n/a"
        return f"{ms['mean']:.3f}" + (f"±{ms['std']:.3f}" if ms["std"] is not None else "")

    cols = ("phone_proxy_best", "phone_pwcca_best", "word_drop", "fbank_rise", "target_pnmi",
            "acc_masked")
    lines = [f"{'schedule':<20}{'it':<5}" + "".join(f"{c:>19}" for c in cols)]
    for name, its in summary["schedules"].items():
        for it, measures in its.items():
            if it.startswith("it"):
                lines.append(f"{name:<20}{it:<5}" + "".join(f"{cell(measures[c]):>19}"
                                                            for c in cols))
    base = summary["baselines"]
    lines.append(f"baselines: log-mel input phone proxy {base['log_mel']['phone_proxy']:.3f}, "
                 f"phone PWCCA {base['log_mel']['phone_pwcca']:.3f}; random init phone proxy "
                 f"{cell(base['random_init']['phone_proxy_best'])}, phone PWCCA "
                 f"{cell(base['random_init']['phone_pwcca_best'])}")
    for key, target in summary["targets"].items():
        if isinstance(target, dict):
            lines.append(f"target {key}: {json.dumps(target)}")
    findings = [c for c in summary["comparisons"] if c["finding"]]
    lines.append(f"schedule differences beyond {REQUIRED_SEED_RATIO:g} seed stds: "
                 + ("; ".join(f"{c['b']} − {c['a']} {c['measure']} {c['difference']:+.3f} "
                              f"({c['seed_std_ratio']:+.1f} std)" for c in findings)
                    or "none"))
    return "\n".join(lines)


def draw_figures(plan: StudyPlan, out: Path, figures: Path) -> list[Path]:
    """Layerwise curves (final iteration of each schedule, bands over seeds), learning curves
    and the targets' teacher quality per iteration."""
    from dataclasses import replace

    from layerprobe.plots import learning_curve_points, plot_curves, plot_layerwise

    written = []
    finals = []
    for s in plan.schedules:
        pooled = load_results(out / s / "profile.json")
        last = max(int(r.meta["iteration"]) for r in pooled)
        finals += [replace(r, label=s) for r in pooled if r.label == f"it{last}"]
    baseline = load_results(out / "baselines.json")
    written.append(plot_layerwise(finals + baseline, figures / "layerwise_final.png",
                                  title="final iteration of each schedule (bands: ±1 std over "
                                        "training seeds); point: the log-mel input"))
    curves: dict[str, dict[str, list]] = {}
    for s in plan.schedules:
        per_seed = [learning_curve_points(load_results(out / s / f"seed{seed}" / "curve.json"))
                    for seed in plan.seeds]
        for panel in per_seed[0]:
            xs = sorted({p[0] for p in per_seed[0][panel]})
            points = []
            for x in xs:
                values = [next((p[1] for p in run.get(panel, []) if p[0] == x), None)
                          for run in per_seed]
                ms = mean_std(values)
                points.append((x, ms["mean"], ms["std"]))
            curves.setdefault(panel, {})[s] = points
    written.append(plot_curves(curves, figures / "learning_curves.png",
                               title="best-layer scores and autoencoder index over training "
                                     "(bands: ±1 std over training seeds)"))
    summary = json.loads((out / "summary.json").read_text())
    quality: dict[str, dict[str, list]] = {}
    for s, its in summary["schedules"].items():
        for measure, panel in (("target_pnmi", "PNMI of the targets"),
                               ("target_phone_purity", "phone purity of the targets"),
                               ("phone_proxy_best", "phone proxy accuracy, best layer")):
            quality.setdefault(panel, {})[s] = [
                (int(it[2:]), m[measure]["mean"], m[measure]["std"])
                for it, m in its.items() if it.startswith("it") and m[measure]["mean"] is not None]
    written.append(plot_curves(quality, figures / "iterations.png", xlabel="iteration",
                               title="teacher quality and proxy per iteration (±1 std over "
                                     "training seeds)"))
    return written


def run_study(plan: StudyPlan, out: str | Path, *, figures: str | Path | None = None,
              progress: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every step of the study (module docstring), resumable; returns the summary."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    build_corpora(plan, out, progress=progress)
    score_baselines(plan, out, log=log)
    run_all(plan, out, log=log)
    pool_schedules(plan, out, log=log)
    summary = summarise(plan, out)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    for path in draw_figures(plan, out, out / "figures"):
        log(f"wrote {path}")
    if figures is not None:
        figures = Path(figures)
        figures.mkdir(parents=True, exist_ok=True)
        atomic_write_text(figures / "summary.json", json.dumps(summary, indent=1) + "\n")
        for path in draw_figures(plan, out, figures):
            log(f"wrote {path}")
    log(format_summary(summary))
    return summary
