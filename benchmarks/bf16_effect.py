"""Does bf16 extraction lower PWCCA through precision alone, or through a bug?

Builds a random-weight HuBERT-Base-width model (768-d, ``--layers`` blocks, the real conv front
end), runs the forward pass over the bundled corpus twice, in float32 and under bf16 autocast
(CPU autocast here; the same code path as CUDA's), recording every batch's hidden states. Then
it scores fbank/phone/word with ``--metrics`` on:

* ``fp32``          the float32 features;
* ``bf16``          the bf16-autocast features;
* ``fp32+noise``    fp32 features plus isotropic Gaussian noise whose energy per layer equals the
                    measured bf16 - fp32 difference (hypothesis a: bf16 = fp32 + rounding noise);
* ``fp32->bf16``    fp32 features rounded to bf16 after the forward (hypothesis b: only the
                    output rounding, no rounding inside the network);
* ``bf16-null``     bf16 features with each frame's mean over dimensions removed: at random
                    init every state is a LayerNorm output (weight 1, bias 0) whose frames sum
                    to 0, an exact null direction of the covariance in fp32 that bf16 fills
                    with rounding noise and a bias (hypothesis d).

The recorded states are replayed (no further forward passes), so every variant sees the same
items, splits and trials. It prints per layer: the relative difference ``|bf16 - fp32| / |fp32|``
(unpadded vs padded rows of a batch, a padding bug would show there), how many of the fp32
covariance's eigen-directions lie below the bf16 noise floor, the scores of each variant with
the split-seed std, and the eps pairs chosen on dev (hypothesis c).

The word probe needs more train items than 768 + vocabulary dimensions, more than the bundled
corpus has (at most 902 word tokens, 105 types); ``--small`` runs the same study on the random
post-LN HuBERT of ``benchmarks/stability.py`` (96-d), where the word probe fits.

    python benchmarks/bf16_effect.py [--layers 4] [--small] [--max-utterances 0] [--n-seeds 3]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from layerprobe.config import AnalysisConfig
from layerprobe.models import LayerModel, load
from layerprobe.score import score_model


def build_base(path: Path, layers: int) -> None:
    """A random HuBERT-Base (``layers`` transformer blocks) saved as a native checkpoint."""
    from layerprobe.models.native import save_native_checkpoint
    from pretraining.model import build_model, model_args

    torch.manual_seed(0)
    args = model_args("base", num_classes=500, overrides={"encoder_num_layers": layers})
    save_native_checkpoint(path, args, build_model(args).state_dict(), {"note": "random"})


class Tape:
    """Records the states of each forward call of a model, or replays them transformed."""

    def __init__(self, model: LayerModel):
        self.model = model
        self.inner = model._forward_states
        self.calls: list[tuple[tuple[int, ...], Tensor | None, list[Tensor]]] = []

    def record(self, on_call: Callable | None = None) -> None:
        def forward(waveforms: Tensor, lengths: Tensor | None) -> list[Tensor]:
            states = self.inner(waveforms, lengths)
            kept = [s.detach().float().clone() for s in states]
            if on_call is not None:
                on_call(len(self.calls), waveforms, lengths, kept)
            self.calls.append((tuple(waveforms.shape), lengths, kept))
            return states

        self.calls = []
        self.model._forward_states = forward

    def replay(self, transform: Callable[[int, Tensor], Tensor]) -> None:
        position = iter(range(len(self.calls)))

        def forward(waveforms: Tensor, lengths: Tensor | None) -> list[Tensor]:
            shape, _, states = self.calls[next(position)]
            if tuple(waveforms.shape) != shape:
                raise RuntimeError(f"replay out of step: batch {tuple(waveforms.shape)}, "
                                   f"recorded {shape}")
            return [transform(layer, s) for layer, s in enumerate(states)]

        self.model._forward_states = forward


def valid_rows(model: LayerModel, shape: tuple[int, ...], lengths: Tensor | None, frames: int
               ) -> list[tuple[int, int, bool]]:
    """(row, valid frames, padded?) for each item of a batch."""
    b, n = shape
    if lengths is None:
        return [(row, frames, False) for row in range(b)]
    counts = model.conv.frame_lengths(lengths.cpu())
    return [(row, int(counts[row]), int(lengths[row]) < n) for row in range(b)]


def score(model: LayerModel, config: AnalysisConfig) -> dict:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = score_model(model, None, config, progress=False, skip_failed=True)
    for w in caught:
        if "metric" in str(w.message):
            print(f"  (left out: {str(w.message)[:200]})")
    return {(r.probe, r.metric): r for r in results}


def chosen_eps(result) -> str:
    """The most common dev-chosen (eps_x, eps_y) over layers, trials and seeds."""
    seeds = result.details.get("seeds") or [{"chosen_eps": result.details["chosen_eps"]}]
    pairs = Counter(tuple(e) if isinstance(e, list | tuple) else (e,)
                    for s in seeds for layer in s["chosen_eps"] for e in layer)
    (top, count), total = pairs.most_common(1)[0], sum(pairs.values())
    return "(" + ", ".join(f"{e:.0e}" for e in top) + f") {count}/{total}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4, help="transformer blocks (Base: 12)")
    parser.add_argument("--max-utterances", type=int, default=0, help="0: all (the word probe "
                        "needs the whole bundled corpus for 768 + vocabulary dimensions)")
    parser.add_argument("--n-seeds", type=int, default=3)
    parser.add_argument("--metrics", nargs="+", default=["pwcca", "pwcca-centred"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--small", action="store_true",
                        help="the random post-LN 96-d HuBERT of benchmarks/stability.py instead")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = AnalysisConfig(device="cpu", metrics=tuple(args.metrics), n_seeds=args.n_seeds,
                            max_utterances=args.max_utterances)
    if args.small:
        from stability import random_post_ln_model

        model = random_post_ln_model(layers=args.layers)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "hubert_base_random.pt"
            build_base(path, args.layers)
            model = load(path)
    n_states = model.n_layers + 1
    tape = Tape(model)
    variants: dict[str, dict] = {}

    tic = time.perf_counter()
    tape.record()
    variants["fp32"] = score(model, config)
    fp32_calls = tape.calls
    print(f"fp32 forward + scoring: {time.perf_counter() - tic:.0f} s, {len(fp32_calls)} batches",
          flush=True)

    # bf16 pass: per layer squared norms of (bf16 - fp32) and fp32 over valid frames, split by
    # whether the item was padded in its batch
    diff = np.zeros((2, n_states))
    norm = np.zeros((2, n_states))
    bias = np.zeros((2, n_states, model.dim))  # sums of (bf16 - fp32), to tell bias from noise
    frames_seen = np.zeros(2)

    def compare(index: int, waveforms: Tensor, lengths: Tensor | None, states: list[Tensor]):
        shape, _, reference = fp32_calls[index]
        assert tuple(waveforms.shape) == shape, "bf16 pass batched differently from fp32"
        for row, t, padded in valid_rows(model, shape, lengths, states[0].shape[1]):
            frames_seen[int(padded)] += t
            for layer in range(n_states):
                a, b = states[layer][row, :t].double(), reference[layer][row, :t].double()
                diff[int(padded), layer] += float(((a - b) ** 2).sum())
                norm[int(padded), layer] += float((b ** 2).sum())
                bias[int(padded), layer] += (a - b).sum(0).numpy()

    tic = time.perf_counter()
    tape.record(on_call=compare)
    variants["bf16"] = score(model, config.replace(bf16=True))
    print(f"bf16 forward + scoring: {time.perf_counter() - tic:.0f} s", flush=True)
    relative = np.sqrt(diff.sum(0) / norm.sum(0))
    bf16_calls = tape.calls

    print("\nper layer: relative |bf16 - fp32| / |fp32| over valid frames (unpadded rows, padded "
          "rows), |mean difference| / rms difference (1/sqrt(frames) for pure noise), and the "
          "fp32 covariance eigen-directions below the bf16 noise floor")
    for layer in range(n_states):
        parts = [math.sqrt(diff[p, layer] / norm[p, layer]) if norm[p, layer] else float("nan")
                 for p in (0, 1)]
        rms = math.sqrt(diff[:, layer].sum() / frames_seen.sum() / model.dim)
        mean_diff = np.linalg.norm(bias[:, layer].sum(0) / frames_seen.sum()) / math.sqrt(
            model.dim)
        feats = torch.cat([s[layer][row, :t] for shape, lengths, s in fp32_calls
                           for row, t, _ in valid_rows(model, shape, lengths, s[0].shape[1])])
        feats = feats.double()
        cov = torch.cov(feats.T)
        floor = relative[layer] ** 2 * float((feats ** 2).mean())  # isotropic noise variance
        eig = torch.linalg.eigvalsh(cov)
        below = int((eig < floor).sum())
        print(f"  layer {layer:2d}: relative {relative[layer]:.2e} (unpadded {parts[0]:.2e}, "
              f"padded {parts[1]:.2e}); mean/rms {mean_diff / rms:.3f} "
              f"(noise ~{1 / math.sqrt(frames_seen.sum()):.3f}); eigen-directions below the "
              f"noise floor {below}/{model.dim} (eigenvalues {float(eig[0]):.1e}.."
              f"{float(eig[-1]):.1e}, floor {floor:.1e})", flush=True)

    gen = torch.Generator().manual_seed(1)

    def add_noise(layer: int, s: Tensor) -> Tensor:
        sigma = relative[layer] * float(s.pow(2).mean().sqrt())
        return s + sigma * torch.randn(s.shape, generator=gen)

    def centre_frames(layer: int, s: Tensor) -> Tensor:
        return s - s.mean(-1, keepdim=True)

    for name, calls, transform in (
            ("fp32+noise", fp32_calls, add_noise),
            ("fp32->bf16", fp32_calls, lambda layer, s: s.bfloat16().float()),
            ("bf16-null", bf16_calls, centre_frames)):
        tic = time.perf_counter()
        tape.calls = calls
        tape.replay(transform)
        variants[name] = score(model, config)
        print(f"{name} scoring: {time.perf_counter() - tic:.0f} s", flush=True)

    print(f"\n{model.name if args.small else 'random HuBERT-Base width'}, {model.dim}-d, "
          f"{args.layers} blocks, bundled corpus, n_seeds "
          f"{args.n_seeds}; scores mean over layers 0..{args.layers} [min..max], split-seed std "
          "(mean over layers), most common dev-chosen eps pair")
    keys = sorted(variants["fp32"])
    for probe, metric in keys:
        n_items = variants["fp32"][(probe, metric)].details["n_items"]
        print(f"{probe} {metric} ({n_items} items)")
        for name, results in variants.items():
            r = results.get((probe, metric))
            if r is None:
                print(f"  {name:<11} not scored")
                continue
            s = np.array(r.scores)
            std = np.mean(r.std) if r.std else float("nan")
            print(f"  {name:<11} {s.mean():.4f} [{s.min():.4f}..{s.max():.4f}] std {std:.4f}  "
                  f"eps {chosen_eps(r)}  per layer {' '.join(f'{v:.3f}' for v in s)}")


if __name__ == "__main__":
    main()
