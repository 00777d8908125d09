"""A torchaudio ``Wav2Vec2Model`` (HuBERT / wav2vec 2.0, post-LN or pre-LN) as a LayerModel.

Used for our own checkpoints and for fairseq checkpoints (both map onto torchaudio's modules).
The layer convention is the one in :mod:`layerprobe.models.base`; torchaudio's own
``extract_features`` omits state 0, which is why the transformer is walked here block by block.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchaudio.models import Wav2Vec2Model

from .base import ConvStack, LayerModel, MaskedGroupNormHook, valid_mask


def conv_stack_of(model: Wav2Vec2Model) -> ConvStack:
    """Kernel sizes and strides of a torchaudio feature extractor."""
    layers = model.feature_extractor.conv_layers
    return ConvStack(tuple(int(layer.kernel_size) for layer in layers),
                     tuple(int(layer.stride) for layer in layers))


class TorchaudioLayerModel(LayerModel):
    """Wraps a torchaudio ``Wav2Vec2Model``; convention in :mod:`layerprobe.models.base`."""

    def __init__(self, model: Wav2Vec2Model, *, name: str, source: str) -> None:
        transformer = model.encoder.transformer
        super().__init__(
            name=name,
            source=source,
            n_layers=len(transformer.layers),
            dim=int(transformer.pos_conv_embed.embed_dim),
            conv=conv_stack_of(model),
        )
        self.model = model
        first_norm = model.feature_extractor.conv_layers[0].layer_norm
        self._group_norm = (MaskedGroupNormHook(first_norm)
                            if isinstance(first_norm, nn.GroupNorm) else None)
        self.eval()

    def _forward_states(self, waveforms: Tensor, lengths: Tensor | None) -> list[Tensor]:
        model = self.model
        if self._group_norm is not None:
            first = model.feature_extractor.conv_layers[0]
            self._group_norm.valid = None
            if lengths is not None:
                n0 = torch.clamp(
                    torch.div(lengths - first.kernel_size, first.stride, rounding_mode="floor") + 1,
                    min=0,
                )
                t0 = (waveforms.shape[1] - first.kernel_size) // first.stride + 1
                self._group_norm.valid = valid_mask(n0, t0)
        try:
            features, frame_lengths = model.feature_extractor(waveforms, lengths)
        finally:
            if self._group_norm is not None:
                self._group_norm.valid = None
        # Encoder._preprocess: projection, zero padded frames, additive attention mask.
        x, mask = model.encoder._preprocess(features, frame_lengths)
        transformer = model.encoder.transformer
        # Transformer._preprocess: + positional conv, then LayerNorm for post-LN models
        # (torchaudio's Transformer.layer_norm_first is True exactly for post-LN encoders).
        x = transformer._preprocess(x)
        states = [x]
        position_bias = None
        for layer in transformer.layers:
            x, position_bias = layer(x, mask, position_bias=position_bias)
            states.append(x)
        return states
