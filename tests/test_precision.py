"""Extraction precision: TF32 off on CUDA (restored afterwards), bf16 autocast on CUDA and CPU."""

from __future__ import annotations

import pytest
import torch
from model_fixtures import random_waveforms, save_hf_folder, tiny_hf_model

import layerprobe.extract as extract
from layerprobe.extract import full_precision, iter_hidden_states
from layerprobe.models import load


def _switches() -> list:
    return [getattr(holder, name) for holder, name, _, _ in extract._tf32_settings()]


@pytest.fixture
def tf32_on():
    """TF32 switched on (as a user script might), the original settings restored afterwards."""
    original = extract._tf32_settings()
    on = "tf32" if original[0][1] == "fp32_precision" else True
    for holder, name, _, _ in original:
        setattr(holder, name, on)
    yield [on] * len(original)
    for holder, name, _, previous in original:
        setattr(holder, name, previous)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("precision") / "hf"
    return load(save_hf_folder(tiny_hf_model("wav2vec2", stable=True, seed=12), folder))


def test_full_precision_on_cuda_turns_tf32_off_and_restores(tf32_on):
    full = [value for _, _, value, _ in extract._tf32_settings()]
    assert _switches() == tf32_on != full
    with full_precision(torch.device("cuda")):
        assert _switches() == full
        with full_precision("cuda:0"):  # nested: still off, and the outer level survives
            assert _switches() == full
        assert _switches() == full
    assert _switches() == tf32_on


def test_full_precision_restores_after_an_exception(tf32_on):
    with pytest.raises(RuntimeError, match="boom"), full_precision("cuda"):
        assert _switches() != tf32_on
        raise RuntimeError("boom")
    assert _switches() == tf32_on


def test_full_precision_is_a_no_op_on_cpu(tf32_on):
    with full_precision("cpu"):
        assert _switches() == tf32_on


def test_extraction_runs_every_forward_under_full_precision(model, monkeypatch):
    entered: list[torch.device] = []
    inner = extract.full_precision

    def spy(device):
        entered.append(torch.device(device))
        return inner(device)

    monkeypatch.setattr(extract, "full_precision", spy)
    wavs = random_waveforms([900, 1200, 1500], seed=3)
    out = list(iter_hidden_states(model, enumerate(wavs), batch_seconds=1500 / 16000))
    assert len(out) == 3 and entered == [model.device] * 3  # one forward pass per item here


def test_bf16_on_cpu_is_autocast_and_close_to_fp32(model):
    wav = random_waveforms([3000], seed=7)[0]
    (_, bf16), = iter_hidden_states(model, [(0, wav)], dtype=torch.bfloat16)
    (_, fp32), = iter_hidden_states(model, [(0, wav)])
    assert bf16.dtype == torch.float32 and bf16.shape == fp32.shape
    relative = (bf16 - fp32).norm() / fp32.norm()
    assert 1e-4 < relative < 5e-2  # bf16 rounding (2^-8 per operation), not a no-op, not garbage
    (_, again), = iter_hidden_states(model, [(0, wav)], dtype=torch.float32)
    assert torch.equal(again, fp32)  # float32 means no autocast


def test_bf16_is_refused_off_cpu_and_cuda(model, monkeypatch):
    monkeypatch.setattr(type(model), "device", property(lambda self: torch.device("meta")))
    with pytest.raises(ValueError, match="bf16 autocast needs a CUDA or CPU model"):
        list(iter_hidden_states(model, [(0, torch.randn(900))], dtype=torch.bfloat16))
