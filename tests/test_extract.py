"""layerprobe.extract.iter_hidden_states: batching, padding, chunking, errors."""

from __future__ import annotations

import pytest
import torch
from model_fixtures import (
    RECEPTIVE_FIELD,
    STRIDE,
    random_waveforms,
    save_hf_folder,
    save_native_from_hf,
    tiny_hf_model,
)

from layerprobe.extract import chunk_bounds, iter_hidden_states
from layerprobe.models import load

LENGTHS = [1600, 433, 1600, 977, 2050, RECEPTIVE_FIELD, 1201, 815]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("models")
    group = tiny_hf_model("hubert", stable=False, seed=11)  # group-norm convs, post-LN
    layer = tiny_hf_model("wav2vec2", stable=True, seed=12)  # layer-norm convs, pre-LN
    return {
        "native-group": load(save_native_from_hf(group, tmp / "native.pt")),
        "hf-group": load(save_hf_folder(group, tmp / "hf-group")),
        "hf-layer": load(save_hf_folder(layer, tmp / "hf-layer")),
        "hf-wavlm": load(save_hf_folder(tiny_hf_model("wavlm", seed=13), tmp / "wavlm")),
    }


def _alone(model, wav):
    states, frames = model.hidden_states(wav[None])
    assert int(frames[0]) == states.shape[2]
    return states[:, 0]


@pytest.mark.parametrize("name", ["native-group", "hf-group", "hf-layer", "hf-wavlm"])
def test_padded_batches_equal_items_alone(models, name):
    model = models[name]
    wavs = random_waveforms(LENGTHS, seed=1)
    sizes = []
    out = dict(iter_hidden_states(model, enumerate(wavs), batch_seconds=1.0,
                                  on_batch=lambda b, n: sizes.append(b)))
    assert sorted(out) == list(range(len(wavs)))
    assert max(sizes) > 1 and sum(sizes) == len(wavs)  # padding really happened
    for i, wav in enumerate(wavs):
        ref = _alone(model, wav)
        assert out[i].shape == (model.n_layers + 1, model.num_frames(len(wav)), model.dim)
        assert out[i].dtype == torch.float32
        torch.testing.assert_close(out[i], ref, atol=1e-4, rtol=1e-4)


def test_normalised_model_batches_equal_items_alone(tmp_path):
    model = load(save_native_from_hf(tiny_hf_model("hubert", seed=15), tmp_path / "n.pt",
                                     normalize=True))
    wavs = [w * (i + 1) + i for i, w in enumerate(random_waveforms([700, 300, 1100], seed=16))]
    out = dict(iter_hidden_states(model, enumerate(wavs)))
    for i, wav in enumerate(wavs):
        ref = _alone(model, (wav - wav.mean()) / torch.sqrt(wav.var(unbiased=False) + 1e-7))
        torch.testing.assert_close(out[i], ref.float(), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out[i], _alone(model, wav), atol=1e-4, rtol=1e-4)


def test_group_norm_statistics_would_leak_without_masking(models):
    """The masked GroupNorm matters: a naive padded batch differs for group-norm models."""
    model = models["hf-group"]
    short, long = random_waveforms([500, 2000], seed=2)
    padded = torch.zeros(2, 2000)
    padded[0, :500], padded[1] = short, long
    with torch.no_grad():
        naive = model.model(padded, attention_mask=(torch.arange(2000) < torch.tensor(
            [[500], [2000]])).long(), output_hidden_states=False)
    masked, _ = model.hidden_states(padded, torch.tensor([500, 2000]))
    ref = _alone(model, short)
    t = ref.shape[1]
    assert not torch.allclose(naive.last_hidden_state[0, :t], ref[-1], atol=1e-3)
    torch.testing.assert_close(masked[:, 0, :t], ref, atol=1e-4, rtol=1e-4)


def test_batches_respect_budget_and_sorting(models):
    model = models["hf-layer"]
    wavs = random_waveforms(LENGTHS, seed=3)
    padded = []
    list(iter_hidden_states(model, enumerate(wavs), batch_seconds=0.25,
                            on_batch=lambda b, n: padded.append(n)))
    assert all(n <= 0.25 * 16000 or n == max(LENGTHS) for n in padded)
    assert len(padded) < len(wavs)  # at least one batch held several items


