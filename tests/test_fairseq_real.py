"""The fairseq loader against checkpoints and per-layer outputs written by genuine fairseq 0.12.2.

Fixtures in tests/fixtures/fairseq/ were made by scripts/make_fairseq_fixtures.py (see its
docstring); fairseq is not needed here. ``C__W.npy`` holds fairseq's states for checkpoint ``C`` on
waveform ``wav_W.npy``: state 0 = input of block 1, state i = ``layer_results[i-1][0]``;
``C__W__default.npy`` is fairseq's default ``extract_features`` output.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from layerprobe.cli import main
from layerprobe.extract import iter_hidden_states
from layerprobe.models import load
from layerprobe.models.base import HF_NORMALIZE_EPS, normalize_waveforms

FIXTURES = Path(__file__).parent / "fixtures" / "fairseq"
# checkpoint -> (task.normalize, pre-LN)
CHECKPOINTS = {
    "hubert_base_gn": (False, False),
    "wav2vec2_large_ln": (True, True),
    "wav2vec2_legacy_args": (False, False),
    "hubert_ctc_ft": (False, False),
}
WAVEFORMS = ("loud", "quiet")
TOLERANCE = 1e-5  # relative, per layer; float32 agreement measured at <= 5e-7


def waveform(name: str) -> torch.Tensor:
    return torch.from_numpy(np.load(FIXTURES / f"wav_{name}.npy"))


def reference(checkpoint: str, wav: str, *, default: bool = False) -> torch.Tensor:
    suffix = "__default" if default else ""
    return torch.from_numpy(np.load(FIXTURES / f"{checkpoint}__{wav}{suffix}.npy"))


def relative_errors(ours: torch.Tensor, ref: torch.Tensor) -> list[float]:
    """||ours - ref|| / ||ref|| for each layer of ``[L+1, T, D]`` states."""
    assert ours.shape == ref.shape
    return [float((a - b).norm() / b.norm()) for a, b in zip(ours, ref, strict=True)]


def test_fixtures_are_tiny_and_rms_as_documented():
    for path in FIXTURES.iterdir():
        assert path.stat().st_size < 300_000, path
    assert abs(float(waveform("quiet").pow(2).mean().sqrt()) - 0.003) < 1e-4
    assert abs(float((waveform("loud") - 0.01).pow(2).mean().sqrt()) - 0.1) < 5e-3


@pytest.mark.parametrize("checkpoint", sorted(CHECKPOINTS))
@pytest.mark.parametrize("wav", WAVEFORMS)
def test_states_match_fairseq(checkpoint, wav):
    model = load(FIXTURES / f"{checkpoint}.pt")
    normalize, pre_ln = CHECKPOINTS[checkpoint]
    assert model.source == "fairseq"
    assert model.normalize_waveform is normalize
    assert model.meta["layer_norm_first"] is pre_ln
    ref = reference(checkpoint, wav)
    states, frames = model.hidden_states(waveform(wav)[None])
    assert int(frames[0]) == ref.shape[1]
    assert max(relative_errors(states[:, 0], ref)) <= TOLERANCE


@pytest.mark.parametrize("checkpoint", sorted(CHECKPOINTS))
def test_padded_batch_matches_fairseq_on_each_item(checkpoint):
    model = load(FIXTURES / f"{checkpoint}.pt")
    wavs = [waveform(w) for w in WAVEFORMS]
    lengths = torch.tensor([len(w) for w in wavs])
    padded = torch.zeros(len(wavs), int(lengths.max()))
    for row, w in enumerate(wavs):
        padded[row, : len(w)] = w
    states, frames = model.hidden_states(padded, lengths)
    for row, name in enumerate(WAVEFORMS):
        ours = states[:, row, : int(frames[row])]
        assert max(relative_errors(ours, reference(checkpoint, name))) <= TOLERANCE


def test_extraction_pipeline_uses_fairseq_normalisation():
    """``iter_hidden_states`` (what ``score`` runs) standardises with fairseq's formula too."""
    model = load(FIXTURES / "wav2vec2_large_ln.pt")
    items = [(name, waveform(name)) for name in WAVEFORMS]
    out = dict(iter_hidden_states(model, items, batch_seconds=1.0))
    for name in WAVEFORMS:
        assert max(relative_errors(out[name], reference("wav2vec2_large_ln", name))) <= TOLERANCE


def test_quiet_audio_needs_fairseqs_eps():
    """Hugging Face's eps (1e-7) instead of fairseq's (1e-5) is far off on quiet audio."""
    model = load(FIXTURES / "wav2vec2_large_ln.pt")
    assert model.normalize_eps == 1e-5
    wav = waveform("quiet")[None]
    hf_style = normalize_waveforms(wav, torch.tensor([wav.shape[1]]), eps=HF_NORMALIZE_EPS)
    wrong, _ = model.hidden_states(hf_style, normalize=False)
    assert min(relative_errors(wrong[:, 0], reference("wav2vec2_large_ln", "quiet"))) > 1e-2
    raw, _ = model.hidden_states(wav, normalize=False)
    assert min(relative_errors(raw[:, 0], reference("wav2vec2_large_ln", "quiet"))) > 1e-2


@pytest.mark.parametrize("checkpoint", sorted(CHECKPOINTS))
def test_fairseq_default_output_and_the_layer_convention(checkpoint):
    """fairseq's default output = our last state, plus the final LayerNorm for pre-LN models."""
    model = load(FIXTURES / f"{checkpoint}.pt")
    default = reference(checkpoint, "loud", default=True)
    last = reference(checkpoint, "loud")[-1]
    states, _ = model.hidden_states(waveform("loud")[None])
    if CHECKPOINTS[checkpoint][1]:
        final_norm = model.model.encoder.transformer.layer_norm
        with torch.no_grad():
            normed = final_norm(states[-1, 0])
        assert relative_errors(normed[None], default[None])[0] <= TOLERANCE
        assert relative_errors(last[None], default[None])[0] > 0.1  # differences of order 1
    else:
        torch.testing.assert_close(last, default, rtol=0, atol=0)


