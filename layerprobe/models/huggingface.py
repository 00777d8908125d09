"""Hugging Face speech SSL models (HuBERT, wav2vec2, WavLM, data2vec-audio) as LayerModels.

Models run through transformers itself (``AutoModel``), so any of these architectures works.
States are captured with hooks on the encoder blocks (a pre-hook on block 0 for state 0, a forward
hook on every block), which gives the convention of :mod:`layerprobe.models.base` independently
of the transformers version. Hub ids are looked up in the local cache first; offline mode
(``HF_HUB_OFFLINE=1`` / ``TRANSFORMERS_OFFLINE=1``) never touches the network, and a hub that
cannot be reached (one quick connection attempt) fails at once instead of after retries.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .base import (
    HF_NORMALIZE_EPS,
    SAMPLE_RATE,
    ConvStack,
    LayerModel,
    MaskedGroupNormHook,
    valid_mask,
)

SUPPORTED_TYPES = ("hubert", "wav2vec2", "wavlm", "data2vec-audio")


def offline_mode() -> bool:
    """True when HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set to a true value."""
    truthy = {"1", "true", "yes", "on"}
    return any(os.environ.get(v, "").strip().lower() in truthy
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


_SHOW_PROGRESS = True  # see loading_progress


@contextlib.contextmanager
def loading_progress(show: bool) -> Iterator[None]:
    """Within the block, models load with (``show``) or without transformers' and the hub's
    progress bars ("Loading weights", downloads); the CLI's ``--no-progress`` uses it."""
    global _SHOW_PROGRESS
    saved, _SHOW_PROGRESS = _SHOW_PROGRESS, show
    try:
        yield
    finally:
        _SHOW_PROGRESS = saved


@contextlib.contextmanager
def _library_bars() -> Iterator[None]:
    if _SHOW_PROGRESS:
        yield
        return
    from transformers.utils import logging as transformers_logging

    was_enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            transformers_logging.enable_progress_bar()


HUB_CONNECT_TIMEOUT = 3.0  # seconds for the one reachability check before downloading


def hub_unreachable_reason(timeout: float = HUB_CONNECT_TIMEOUT) -> str | None:
    """Why the hub endpoint (HF_ENDPOINT) cannot be reached now, or None if a TCP connection
    opens; one attempt, no retries. Behind a proxy (``*_PROXY`` set) it is not checked."""
    import socket
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy",
                                       "ALL_PROXY", "all_proxy")):
        return None
    url = urlsplit(constants.ENDPOINT)
    host = url.hostname or ""
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as err:
        return f"cannot reach {constants.ENDPOINT} ({err.strerror or err})"
    return None


def _fetch_hint(spec: str) -> str:
    return (f"fetch it on a machine with internet access with `huggingface-cli download {spec}` "
            f"(or `hf download {spec}`) and copy the cache here (set HF_HOME / HF_HUB_CACHE to "
            f"point at it), or pass the path of a local model folder")


def _first(output: Any) -> Tensor:
    return output[0] if isinstance(output, tuple | list) else output


