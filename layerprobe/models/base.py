"""The one abstraction every model source is wrapped into: :class:`LayerModel`.

Layer convention (identical for every source, tested across sources):

* state ``0`` is the input of the first transformer block: the projected conv features plus the
  convolutional positional embedding, followed by the encoder LayerNorm for post-LN ("base",
  ``layer_norm_first=False``) models; pre-LN ("large", "stable layer norm") models apply no norm
  there;
* state ``i`` (1..L) is the raw output of transformer block ``i``.

The encoder's final LayerNorm of pre-LN models is applied to *no* state. This is fairseq's
``layer_results`` convention and transformers 5.x's ``output_hidden_states`` convention
(transformers 4.x applied that final norm to the last state only). A model with L blocks yields
L+1 states.

Waveform normalisation: models trained on per-utterance standardised audio (fairseq
``task.normalize``, HF ``do_normalize``) set ``normalize_waveform``; each item is then scaled to
zero mean and unit variance over its valid samples, ``(x - mean) / sqrt(var + eps)``, before the
forward, with the ``eps`` of the model's own pipeline (``normalize_eps``): fairseq's
``F.layer_norm(wav, wav.shape)`` uses 1e-5, Hugging Face's ``Wav2Vec2FeatureExtractor`` 1e-7. The
two differ by several percent on quiet audio (RMS 0.003), so each source keeps its own.

Padding: every batch is padded on the right and carries its valid lengths. Attention never sees
padded frames, padded frames are zeroed before the positional convolution, and models whose first
conv layer uses GroupNorm over time (fairseq's "default" extractor: HuBERT/wav2vec2 base) normalise
with statistics of the valid frames only, so each item's features do not depend on its batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

SAMPLE_RATE = 16000


@dataclass(frozen=True)
class ConvStack:
    """Kernel sizes and strides of the waveform convolution stack."""

    kernels: tuple[int, ...]
    strides: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.kernels or len(self.kernels) != len(self.strides):
            raise ValueError(
                f"ConvStack: need as many kernels as strides, got {self.kernels} / {self.strides}"
            )
        if min(self.kernels) < 1 or min(self.strides) < 1:
            raise ValueError(f"ConvStack: kernels and strides must be >= 1: {self}")

    @property
    def stride(self) -> int:
        """Samples between consecutive frames."""
        return math.prod(self.strides)

    @property
    def receptive_field(self) -> int:
        """Samples one output frame depends on (400 for HuBERT/wav2vec2)."""
        field = 1
        for kernel, stride in zip(reversed(self.kernels), reversed(self.strides), strict=True):
            field = (field - 1) * stride + kernel
        return field

    def num_frames(self, n_samples: int) -> int:
        """Frames produced for ``n_samples`` samples (0 when shorter than the receptive field)."""
        n = int(n_samples)
        for kernel, stride in zip(self.kernels, self.strides, strict=True):
            n = max(0, (n - kernel) // stride + 1)
        return n

    def frame_lengths(self, lengths: Tensor) -> Tensor:
        """Vectorised :meth:`num_frames` for a tensor of sample counts."""
        n = lengths.to(torch.long)
        for kernel, stride in zip(self.kernels, self.strides, strict=True):
            n = torch.clamp(torch.div(n - kernel, stride, rounding_mode="floor") + 1, min=0)
        return n


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"``/None picks CUDA when available; ``"cpu"``/``"cuda"``/``"cuda:1"`` as given."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r} requested but CUDA is not available")
    return resolved


def masked_group_norm(norm: nn.GroupNorm, x: Tensor, valid: Tensor) -> Tensor:
    """GroupNorm over time of ``x [B, C, T]`` using only frames where ``valid [B, T]`` is true.

    Equal to ``norm(x)`` on the valid frames of each item run alone.
    """
    if x.ndim != 3 or valid.shape != (x.shape[0], x.shape[2]):
        raise ValueError(f"masked_group_norm: x {tuple(x.shape)} and valid {tuple(valid.shape)}")
    b, c, t = x.shape
    g = norm.num_groups
    xf = x.float().reshape(b, g, c // g, t)
    w = valid.to(xf.dtype)[:, None, None, :]
    count = (w.sum(dim=-1, keepdim=True) * (c // g)).sum(dim=-2, keepdim=True).clamp(min=1.0)
    mean = (xf * w).sum(dim=(-1, -2), keepdim=True) / count
    var = (((xf - mean) ** 2) * w).sum(dim=(-1, -2), keepdim=True) / count
    out = ((xf - mean) / torch.sqrt(var + norm.eps)).reshape(b, c, t)
    if norm.affine:
        out = out * norm.weight.float()[None, :, None] + norm.bias.float()[None, :, None]
    return out.to(x.dtype)


class MaskedGroupNormHook:
    """Forward hook replacing a GroupNorm's output by :func:`masked_group_norm`.

    ``valid`` is set by the owning model around each forward; when None the module's own output
    is kept (single items or equal-length batches).
    """

    def __init__(self, norm: nn.GroupNorm) -> None:
        self.norm = norm
        self.valid: Tensor | None = None
        self.handle = norm.register_forward_hook(self)

    def __call__(self, module: nn.Module, inputs: tuple, output: Tensor) -> Tensor | None:
        if self.valid is None:
            return None
        x = inputs[0]
        if self.valid.shape != (x.shape[0], x.shape[2]):
            raise ValueError(
                f"masked GroupNorm: valid mask {tuple(self.valid.shape)} does not match "
                f"conv output {tuple(x.shape)}"
            )
        return masked_group_norm(self.norm, x, self.valid)


HF_NORMALIZE_EPS = 1e-7  # transformers Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm
FAIRSEQ_NORMALIZE_EPS = 1e-5  # fairseq datasets: F.layer_norm(wav, wav.shape), default eps


def normalize_waveforms(waveforms: Tensor, lengths: Tensor, *,
                        eps: float = HF_NORMALIZE_EPS) -> Tensor:
    """``(x - mean) / sqrt(var + eps)`` per item over its valid samples; padding stays 0.

    ``var`` is the biased (population) variance, as in both fairseq and transformers.
    """
    if waveforms.ndim != 2 or lengths.shape != (waveforms.shape[0],):
        raise ValueError(f"normalize_waveforms: waveforms {tuple(waveforms.shape)} must be [B, n] "
                         f"and lengths {tuple(lengths.shape)} [B]")
    if not eps > 0:
        raise ValueError(f"normalize_waveforms: eps must be > 0, got {eps}")
    valid = valid_mask(lengths, waveforms.shape[1]).to(waveforms.dtype)
    count = valid.sum(dim=1, keepdim=True).clamp(min=1.0)
    mean = (waveforms * valid).sum(dim=1, keepdim=True) / count
    var = (((waveforms - mean) * valid) ** 2).sum(dim=1, keepdim=True) / count
    return (waveforms - mean) / torch.sqrt(var + eps) * valid


def valid_mask(lengths: Tensor, max_len: int) -> Tensor:
    """``[B, max_len]`` bool, true on the first ``lengths[b]`` positions."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


