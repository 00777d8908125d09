"""CPU vs CUDA: the same model scored on the same items on both devices.

Scores a random-weight HuBERT (``--preset base`` or ``tiny``, seeded) on the bundled corpus with
``--metrics`` on the CPU and on ``--device`` (default cuda), both in float32 with TF32 off, and
prints per probe and metric the largest |score difference| over layers, the smallest spread (std
over seeds) of the two runs and the largest z (a layer's difference over the standard error of a
difference of two seed means): a difference well below the spread means the devices agree for
every purpose the scores serve; z of ~2 over 13 layers is what two independent seed draws give.

    python benchmarks/device_agreement.py [--preset base] [--metrics pwcca,pwcca-centred,mi]
    python benchmarks/device_agreement.py --device cpu --kmeans-seed-shift 100 --metrics mi
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch


def build(path: Path, preset: str) -> None:
    from layerprobe.models.native import save_native_checkpoint
    from pretraining.model import build_model, model_args

    torch.manual_seed(0)
    args = model_args(preset, num_classes=100)
    save_native_checkpoint(path, args, build_model(args).state_dict(), {"note": "random weights"})


def score_on(model: Path, device: str, metrics: tuple[str, ...], kmeans_seed_shift: int = 0
             ) -> dict[str, object]:
    import layerprobe.score as score
    from layerprobe.config import AnalysisConfig
    from layerprobe.mi import mi_score

    def shifted(*args, **kwargs):  # the same MI with its k-means seeds moved
        return mi_score(*args, **{**kwargs, "seed": kwargs["seed"] + kmeans_seed_shift})

    config = AnalysisConfig(device=device, metrics=metrics)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        score.mi_score = shifted
        try:
            results = score.score_model(model, None, config, progress=False, skip_failed=True)
        finally:
            score.mi_score = mi_score
    print(f"{device}: {time.perf_counter() - start:.1f} s", flush=True)
    return {f"{r.probe}/{r.metric}": r for r in results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="base", choices=("base", "tiny"))
    parser.add_argument("--metrics", default="pwcca,pwcca-centred,mi")
    parser.add_argument("--device", default="cuda", help="the device compared with the CPU")
    parser.add_argument("--kmeans-seed-shift", type=int, default=0,
                        help="shift the second run's k-means seeds by this much: with "
                             "--device cpu, what two independent seed draws give")
    a = parser.parse_args()
    metrics = tuple(a.metrics.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model.pt"
        build(model, a.preset)
        cpu = score_on(model, "cpu", metrics)
        other = score_on(model, a.device, metrics, a.kmeans_seed_shift)
    shift = f", its k-means seeds shifted by {a.kmeans_seed_shift}" if a.kmeans_seed_shift else ""
    print(f"\nrandom {a.preset} HuBERT, bundled corpus: CPU vs {a.device}{shift}")
    print("z: a layer's |difference| over the standard error of a difference of two means over "
          "seeds, sqrt((s_cpu^2 + s_dev^2) / n_seeds);\n   two independent seed draws give max z "
          "of ~2-2.5 over 13 layers (CPU vs CPU, k-means seeds shifted by 100: 2.4 phone, 2.2 "
          "word)")
    print(f"{'probe/metric':<22} {'max |diff|':>11} {'min std':>9} {'diff / std':>11} "
          f"{'max z':>8}")
    for key, ref in cpu.items():
        if key not in other:
            print(f"{key:<22} scored on the CPU only")
            continue
        diff = np.abs(np.subtract(ref.scores, other[key].scores))
        stds = [s for r in (ref, other[key]) if r.std for s in r.std]
        spread = min(stds) if stds else float("nan")
        z = float("nan")
        if ref.std and other[key].std:
            n = len(ref.details.get("seed_scores", [])) or 1
            se = np.sqrt((np.square(ref.std) + np.square(other[key].std)) / n)
            z = float(np.max(diff / np.where(se > 0, se, np.nan)))
        print(f"{key:<22} {diff.max():>11.2e} {spread:>9.2e} {diff.max() / spread:>11.3f} "
              f"{z:>8.3f}")

if __name__ == "__main__":
    main()
