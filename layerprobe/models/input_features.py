"""The input itself as a model: ``input:log-mel`` gives the 80 log-mel filterbanks of the
``fbank`` probe as a single state (state 0, no transformer block), at HuBERT's frame rate.

Scored like any model (every probe and metric), it shows where the input stands: a layer that
beats it on the phone probe or the linear proxy exposes phone information the input does not
expose linearly. Frames follow HuBERT's conv stack (400-sample receptive field, 320-sample hop,
50 Hz): model frame ``t`` takes the 10 ms log-mel frame ``2t``, as the ``fbank`` probe maps
them, so the ``fbank`` probe of this "model" compares the features with themselves.
"""

from __future__ import annotations

import torch
from torch import Tensor

from layerprobe.features import FBANK_DIM, fbank_frame_indices, log_mel_fbank

from .base import SAMPLE_RATE, ConvStack, LayerModel

PREFIX = "input:"
HUBERT_CONV = ConvStack((10, 3, 3, 3, 3, 2, 2), (5, 2, 2, 2, 2, 2, 2))
INPUT_FEATURES = ("log-mel",)


class LogMelInput(LayerModel):
    """The log-mel input features as a one-state model (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__(name="log-mel", source="input", n_layers=0, dim=FBANK_DIM,
                         conv=HUBERT_CONV)

    def _forward_states(self, waveforms: Tensor, lengths: Tensor | None) -> list[Tensor]:
        b, n = waveforms.shape
        lengths = torch.full((b,), n) if lengths is None else lengths
        frames = self.conv.frame_lengths(lengths.cpu())
        out = torch.zeros(b, int(frames.max()), FBANK_DIM)
        for i in range(b):
            fb = log_mel_fbank(waveforms[i, :int(lengths[i])].float().cpu(), SAMPLE_RATE)
            idx = fbank_frame_indices(int(frames[i]), self.frame_rate, fb.shape[0])
            out[i, :idx.shape[0]] = fb[idx]
        return [out.to(waveforms.device)]


def input_layer_model(spec: str) -> LayerModel:
    """The model of an ``input:NAME`` spec."""
    name = spec[len(PREFIX):]
    if name != "log-mel":
        raise ValueError(f"model {spec!r}: unknown input features {name!r}; choose from "
                         f"{[PREFIX + f for f in INPUT_FEATURES]}")
    return LogMelInput()
