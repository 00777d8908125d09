"""``layerprobe pretrain``: arguments and entry point (also ``python -m pretraining``).

Command-line values override the config file (``--config``, a path or a bundled name such as
``demo``), which overrides the preset's bundled config (``configs/{preset}.toml``).
Several GPUs: ``torchrun --nproc_per_node=G -m pretraining --config base ...``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from pretraining.config import PRESETS, SCHEDULES, PretrainConfig, resolve_config


def add_pretrain_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--schedule", choices=SCHEDULES, help="pretraining schedule")
    parser.add_argument("--iterations", type=int, help="number of iterations N")
    parser.add_argument("--steps", type=int, help="total optimizer steps over all iterations")
    parser.add_argument("--data", help="pretraining corpus (folder, LibriSpeech tree, manifest); "
                        "default: the config's, else the bundled corpus")
    parser.add_argument("--out", required=True, help="run folder (RUN_DIR)")
    parser.add_argument("--preset", choices=PRESETS, help="model preset (default: the config's)")
    parser.add_argument("--config", help="pretraining TOML, or a bundled name (tiny, base, demo)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out")
    parser.add_argument("--first-layer", type=int,
                        help="supervision layer of iteration 2 (of all later ones for original, "
                        "uniform)")
    parser.add_argument("--last-layer", type=int,
                        help="supervision layer of iteration N (progressive schedules)")
    parser.add_argument("--first-clusters", type=int, help="clusters of iteration 1")
    parser.add_argument("--last-clusters", type=int, help="clusters of later iterations")
    parser.add_argument("--seed", type=int, help="seed of everything")
    parser.add_argument("--seeds", type=int, default=1, metavar="N",
                        help="train N runs with seeds SEED, SEED+1, ... (in OUT/seedS) and pool "
                        "their profiles into OUT (mean curves, spread over runs)")
    parser.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--probe-corpus", help="corpus for profiling (default: bundled)")
    parser.add_argument("--no-profile", action="store_true", help="skip profiling")


def config_from_args(args: argparse.Namespace) -> PretrainConfig:
    """The config file(s) with the command line's values on top."""
    if args.config:
        config = PretrainConfig.from_toml(resolve_config(args.config))
        if args.preset and args.preset != config.model.preset:
            config = config.with_changes(model={"preset": args.preset, "overrides": {}})
    else:
        config = PretrainConfig.from_toml(resolve_config(args.preset or "tiny"))
    schedule = {k: v for k, v in {
        "name": args.schedule, "iterations": args.iterations, "total_steps": args.steps,
        "first_layer": args.first_layer, "last_layer": args.last_layer,
        "first_clusters": args.first_clusters, "last_clusters": args.last_clusters,
    }.items() if v is not None}
    if args.schedule == "original" and args.iterations is None:
        schedule["iterations"] = 2
    train = {k: v for k, v in {"seed": args.seed, "device": args.device}.items() if v is not None}
    data = {"path": args.data} if args.data else {}
    profile: dict = {"enabled": False} if args.no_profile else {}
    if args.probe_corpus:
        profile["corpus"] = args.probe_corpus
    return config.with_changes(schedule=schedule, train=train, data=data, profile=profile)


def run_pretrain(args: argparse.Namespace) -> int:
    from pretraining.run import run_pretraining

    config = config_from_args(args)
    if args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    if args.seeds == 1:
        summary = run_pretraining(config, args.out, resume=args.resume)
        if os.environ.get("RANK", "0") != "0":
            return 0
        print(f"done: {len(summary.completed)} iteration(s) in {summary.seconds / 60:.1f} min; "
              f"checkpoints under {summary.run_dir}/it*/ckpt.pt"
              + (f", figure {summary.run_dir}/profile.png" if config.profile.enabled else ""))
        return 0
    out = Path(args.out)
    first = config.train.seed
    runs = [out / f"seed{first + k}" for k in range(args.seeds)]
    for k, run_dir in enumerate(runs):
        run_pretraining(config.with_changes(train={"seed": first + k}), run_dir,
                        resume=args.resume)
    if os.environ.get("RANK", "0") != "0":
        return 0
    if config.profile.enabled:
        from pretraining.profile import pool_seed_runs

        pool_seed_runs(runs, out)
    print(f"done: {args.seeds} runs under {out}/seed*/"
          + (f"; pooled profile {out}/profile.png, index {out}/autoencoder.json"
             if config.profile.enabled else ""))
    return 0


def add_study_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/study", help="study folder (default runs/study)")
    parser.add_argument("--config", default="study",
                        help="pretraining config of every run (default: the bundled study.toml)")
    parser.add_argument("--smoke", action="store_true",
                        help="toy scale (configs/study_smoke.toml): the machinery in minutes")
    parser.add_argument("--seeds", type=int, default=3, help="training seeds per schedule")
    parser.add_argument("--iterations", type=int, default=3,
                        help="N of uniform, progressive and progressive-cluster (original: 2)")
    parser.add_argument("--schedules", nargs="+", choices=SCHEDULES, default=list(SCHEDULES))
    parser.add_argument("--figures", help="also write summary.json and the figures here "
                        "(e.g. figures/study)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def run_study_command(args: argparse.Namespace) -> int:
    from pretraining.study import run_study, study_plan

    plan = study_plan(args.config, smoke=args.smoke, seeds=args.seeds,
                      iterations=args.iterations, schedules=args.schedules)
    run_study(plan, args.out, figures=args.figures, progress=not args.no_progress)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretraining", description=__doc__)
    add_pretrain_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_pretrain(args)
    except (ValueError, FileNotFoundError, OSError, RuntimeError) as err:
        print(f"pretrain: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