class HuggingFaceLayerModel(LayerModel):
    """A transformers speech encoder with all block states captured by hooks."""

    def __init__(self, model: nn.Module, *, name: str) -> None:
        config = model.config
        if config.model_type not in SUPPORTED_TYPES:
            raise ValueError(f"model {name!r}: unsupported model type {config.model_type!r} "
                             f"(supported: {', '.join(SUPPORTED_TYPES)})")
        layers = getattr(getattr(model, "encoder", None), "layers", None)
        if not isinstance(layers, nn.ModuleList) or len(layers) != config.num_hidden_layers:
            raise ValueError(f"model {name!r}: no encoder.layers with "
                             f"{config.num_hidden_layers} blocks")
        group_norm = None
        batch_invariant = True
        if getattr(config, "feat_extract_norm", "layer") == "group":
            first_norm = getattr(model.feature_extractor.conv_layers[0], "layer_norm", None)
            if isinstance(first_norm, nn.GroupNorm):
                group_norm = first_norm
            else:  # cannot mask the statistics: batch equal lengths only
                batch_invariant = False
        super().__init__(
            name=name,
            source="huggingface",
            n_layers=int(config.num_hidden_layers),
            dim=int(config.hidden_size),
            conv=ConvStack(tuple(int(k) for k in config.conv_kernel),
                           tuple(int(s) for s in config.conv_stride)),
            batch_invariant=batch_invariant,
        )
        self.model = model
        self._group_norm = MaskedGroupNormHook(group_norm) if group_norm is not None else None
        self._captured: list[Tensor] | None = None
        layers[0].register_forward_pre_hook(self._capture_input, with_kwargs=True)
        for layer in layers:
            layer.register_forward_hook(self._capture_output)
        self.meta = {"model_type": config.model_type,  # normalize_waveform set by the loader
                     "do_stable_layer_norm": bool(getattr(config, "do_stable_layer_norm", False))}
        self.eval()

    def _capture_input(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._captured is not None:
            self._captured.append(args[0] if args else kwargs["hidden_states"])

    def _capture_output(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._captured is not None:
            self._captured.append(_first(output))

    def _forward_states(self, waveforms: Tensor, lengths: Tensor | None) -> list[Tensor]:
        attention_mask = None
        if lengths is not None:
            attention_mask = valid_mask(lengths, waveforms.shape[1]).to(torch.long)
            if self._group_norm is not None:
                k, s = self.conv.kernels[0], self.conv.strides[0]
                n0 = torch.clamp(torch.div(lengths - k, s, rounding_mode="floor") + 1, min=0)
                self._group_norm.valid = valid_mask(n0, (waveforms.shape[1] - k) // s + 1)
        self._captured = []
        try:
            self.model(waveforms, attention_mask=attention_mask)
            states = self._captured
        finally:
            self._captured = None
            if self._group_norm is not None:
                self._group_norm.valid = None
        return states


def _do_normalize(spec: str, *, local_files_only: bool) -> bool:
    """``do_normalize`` of the model's preprocessor_config.json (False when there is none).

    That flag is what transformers' ``Wav2Vec2FeatureExtractor`` applies: ``(x - mean) /
    sqrt(var + 1e-7)`` per item (:data:`HF_NORMALIZE_EPS`); without it, no preprocessing.
    """
    from transformers.utils import cached_file

    try:
        with _library_bars():
            found = cached_file(spec, "preprocessor_config.json",
                                local_files_only=local_files_only,
                                _raise_exceptions_for_missing_entries=False)
    except OSError:
        return False
    if found is None:
        return False
    try:
        with open(found, encoding="utf-8") as handle:
            config = json.load(handle)
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{found}: unreadable preprocessor config ({err})") from err
    if not isinstance(config, dict):
        raise ValueError(f"{found}: preprocessor config is not a JSON object")
    value = config.get("do_normalize", False)
    if not isinstance(value, bool):
        raise ValueError(f"{found}: do_normalize={value!r} is not true/false")
    rate = config.get("sampling_rate", SAMPLE_RATE)
    if rate != SAMPLE_RATE:
        raise ValueError(f"{found}: sampling_rate={rate!r}; layerprobe feeds {SAMPLE_RATE} Hz "
                         f"audio")
    return value


def _set_preprocessing(model: HuggingFaceLayerModel, do_normalize: bool) -> None:
    model.normalize_waveform = do_normalize
    model.normalize_eps = HF_NORMALIZE_EPS
    model.meta["normalize_waveform"] = do_normalize
    model.meta["waveform_preprocessing"] = (
        "transformers Wav2Vec2FeatureExtractor do_normalize, eps 1e-7" if do_normalize else "none")


def _from_pretrained(spec: str, *, local_files_only: bool) -> nn.Module:
    from transformers import AutoConfig, AutoModel

    with _library_bars():
        config = AutoConfig.from_pretrained(spec, local_files_only=local_files_only)
        if config.model_type not in SUPPORTED_TYPES:
            raise ValueError(f"{spec}: unsupported model type {config.model_type!r} "
                             f"(supported: {', '.join(SUPPORTED_TYPES)})")
        return AutoModel.from_pretrained(spec, config=config, local_files_only=local_files_only,
                                         dtype=torch.float32)


def huggingface_layer_model(spec: str | Path) -> HuggingFaceLayerModel:
    """Load a local model folder, or a hub id from the cache (downloading only when online)."""
    path = Path(spec)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path}: folder has no config.json; not a Hugging Face model folder")
        try:
            model = _from_pretrained(str(path), local_files_only=True)
        except OSError as err:
            raise ValueError(f"{path}: cannot load Hugging Face model folder: {err}") from err
        layer_model = HuggingFaceLayerModel(model, name=path.name)
        _set_preprocessing(layer_model, _do_normalize(str(path), local_files_only=True))
        return layer_model
    spec = str(spec)
    local = True
    try:
        model = _from_pretrained(spec, local_files_only=True)
    except OSError as cached_err:
        if offline_mode():
            raise ValueError(f"{spec!r} is not in the local Hugging Face cache and offline mode "
                             f"is on (HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE); "
                             f"{_fetch_hint(spec)}") from cached_err
        unreachable = hub_unreachable_reason()
        if unreachable:
            raise ValueError(f"{spec!r} is not in the local Hugging Face cache and the hub is "
                             f"out of reach: {unreachable}; {_fetch_hint(spec)}") from cached_err
        try:
            model = _from_pretrained(spec, local_files_only=False)
            local = False
        except OSError as err:
            raise ValueError(f"{spec!r}: not in the local Hugging Face cache and could not be "
                             f"downloaded ({err}); {_fetch_hint(spec)}") from err
    layer_model = HuggingFaceLayerModel(model, name=spec)
    _set_preprocessing(layer_model, _do_normalize(spec, local_files_only=local))
    return layer_model
