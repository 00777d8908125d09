"""Which PWCCA variant ranks layers stably, how large is the protocol's own spread, and how many
items per dimension does a probe need before its layer ranking is stable?

For each model (a random post-LN HuBERT from ``benchmarks/stability.py`` and, with ``--model``,
e.g. a trained demo checkpoint) and each corpus size (``--utterances``: seeded random subsets of
the bundled corpus, 0 = all), scores fbank/phone/word with pwcca and pwcca-centred over
``--n-seeds`` split seeds (items re-dealt into splits; same items, same model) and prints per
model x probe x metric x size:

* items, ``n_train / (dx + dy)`` (train items per dimension; 8 of the 10 splits train);
* the split-seed std of the per-layer scores, mean over layers (the protocol's own spread),
  and the range of the layer curve over that std (layers closer than the spread cannot be
  ranked, whatever the item count);
* the mean Spearman correlation between the seeds' per-layer curves (ranking agreement), and
  the fraction of seeds whose best layer is the most common best layer;
* the Spearman correlation of the seed-mean curve with the full-corpus seed-mean curve;
* the autoencoder index (``pretraining/profile.py``) of each seed's curves: its seed spread.

    python benchmarks/metric_study.py [--model runs/demo/it2/ckpt.pt] [--n-seeds 6]
        [--utterances 20 40 70 0]
"""

from __future__ import annotations

import argparse
import itertools
import time
import warnings
from collections import Counter

import numpy as np
from scipy.stats import spearmanr

from layerprobe.config import AnalysisConfig
from layerprobe.models import LayerModel, load
from layerprobe.probes import build_probes
from layerprobe.score import resolve_corpus, score_model

METRICS = ("pwcca", "pwcca-centred")


def ranking_agreement(seed_scores: np.ndarray) -> tuple[float, float]:
    """Mean pairwise Spearman rho between seeds' curves ``[n_seeds, L]``, and the fraction of
    seeds whose argmax layer is the most common one."""
    rhos = [spearmanr(a, b).statistic for a, b in itertools.combinations(seed_scores, 2)]
    best = Counter(int(np.argmax(s)) for s in seed_scores)
    return float(np.mean(rhos)), best.most_common(1)[0][1] / len(seed_scores)


