"""The fast training step: same objective as torchaudio's model, HuBERT's mask statistics,
compile fallback, unreadable audio, layer features through layerprobe's extractor."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from torchaudio.models.wav2vec2 import components

from pretraining.config import KMeansConfig, TrainConfig
from pretraining.data import AudioSet, BatchStream, Prefetcher, list_audio
from pretraining.model import (
    PretrainStep,
    block_forward,
    build_model,
    clip_grad_norm,
    layer_keep,
    model_args,
    num_frames,
    save_checkpoint,
    span_mask,
)
from pretraining.schedules import Iteration
from pretraining.targets import LayerFeatures, compute_labels
from pretraining.train import hubert_loss, train_iteration

SR = 16_000


def _generators(seed: int) -> tuple[torch.Generator, torch.Generator]:
    return torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)


def _reference_loss(model, waves, labels, mask, monkeypatch) -> tuple[torch.Tensor, dict]:
    """torchaudio's HuBERTPretrainModel forward (with ``mask`` forced) + the fairseq criterion."""
    monkeypatch.setattr(components, "_compute_mask_indices", lambda *a, **k: mask.clone())
    logit_m, logit_u, pen = model(waves, labels, None)
    return hubert_loss(logit_m, logit_u, pen, TrainConfig())


@pytest.mark.parametrize("preset,classes,layers", [("tiny", 12, 2), ("base", 500, 1)])
def test_step_loss_and_gradients_match_torchaudio(preset, classes, layers, monkeypatch):
    overrides = {"encoder_num_layers": layers, "encoder_layer_drop": 0.0,
                 "encoder_dropout": 0.0, "encoder_attention_dropout": 0.0,
                 "encoder_projection_dropout": 0.0}
    args = model_args(preset, classes, overrides)
    torch.manual_seed(0)
    model = build_model(args).train()
    n = 24_000
    t = num_frames(args, n)
    waves = torch.randn(3, n)
    labels = torch.randint(0, classes, (3, t))
    mask = span_mask(3, t, mask_prob=0.8, mask_length=10, host=_generators(5)[0],
                     device_gen=_generators(5)[1])
    ref, ref_stats = _reference_loss(model, waves, labels, mask, monkeypatch)
    ref.backward()
    ref_grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    loss, ce, acc, pen = PretrainStep(model, TrainConfig().feature_penalty_weight)(
        waves, labels, mask)
    ours, theirs = float(loss.detach()), float(ref.detach())
    assert abs(ours - theirs) <= 1e-5 * max(1.0, abs(theirs))
    assert float(ce) == pytest.approx(ref_stats["ce_masked"], abs=1e-5)
    assert float(acc) == pytest.approx(ref_stats["acc_masked"], abs=1e-6)
    assert float(pen) == pytest.approx(ref_stats["feature_pen"], rel=1e-6)
    loss.backward()
    grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == ref_grads.keys()
    for k in grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.parametrize("layer_norm_first", [False, True])
@pytest.mark.parametrize("training", [False, True])
def test_block_forward_equals_torchaudio_block(layer_norm_first, training):
    """Our block forward on [B * T, D] frames = torchaudio's ``EncoderLayer`` on [B, T, D], values
    and gradients (dropout 0 in training: the random streams differ, the placement is the
    module's); in eval mode with the Base dropouts."""
    dropout = 0.0 if training else 0.1
    args = model_args("tiny", 5, {"encoder_layer_norm_first": layer_norm_first,
                                  "encoder_dropout": dropout,
                                  "encoder_attention_dropout": dropout,
                                  "encoder_ff_interm_dropout": dropout})
    torch.manual_seed(0)
    block = build_model(args).wav2vec2.encoder.transformer.layers[1].train(training)
    assert block.layer_norm_first == layer_norm_first
    x = torch.randn(3, 17, 64, requires_grad=True)
    ref = block(x, None)[0]
    ref.square().sum().backward()
    ref_grads = [x.grad.clone()] + [p.grad.clone() for p in block.parameters()]
    x.grad = None
    block.zero_grad(set_to_none=True)
    ours = block_forward(block, x.flatten(0, 1), 3)
    assert ours.shape == (3 * 17, 64)
    torch.testing.assert_close(ours.view(3, 17, 64), ref, rtol=1e-5, atol=1e-5)
    ours.square().sum().backward()
    for got, want in zip([x.grad] + [p.grad for p in block.parameters()], ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="block_forward"):
        block_forward(block, x.flatten(0, 1), 2)


