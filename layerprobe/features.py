"""Input features computed from the waveform: the 80 log-mel filterbanks of the ``fbank`` probe
(the reference's librosa recipe, in torch) and their frame mapping onto model frames."""

from __future__ import annotations

import functools

import torch
import torchaudio

__all__ = ["FBANK_DIM", "FBANK_RATE", "fbank_frame_indices", "log_mel_fbank"]

FBANK_DIM = 80
FBANK_RATE = 100.0  # frames per second


@functools.lru_cache(maxsize=4)
def _mel_transform(sample_rate: int) -> torchaudio.transforms.MelSpectrogram:
    return torchaudio.transforms.MelSpectrogram(
        sample_rate=sample_rate, n_fft=2048, win_length=round(0.025 * sample_rate),
        hop_length=round(0.010 * sample_rate), f_min=50.0, n_mels=FBANK_DIM, power=1.0,
        center=True, pad_mode="constant", norm="slaney", mel_scale="slaney",
    )


def log_mel_fbank(waveform: torch.Tensor, sample_rate: int = 16000) -> torch.Tensor:
    """80 log-mel filterbanks at 10 ms, ``[T, 80]`` float32 (the reference's librosa recipe).

    Peak-normalise to 0.999, pre-emphasis 0.97 (exactly librosa's, first sample included),
    |STFT| with a 25 ms Hann window centred in n_fft 2048, Slaney mel 50 Hz–Nyquist with area
    normalisation, dB (amin 1e-5, top 80 dB below the utterance maximum), then /80 + 1.
    T = 1 + n // hop. Pre-processing in float64, the STFT in float32 (as librosa on float32).
    """
    if waveform.dim() != 1 or waveform.shape[0] < 2:
        raise ValueError(f"log_mel_fbank: expected a 1-d waveform of >= 2 samples, got shape "
                         f"{tuple(waveform.shape)}")
    x = waveform.to(torch.float64)
    peak = x.abs().max()
    if peak > 0:
        x = x / peak * 0.999
    # librosa.effects.preemphasis: lfilter([1, -0.97], [1], x, zi=2·x[0] − x[1]), so the first
    # output sample is x[0] + (2·x[0] − x[1]) (lfilter's zi is a state, not a past sample)
    x = torch.cat([x[:1] + (2 * x[0] - x[1]), x[1:] - 0.97 * x[:-1]])
    spec = _mel_transform(sample_rate)(x.to(torch.float32))  # [80, T]
    db = 20.0 * torch.log10(spec.clamp_min(1e-5))
    db = torch.maximum(db, db.max() - 80.0)
    return (db / 80.0 + 1.0).T.contiguous().to(torch.float32)


def fbank_frame_indices(n_frames: int, frame_rate: float, n_fbank: int) -> torch.Tensor:
    """10 ms frame index of each model frame: round(t·100/frame_rate), truncated to ``n_fbank``."""
    idx = torch.round(torch.arange(n_frames, dtype=torch.float64) * FBANK_RATE / frame_rate)
    idx = idx.to(torch.int64)
    return idx[idx < n_fbank]