def study(model: LayerModel, name: str, config: AnalysisConfig, sizes: list[int]) -> list[dict]:
    rows, reference = [], {}
    for size in sorted(sizes, key=lambda s: s or 10**9, reverse=True):  # full corpus first
        cfg = config.replace(max_utterances=size)
        dys = {p: probe.dy for p, probe in
               build_probes(resolve_corpus(None, cfg), cfg.probes, cfg.probe_config).items()}
        tic = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            results = score_model(model, None, cfg, progress=False, skip_failed=True)
        left_out = [str(w.message)[:90] for w in caught if "metric" in str(w.message)]
        print(f"  {name}, {size or 'all'} utterances: {time.perf_counter() - tic:.0f} s"
              + (f"; left out: {left_out}" if left_out else ""), flush=True)
        for r in results:
            seeds = np.array(r.details["seed_scores"])
            n_train = sum(sorted(r.details["n_per_split"])[2:])  # at least 8 of 10 splits
            rho, argmax = ranking_agreement(seeds)
            key = (r.probe, r.metric)
            if size == 0:
                reference[key] = seeds.mean(0)
            vs_full = (spearmanr(seeds.mean(0), reference[key]).statistic
                       if key in reference else float("nan"))
            rows.append({"model": name, "probe": r.probe, "metric": r.metric,
                         "utterances": size, "items": r.details["n_items"],
                         "per_dim": n_train / (model.dim + dys[r.probe]),
                         "std": float(np.mean(r.std)), "rho": rho, "argmax": argmax,
                         "vs_full": float(vs_full), "mean": float(np.mean(r.scores)),
                         "separation": float(np.ptp(r.scores) / max(np.mean(r.std), 1e-12)),
                         "best": int(np.argmax(r.scores)), "seed_scores": seeds})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", default=[],
                        help="model spec (repeatable), besides the random post-LN model")
    parser.add_argument("--skip-random", action="store_true", help="leave the random model out")
    parser.add_argument("--n-seeds", type=int, default=6)
    parser.add_argument("--utterances", type=int, nargs="+", default=[20, 40, 70, 0])
    args = parser.parse_args()
    from stability import random_post_ln_model

    if 0 not in args.utterances:
        args.utterances.append(0)
    config = AnalysisConfig(device="cpu", metrics=METRICS, n_seeds=args.n_seeds)
    models = [] if args.skip_random else [("random-post-ln", random_post_ln_model())]
    models += [(spec, load(spec)) for spec in args.model]
    rows = []
    for name, model in models:
        print(f"{name}: {model.n_layers} blocks, {model.dim}-d", flush=True)
        rows += study(model, name, config, args.utterances)

    print(f"\n{args.n_seeds} split seeds; std = split-seed std per layer, mean over layers; rho = "
          "mean pairwise Spearman of seeds' layer curves; top = seeds agreeing on the best "
          "layer; vs all = Spearman of the mean curve with the full corpus's")
    print(f"{'model':<16} {'probe':<6} {'metric':<14} {'utts':>5} {'items':>6} {'items/dim':>9} "
          f"{'mean':>6} {'std':>7} {'range/std':>9} {'rho':>6} {'top':>5} {'vs all':>6} "
          f"{'best':>4}")
    for r in sorted(rows, key=lambda r: (r["model"], r["probe"], r["metric"], -r["per_dim"])):
        print(f"{r['model'][-16:]:<16} {r['probe']:<6} {r['metric']:<14} "
              f"{r['utterances'] or 'all':>5} {r['items']:>6} {r['per_dim']:>9.2f} "
              f"{r['mean']:>6.3f} {r['std']:>7.4f} {r['separation']:>9.1f} {r['rho']:>6.2f} "
              f"{r['argmax']:>5.2f} "
              f"{r['vs_full']:>6.2f} {r['best']:>4}")
    print("\nper metric, full corpus: mean over models and probes of std / rho / top")
    for metric in METRICS:
        full = [r for r in rows if r["metric"] == metric and r["utterances"] == 0]
        if full:
            print(f"  {metric:<14} std {np.mean([r['std'] for r in full]):.4f}  rho "
                  f"{np.mean([r['rho'] for r in full]):.2f}  top "
                  f"{np.mean([r['argmax'] for r in full]):.2f}")
    print("\nautoencoder index per split seed, full corpus: mean +- std over seeds "
          "(word_drop = (max - last) / max of word, fbank_rise = last - min of fbank)")
    for r in rows:
        if r["utterances"] == 0 and r["probe"] in ("word", "fbank"):
            curves = r["seed_scores"]
            index = ((curves.max(1) - curves[:, -1]) / curves.max(1) if r["probe"] == "word"
                     else curves[:, -1] - curves.min(1))
            print(f"  {r['model'][-16:]:<16} {r['metric']:<14} "
                  f"{'word_drop' if r['probe'] == 'word' else 'fbank_rise':<10} "
                  f"{index.mean():.4f} +- {index.std(ddof=1):.4f}")
    print("\nranking agreement (rho) by items per dimension, all models, probes and metrics")
    for low, high in ((0, 1), (1, 2), (2, 4), (4, 8), (8, 16), (16, 1e9)):
        sel = [r for r in rows if low <= r["per_dim"] < high]
        if sel:
            print(f"  [{low:>2}, {high if high < 1e9 else 'inf':>3}) items/dim: {len(sel):>2} "
                  f"cases, rho min {min(r['rho'] for r in sel):.2f} mean "
                  f"{np.mean([r['rho'] for r in sel]):.2f}; top mean "
                  f"{np.mean([r['argmax'] for r in sel]):.2f}; vs all min "
                  f"{np.nanmin([r['vs_full'] for r in sel]):.2f}")


if __name__ == "__main__":
    main()