@pytest.mark.parametrize("layer_norm_first", [False, True])
@pytest.mark.parametrize("interm_dropout", [0.0, 0.2])
def test_block_forward_draws_torchaudio_dropout(layer_norm_first, interm_dropout):
    """In training with dropout, the same RNG state gives torchaudio's block output exactly: the
    same dropouts (attention, after attention, feed-forward) in the same order, p = 0 skipped
    without drawing as torchaudio's p = 0 dropout draws nothing."""
    args = model_args("tiny", 5, {"encoder_layer_norm_first": layer_norm_first,
                                  "encoder_dropout": 0.3, "encoder_attention_dropout": 0.4,
                                  "encoder_ff_interm_dropout": interm_dropout})
    torch.manual_seed(0)
    block = build_model(args).wav2vec2.encoder.transformer.layers[0].train()
    x = torch.randn(2, 17, 64)
    torch.manual_seed(5)
    ref = block(x, None)[0]
    torch.manual_seed(5)
    ours = block_forward(block, x.flatten(0, 1), 2).view(2, 17, 64)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ours, block.eval()(x, None)[0])  # dropout did act


def test_clip_grad_norm_equals_torch():
    torch.manual_seed(0)
    nets = [torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 3)) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    inputs = torch.randn(5, 4)
    for net in nets:
        net(inputs).square().sum().backward()
        net[0].bias.grad = None  # a parameter without gradient (a dropped block's)
    for max_norm in (1e-3, 1e3):
        ours = clip_grad_norm(nets[0].parameters(), max_norm)
        theirs = torch.nn.utils.clip_grad_norm_(nets[1].parameters(), max_norm)
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
        for p, q in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
            assert (p.grad is None) == (q.grad is None)
            if p.grad is not None:
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0)
    assert float(clip_grad_norm([torch.nn.Parameter(torch.ones(2))], 1.0)) == 0.0


def _fairseq_mask(rng: np.random.Generator, bsz: int, frames: int, mask_prob: float,
                  length: int, min_masks: int = 2) -> np.ndarray:
    """numpy port of fairseq ``compute_mask_indices`` (no padding, static lengths, overlaps,
    ``require_same_masks``), the procedure of HuBERT's published recipe."""
    num_mask = max(min_masks, int(mask_prob * frames / float(length) + rng.random()))
    idcs = []
    for _ in range(bsz):
        min_len = length
        if frames - min_len <= num_mask:
            min_len = frames - num_mask - 1
        starts = rng.choice(frames - min_len, num_mask, replace=False)
        idc = np.unique((starts[:, None] + np.arange(length)).ravel())
        idcs.append(idc[idc < frames])
    keep = min(len(m) for m in idcs)
    mask = np.zeros((bsz, frames), dtype=bool)
    for i, idc in enumerate(idcs):
        if len(idc) > keep:
            idc = rng.choice(idc, keep, replace=False)
        mask[i, idc] = True
    return mask


def _run_lengths(mask: np.ndarray) -> list[int]:
    out = []
    for row in mask:
        padded = np.concatenate([[0], row.astype(int), [0]])
        edges = np.flatnonzero(np.diff(padded))
        out += (edges[1::2] - edges[::2]).tolist()
    return out


