"""End-to-end scoring of a HuBERT-Base-sized model (random weights) on this machine.

Scores fbank, phone and word probes (PWCCA, full protocol) on ~5 minutes of the bundled corpus,
then on twice that audio, each in a fresh process, and prints seconds per stage (reading + probe
targets, forward pass, statistics, CCA) and the peak resident memory of each run.

    python benchmarks/score_end_to_end.py [--minutes 5] [--device cpu]
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
    """A JSONL manifest of bundled utterances adding up to ``minutes``, listed ``copies`` times."""
    from layerprobe.corpus import load_corpus

    corpus = load_corpus(None)
    chosen, total = [], 0.0
    for utt in corpus.utterances:
        if total >= minutes * 60:
            break
        chosen.append(utt)
        total += utt.duration
    rows = [
        {"id": f"{utt.id}_{c}", "audio": str(utt.audio_path), "alignment": str(utt.alignment_path)}
        for c in range(copies) for utt in chosen
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return total * copies


def child(model: str, manifest: str, device: str) -> None:
    """One scoring run; prints a JSON line with timings and peak memory."""
    from layerprobe.config import AnalysisConfig
    from layerprobe.score import score_model

    config = AnalysisConfig(corpus=manifest, device=device, batch_seconds=60.0)
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
        "items": {r.probe: r.details["n_items"] for r in results},
        "best": {r.probe: max(range(len(r.scores)), key=r.scores.__getitem__) for r in results},
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "MANIFEST"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child, args.device)
        return
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "hubert_base_random.pt"
        build_model(model)
        runs = []
        for copies in (1, 2):
            manifest = Path(tmp) / f"corpus_x{copies}.jsonl"
            seconds = write_manifest(manifest, args.minutes, copies)
            print(f"scoring {seconds / 60:.1f} min of audio (fresh process) ...", flush=True)
            proc = subprocess.run(
                [sys.executable, __file__, "--device", args.device, "--child", str(model),
                 str(manifest)], capture_output=True, text=True,
            )
            if proc.returncode != 0:
                sys.exit(f"scoring run failed:\n{proc.stderr[-3000:]}")
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"\nHuBERT-Base-sized (12 layers, 768-d, random weights) on {args.device}, "
          f"{torch.get_num_threads()} threads")
    header = f"{'audio':>8} {'read':>7} {'forward':>8} {'stats':>7} {'cca':>7} {'wall':>7} " \
             f"{'peak MiB':>9}  items"
    print(header)
    for run in runs:
        t = run["timings"]
        print(f"{run['audio_seconds'] / 60:>6.1f}m {t['read']:>7.1f} {t['forward']:>8.1f} "
              f"{t['statistics']:>7.1f} {t['cca']:>7.1f} {run['wall']:>7.1f} "
              f"{run['peak_mib']:>9.0f}  {run['items']}")
    first, second = runs
    t = first["timings"]
    print(f"\nCCA / forward = {t['cca'] / t['forward']:.3f}; "
          f"(statistics + CCA) / forward = {(t['statistics'] + t['cca']) / t['forward']:.3f}")
    print(f"forward seconds per audio second = {t['forward'] / first['audio_seconds']:.3f}")
    print(f"peak memory, 2x audio / 1x audio = {second['peak_mib'] / first['peak_mib']:.3f}")


if __name__ == "__main__":
    main()
