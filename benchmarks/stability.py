"""How much do scores move when the features move by rounding-level amounts?

Scores one model on the bundled corpus (or ``--data``) with every CCA metric, then again with the
hidden states multiplied by ``1 + sigma * N(0, 1)`` (seeded, fresh noise per utterance) for each
``--sigma``, and prints the largest per-layer change per probe and metric. The protocol (splits,
trials, eps grid) is identical in every run, so any change comes from the fits' sensitivity.

Targets (issue #8): sigma 1e-7 moves no score by more than 1e-5; 1e-6 by no more than 1e-4.
``--model`` takes any spec ``layerprobe.models.load`` takes (a trained demo checkpoint, e.g.
``runs/demo/it3/ckpt.pt``); without it a random post-LN tiny HF HuBERT is built.

Usage: ``python benchmarks/stability.py [--model SPEC] [--sigma 1e-7 1e-6] [--max-utterances N]``
"""

from __future__ import annotations

import argparse
import warnings

import torch

from layerprobe.config import CCA_METRICS, AnalysisConfig
from layerprobe.models import LayerModel, load
from layerprobe.models.huggingface import HuggingFaceLayerModel
from layerprobe.score import score_model


def random_post_ln_model(seed: int = 0, hidden: int = 96, layers: int = 4) -> LayerModel:
    """A random post-LN (group-norm) HF HuBERT with the real conv front end, small width."""
    from transformers import HubertConfig, HubertModel

    torch.manual_seed(seed)
    config = HubertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                          intermediate_size=2 * hidden, conv_dim=(64,) * 7,
                          feat_extract_norm="group", do_stable_layer_norm=False)
    return HuggingFaceLayerModel(HubertModel(config).eval(), name="random-post-ln-hubert")


def perturb(model: LayerModel, sigma: float, seed: int = 1) -> None:
    """Multiply every hidden state of ``model`` by ``1 + sigma N(0, 1)`` from now on."""
    inner = model._forward_states
    gen = torch.Generator().manual_seed(seed)

    def noisy(waveforms, lengths):
        states = inner(waveforms, lengths)
        return [s * (1 + sigma * torch.randn(s.shape, generator=gen).to(s)) for s in states]

    model._forward_states = noisy


def scores(model: LayerModel, config: AnalysisConfig) -> dict[tuple[str, str], list[float]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = score_model(model, None, config, progress=False, skip_failed=True)
    for w in caught:
        if "not scored" in str(w.message) or "metric" in str(w.message):
            print(f"  (left out: {w.message})")
    return {(r.probe, r.metric): r.scores for r in results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="model spec (default: a random post-LN tiny HuBERT)")
    parser.add_argument("--sigma", type=float, nargs="+", default=[1e-7, 1e-6])
    parser.add_argument("--metrics", nargs="+", default=list(CCA_METRICS))
    parser.add_argument("--max-utterances", type=int, default=0)
    parser.add_argument("--data", default="")
    args = parser.parse_args()
    config = AnalysisConfig(corpus=args.data, metrics=tuple(args.metrics), n_seeds=1,
                            max_utterances=args.max_utterances, device="cpu")

    def fresh() -> LayerModel:
        return load(args.model) if args.model else random_post_ln_model()

    base = scores(fresh(), config)
    print(f"model: {args.model or 'random post-LN HuBERT (HF, 96-d, 4 layers)'}")
    print("probe   metric          " + "  ".join(f"max|d| at {s:.0e}" for s in args.sigma))
    moved = {}
    for sigma in args.sigma:
        model = fresh()
        perturb(model, sigma)
        other = scores(model, config)
        for key, ref in base.items():
            if key in other:
                moved.setdefault(key, []).append(
                    max(abs(a - b) for a, b in zip(ref, other[key], strict=True)))
    for (probe, metric), deltas in sorted(moved.items()):
        cells = "  ".join(f"{d:16.2e}" for d in deltas)
        print(f"{probe:<7} {metric:<15} {cells}")


if __name__ == "__main__":
    main()