@pytest.mark.parametrize("frames", [50, 499])
def test_span_mask_statistics_match_fairseq_procedure(frames):
    rng = np.random.default_rng(0)
    host, dev = _generators(0)
    ours = [span_mask(8, frames, mask_prob=0.8, mask_length=10, host=host, device_gen=dev)
            .numpy() for _ in range(300)]
    theirs = [_fairseq_mask(rng, 8, frames, 0.8, 10) for _ in range(300)]
    for m in ours:
        assert len(set(m.sum(axis=1).tolist())) == 1  # require_same_masks
    frac_ours = np.array([m.mean() for m in ours])
    frac_ref = np.array([m.mean() for m in theirs])
    se = math.hypot(frac_ours.std() / 300**0.5, frac_ref.std() / 300**0.5)
    assert abs(frac_ours.mean() - frac_ref.mean()) < 5 * se + 1e-3
    assert 0.4 < frac_ref.mean() < 0.7  # sanity of the port: overlaps bring 0.8 down
    runs_ours, runs_ref = _run_lengths(np.concatenate(ours)), _run_lengths(np.concatenate(theirs))
    assert np.mean(runs_ours) == pytest.approx(np.mean(runs_ref), rel=0.05)
    hist_ours = np.bincount(np.minimum(runs_ours, 40), minlength=41) / len(runs_ours)
    hist_ref = np.bincount(np.minimum(runs_ref, 40), minlength=41) / len(runs_ref)
    assert np.abs(hist_ours - hist_ref).max() < 0.03


def test_span_mask_is_seeded_and_layer_drop_rate():
    a = span_mask(4, 200, mask_prob=0.8, mask_length=10, host=_generators(3)[0],
                  device_gen=_generators(3)[1])
    b = span_mask(4, 200, mask_prob=0.8, mask_length=10, host=_generators(3)[0],
                  device_gen=_generators(3)[1])
    assert torch.equal(a, b)
    short = span_mask(2, 3, mask_prob=0.8, mask_length=10, host=_generators(0)[0],
                      device_gen=_generators(0)[1])
    assert short.sum(1).tolist() == [2, 2]  # spans cut at the end, same count per row
    with pytest.raises(ValueError, match="frames=0"):
        span_mask(1, 0, mask_prob=0.8, mask_length=10, host=_generators(0)[0],
                  device_gen=_generators(0)[1])
    gen = torch.Generator().manual_seed(0)
    kept = [k for _ in range(2000) for k in layer_keep(12, 0.05, gen)]
    assert 1 - np.mean(kept) == pytest.approx(0.05, abs=0.01)
    assert layer_keep(3, 0.0, gen) == [True] * 3


# ---------------------------------------------------------------------------------------------
# data and training


def _write_audio(root: Path, n: int, seconds: float = 2.0, suffix: str = ".wav") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for u in range(n):
        x = (0.1 * rng.standard_normal(int((seconds + 0.3 * u) * SR))).astype(np.float32)
        soundfile.write(root / f"utt{u:02d}{suffix}", x, SR)
    return root


def _corrupt(path: Path) -> None:
    """Overwrite part of the body of a valid FLAC (the header stays valid)."""
    data = bytearray(path.read_bytes())
    start = len(data) // 3
    data[start:start + 4000] = np.random.default_rng(1).integers(0, 256, 4000, np.uint8).tobytes()
    path.write_bytes(bytes(data))


def _stream(audio: AudioSet, args: dict) -> BatchStream:
    labels = {}
    for i, uid in enumerate(audio.ids):
        n = int(audio.items[i].duration * SR)
        labels[uid] = torch.randint(0, args["num_classes"], (num_frames(args, n),),
                                    generator=torch.Generator().manual_seed(i))
    return BatchStream(audio, labels, args, batch_seconds=6.0, max_sample_seconds=3.0, seed=0,
                       iteration=1)


def test_corrupt_flac_is_skipped_in_training_and_labels(tmp_path):
    root = _write_audio(tmp_path / "corpus", 5, suffix=".flac")
    _corrupt(root / "utt02.flac")
    audio = AudioSet(list_audio(root))  # the header is fine: it is listed
    args = model_args("tiny", 6, {"encoder_num_layers": 2})
    stream = _stream(audio, args)
    with pytest.warns(UserWarning, match=r"utt02.*utt02\.flac.*lost sync"):
        batches = [next(stream) for _ in range(8)]
    assert audio.failed.keys() == {2}
    assert sum(len(b.skipped) for b in batches) >= 1
    assert all(b.waveforms.shape[0] >= 1 for b in batches)
    it = Iteration(1, 10, "mfcc", None, 4, 1.0)
    with pytest.warns(UserWarning, match="utt02"):
        labels = compute_labels(audio.ids, audio.load, it, args, KMeansConfig(n_init=1),
                                previous_ckpt=None, seed=0, log=lambda _: None)
    assert labels.skipped == ("utt02",) and "utt02" not in labels.labels
    assert len(labels.labels) == 4
    ckpt = save_checkpoint(tmp_path / "ckpt.pt", args, build_model(args).state_dict(), {})
    it2 = Iteration(2, 10, "layer", 1, 4, 1.0)
    with pytest.warns(UserWarning, match="utt02"):
        layer_labels = compute_labels(audio.ids, audio.load, it2, args, KMeansConfig(n_init=1),
                                      previous_ckpt=ckpt, seed=0, log=lambda _: None)
    assert layer_labels.skipped == ("utt02",) and len(layer_labels.labels) == 4


