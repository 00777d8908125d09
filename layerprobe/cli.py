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
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for the forward "
                        "(CUDA or CPU; features move ~1e-2 relative, see README)")
    parser.add_argument("--seed", type=int, help="seed for sampling, splits, trials, k-means")
    parser.add_argument("--mi-backend", choices=MI_BACKENDS,
                        help="k-means for MI: torch (CPU/GPU, batched over layers; default) or "
                        "sklearn (MiniBatchKMeans, the reference)")
    parser.add_argument("--max-utterances", type=int, help="use at most this many utterances")
    parser.add_argument("--strict", action="store_true",
                        help="stop at the first bad utterance instead of skipping it")
    parser.add_argument("--batch-seconds", type=float, help="padded audio per forward batch")
    parser.add_argument("--memory-gb", type=float, metavar="GB",
                        help="memory budget of a CPU run (default: 90%% of the memory available "
                        "now); a run that needs more accumulates the probes in turn, or stops "
                        "at once if even one probe does not fit")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="CPU threads for torch (default: torch's, one per core); 1 on a "
                        "machine other jobs keep busy")
    parser.add_argument("--fairseq-pretrained", metavar="PATH",
                        help="pretrained fairseq checkpoint giving the architecture of a "
                        "fine-tuned one saved with w2v_args=None (default: its w2v_path)")
    parser.add_argument("--seeds", type=int, metavar="N",
                        help="split seeds (re-dealt shards) for the spread of CCA scores, k-means "
                        "seeds for MI (default: the config's, 3)")
    parser.add_argument("--append", action="store_true",
                        help="merge into an existing --out results file (under a file lock) "
                        "instead of replacing it: the same model, label, probe and metric is "
                        "replaced, other results are kept")
    parser.add_argument("--csv", type=Path, help="also write the results as CSV, one row per "
                        "model x probe x metric x layer (with --append: the merged file)")


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
                       ("max_utterances", "max_utterances"), ("batch_seconds", "batch_seconds"),
                       ("fairseq_pretrained", "fairseq_pretrained"), ("seeds", "n_seeds"),
                       ("memory_gb", "memory_gb")):
        if getattr(args, arg) is not None:
            changes[field] = getattr(args, arg)
    if args.bf16:
        changes["bf16"] = True
    if args.strict:
        changes["strict"] = True
    return config.replace(**changes)


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "model"


def check_outputs(*paths: Path | None, append_to: Path | None = None,
                  figures: Sequence[Path | None] = ()) -> None:
    """Before any work: every output can be written, figures have a format we write, and a file
    to --append to is readable."""
    from layerprobe.atomic import check_writable
    from layerprobe.results import load_results

    if any(f is not None for f in figures):
        from layerprobe.plots import check_figure_path

        for figure in figures:
            if figure is not None:
                check_figure_path(figure)
    for path in (*paths, *figures):
        if path is not None:
            check_writable(path)
    if append_to is not None and append_to.exists():
        load_results(append_to)


def write_results(results, out: Path, *, append: bool, csv: Path | None) -> None:
    """Write (or with ``append`` merge into) ``out`` and the optional CSV; say what happened."""
    from layerprobe.results import append_results, save_csv, save_results

    if append:
        results, replaced = append_results(results, out)
        print(f"wrote {out} (merged: {len(results)} result(s) in the file, "
              f"{replaced} replaced)")
    else:
        existed = out.exists()
        save_results(results, out)
        if existed:
            warnings.warn(f"replaced the existing {out} (--append merges into it instead)",
                          UserWarning, stacklevel=2)
        print(f"wrote {out}")
    if csv is not None:
        print(f"wrote {save_csv(results, csv)}")


def partial_results_path(out: Path) -> Path:
    """Where ``layerprobe score`` keeps the models finished so far while it scores several."""
    return out.with_name(out.name + ".partial")


def resumed_results(partial: Path, models: Sequence[str], labels: Sequence[str], config
                    ) -> dict[str, list]:
    """The results an interrupted run left in ``partial``, by label, for the models of this
    command scored with this configuration; a model scored with another configuration is an
    error (its results would not be comparable)."""
    import json

    from layerprobe.results import load_results

    want = json.loads(json.dumps(config.to_dict()))
    mine = set(zip(models, labels, strict=True))
    done: dict[str, list] = {}
    for r in load_results(partial):
        if (r.model, r.label) not in mine:
            continue
        if r.meta.get("config") != want:
            changed = _changed_keys(r.meta.get("config") or {}, want)
            raise ValueError(f"{partial}: {r.label!r} was scored with another configuration "
                             f"(differs in {', '.join(changed) or 'its fields'}); delete the "
                             "file or drop --resume")
        done.setdefault(r.label, []).append(r)
    return done