class LayerModel(nn.Module):
    """A speech SSL model seen as a stack of layers (see module docstring for the convention).

    Subclasses implement :meth:`_forward_states`. Instances are always in eval mode.
    """

    name: str
    source: str  # "layerprobe" | "fairseq" | "huggingface"
    n_layers: int
    dim: int
    conv: ConvStack
    batch_invariant: bool  # padding does not change an item's features
    normalize_waveform: bool  # standardise each waveform before the forward
    normalize_eps: float  # eps of that standardisation, as in the model's own pipeline

    def __init__(self, *, name: str, source: str, n_layers: int, dim: int, conv: ConvStack,
                 batch_invariant: bool = True, normalize_waveform: bool = False,
                 normalize_eps: float = HF_NORMALIZE_EPS) -> None:
        super().__init__()
        if n_layers < 0 or dim < 1:
            raise ValueError(f"model {name!r}: n_layers={n_layers} must be >= 0 and dim={dim} "
                             ">= 1")
        self.name = name
        self.source = source
        self.n_layers = n_layers
        self.dim = dim
        self.conv = conv
        self.batch_invariant = batch_invariant
        self.normalize_waveform = normalize_waveform
        self.normalize_eps = normalize_eps
        self.meta: dict = {}  # source-specific facts (checkpoint meta, config), JSON-able

    # ----------------------------------------------------------------- geometry
    @property
    def frame_rate(self) -> float:
        """Frames per second at 16 kHz (50.0 for HuBERT)."""
        return SAMPLE_RATE / self.conv.stride

    @property
    def stride(self) -> int:
        """Samples between consecutive frames (320 for HuBERT)."""
        return self.conv.stride

    @property
    def receptive_field(self) -> int:
        """Samples one frame depends on, through the conv stack (400 for HuBERT)."""
        return self.conv.receptive_field

    def num_frames(self, n_samples: int) -> int:
        """Frames the model yields for ``n_samples`` samples."""
        return self.conv.num_frames(n_samples)

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        return torch.device("cpu")

    def train(self, mode: bool = True) -> LayerModel:
        """Always eval: dropout, layer drop and masking stay off."""
        return super().train(False)

    # ----------------------------------------------------------------- forward
    def check_lengths(self, lengths: Sequence[int] | Tensor, keys: Sequence[object] | None = None
                      ) -> None:
        """Raise a ValueError naming the item when audio is shorter than the receptive field."""
        for i, n in enumerate(torch.as_tensor(lengths).tolist()):
            if n < self.receptive_field:
                who = f"utterance {keys[i]!r}" if keys is not None else f"batch item {i}"
                raise ValueError(
                    f"{who}: audio of {n} samples shorter than the receptive field of "
                    f"{self.receptive_field} samples of model {self.name!r}"
                )

    def normalize(self, waveforms: Tensor, lengths: Tensor) -> Tensor:
        """This model's waveform standardisation (``normalize_eps``) of a padded batch."""
        return normalize_waveforms(waveforms, lengths, eps=self.normalize_eps)

    @torch.no_grad()
    def hidden_states(self, waveforms: Tensor, lengths: Tensor | None = None, *,
                      normalize: bool | None = None) -> tuple[Tensor, Tensor]:
        """All layers for a right-padded batch.

        Args:
            waveforms: ``[B, n]`` float 16 kHz audio, padded on the right.
            lengths: ``[B]`` valid samples per item (None: all ``n``).
            normalize: standardise each item first (None: ``self.normalize_waveform``).

        Returns:
            ``([L+1, B, T, D], frame_lengths [B])``; frames past an item's length are padding.
        """
        if waveforms.ndim != 2:
            raise ValueError(
                f"hidden_states: waveforms must be [B, n], got {tuple(waveforms.shape)}")
        b, n = waveforms.shape
        if lengths is None:
            lengths = torch.full((b,), n, dtype=torch.long)
        lengths = torch.as_tensor(lengths, dtype=torch.long)
        if lengths.shape != (b,) or int(lengths.max()) > n or int(lengths.min()) < 0:
            raise ValueError(
                f"hidden_states: lengths {lengths.tolist()} do not fit waveforms "
                f"{tuple(waveforms.shape)}"
            )
        self.check_lengths(lengths)
        device = self.device
        waveforms = waveforms.to(device=device, dtype=torch.float32)
        lengths = lengths.to(device)
        padded = bool((lengths < n).any())
        if self.normalize_waveform if normalize is None else normalize:
            waveforms = self.normalize(waveforms, lengths)
        states = self._forward_states(waveforms, lengths if padded else None)
        frame_lengths = self.conv.frame_lengths(lengths)
        if len(states) != self.n_layers + 1:
            raise ValueError(
                f"model {self.name!r} returned {len(states)} states, expected {self.n_layers + 1}"
            )
        out = torch.stack([s.float() for s in states], dim=0)
        n_frames = int(frame_lengths.max())
        if out.shape[1] != b or out.shape[3] != self.dim or out.shape[2] != n_frames:
            raise ValueError(
                f"model {self.name!r}: hidden states {tuple(out.shape)} do not match batch {b}, "
                f"dim {self.dim}, frames {int(frame_lengths.max())}"
            )
        return out, frame_lengths

    def _forward_states(self, waveforms: Tensor, lengths: Tensor | None) -> list[Tensor]:
        """L+1 tensors ``[B, T, D]``; ``lengths`` None means no padding."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, source={self.source!r}, n_layers={self.n_layers}, "
                f"dim={self.dim}, frame_rate={self.frame_rate}, "
                f"receptive_field={self.receptive_field}")
