"""Batched extraction of all layers' hidden states from a stream of waveforms.

:func:`iter_hidden_states` reads a bounded window of items, splits long ones into chunks, sorts the
pieces by length, packs them into padded batches of at most ``batch_seconds`` of padded audio, runs
ONE forward pass per batch for all layers and yields each item's ``[L+1, T, D]`` states as soon as
all its pieces are done. Memory is bounded by the window and one batch, whatever the corpus size.

Order: within a read-ahead window items come out by batch (shortest first), not in input order;
every result carries its key.

Chunking: an item longer than ``max_chunk_seconds`` is cut into pieces of ``m`` frames each
(``m`` = the most frames whose samples fit in ``max_chunk_seconds``); piece ``j`` gets samples
``[j*m*stride, (j+1)*m*stride + receptive_field - stride)`` (consecutive pieces overlap by
``receptive_field - stride`` samples) so the conv features of every frame are exact and the
concatenated output has exactly ``model.num_frames(n)`` frames. The transformer
(attention and positional convolution) sees only its piece, so frames within a few seconds of a
boundary differ slightly from an unchunked pass.

Waveform normalisation (models with ``normalize_waveform``) is applied to each whole item before
it is cut into pieces.

Padding: models with ``batch_invariant`` (all our wrappers whose first conv norm can be masked)
give the same features in any batch; other models only batch items of identical length.

Precision: every forward pass runs in full float32 (:func:`full_precision`: TF32 off for CUDA
matmuls and cuDNN convolutions, restored afterwards) unless bf16 autocast is asked for
(``dtype=torch.bfloat16``, on CUDA or the CPU). TF32 rounds matmul and convolution inputs to 10
mantissa bits, so CUDA features would not match the CPU's; bf16 (opt-in) moves features by
about 1% relative (``benchmarks/bf16_effect.py``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .models.base import SAMPLE_RATE, LayerModel


@dataclass(frozen=True)
class _Piece:
    key: Any
    index: int  # piece number within its item
    count: int  # pieces of the item
    start: int  # first sample
    end: int  # one past the last sample

    @property
    def n(self) -> int:
        return self.end - self.start


def chunk_bounds(model: LayerModel, n_samples: int, max_chunk_samples: int
                 ) -> list[tuple[int, int]]:
    """Sample ranges of the pieces of an item of ``n_samples`` (one range when short enough)."""
    if n_samples <= max_chunk_samples:
        return [(0, n_samples)]
    stride, field = model.stride, model.receptive_field
    frames_per_piece = max(1, (max_chunk_samples - field) // stride + 1)
    total = model.num_frames(n_samples)
    bounds = []
    for first in range(0, total, frames_per_piece):
        last = min(first + frames_per_piece, total)  # exclusive
        bounds.append((first * stride, (last - 1) * stride + field))
    return bounds


def _batches(pieces: list[tuple[_Piece, Tensor]], max_padded: int, equal_only: bool
             ) -> list[list[tuple[_Piece, Tensor]]]:
    """Length-sorted groups whose padded size (count * longest) stays within ``max_padded``."""
    ordered = sorted(pieces, key=lambda p: p[0].n)
    batches: list[list[tuple[_Piece, Tensor]]] = []
    current: list[tuple[_Piece, Tensor]] = []
    for piece in ordered:
        n = piece[0].n
        fits = (len(current) + 1) * n <= max_padded
        same = not current or current[0][0].n == n
        if current and (not fits or (equal_only and not same)):
            batches.append(current)
            current = []
        current.append(piece)
    if current:
        batches.append(current)
    return batches


def _autocast(model: LayerModel, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    if dtype != torch.bfloat16:
        raise ValueError(
            f"iter_hidden_states: dtype must be None, float32 or bfloat16, got {dtype}")
    if model.device.type not in ("cuda", "cpu"):
        raise ValueError(f"iter_hidden_states: bf16 autocast needs a CUDA or CPU model, this one "
                         f"is on {model.device}")
    return torch.autocast(model.device.type, dtype=torch.bfloat16)


def _tf32_settings() -> list[tuple[Any, str, Any, Any]]:
    """(holder, attribute, full-precision value) of torch's global TF32 switches, each with its
    current value: the ``fp32_precision`` API where torch has it (mixing it with the legacy
    ``allow_tf32`` flags is an error in torch >= 2.9), else the legacy flags."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    if hasattr(matmul, "fp32_precision") and hasattr(cudnn, "conv"):
        switches = [(matmul, "fp32_precision", "ieee"), (cudnn.conv, "fp32_precision", "ieee")]
    else:
        switches = [(matmul, "allow_tf32", False), (cudnn, "allow_tf32", False)]
    return [(holder, name, value, getattr(holder, name)) for holder, name, value in switches]


