"""Every score of fixed models on fixed corpora, written to one JSON, to check that a change
leaves scores bit-identical (compare two runs with ``--compare``).

    python benchmarks/score_fingerprint.py --out before.json            # at the old commit
    python benchmarks/score_fingerprint.py --out after.json --compare before.json

Cases: a seeded random tiny and small HuBERT (our checkpoint format) on the bundled corpus with
every metric, once with plain sums; any extra checkpoints given with ``--model`` (e.g. a trained
demo run) with the profile's metrics. Exact float equality is reported per case, with the
largest difference where there is one.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import torch

from layerprobe.config import AnalysisConfig
from layerprobe.registry import ALL_METRICS
from layerprobe.score import score_models
from pretraining.model import build_model, model_args, save_checkpoint


def random_checkpoint(preset: str, seed: int, folder: Path) -> Path:
    torch.manual_seed(seed)
    args = model_args(preset, 50)
    path = folder / f"{preset}_{seed}.pt"
    save_checkpoint(path, args, build_model(args).state_dict(), {"seed": seed})
    return path


def fingerprint(extra: list[str], corpus: str | None) -> dict[str, list]:
    cases: dict[str, list] = {}
    with tempfile.TemporaryDirectory() as tmp:
        models = [random_checkpoint("tiny", 0, Path(tmp)), random_checkpoint("small", 1, Path(tmp))]
        everything = AnalysisConfig().replace(metrics=ALL_METRICS)
        for name, cfg in (("all-metrics", everything),
                          ("plain-sums", everything.replace(metrics=("pwcca", "pwcca-centred"),
                                                            exact_sums=False))):
            results = score_models(models, corpus, cfg, labels=["tiny", "small"], progress=False,
                                   skip_failed=True)
            cases[name] = [(r.label, r.probe, r.metric, r.scores, r.std) for r in results]
    if extra:
        cfg = AnalysisConfig().replace(metrics=("pwcca-centred", "linear-accuracy"))
        results = score_models(extra, corpus, cfg, progress=False, skip_failed=True)
        cases["extra"] = [(r.label, r.probe, r.metric, r.scores, r.std) for r in results]
    return cases


def compare(new: dict, old: dict) -> bool:
    same = True
    for case in sorted(set(new) | set(old)):
        a, b = new.get(case), old.get(case)
        if a == b:
            print(f"{case}: bit-identical ({len(a)} results)")
            continue
        same = False
        if a is None or b is None or len(a) != len(b):
            print(f"{case}: different result sets")
            continue
        worst = 0.0
        for ra, rb in zip(a, b, strict=True):
            for xa, xb in zip(ra[3] + (ra[4] or []), rb[3] + (rb[4] or []), strict=False):
                if not (math.isnan(xa) and math.isnan(xb)):
                    worst = max(worst, abs(xa - xb))
        print(f"{case}: DIFFERENT, largest |difference| {worst:.3e}")
    return same


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--compare", type=Path, help="an earlier output to compare with")
    parser.add_argument("--model", action="append", default=[], help="extra checkpoint(s)")
    parser.add_argument("--data", help="corpus (default: the bundled one)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    cases = fingerprint(args.model, args.data)
    args.out.write_text(json.dumps(cases) + "\n")
    print(f"wrote {args.out}")
    if args.compare:
        return 0 if compare(json.loads(json.dumps(cases)), json.loads(args.compare.read_text()))\
            else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