def _changed_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted names of the fields in which two config dicts differ."""
    out = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _changed_keys(x, y, f"{prefix}{key}.")
        elif x != y:
            out.append(prefix + key)
    return out


def _label_for_file(model: str, append_to: Path | None) -> str:
    """The default label of ``model``: its label in a file appended to if it is there already
    (so that its results get replaced), else one unique among that file's other models."""
    from layerprobe.labels import unique_labels
    from layerprobe.results import load_results

    existing = load_results(append_to) if append_to is not None and append_to.is_file() else []
    mine = [r.label for r in existing if r.model == str(model)]
    if mine:
        return mine[0]
    others = dict.fromkeys(r.model for r in existing)
    return unique_labels([*others, str(model)])[-1]


def _say(message: str) -> None:
    """An informational line on stderr (results and tables go to stdout)."""
    print(f"layerprobe: {message}", file=sys.stderr, flush=True)


def _score_all(args: argparse.Namespace, config, models: list[str], labels: list[str],
               on_model=None):
    """Score ``models`` (alone, or as one rank under torchrun); ``(None, failures)`` on
    ranks other than 0, else the results and what could not be scored."""
    from layerprobe.distributed import destroy_distributed, init_distributed
    from layerprobe.score import score_models

    dist_info, _ = init_distributed(config.device)
    try:
        with _collect_failures() as failures:
            results = score_models(models, None, config, labels=labels,
                                   progress=not args.no_progress, skip_failed=True,
                                   on_model=on_model, log=_say)
    finally:
        destroy_distributed(dist_info)
    if not dist_info.main:
        return None, failures
    if not results:
        raise ValueError("nothing could be scored: " + "; ".join(failures))
    return results, failures


def cmd_score(args: argparse.Namespace) -> int:
    from layerprobe.labels import unique_labels
    from layerprobe.score import summary_table

    config = _config_from_args(args)
    if args.label and len(args.models) > 1:
        raise ValueError(f"--label names one model; {len(args.models)} were given "
                         "(use --labels a,b,...)")
    if args.labels:
        labels = args.labels.split(",")
    elif args.label:
        labels = [args.label]
    elif len(args.models) == 1:
        labels = [_label_for_file(args.models[0], args.out if args.append else None)]
    else:
        labels = unique_labels(args.models)
    if len(labels) != len(args.models):
        raise ValueError(f"--labels gives {len(labels)} names for {len(args.models)} models")
    name = labels[0] if len(labels) == 1 else f"{labels[0]}_and_{len(labels) - 1}_more"
    out = args.out or Path("results") / f"{_safe_name(name)}.json"
    check_outputs(out, args.csv, append_to=out if args.append else None, figures=[args.plot])
    partial = partial_results_path(out)
    kept: dict[str, list] = {}
    if args.resume and partial.exists():
        kept = resumed_results(partial, args.models, labels, config)
        print(f"resuming from {partial}: {len(kept)} of {len(args.models)} model(s) done")
    elif partial.exists():
        warnings.warn(f"{partial} holds the models an interrupted run finished; replacing it "
                      "(--resume continues that run instead)", UserWarning, stacklevel=2)
    todo = [i for i, label in enumerate(labels) if label not in kept]
    failures: list[str] = []
    if todo:
        from layerprobe.results import save_results

        finished = [r for rs in kept.values() for r in rs]

        def save_finished(model_results: list) -> None:  # an interrupted run keeps these
            finished.extend(model_results)
            save_results(finished, partial)

        new, failures = _score_all(args, config, [args.models[i] for i in todo],
                                   [labels[i] for i in todo], save_finished)
        if new is None:
            return 0  # rank 0 writes the results
        for r in new:
            kept.setdefault(r.label, []).append(r)
    results = [r for label in labels for r in kept.get(label, [])]
    print(summary_table(results))
    write_results(results, out, append=args.append, csv=args.csv)
    partial.unlink(missing_ok=True)
    if args.plot:
        from layerprobe.plots import plot_layerwise

        print(f"wrote {plot_layerwise(results, args.plot, title=args.title or name)}")
    return _report_failures(failures)


