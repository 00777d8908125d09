"""The ``layerprobe`` command line: a thin layer over score, plots, synth and pretraining.

Exit codes: 0 success; 1 bad input or a failed run (the message names the file and the problem);
2 wrong command-line usage (argparse).
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

from layerprobe.registry import ALL_METRICS, ALL_PROBES, MI_BACKENDS, expand_metrics, expand_probes

PROBE_CHOICES = (*ALL_PROBES, "all")
METRIC_CHOICES = (*ALL_METRICS, "all")


def _analysis_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", help="corpus: folder, LibriSpeech tree or manifest "
                        "(default: the bundled corpus, or the config's)")
    parser.add_argument("--config", type=Path, help="analysis config TOML (analysis_configs/)")
    parser.add_argument("--probe", action="append", choices=PROBE_CHOICES,
                        help="probe(s) to score; repeatable (default: the config's, "
                        "or fbank, phone and word)")
    parser.add_argument("--metric", action="append", choices=METRIC_CHOICES,
                        help="metric(s); repeatable; all = pwcca and mi (default: pwcca)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default: auto")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for the forward (CUDA)")
    parser.add_argument("--seed", type=int, help="seed for sampling, splits, trials, k-means")
    parser.add_argument("--mi-backend", choices=MI_BACKENDS,
                        help="k-means for MI: torch (CPU/GPU, batched over layers; default) or "
                        "sklearn (MiniBatchKMeans, the reference)")
    parser.add_argument("--max-utterances", type=int, help="use at most this many utterances")
    parser.add_argument("--strict", action="store_true",
                        help="stop at the first bad utterance instead of skipping it")
    parser.add_argument("--batch-seconds", type=float, help="padded audio per forward batch")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _config_from_args(args: argparse.Namespace):
    from layerprobe.config import AnalysisConfig

    config = AnalysisConfig.from_toml(args.config) if args.config else AnalysisConfig()
    changes: dict[str, object] = {}
    if args.data:
        changes["corpus"] = args.data
    if args.probe:
        changes["probes"] = expand_probes(args.probe)
    if args.metric:
        changes["metrics"] = expand_metrics(args.metric)
    if args.mi_backend:
        changes["mi_backend"] = args.mi_backend
    for arg, field in (("device", "device"), ("seed", "seed"),
                       ("max_utterances", "max_utterances"), ("batch_seconds", "batch_seconds")):
        if getattr(args, arg) is not None:
            changes[field] = getattr(args, arg)
    if args.bf16:
        changes["bf16"] = True
    if args.strict:
        changes["strict"] = True
    return config.replace(**changes)


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "model"


def cmd_score(args: argparse.Namespace) -> int:
    from layerprobe.distributed import destroy_distributed, init_distributed
    from layerprobe.results import save_results
    from layerprobe.score import model_label, score_models, summary_table

    config = _config_from_args(args)
    if args.label and len(args.models) > 1:
        raise ValueError(f"--label names one model; {len(args.models)} were given "
                         "(use --labels a,b,...)")
    labels = ([args.label] if args.label else
              args.labels.split(",") if args.labels else [model_label(m) for m in args.models])
    if len(labels) != len(args.models):
        raise ValueError(f"--labels gives {len(labels)} names for {len(args.models)} models")
    dist_info, _ = init_distributed(config.device)
    try:
        with _collect_failures() as failures:
            results = score_models(args.models, None, config, labels=labels,
                                   progress=not args.no_progress, skip_failed=True)
    finally:
        destroy_distributed(dist_info)
    if not dist_info.main:
        return 0  # rank 0 writes the results
    if not results:
        raise ValueError("nothing could be scored: " + "; ".join(failures))
    name = labels[0] if len(labels) == 1 else f"{labels[0]}_and_{len(labels) - 1}_more"
    out = args.out or Path("results") / f"{_safe_name(name)}.json"
    save_results(results, out)
    print(summary_table(results))
    print(f"wrote {out}")
    if args.plot:
        from layerprobe.plots import plot_layerwise

        print(f"wrote {plot_layerwise(results, args.plot, title=args.title or name)}")
    return _report_failures(failures)


def cmd_plot(args: argparse.Namespace) -> int:
    from layerprobe.plots import plot_layerwise
    from layerprobe.results import load_results

    results = [r for path in args.results for r in load_results(path)]
    if args.probe:
        results = [r for r in results if r.probe in args.probe]
    if args.metric:
        results = [r for r in results if r.metric in args.metric]
    if not results:
        raise ValueError("no results left to plot (check --probe/--metric filters)")
    print(f"wrote {plot_layerwise(results, args.output, title=args.title, rows_by=args.rows_by)}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from layerprobe.distributed import destroy_distributed, init_distributed
    from layerprobe.plots import plot_layerwise
    from layerprobe.results import save_results
    from layerprobe.score import score_models, summary_table

    labels = args.labels.split(",") if args.labels else None
    config = _config_from_args(args)
    dist_info, _ = init_distributed(config.device)
    try:
        with _collect_failures() as failures:
            results = score_models(args.models, None, config, labels=labels,
                                   progress=not args.no_progress, skip_failed=True)
    finally:
        destroy_distributed(dist_info)
    if not dist_info.main:
        return 0  # rank 0 writes the results
    if not results:
        raise ValueError("nothing could be scored: " + "; ".join(failures))
    out = args.out or Path(args.output).with_suffix(".json")
    save_results(results, out)
    print(summary_table(results))
    print(f"wrote {out}")
    print(f"wrote {plot_layerwise(results, args.output, title=args.title)}")
    return _report_failures(failures)


@contextlib.contextmanager
def _collect_failures() -> Iterator[list[str]]:
    """Collect the probes/metrics that score_model left out (ScoringWarning messages)."""
    from layerprobe.score import ScoringWarning

    failures: list[str] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ScoringWarning)
            yield failures
    finally:
        for w in caught:  # outside the recording context: others are shown as usual
            if issubclass(w.category, ScoringWarning):
                failures.append(str(w.message))
            else:
                warnings.showwarning(w.message, w.category, w.filename, w.lineno)


def _report_failures(failures: list[str]) -> int:
    """Print what could not be scored; exit code 1 if anything was left out."""
    for message in failures:
        print(f"layerprobe: not scored: {message}", file=sys.stderr)
    return 1 if failures else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="layerprobe",
        description="Layerwise CCA / MI analysis of speech SSL models, and HuBERT pretraining.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    score = sub.add_parser("score", help="score every layer of one or more models",
                           description="Score every layer of each model against fbank, phone "
                           "and word properties of a corpus (read once, the same items for "
                           "every model); print a table and write one results JSON. Under "
                           "torchrun the utterances are shared among the ranks.")
    score.add_argument("models", nargs="+", metavar="model",
                       help="our ckpt.pt, a fairseq .pt, a HF folder or a hub id (several: "
                       "e.g. runs/p5/it*/ckpt.pt)")
    _analysis_arguments(score)
    score.add_argument("--out", type=Path, help="results JSON (default: results/<label>.json)")
    score.add_argument("--label", help="name of the model in tables and figures (one model)")
    score.add_argument("--labels", help="comma-separated names, one per model")
    score.add_argument("--title", help="figure title (with --plot)")
    score.add_argument("--plot", type=Path, help="also draw the curves to this PNG/PDF")
    score.set_defaults(func=cmd_score)

    plot = sub.add_parser("plot", help="draw layerwise curves from results JSON files")
    plot.add_argument("results", nargs="+", type=Path, help="results JSON files")
    plot.add_argument("-o", "--output", type=Path, required=True, help="figure (.png/.pdf/.svg)")
    plot.add_argument("--title")
    plot.add_argument("--probe", action="append", help="keep only this probe (repeatable)")
    plot.add_argument("--metric", action="append", help="keep only this metric (repeatable)")
    plot.add_argument("--rows-by", help="meta field giving one row of panels per value "
                      "(e.g. schedule)")
    plot.set_defaults(func=cmd_plot)

    compare = sub.add_parser("compare", help="score several models on the same items and plot")
    compare.add_argument("models", nargs="+", help="model specs (checkpoints, HF folders/ids)")
    _analysis_arguments(compare)
    compare.add_argument("-o", "--output", type=Path, required=True, help="figure (.png/.pdf)")
    compare.add_argument("--out", type=Path, help="results JSON (default: figure name .json)")
    compare.add_argument("--labels", help="comma-separated names, one per model")
    compare.add_argument("--title")
    compare.set_defaults(func=cmd_compare)

    from layerprobe.synth import add_synth_arguments, run_synth

    synth = sub.add_parser("synth", help="synthesize an aligned corpus (audio + TextGrids)")
    add_synth_arguments(synth)
    synth.set_defaults(func=run_synth)

    from pretraining.cli import add_pretrain_arguments, run_pretrain

    pretrain = sub.add_parser("pretrain", help="pretrain HuBERT under a schedule, profiling "
                              "every iteration")
    add_pretrain_arguments(pretrain)
    pretrain.set_defaults(func=run_pretrain)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, OSError, RuntimeError) as err:
        print(f"layerprobe {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