@contextlib.contextmanager
def full_precision(device: torch.device | str) -> Iterator[None]:
    """Run the block with TF32 off for CUDA matmuls and cuDNN convolutions (IEEE float32).

    TF32 is a process-wide switch: the previous settings are restored on exit, exceptions
    included. A no-op for any device but CUDA (the CPU has no TF32).
    """
    if torch.device(device).type != "cuda":
        yield
        return
    settings = _tf32_settings()
    try:
        for holder, name, value, _ in settings:
            setattr(holder, name, value)
        yield
    finally:
        for holder, name, _, previous in settings:
            setattr(holder, name, previous)


def _as_waveform(key: Any, waveform: Any) -> Tensor:
    wav = torch.as_tensor(waveform)
    if wav.ndim == 2 and 1 in wav.shape:
        wav = wav.reshape(-1)
    if wav.ndim != 1:
        raise ValueError(f"utterance {key!r}: waveform must be 1-D [n], got {tuple(wav.shape)}")
    if not wav.is_floating_point():
        raise ValueError(f"utterance {key!r}: waveform must be float, got {wav.dtype}")
    return wav.to(torch.float32)


def iter_hidden_states(
    model: LayerModel,
    waveforms: Iterable[tuple[Any, Tensor]],
    *,
    batch_seconds: float = 60.0,
    max_chunk_seconds: float = 30.0,
    dtype: torch.dtype | None = None,
    read_ahead: int = 64,
    on_batch: Callable[[int, int], None] | None = None,
) -> Iterator[tuple[Any, Tensor]]:
    """Yield ``(key, hidden [L+1, T, D])`` (float32, on the model's device) for every item.

    Args:
        model: a loaded :class:`LayerModel`.
        waveforms: ``(key, waveform [n])`` pairs, 16 kHz float audio.
        batch_seconds: most padded audio per forward pass (one item always fits).
        max_chunk_seconds: items longer than this are split into pieces (see module docstring).
        dtype: ``torch.bfloat16`` for bf16 autocast (CUDA or CPU); otherwise full float32
            (TF32 off on CUDA during each forward pass, see :func:`full_precision`).
        read_ahead: items read before sorting into buckets (bounds memory).
        on_batch: called with (batch size, padded samples) after each forward pass.

    Raises:
        ValueError: naming the utterance when its audio is shorter than the receptive field.
    """
    if batch_seconds <= 0 or max_chunk_seconds <= 0 or read_ahead < 1:
        raise ValueError(f"iter_hidden_states: batch_seconds={batch_seconds}, max_chunk_seconds="
                         f"{max_chunk_seconds}, read_ahead={read_ahead} must be positive")
    _autocast(model, dtype)  # validates dtype before any input is read
    max_chunk = max(int(max_chunk_seconds * SAMPLE_RATE), model.receptive_field)
    max_padded = int(batch_seconds * SAMPLE_RATE)
    model.eval()
    window: list[tuple[_Piece, Tensor]] = []
    n_items = 0
    for key, waveform in waveforms:
        wav = _as_waveform(key, waveform)
        model.check_lengths([wav.shape[0]], keys=[key])
        if model.normalize_waveform:
            wav = model.normalize(wav[None], torch.tensor([wav.shape[0]]))[0]
        bounds = chunk_bounds(model, wav.shape[0], max_chunk)
        for i, (start, end) in enumerate(bounds):
            window.append((_Piece(key, i, len(bounds), start, end), wav))
        n_items += 1
        if n_items >= read_ahead:
            yield from _run_window(model, window, max_padded, dtype, on_batch)
            window, n_items = [], 0
    if window:
        yield from _run_window(model, window, max_padded, dtype, on_batch)


def _run_window(model: LayerModel, window: list[tuple[_Piece, Tensor]], max_padded: int,
                dtype: torch.dtype | None, on_batch: Callable[[int, int], None] | None
                ) -> Iterator[tuple[Any, Tensor]]:
    pending: dict[int, list[Tensor | None]] = {}  # id of the item's waveform -> pieces
    device = model.device
    for batch in _batches(window, max_padded, equal_only=not model.batch_invariant):
        longest = max(p.n for p, _ in batch)
        padded = torch.zeros(len(batch), longest, dtype=torch.float32)
        for row, (piece, wav) in enumerate(batch):
            padded[row, : piece.n] = wav[piece.start: piece.end]
        # items are standardised whole in iter_hidden_states, not per piece
        lengths = torch.tensor([p.n for p, _ in batch], dtype=torch.long)
        with full_precision(device), _autocast(model, dtype):
            states, frames = model.hidden_states(padded.to(device), lengths, normalize=False)
        if on_batch is not None:
            on_batch(len(batch), padded.numel())
        for row, (piece, wav) in enumerate(batch):
            hidden = states[:, row, : int(frames[row])].contiguous()  # frees the batch
            if piece.count == 1:
                yield piece.key, hidden
                continue
            parts = pending.setdefault(id(wav), [None] * piece.count)
            parts[piece.index] = hidden
            if all(p is not None for p in parts):
                del pending[id(wav)]
                yield piece.key, torch.cat(parts, dim=1)
    if pending:
        raise RuntimeError(f"iter_hidden_states: {len(pending)} chunked items left incomplete")