def cmd_plot(args: argparse.Namespace) -> int:
    from layerprobe.plots import plot_layerwise, results_of_files

    check_outputs(figures=[args.output])
    results = results_of_files(args.results, rows_by=args.rows_by)
    if args.probe:
        results = [r for r in results if r.probe in args.probe]
    if args.metric:
        results = [r for r in results if r.metric in args.metric]
    if not results:
        raise ValueError("no results left to plot (check --probe/--metric filters)")
    print(f"wrote {plot_layerwise(results, args.output, title=args.title, rows_by=args.rows_by)}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from layerprobe.labels import unique_labels
    from layerprobe.plots import plot_layerwise
    from layerprobe.score import summary_table

    labels = args.labels.split(",") if args.labels else unique_labels(args.models)
    config = _config_from_args(args)
    out = args.out or Path(args.output).with_suffix(".json")
    check_outputs(out, args.csv, append_to=out if args.append else None, figures=[args.output])
    results, failures = _score_all(args, config, args.models, labels)
    if results is None:
        return 0  # rank 0 writes the results
    print(summary_table(results))
    write_results(results, out, append=args.append, csv=args.csv)
    print(f"wrote {plot_layerwise(results, args.output, title=args.title)}")
    return _report_failures(failures)


def cmd_export(args: argparse.Namespace) -> int:
    from layerprobe.results import load_results, results_to_csv, save_csv

    if str(args.csv) != "-":
        check_outputs(args.csv)
    results = [r for path in args.results for r in load_results(path)]
    if str(args.csv) == "-":
        sys.stdout.write(results_to_csv(results))
    else:
        print(f"wrote {save_csv(results, args.csv)}")
    return 0


def cmd_pool(args: argparse.Namespace) -> int:
    from layerprobe.autoencoder import autoencoder_index, format_index
    from layerprobe.results import load_results, pool_runs, save_results
    from layerprobe.score import summary_table

    check_outputs(args.out, figures=[args.plot])
    # each run is named by its file, so an error names the file that does not fit
    pooled = pool_runs([(str(path), load_results(path)) for path in args.results])
    print(summary_table(pooled))
    rows = autoencoder_index(pooled)
    if rows:
        print(format_index(rows, spread=f"{len(args.results)} runs"))
    save_results(pooled, args.out)
    print(f"wrote {args.out}")
    if args.plot:
        from layerprobe.plots import plot_layerwise

        title = args.title or f"mean of {len(args.results)} runs (bands: std over runs)"
        print(f"wrote {plot_layerwise(pooled, args.plot, title=title)}")
    return 0


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
    score.add_argument("--resume", action="store_true",
                       help="continue an interrupted run: keep the models it finished (saved "
                       "in OUT.partial after each model) and score the others")
    score.set_defaults(func=cmd_score)

    plot = sub.add_parser("plot", help="draw layerwise curves from results JSON files",
                          description="Draw one panel per probe and metric and one curve per "
                          "result label from results JSON files (score, compare, or a "
                          "pretraining run's profile.json). Labels that occur in several files "
                          "are prefixed with the file's run (its folder name).")
    plot.add_argument("results", nargs="+", type=Path, help="results JSON files")
    plot.add_argument("-o", "--output", type=Path, required=True, help="figure (.png/.pdf/.svg)")
    plot.add_argument("--title")
    plot.add_argument("--probe", action="append", help="keep only this probe (repeatable)")
    plot.add_argument("--metric", action="append", help="keep only this metric (repeatable)")
    plot.add_argument("--rows-by", help="meta field giving one row of panels per value, each "
                      "row with its own colour scale: e.g. run (the file's folder unless the "
                      "results name one), schedule, iteration")
    plot.set_defaults(func=cmd_plot)

    compare = sub.add_parser("compare", help="score several models on the same items and plot",
                             description="Score several models on exactly the same corpus items "
                             "(one probe plan, one seed), print a table, write results JSON and "
                             "draw the curves. Default labels are the shortest path endings that "
                             "tell the models apart (runs/demo/it1/ckpt.pt -> demo/it1).")
    compare.add_argument("models", nargs="+", help="model specs (checkpoints, HF folders/ids)")
    _analysis_arguments(compare)
    compare.add_argument("-o", "--output", type=Path, required=True, help="figure (.png/.pdf)")
    compare.add_argument("--out", type=Path, help="results JSON (default: figure name .json)")
    compare.add_argument("--labels", help="comma-separated names, one per model")
    compare.add_argument("--title")
    compare.set_defaults(func=cmd_compare)

    export = sub.add_parser("export", help="convert results JSON files to CSV",
                            description="Write the results of one or more results JSON files "
                            "as CSV: one row per model x probe x metric x layer, columns "
                            "model, label, corpus, probe, metric, layer, score, std.")
    export.add_argument("results", nargs="+", type=Path, help="results JSON files")
    export.add_argument("--csv", type=Path, required=True, help="CSV file to write ('-': stdout)")
    export.set_defaults(func=cmd_export)

    pool = sub.add_parser("pool", help="pool the results of several runs (e.g. training seeds)",
                          description="Pool results files of runs of the same experiment (e.g. "
                          "a schedule pretrained with several seeds: runs/s*/profile.json): "
                          "per label, probe and metric the mean curve and its std over runs, "
                          "the spread that a difference between setups has to beat. Prints the "
                          "autoencoder index with that spread.")
    pool.add_argument("results", nargs="+", type=Path, help="results JSON files, one per run")
    pool.add_argument("--out", type=Path, required=True, help="pooled results JSON")
    pool.add_argument("--plot", type=Path, help="also draw the pooled curves (bands: std over "
                      "runs)")
    pool.add_argument("--title")
    pool.set_defaults(func=cmd_pool)

    from layerprobe.synth import add_synth_arguments, run_synth

    synth = sub.add_parser("synth", help="synthesize an aligned corpus (audio + TextGrids)",
                           description="Synthesize an English corpus with festival/flite voices: "
                           "16 kHz FLAC audio with word and phone TextGrid alignments and a "
                           "transcript list, usable by score, compare and pretrain.")
    add_synth_arguments(synth)
    synth.set_defaults(func=run_synth)

    from pretraining.cli import add_pretrain_arguments, run_pretrain

    pretrain = sub.add_parser("pretrain", help="pretrain HuBERT under a schedule, profiling "
                              "every iteration",
                              description="Pretrain a HuBERT model for N iterations of k-means "
                              "targets under a schedule (original, progressive, ...), writing "
                              "it*/ckpt.pt per iteration, profiling each checkpoint layerwise "
                              "(it*/probe.json, profile.json, profile.png) and resuming with "
                              "--resume.")
    add_pretrain_arguments(pretrain)
    pretrain.set_defaults(func=run_pretrain)

    from pretraining.cli import add_study_arguments, run_study_command

    study = sub.add_parser("study", help="the schedule study: every schedule x training seeds, "
                           "profiled on a held-out voice, pooled into one summary",
                           description="Build the study corpora (synthetic voices, one held "
                           "out), pretrain every schedule with several seeds at one step "
                           "budget, profile every checkpoint on the held-out voice, and write "
                           "summary.json and figures. Resumable: run it again to continue.")
    add_study_arguments(study)
    study.set_defaults(func=run_study_command)
    return parser


def format_warning(message, category=None, filename=None, lineno=None, line=None) -> str:
    """How the command line shows a warning: ``layerprobe: warning: <message>``, one line, no
    Python source (a ``warnings.formatwarning``)."""
    return f"layerprobe: warning: {message}\n"


@contextlib.contextmanager
def cli_warnings() -> Iterator[None]:
    """Format warnings with :func:`format_warning` while the command runs (they are still
    shown, filtered and recorded, e.g. by ``pytest.warns``, the usual way)."""
    saved = warnings.formatwarning
    warnings.formatwarning = format_warning
    try:
        yield
    finally:
        warnings.formatwarning = saved


def _library_progress(show: bool) -> contextlib.AbstractContextManager:
    """--no-progress also hides transformers' "Loading weights" and the hub's download bars."""
    if show:
        return contextlib.nullcontext()
    from layerprobe.models.huggingface import loading_progress

    return loading_progress(False)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        threads = getattr(args, "threads", None)
        if threads is not None:
            if threads < 1:
                raise ValueError(f"--threads must be >= 1, got {threads}")
            import torch

            torch.set_num_threads(threads)
        hide = args.command in ("score", "compare") and args.no_progress
        with cli_warnings(), _library_progress(not hide):
            return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, OSError, RuntimeError) as err:
        print(f"layerprobe {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