def test_layer_features_of_an_utterance_longer_than_the_chunk(tmp_path):
    """3 s cut into 1 s chunks: every one of the 149 frames, and labels for it."""
    args = model_args("tiny", 5, {"encoder_num_layers": 3})
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "ckpt.pt", args, build_model(args).state_dict(), {})
    wave = torch.randn(3 * SR)
    chunked = LayerFeatures(ckpt, 2, max_chunk_seconds=1.0)(wave)
    whole = LayerFeatures(ckpt, 2)(wave)
    assert chunked.shape == whole.shape == (149, 64)
    # far from the chunk boundaries the transformer context barely matters
    assert torch.allclose(chunked[:20], whole[:20], atol=0.2)
    it = Iteration(2, 10, "layer", 2, 3, 1.0)
    waves = [wave, torch.randn(SR)]
    labels = compute_labels(["long", "short"], waves.__getitem__, it, args,
                            KMeansConfig(n_init=1, max_chunk_seconds=1.0), previous_ckpt=ckpt,
                            seed=0, log=lambda _: None)
    assert labels.labels["long"].shape == (149,) and labels.labels["short"].shape == (49,)


def test_prefetcher_gives_the_stream_batches_in_order(tmp_path):
    audio = AudioSet(list_audio(_write_audio(tmp_path / "c", 6)))
    args = model_args("tiny", 6)
    direct = [next(_stream(audio, args)) for _ in range(1)]
    stream = _stream(audio, args)
    expected = [next(stream) for _ in range(7)]
    pre = Prefetcher(_stream(audio, args), torch.device("cpu"), depth=3)
    try:
        got = [next(pre) for _ in range(7)]
    finally:
        pre.close()
    assert torch.equal(direct[0].waveforms, expected[0].waveforms)
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a.waveforms, b.waveforms) and torch.equal(a.labels, b.labels)
        assert a.state_after == b.state_after


def test_compile_failure_falls_back_to_eager(tmp_path, monkeypatch):
    """A compiled path that fails (as Inductor did on torch 2.11) trains eagerly instead, with
    the same result as an eager run."""
    audio = AudioSet(list_audio(_write_audio(tmp_path / "c", 6)))
    args = model_args("tiny", 6, {"encoder_num_layers": 2})

    def train(compile_: bool) -> dict:
        torch.manual_seed(0)
        model = build_model(args)
        cfg = TrainConfig(compile=compile_, log_every=2, save_every=100, warmup_fraction=0.0)
        stats = train_iteration(model, _stream(audio, args), iteration=1, steps=3, config=cfg,
                                device=torch.device("cpu"), state_path=tmp_path / "s.pt",
                                log=lambda _: None)
        assert math.isfinite(stats["loss"]) and stats["step"] == 3
        return model.state_dict()

    eager = train(False)

    def broken_compile(module, **_):
        def fail(*args, **kwargs):
            raise RuntimeError("forced Inductor failure")
        return fail

    monkeypatch.setattr(torch, "compile", broken_compile)
    with pytest.warns(UserWarning, match="forced Inductor failure"):
        fallback = train(True)
    assert all(torch.equal(eager[k], fallback[k]) for k in eager)