def test_read_ahead_window_bounds_batches(models):
    model = models["hf-layer"]
    wavs = random_waveforms([600] * 6, seed=4)
    sizes = []
    keys = [k for k, _ in iter_hidden_states(model, enumerate(wavs), read_ahead=2,
                                              on_batch=lambda b, n: sizes.append(b))]
    assert sizes == [2, 2, 2] and sorted(keys) == list(range(6))


@pytest.mark.parametrize("n", [5000, 4000 + RECEPTIVE_FIELD - 1, 4000 + 7])
def test_chunking_keeps_frames_exact(models, n):
    model = models["hf-layer"]  # layer-norm convs: conv features are local, hence exact
    wav = random_waveforms([n], seed=5)[0]
    max_chunk = 0.1  # seconds = 1600 samples
    ((key, out),) = list(iter_hidden_states(model, [("long", wav)], max_chunk_seconds=max_chunk))
    assert key == "long" and out.shape[1] == model.num_frames(n)
    # Reference: piece j = frames [j*m, (j+1)*m), m = most frames whose samples fit in 1600.
    m = max(k for k in range(1, 100) if (k - 1) * STRIDE + RECEPTIVE_FIELD <= 1600)
    full = _alone(model, wav)
    pieces = []
    for first in range(0, model.num_frames(n), m):
        last = min(first + m, model.num_frames(n))
        piece = wav[first * STRIDE: (last - 1) * STRIDE + RECEPTIVE_FIELD]
        assert len(piece) <= 1600
        pieces.append(_alone(model, piece))
        assert pieces[-1].shape[1] == last - first
    torch.testing.assert_close(out, torch.cat(pieces, dim=1), atol=1e-5, rtol=1e-5)
    # Pre-LN layer 0 is conv features + positional conv (kernel 8): exact away from boundaries.
    inner = [t for t in range(out.shape[1]) if min(t % m, m - 1 - t % m) >= 8]
    torch.testing.assert_close(out[0, inner], full[0, inner], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out[-1], full[-1], atol=1e-4)  # attention context was cut


def test_chunk_bounds_cover_all_frames(models):
    model = models["hf-layer"]
    for n in (RECEPTIVE_FIELD, 1599, 1600, 1601, 1619, 1620, 3239, 3240, 3259, 10001):
        bounds = chunk_bounds(model, n, 1600)
        frames = [model.num_frames(e - s) for s, e in bounds]
        assert sum(frames) == model.num_frames(n) and min(frames) >= 1
        assert bounds[-1][1] <= n


def test_short_audio_names_the_utterance(models):
    wavs = [("utt-ok", torch.randn(800)), ("utt-short", torch.randn(RECEPTIVE_FIELD - 1))]
    with pytest.raises(ValueError, match=rf"utterance 'utt-short': audio of {RECEPTIVE_FIELD - 1} "
                                         rf"samples shorter than the receptive field of "
                                         rf"{RECEPTIVE_FIELD}"):
        list(iter_hidden_states(models["hf-layer"], wavs))


def test_bad_inputs(models):
    model = models["hf-layer"]
    with pytest.raises(ValueError, match="'x': waveform must be 1-D"):
        list(iter_hidden_states(model, [("x", torch.randn(2, 500))]))
    with pytest.raises(ValueError, match="dtype must be"):
        list(iter_hidden_states(model, [("x", torch.randn(500))], dtype=torch.float16))
    with pytest.raises(ValueError, match="batch_seconds"):
        list(iter_hidden_states(model, [], batch_seconds=0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_close_to_fp32(models):
    model = models["hf-layer"].to("cuda")
    try:
        wav = random_waveforms([3000], seed=7)[0]
        (_, a), = iter_hidden_states(model, [(0, wav)], dtype=torch.bfloat16)
        (_, b), = iter_hidden_states(model, [(0, wav)])
        assert a.device.type == "cuda" and a.dtype == torch.float32
        assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99
    finally:
        model.to("cpu")
