"""HuBERT pretraining model presets (torchaudio's ``hubert_pretrain_model``) and checkpoints.

Presets are complete keyword sets of ``torchaudio.models.hubert_pretrain_model``; they are stored
verbatim as ``model_args`` in checkpoints so that a loader can rebuild the model.

- ``base``: the published HuBERT Base architecture and masking (torchaudio's
  ``hubert_pretrain_base``).
- ``tiny``: the same convolutional strides (so 50 Hz frames and a 400-sample receptive field) with
  32 channels, 4 transformer blocks of width 64, no dropout nor layer drop; for CPU tests and demos.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torchaudio.models import HuBERTPretrainModel, hubert_pretrain_model

from layerprobe.models import ConvStack
from layerprobe.models import load_checkpoint as read_checkpoint
from layerprobe.models.native import FORMAT, save_native_checkpoint

CONV_STRIDES = [(10, 5)] + [(3, 2)] * 4 + [(2, 2)] * 2  # (kernel, stride) of HuBERT's conv stack


def _conv_config(channels: int) -> list[list[int]]:
    return [[channels, k, s] for k, s in CONV_STRIDES]


_COMMON: dict[str, Any] = {
    "extractor_mode": "group_norm",
    "extractor_conv_bias": False,
    "encoder_layer_norm_first": False,
    "mask_prob": 0.8,
    "mask_selection": "static",
    "mask_other": 0.0,
    "mask_length": 10,
    "no_mask_overlap": False,
    "mask_min_space": 1,
    "mask_channel_prob": 0.0,
    "mask_channel_selection": "static",
    "mask_channel_other": 0.0,
    "mask_channel_length": 10,
    "no_mask_channel_overlap": False,
    "mask_channel_min_space": 1,
    "skip_masked": False,
    "skip_nomask": False,
    "feature_grad_mult": 0.1,
}

PRESETS: dict[str, dict[str, Any]] = {
    "base": {
        **_COMMON,
        "extractor_conv_layer_config": _conv_config(512),
        "encoder_embed_dim": 768,
        "encoder_projection_dropout": 0.1,
        "encoder_pos_conv_kernel": 128,
        "encoder_pos_conv_groups": 16,
        "encoder_num_layers": 12,
        "encoder_num_heads": 12,
        "encoder_attention_dropout": 0.1,
        "encoder_ff_interm_features": 3072,
        "encoder_ff_interm_dropout": 0.0,
        "encoder_dropout": 0.1,
        "encoder_layer_drop": 0.05,
        "final_dim": 256,
    },
    "tiny": {
        **_COMMON,
        "extractor_conv_layer_config": _conv_config(32),
        "encoder_embed_dim": 64,
        "encoder_projection_dropout": 0.0,
        "encoder_pos_conv_kernel": 16,
        "encoder_pos_conv_groups": 4,
        "encoder_num_layers": 4,
        "encoder_num_heads": 4,
        "encoder_attention_dropout": 0.0,
        "encoder_ff_interm_features": 128,
        "encoder_ff_interm_dropout": 0.0,
        "encoder_dropout": 0.0,
        "encoder_layer_drop": 0.0,
        "final_dim": 32,
    },
}


def model_args(preset: str, num_classes: int, overrides: dict[str, Any] | None = None) -> dict:
    """The full JSON-able kwargs of ``hubert_pretrain_model`` for a preset."""
    if preset not in PRESETS:
        raise ValueError(f"model preset {preset!r} unknown; choose from {sorted(PRESETS)}")
    args = {**PRESETS[preset], **(overrides or {}), "num_classes": int(num_classes)}
    unknown = sorted(set(args) - set(PRESETS["base"]) - {"num_classes"})
    if unknown:
        raise ValueError(f"unknown hubert_pretrain_model argument(s) {unknown} "
                         "in [model] overrides")
    if args["extractor_conv_layer_config"] is not None:
        args["extractor_conv_layer_config"] = [list(c) for c in args["extractor_conv_layer_config"]]
    return args


def build_model(args: dict[str, Any]) -> HuBERTPretrainModel:
    """``hubert_pretrain_model(**args)`` with conv configs turned back into tuples."""
    kw = dict(args)
    if kw.get("extractor_conv_layer_config") is not None:
        kw["extractor_conv_layer_config"] = [tuple(c) for c in kw["extractor_conv_layer_config"]]
    return hubert_pretrain_model(**kw)


def conv_stack(args: dict[str, Any]) -> ConvStack:
    """Kernels and strides of the model's conv stack (frame arithmetic shared with scoring)."""
    conv = args.get("extractor_conv_layer_config") or _conv_config(512)
    return ConvStack(tuple(int(k) for _, k, _ in conv), tuple(int(s) for _, _, s in conv))


def num_frames(args: dict[str, Any], n_samples: int) -> int:
    """Output frames of the conv stack for ``n_samples`` of audio (0 if too short)."""
    return conv_stack(args).num_frames(n_samples)


def receptive_field(args: dict[str, Any]) -> tuple[int, int]:
    """(receptive field, hop) in samples of the conv stack."""
    stack = conv_stack(args)
    return stack.receptive_field, stack.stride


def reset_prediction_head(model: HuBERTPretrainModel, num_classes: int, seed: int) -> None:
    """Re-initialise ``final_proj`` and ``label_embeddings`` (for ``num_classes`` classes).

    Cluster ids of a new k-means have no relation to the previous ones, so a model continued from
    the previous iteration keeps its encoder and mask embedding but gets a fresh head. Initialised
    as torchaudio does (uniform label embeddings, default ``nn.Linear``), from ``seed``.
    """
    gen = torch.Generator().manual_seed(seed)
    head = model.logit_generator
    final_dim = head.final_proj.out_features
    device = head.final_proj.weight.device
    emb = torch.rand(num_classes, final_dim, generator=gen)
    head.label_embeddings = torch.nn.Parameter(emb.to(device))
    fan_in = head.final_proj.in_features
    bound = 1.0 / fan_in**0.5
    with torch.no_grad():
        w = (torch.rand(head.final_proj.weight.shape, generator=gen) * 2 - 1) * bound
        head.final_proj.weight.copy_(w)
        head.final_proj.bias.copy_((torch.rand(final_dim, generator=gen) * 2 - 1) * bound)


def save_checkpoint(path: str | Path, args: dict[str, Any], state_dict: dict,
                    meta: dict[str, Any]) -> Path:
    """Write a ``layerprobe-hubert-v1`` checkpoint atomically (read by ``layerprobe.models``)."""
    cpu_state = {k: v.detach().cpu() for k, v in state_dict.items()}
    return save_native_checkpoint(path, args, cpu_state, meta)


def load_checkpoint(path: str | Path, *, device: str | torch.device = "cpu"
                    ) -> tuple[HuBERTPretrainModel, dict[str, Any], dict[str, Any]]:
    """(model in eval mode, model_args, meta) from a ``layerprobe-hubert-v1`` checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    payload = read_checkpoint(path)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} checkpoint")
    model = build_model(payload["model_args"])
    model.load_state_dict(payload["model"])
    return model.to(device).eval(), payload["model_args"], payload.get("meta", {})