# ---------------------------------------------------------------- fine-tuned, w2v_args=None
def test_finetuned_without_w2v_args_follows_w2v_path():
    model = load(FIXTURES / "hubert_ctc_ft.pt")
    assert model.meta["fairseq_arch"] == "hubert_ctc"
    assert Path(model.meta["pretrained_config_from"]) == FIXTURES / "hubert_base_gn.pt"
    # the weights are the fine-tuned ones, not the pretrained file's
    assert min(relative_errors(reference("hubert_ctc_ft", "loud"),
                               reference("hubert_base_gn", "loud"))) > 1e-2


def test_finetuned_pretrained_override(tmp_path):
    alone = shutil.copy(FIXTURES / "hubert_ctc_ft.pt", tmp_path / "ft.pt")
    pretrained = shutil.copy(FIXTURES / "hubert_base_gn.pt", tmp_path / "elsewhere.pt")
    model = load(alone, fairseq_pretrained=pretrained)
    assert model.meta["pretrained_config_from"] == str(pretrained)
    states, _ = model.hidden_states(waveform("loud")[None])
    assert max(relative_errors(states[:, 0], reference("hubert_ctc_ft", "loud"))) <= TOLERANCE
    with pytest.raises(ValueError, match="does not match the weights"):  # wrong architecture
        load(alone, fairseq_pretrained=FIXTURES / "wav2vec2_large_ln.pt")
    with pytest.raises(FileNotFoundError, match="fairseq pretrained checkpoint not found"):
        load(alone, fairseq_pretrained=tmp_path / "absent.pt")


def test_finetuned_missing_pretrained_names_w2v_args_path_and_option(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    alone = shutil.copy(FIXTURES / "hubert_ctc_ft.pt", tmp_path / "ft.pt")
    with pytest.raises(ValueError) as err:
        load(alone)
    message = str(err.value)
    for part in ("w2v_args=None", "w2v_path='hubert_base_gn.pt'",
                 str(tmp_path / "hubert_base_gn.pt"), "--fairseq-pretrained",
                 "fairseq_pretrained="):
        assert part in message, part


def test_cli_fairseq_pretrained_option(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    alone = shutil.copy(FIXTURES / "hubert_ctc_ft.pt", tmp_path / "ft.pt")
    assert main(["score", str(alone), "--no-progress", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "w2v_args=None" in err and "--fairseq-pretrained" in err and "Traceback" not in err
    assert main(["score", str(alone), "--no-progress", "--device", "cpu",
                 "--fairseq-pretrained", str(tmp_path / "absent.pt")]) == 1
    assert "fairseq pretrained checkpoint not found" in capsys.readouterr().err


# ---------------------------------------------------------------- hostile pickles
class _System:
    """Pickles as a call of os.system: running it would create ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _hostile_copy(tmp_path: Path, checkpoint: str, where: tuple[str, ...]) -> tuple[Path, Path]:
    """A copy of a trainer-style fixture (plain-dict cfg) with an os.system object at ``where``."""
    payload = torch.load(FIXTURES / f"{checkpoint}.pt", weights_only=True)
    marker = tmp_path / "code_ran"
    target = payload
    for key in where[:-1]:
        target = target[key]
    target[where[-1]] = _System(marker)
    path = tmp_path / "hostile.pt"
    torch.save(payload, path)
    return path, marker


@pytest.mark.parametrize("key", ["encoder.layers.0.fc1.weight", "encoder.pos_conv.0.weight_v",
                                 "feature_extractor.conv_layers.0.0.weight", "mask_emb"])
def test_hostile_object_in_a_weight_slot_is_refused(tmp_path, capsys, key):
    path, marker = _hostile_copy(tmp_path, "wav2vec2_large_ln", ("model", key))
    with pytest.raises(ValueError, match=f"'model' entries that are not tensors: '{key}'"):
        load(path)
    assert main(["score", str(path), "--no-progress", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert key in err and "Traceback" not in err
    assert not marker.exists()


def test_hostile_object_in_a_finetuned_weight_slot(tmp_path):
    key = "w2v_encoder.w2v_model.encoder.layers.1.fc2.weight"
    path, marker = _hostile_copy(tmp_path, "hubert_ctc_ft", ("model", key))
    shutil.copy(FIXTURES / "hubert_base_gn.pt", tmp_path / "hubert_base_gn.pt")
    with pytest.raises(ValueError, match=f"not tensors: '{key}'"):
        load(path)
    assert not marker.exists()


@pytest.mark.parametrize("field", ["encoder_attention_heads", "layer_norm_first",
                                   "pos_conv_depth"])
def test_hostile_object_in_a_config_field_is_refused(tmp_path, field):
    path, marker = _hostile_copy(tmp_path, "wav2vec2_large_ln", ("cfg", "model", field))
    with pytest.raises(ValueError, match=f"config field {field}="):
        load(path)
    assert not marker.exists()


def test_weight_of_the_wrong_rank_is_refused(tmp_path):
    payload = torch.load(FIXTURES / "wav2vec2_large_ln.pt", weights_only=True)
    payload["model"]["encoder.pos_conv.0.weight_v"] = torch.zeros(4)
    torch.save(payload, tmp_path / "flat.pt")
    with pytest.raises(ValueError, match=r"encoder.pos_conv.0.weight_v has shape \(4,\)"):
        load(tmp_path / "flat.pt")