def test_run_with_a_corrupt_flac_completes_and_reports_it(tmp_path):
    import json

    from pretraining.config import PretrainConfig
    from pretraining.run import run_pretraining

    root = _write_audio(tmp_path / "corpus", 8, suffix=".flac")
    _corrupt(root / "utt05.flac")
    small = {"encoder_num_layers": 2, "encoder_embed_dim": 32, "encoder_ff_interm_features": 64,
             "encoder_num_heads": 2, "final_dim": 16}
    cfg = PretrainConfig.from_dict({
        "schedule": {"name": "uniform", "iterations": 2, "total_steps": 4, "first_layer": 1,
                     "first_clusters": 6, "last_clusters": 6, "kmeans_fraction": 1.0},
        "model": {"preset": "tiny", "overrides": small},
        "train": {"batch_seconds": 8.0, "save_every": 2, "log_every": 1, "device": "cpu"},
        "kmeans": {"n_init": 1, "batch_size": 1024},
        "data": {"path": str(root), "max_sample_seconds": 3.0},
        "profile": {"enabled": False},
    })
    with pytest.warns(UserWarning, match=r"utt05\.flac"):
        summary = run_pretraining(cfg, tmp_path / "run", log=lambda _: None)
    assert summary.completed == (1, 2)
    for it in (1, 2):
        stage = json.loads((tmp_path / "run" / f"it{it}" / "label_stage.json").read_text())
        assert stage["skipped"] == ["utt05"] and stage["utterances"] == 7


def test_one_process_ddp_trains_as_no_ddp(tmp_path):
    """``torchrun --nproc_per_node 1`` (DDP over a gloo group of one, layer drop so that
    ``find_unused_parameters``, accumulation so that ``no_sync``) gives the weights, optimizer
    state and gradients of the plain loop bit for bit."""
    import socket

    import torch.distributed as dist

    from layerprobe.distributed import Dist

    audio = AudioSet(list_audio(_write_audio(tmp_path / "c", 6)))
    args = model_args("tiny", 6, {"encoder_num_layers": 3, "encoder_layer_drop": 0.5})
    cfg = TrainConfig(grad_accum=2, log_every=2, save_every=100, warmup_fraction=0.0)

    def train(dist_info: Dist) -> tuple[dict, dict, list]:
        torch.manual_seed(0)
        model = build_model(args)
        # step 1 runs a block in one micro-batch only, step 2 drops two blocks in both
        train_iteration(model, _stream(audio, args), iteration=1, steps=2, config=cfg,
                        device=torch.device("cpu"), state_path=tmp_path / "s.pt",
                        dist_info=dist_info, log=lambda _: None)
        state = torch.load(tmp_path / "s.pt", weights_only=False)
        return model.state_dict(), state["optimizer"]["state"], \
            [p.grad for p in model.parameters()]

    plain = train(Dist())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0,
                            world_size=1)
    try:
        ddp = train(Dist(launched=True))
    finally:
        dist.destroy_process_group()
    assert all(torch.equal(plain[0][k], ddp[0][k]) for k in plain[0])
    assert plain[1].keys() == ddp[1].keys()
    for i in plain[1]:
        assert all(torch.equal(plain[1][i][k], ddp[1][i][k]) for k in plain[1][i])
    dropped = [g is None for g in plain[2]]
    assert any(dropped) and not all(dropped)
    assert dropped == [g is None for g in ddp[2]]
    assert all(torch.equal(a, b) for a, b in zip(plain[2], ddp[2], strict=True) if a is not None)


def test_stream_gives_each_utterance_its_own_labels(tmp_path):
    """Every row of every batch: the audio of one utterance and that utterance's labels."""
    root = tmp_path / "c"
    root.mkdir()
    for u in range(7):  # audio of constant value u + 1, labels of value u
        soundfile.write(root / f"utt{u:02d}.wav", np.full(int((1.0 + 0.2 * u) * SR),
                                                          (u + 1) / 16, np.float32), SR)
    audio = AudioSet(list_audio(root))
    args = model_args("tiny", 8)
    labels = {uid: torch.full((num_frames(args, int(d * SR)),), int(uid[3:]))
              for uid, d in zip(audio.ids, audio.durations, strict=True)}
    stream = BatchStream(audio, labels, args, batch_seconds=4.0, max_sample_seconds=3.0, seed=0,
                         iteration=1)
    seen = set()
    for _ in range(10):
        batch = next(stream)
        for wave, lab in zip(batch.waveforms, batch.labels, strict=True):
            u = round(float(wave[0]) * 16) - 1
            assert torch.all(wave == (u + 1) / 16) and torch.all(lab == u)
            seen.add(u)
    assert seen == set(range(7))
