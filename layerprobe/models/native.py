"""Our own checkpoint format: written by ``pretraining/``, read by :func:`layerprobe.models.load`.

``torch.save(payload)`` with payload::

    {"format": "layerprobe-hubert-v1",
     "model_args": {...},   # JSON-able kwargs of torchaudio.models.hubert_pretrain_model(...)
     "model": HuBERTPretrainModel.state_dict(),
     "meta": {"iteration": int, "step": int, "schedule": str, ...}}

``meta["normalize_waveform"] = True`` marks a model trained on standardised waveforms.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torchaudio.models import hubert_pretrain_model

from layerprobe.atomic import atomic_torch_save

from .wav2vec2 import TorchaudioLayerModel

FORMAT = "layerprobe-hubert-v1"


def save_native_checkpoint(path: str | Path, model_args: Mapping[str, Any],
                           state_dict: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> Path:
    """Atomically write a ``layerprobe-hubert-v1`` checkpoint (tmp file + ``os.replace``).

    ``model_args`` and ``meta`` must be JSON-able; tensors are stored on the CPU.
    """
    path = Path(path)
    for what, value in (("model_args", model_args), ("meta", meta)):
        try:
            json.dumps(value)
        except TypeError as err:
            raise ValueError(
                f"save_native_checkpoint({path}): {what} is not JSON-able: {err}") from err
    bad = [k for k, v in state_dict.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if bad:
        raise ValueError(f"save_native_checkpoint({path}): non-tensor state entries {bad[:5]}")
    payload = {
        "format": FORMAT,
        "model_args": dict(model_args),
        "model": {k: v.detach().cpu() for k, v in state_dict.items()},
        "meta": dict(meta),
    }
    return atomic_torch_save(payload, path)


def _model_args(value: Any, path: Path) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"{path}: 'model_args' must be a dict, got {type(value).__name__}")
    args = dict(value)
    if args.get("feature_grad_mult") == 1.0:  # no scaling; torchaudio takes None for it
        args["feature_grad_mult"] = None
    conv = args.get("extractor_conv_layer_config")
    if conv is not None:
        args["extractor_conv_layer_config"] = [tuple(int(v) for v in layer) for layer in conv]
    return args


def native_layer_model(payload: Mapping[str, Any], path: Path) -> TorchaudioLayerModel:
    """Build the LayerModel of a loaded ``layerprobe-hubert-v1`` payload read from ``path``."""
    if payload.get("format") != FORMAT:
        raise ValueError(f"{path}: format {payload.get('format')!r} is not {FORMAT!r}")
    missing = [k for k in ("model_args", "model") if k not in payload]
    if missing:
        raise ValueError(f"{path}: layerprobe checkpoint lacks {missing}")
    args = _model_args(payload["model_args"], path)
    state = payload["model"]
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: 'model' is a {type(state).__name__}, not a state dict")
    bad = [k for k, v in state.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if bad:
        raise ValueError(f"{path}: 'model' entries that are not tensors: {bad[:5]}")
    try:
        pretrain = hubert_pretrain_model(**args)
    except TypeError as err:
        raise ValueError(f"{path}: bad model_args for hubert_pretrain_model: {err}") from err
    try:
        pretrain.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"{path}: weights do not match model_args: {err}") from err
    meta = payload.get("meta") or {}
    model = TorchaudioLayerModel(pretrain.wav2vec2, name=path.stem, source="layerprobe")
    model.meta = dict(meta) if isinstance(meta, Mapping) else {}
    model.normalize_waveform = bool(model.meta.get("normalize_waveform", False))
    return model
