"""One loader for every model source: ``load(spec)`` returns a :class:`LayerModel`.

``spec`` is one of

* a checkpoint written by ``pretraining/`` (``{"format": "layerprobe-hubert-v1", ...}``);
* a fairseq HuBERT / wav2vec 2.0 checkpoint (``model`` + ``cfg`` or ``args``), read without fairseq;
* a Hugging Face model folder or hub id (HuBERT, wav2vec2, WavLM, data2vec-audio);
* ``input:log-mel``: the input features themselves, one state (:mod:`.input_features`).

Every source follows the layer convention of :mod:`layerprobe.models.base`: state 0 is the
input of the first transformer block, state i the output of block i.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from . import safe_pickle
from .base import ConvStack, LayerModel, resolve_device
from .fairseq import fairseq_layer_model, is_fairseq_payload
from .huggingface import huggingface_layer_model
from .input_features import PREFIX as INPUT_PREFIX
from .input_features import input_layer_model
from .native import FORMAT, native_layer_model, save_native_checkpoint

__all__ = ["FORMAT", "ConvStack", "LayerModel", "load", "load_checkpoint", "resolve_device",
           "save_native_checkpoint"]

_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")


def load_checkpoint(path: str | Path) -> Any:
    """``torch.load`` on the CPU; classes we do not have (fairseq, omegaconf) become placeholders.

    Tries the safe ``weights_only`` loader first, then :mod:`.safe_pickle` (allowlisted globals
    only, so no code from the file runs either way).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise ValueError(f"{path}: not a file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # foreign classes (or a corrupt file): retry with placeholders below
        pass
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=safe_pickle)
    except Exception as err:  # torch/pickle raise many types for corrupt files
        raise ValueError(f"{path}: unreadable checkpoint ({type(err).__name__}: {err})") from err


def _checkpoint_model(path: Path, fairseq_pretrained: Path | None) -> LayerModel:
    payload = load_checkpoint(path)
    if isinstance(payload, Mapping) and payload.get("format") == FORMAT:
        return native_layer_model(payload, path)
    if is_fairseq_payload(payload):
        return fairseq_layer_model(payload, path, pretrained=fairseq_pretrained)
    found = sorted(map(str, payload)) if isinstance(payload, Mapping) else type(payload).__name__
    raise ValueError(
        f"{path}: unknown checkpoint layout (keys/type: {found}); expected a layerprobe checkpoint "
        f"(format={FORMAT!r}) or a fairseq one (keys 'model' and 'cfg' or 'args')"
    )


def _looks_like_path(spec: str) -> bool:
    return (spec.startswith(("/", "./", "../", "~")) or spec.endswith(_CHECKPOINT_SUFFIXES)
            or spec.count("/") > 1)


def load(spec: str | Path, *, device: str | torch.device = "cpu",
         fairseq_pretrained: str | Path | None = None) -> LayerModel:
    """Load any supported model in eval mode on ``device`` ("auto" | "cpu" | "cuda[:i]").

    ``fairseq_pretrained``: the pretrained checkpoint whose config a fine-tuned fairseq
    checkpoint with ``w2v_args=None`` needs (default: its ``w2v_path``, looked up as fairseq
    does, then next to the checkpoint); ignored by every other kind of model.
    """
    target = resolve_device(device)
    pretrained = None
    if fairseq_pretrained:
        pretrained = Path(fairseq_pretrained).expanduser()
        if not pretrained.is_file():
            raise FileNotFoundError(f"fairseq pretrained checkpoint not found: {pretrained}")
    path = Path(spec).expanduser()
    if isinstance(spec, str) and spec.startswith(INPUT_PREFIX) and not path.exists():
        model = input_layer_model(spec)
    elif path.is_file():
        model = _checkpoint_model(path, pretrained)
    elif path.is_dir():
        model = huggingface_layer_model(path)
    elif isinstance(spec, Path) or _looks_like_path(str(spec)):
        raise FileNotFoundError(f"model not found: {spec} (no such checkpoint file or folder)")
    else:
        model = huggingface_layer_model(str(spec))
    return model.to(target).eval()
