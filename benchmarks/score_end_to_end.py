"""End-to-end scoring of a HuBERT-Base-sized model (random weights) on this machine.

Scores fbank, phone and word probes (``--metrics``, default PWCCA and MI, full protocol) on
``--minutes`` of the bundled corpus (repeated through a manifest when longer: ``--minutes 61`` is
the hour of the issue), then on twice that audio, each in a fresh process, and prints seconds per
stage (reading + probe targets, forward pass, statistics, CCA, MI), audio seconds per second and
the peak resident memory of each run.

``--kmeans`` instead times MI's k-means alone on synthetic features of realistic size
(``--layers`` x ``--items`` x 768, ``--clusters`` clusters): the torch backend (default settings,
CPU or CUDA) against scikit-learn's ``MiniBatchKMeans`` with the published settings, in the same
run (torch before and after scikit-learn), and prints the ratios.

    python benchmarks/score_end_to_end.py [--minutes 5] [--metrics pwcca,mi] [--device cpu]
    python benchmarks/score_end_to_end.py --kmeans [--layers 13 --items 20000 --clusters 500]

``--compare-sums`` scores ``--minutes`` of audio twice instead, in fresh processes, with the
compensated float64 moments of ``[cca] exact_sums = true`` (the default) and with plain float64
sums, and prints what the compensation costs (statistics seconds, peak memory) and how far the
scores move.

    python benchmarks/score_end_to_end.py --compare-sums [--minutes 5] [--device cpu]

``--agreement`` scores MI of the random HuBERT-Base on the bundled corpus with both backends over
``--seeds`` k-means seeds and prints, per layer, each backend's mean and spread (std over seeds)
and how many scikit-learn spreads apart the two means are.

    python benchmarks/score_end_to_end.py --agreement [--seeds 5]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch


def build_model(path: Path) -> None:
    from layerprobe.models.native import save_native_checkpoint
    from pretraining.model import build_model as build_hubert
    from pretraining.model import model_args

    torch.manual_seed(0)
    args = model_args("base", num_classes=500)
    model = build_hubert(args)
    save_native_checkpoint(path, args, model.state_dict(), {"note": "random weights"})


def write_manifest(path: Path, minutes: float, copies: int) -> float:
    """A JSONL manifest of bundled utterances adding up to ``minutes`` (the corpus repeated when
    it is shorter), listed ``copies`` times."""
    from layerprobe.corpus import load_corpus

    corpus = load_corpus(None)
    chosen, total = [], 0.0
    while total < minutes * 60:
        for utt in corpus.utterances:
            if total >= minutes * 60:
                break
            chosen.append(utt)
            total += utt.duration
    rows = [
        {"id": f"{utt.id}_{c}_{i}", "audio": str(utt.audio_path),
         "alignment": str(utt.alignment_path)}
        for c in range(copies) for i, utt in enumerate(chosen)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return total * copies


def child(model: str, manifest: str, device: str, metrics: str, exact_sums: bool) -> None:
    """One scoring run; prints a JSON line with timings, peak memory and scores."""
    from layerprobe.config import AnalysisConfig
    from layerprobe.score import score_model

    config = AnalysisConfig(corpus=manifest, device=device, batch_seconds=60.0,
                            metrics=tuple(metrics.split(",")), exact_sums=exact_sums)
    start = time.perf_counter()
    # the word probe needs more items than 768 + vocabulary dimensions: more than 5 min has
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = score_model(model, None, config, progress=False, skip_failed=True)
    wall = time.perf_counter() - start
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({
        "wall": wall, "timings": results[0].meta["timings"], "peak_mib": peak_mib,
        "audio_seconds": results[0].meta["audio_seconds"],
        "items": {f"{r.probe}/{r.metric}": r.details["n_items"] for r in results},
        "clusters": {r.probe: r.details["n_clusters"] for r in results if r.metric == "mi"},
        "scores": {f"{r.probe}/{r.metric}": r.scores for r in results},
    }))


def reference_kmeans(backend: str):
    """scikit-learn's ``MiniBatchKMeans`` with the published settings (``backend="sklearn"``), or
    the torch backend with the same settings."""
    from layerprobe.kmeans import KMeansConfig

    return KMeansConfig(backend=backend, batch_size=1500, n_init=3, max_iter=500, tol=0.0,
                        max_no_improvement=10, reassignment_ratio=0.01)


def kmeans_benchmark(layers: int, items: int, clusters: int, device: str, lloyd: bool) -> None:
    """MI k-means on synthetic features: torch backend vs scikit-learn, same data, same run; the
    torch backend runs before and after scikit-learn (this machine's speed drifts within a run)."""
    from layerprobe.kmeans import KMeansConfig
    from layerprobe.mi import mi_score

    gen = torch.Generator().manual_seed(0)
    n_classes, dim = 60, 768
    labels = torch.randint(n_classes, (items,), generator=gen)
    centres = torch.randn(layers, n_classes, dim, generator=gen)
    x = centres[:, labels] + 2.0 * torch.randn(layers, items, dim, generator=gen)
    train = torch.rand(items, generator=gen) < 0.8
    published = "torch mini-batch 1500, n_init 3 (published)"
    reference = "sklearn MiniBatchKMeans 1500, n_init 3 (published)"
    runs = [(published, reference_kmeans("torch"))]
    if lloyd:
        runs.append(("torch Lloyd, n_init 3", KMeansConfig(batch_size=0)))
    runs += [(reference, reference_kmeans("sklearn")), (published, reference_kmeans("torch"))]
    print(f"MI k-means: {layers} layers x {items} items x {dim}-d, {clusters} clusters, "
          f"{torch.get_num_threads()} threads")
    seconds: dict[str, list[float]] = {}
    floor = None
    for name, config in runs:
        target = device if config.backend == "torch" else "cpu"
        start = time.perf_counter()
        res = mi_score(x, labels, train, n_clusters=clusters, kmeans=config, device=target)
        if target.startswith("cuda"):
            torch.cuda.synchronize()
        seconds.setdefault(name, []).append(time.perf_counter() - start)
        print(f"  {name:<52} on {target:<6} {seconds[name][-1]:8.1f} s   MI per layer "
              f"{[round(s, 3) for s in res.scores[:4]]}{' ...' if layers > 4 else ''}   "
              f"steps {res.details['kmeans_steps'][0][:4]}", flush=True)
        if name == published and floor is None:
            floor = gemm_floor(res.details, layers, int(train.sum()), items - int(train.sum()),
                               dim, clusters, config, target)
            print(f"  float32 GEMM floor of the mini-batch algorithm's distance matmuls "
                  f"(seeding Gram, validation, steps, held-out assignment): "
                  f"{floor:.1f} s; torch / floor = {seconds[name][-1] / floor:.2f}")
    sk = seconds[reference][0]
    for name, times in seconds.items():
        if name != reference:
            ratios = ", ".join(f"{sk / t:.1f}x" for t in times)
            print(f"sklearn / {name}: {ratios}"
                  + (" (torch before and after sklearn)" if len(times) > 1 else ""))
    if floor is not None:
        print(f"sklearn / GEMM floor: {sk / floor:.1f}x (the most any implementation of this "
              "algorithm's matmuls in float32 could gain here)")


def gemm_floor(details: dict, layers: int, n_train: int, n_test: int, dim: int, k: int,
               config, device: str) -> float:
    """Seconds the mini-batch algorithm's float32 distance matmuls take at this machine's GEMM
    rate (measured now on the step's shape, batched or a matmul per layer, whichever is faster):
    the seeding's ``[m, m]`` Gram (its upper triangle
    in 512-row blocks, as computed: ``m (m + 512) / 2`` dot products), the validation of
    ``n_init`` seedings, the mini-batch steps run and the assignment of the held-out rows (MI
    needs no inertia on the train rows; scikit-learn runs with ``compute_labels=False`` too)."""
    b = min(config.batch_size, n_train)
    m = min(n_train, 3 * b if 3 * b >= k else 3 * k)
    steps = sum(details["kmeans_steps"][0])
    gram = m * (m + min(m, 512)) // 2
    flops = 2 * dim * (layers * gram + config.n_init * layers * m * k + steps * b * k
                       + layers * n_test * k)
    a = torch.randn(layers, b, dim, device=device)
    c = torch.randn(layers, dim, k, device=device)
    kernels = {"batched bmm": lambda: torch.bmm(a, c),
               "one mm per layer": lambda: [torch.mm(a[i], c[i]) for i in range(layers)]}
    rates = {}
    for name, kernel in kernels.items():
        kernel()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        reps, start = 20, time.perf_counter()
        for _ in range(reps):
            kernel()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        rates[name] = reps * 2 * layers * b * dim * k / (time.perf_counter() - start)
    rate = max(rates.values())
    print(f"  distance matmuls: {flops / 1e9:.0f} GFLOP at {rate / 1e9:.0f} GFLOP/s, the faster of "
          + " and ".join(f"{name} {r / 1e9:.0f}" for name, r in rates.items())
          + f" (float32 [{layers}, {b}, {dim}] x [{layers}, {dim}, {k}], timed now)")
    return flops / rate


def agreement(device: str, seeds: int, lloyd: bool) -> None:
    """torch-MI vs scikit-learn-MI per layer on the bundled corpus, with the spread over seeds."""
    import statistics

    from layerprobe.config import AnalysisConfig
    from layerprobe.kmeans import KMeansConfig
    from layerprobe.score import score_model

    runs = {"torch": reference_kmeans("torch")}
    if lloyd:
        runs["torch Lloyd"] = KMeansConfig(batch_size=0)
    runs["sklearn"] = reference_kmeans("sklearn")
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "hubert_base_random.pt"
        build_model(model)
        scored = {}
        for name, kmeans in runs.items():
            config = AnalysisConfig(device=device, metrics=("mi",), probes=("phone", "word"),
                                    n_seeds=seeds, mi_kmeans=kmeans)
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                scored[name] = score_model(model, None, config, progress=False)
            print(f"{name}: {time.perf_counter() - start:.1f} s, MI "
                  f"{scored[name][0].meta['timings']['mi']:.1f} s", flush=True)
    for name in list(runs)[:-1]:
        print(f"\n=== {name}: {runs[name]}")
        for ours, ref in zip(scored[name], scored["sklearn"], strict=True):
            n_train = ours.details["n_train"]
            kind = "Lloyd" if runs[name].batch_size == 0 or \
                runs[name].batch_size >= n_train else "mini-batch"
            print(f"\n{ours.probe} MI, {ours.details['n_clusters']} clusters "
                  f"({ours.details['n_clusters_rule']}), {n_train} train items ({kind}), "
                  f"{seeds} seeds")
            print(f"{'layer':>5} {'torch':>15} {'sklearn':>15} {'(torch - sklearn) / std':>24}")
            gaps = []
            for layer in ours.layers:
                spread = ref.std[layer] if ref.std else float("nan")
                gaps.append((ours.scores[layer] - ref.scores[layer]) / spread)
                print(f"{layer:>5} {ours.scores[layer]:.4f} ± {ours.std[layer]:.4f} "
                      f"{ref.scores[layer]:.4f} ± {spread:.4f} {gaps[-1]:>24.2f}")
            size = [abs(g) for g in gaps]
            print(f"|gap| in sklearn stds: median {statistics.median(size):.2f}, max "
                  f"{max(size):.2f}; torch higher in {sum(g > 0 for g in gaps)}/{len(gaps)} "
                  f"layers; mean signed gap {statistics.fmean(gaps):+.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--metrics", default="pwcca,mi")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--kmeans", action="store_true", help="time MI's k-means alone")
    parser.add_argument("--layers", type=int, default=13)
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--clusters", type=int, default=500)
    parser.add_argument("--agreement", action="store_true",
                        help="torch vs scikit-learn MI on the bundled corpus")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--lloyd", action="store_true",
                        help="--kmeans / --agreement: also run the torch backend's full Lloyd")
    parser.add_argument("--compare-sums", action="store_true",
                        help="compensated (exact_sums) vs plain float64 moments")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "MANIFEST"), help=argparse.SUPPRESS)
    parser.add_argument("--plain-sums", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.kmeans:
        kmeans_benchmark(args.layers, args.items, args.clusters, args.device, args.lloyd)
        return
    if args.agreement:
        agreement(args.device, args.seeds, args.lloyd)
        return
    if args.child:
        child(*args.child, args.device, args.metrics, not args.plain_sums)
        return
    if args.compare_sums:
        compare_sums(args.minutes, args.device, args.metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "hubert_base_random.pt"
        build_model(model)
        runs = []
        for copies in (1, 2):
            manifest = Path(tmp) / f"corpus_x{copies}.jsonl"
            seconds = write_manifest(manifest, args.minutes, copies)
            print(f"scoring {seconds / 60:.1f} min of audio (fresh process) ...", flush=True)
            runs.append(scoring_run(model, manifest, args.device, args.metrics))
    print_runs(runs, args.device, args.metrics)
    first, second = runs
    t = first["timings"]
    print(f"\nCCA / forward = {t['cca'] / t['forward']:.3f}; MI / forward = "
          f"{t['mi'] / t['forward']:.3f}; (statistics + CCA + MI) / forward = "
          f"{(t['statistics'] + t['cca'] + t['mi']) / t['forward']:.3f}")
    print(f"forward seconds per audio second = {t['forward'] / first['audio_seconds']:.3f}")
    print(f"peak memory, 2x audio / 1x audio = {second['peak_mib'] / first['peak_mib']:.3f}")


def scoring_run(model: Path, manifest: Path, device: str, metrics: str,
                plain_sums: bool = False) -> dict:
    """One scoring run in a fresh process (its JSON line)."""
    proc = subprocess.run(
        [sys.executable, __file__, "--device", device, "--metrics", metrics,
         "--child", str(model), str(manifest), *(["--plain-sums"] if plain_sums else [])],
        capture_output=True, text=True,
    )
    if proc.returncode != 0:
        sys.exit(f"scoring run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def print_runs(runs: list[dict], device: str, metrics: str, names: list[str] | None = None
               ) -> None:
    print(f"\nHuBERT-Base-sized (12 layers, 768-d, random weights) on {device}, "
          f"{torch.get_num_threads()} threads, metrics {metrics}")
    header = f"{'audio':>8} {'read':>7} {'forward':>8} {'stats':>7} {'cca':>7} {'mi':>7} " \
             f"{'wall':>7} {'audio s/s':>9} {'peak MiB':>9}  items"
    print(header)
    for i, run in enumerate(runs):
        t = run["timings"]
        print(f"{run['audio_seconds'] / 60:>6.1f}m {t['read']:>7.1f} {t['forward']:>8.1f} "
              f"{t['statistics']:>7.1f} {t['cca']:>7.1f} {t['mi']:>7.1f} {run['wall']:>7.1f} "
              f"{run['audio_seconds'] / run['wall']:>9.1f} {run['peak_mib']:>9.0f}  "
              + (f"{names[i]}" if names else f"{run['items']} MI clusters {run['clusters']}"))


def compare_sums(minutes: float, device: str, metrics: str) -> None:
    """Compensated (exact_sums) against plain float64 moments on the same audio: plain, exact,
    plain, exact (fresh processes; the machine's drift shows in the repeats)."""
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "hubert_base_random.pt"
        build_model(model)
        manifest = Path(tmp) / "corpus.jsonl"
        seconds = write_manifest(manifest, minutes, 1)
        print(f"scoring {seconds / 60:.1f} min of audio 4 times (fresh processes) ...", flush=True)
        names = ["plain", "exact", "plain", "exact"]
        runs = [scoring_run(model, manifest, device, metrics, plain_sums=name == "plain")
                for name in names]
    print_runs(runs, device, metrics, names)
    plain = [r for r, n in zip(runs, names, strict=True) if n == "plain"]
    exact = [r for r, n in zip(runs, names, strict=True) if n == "exact"]
    stats = [r["timings"]["statistics"] for r in (*plain, *exact)]
    print(f"\nstatistics, exact / plain: {stats[2] / stats[0]:.2f} and {stats[3] / stats[1]:.2f}"
          f" (plain {stats[0]:.1f} / {stats[1]:.1f} s, exact {stats[2]:.1f} / {stats[3]:.1f} s)")
    print(f"wall, exact / plain: {exact[0]['wall'] / plain[0]['wall']:.3f} and "
          f"{exact[1]['wall'] / plain[1]['wall']:.3f}")
    print(f"peak memory, exact / plain: {exact[0]['peak_mib'] / plain[0]['peak_mib']:.3f}")
    for key in exact[0]["scores"]:
        moved = max(abs(a - b) for a, b in zip(exact[0]["scores"][key], plain[0]["scores"][key],
                                               strict=True))
        again = max(abs(a - b) for a, b in zip(exact[0]["scores"][key], exact[1]["scores"][key],
                                               strict=True))
        print(f"{key}: max |exact - plain| = {moved:.2g}; exact run 2 vs run 1: {again:.2g}")


if __name__ == "__main__":
    main()
