"""Pretraining: targets, labels, batches, loss, training, resume, checkpoints, profiling."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
import torchaudio

from layerprobe.autoencoder import autoencoder_index
from layerprobe.results import Result
from pretraining.config import KMeansConfig, PretrainConfig, TrainConfig
from pretraining.data import AudioSet, BatchStream, bucket_batches, collate, list_audio
from pretraining.model import build_model, load_checkpoint, model_args, num_frames
from pretraining.run import run_pretraining
from pretraining.schedules import Iteration
from pretraining.targets import (
    LayerFeatures,
    compute_labels,
    fit_kmeans,
    mfcc_features,
    nearest_centroid,
    subsample_to_model_rate,
)
from pretraining.train import hubert_loss, lr_factor, make_optimizer

SR = 16_000
# a toy lexicon: word -> ARPAbet phones; each phone gets its own spectral signature
LEXICON = {"bat": ["B", "AE1", "T"], "sit": ["S", "IH1", "T"], "moon": ["M", "UW1", "N"],
           "fish": ["F", "IH1", "SH"], "go": ["G", "OW1"], "keep": ["K", "IY1", "P"]}
PHONE_FREQ = {p: 150 + 97 * i for i, p in enumerate(sorted({p for ps in LEXICON.values()
                                                           for p in ps}))}


def _textgrid(path: Path, duration: float, words: list, phones: list) -> None:
    def tier(name: str, items: list) -> str:
        out = [f'        class = "IntervalTier"\n        name = "{name}"\n        xmin = 0\n'
               f"        xmax = {duration}\n        intervals: size = {len(items)}\n"]
        for k, (a, b, text) in enumerate(items, 1):
            out.append(f"        intervals [{k}]:\n            xmin = {a}\n            xmax = {b}\n"
                       f'            text = "{text}"\n')
        return "".join(out)

    path.write_text('File type = "ooTextFile"\nObject class = "TextGrid"\n\nxmin = 0\n'
                    f"xmax = {duration}\ntiers? <exists>\nsize = 2\nitem []:\n"
                    f"    item [1]:\n{tier('words', words)}    item [2]:\n{tier('phones', phones)}")


def _write_corpus(root: Path, n_utts: int, seed: int = 0) -> Path:
    """Aligned synthetic 'speech': each phone a harmonic tone with its own pitch, plus noise."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    names = sorted(LEXICON)
    for u in range(n_utts):
        t, words, phones, chunks = 0.1, [], [], [0.01 * rng.standard_normal(int(0.1 * SR))]
        words.append((0.0, 0.1, ""))
        phones.append((0.0, 0.1, ""))
        for _ in range(int(rng.integers(6, 12))):
            w = names[int(rng.integers(len(names)))]
            start = t
            for p in LEXICON[w]:
                d = float(rng.uniform(0.06, 0.14))
                n = int(round(d * SR))
                tt = np.arange(n) / SR
                f0 = PHONE_FREQ[p] * (1 + 0.05 * rng.standard_normal())
                x = sum(np.sin(2 * np.pi * f0 * h * tt) / h for h in (1, 2, 3))
                chunks.append(0.3 * x + 0.02 * rng.standard_normal(n))
                phones.append((round(t, 6), round(t + n / SR, 6), p))
                t += n / SR
            words.append((round(start, 6), round(t, 6), w))
        chunks.append(0.01 * rng.standard_normal(int(0.1 * SR)))
        audio = np.concatenate(chunks).astype(np.float32)
        duration = len(audio) / SR
        words.append((round(t, 6), duration, ""))
        phones.append((round(t, 6), duration, ""))
        soundfile.write(root / f"utt{u:02d}.wav", audio, SR)
        _textgrid(root / f"utt{u:02d}.TextGrid", duration, words, phones)
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return _write_corpus(tmp_path_factory.mktemp("pretrain") / "corpus", 12)


def _tiny_config(corpus: Path, **train) -> PretrainConfig:
    small = {"encoder_num_layers": 2, "encoder_embed_dim": 32, "encoder_ff_interm_features": 64,
             "encoder_num_heads": 2, "final_dim": 16, "mask_prob": 0.5, "mask_length": 5}
    return PretrainConfig.from_dict({
        "schedule": {"name": "progressive-cluster", "iterations": 2, "total_steps": 12,
                     "first_layer": 1, "last_layer": 2, "first_clusters": 8,
                     "last_clusters": 12, "kmeans_fraction": 0.5},
        "model": {"preset": "tiny", "overrides": small},
        "train": {"lr": 2e-3, "batch_seconds": 8.0, "save_every": 4, "log_every": 2,
                  "device": "cpu", **train},
        "kmeans": {"n_init": 2, "batch_size": 1024},
        "data": {"path": str(corpus), "max_sample_seconds": 3.0},
        "profile": {"enabled": False},
    })


# ---------------------------------------------------------------------------------------------
# targets


def _delta_reference(c: np.ndarray) -> np.ndarray:
    """HTK/kaldi delta with window 2 and replicated edges: [d, T] -> [d, T]."""
    p = np.pad(c, ((0, 0), (2, 2)), mode="edge")
    t = c.shape[1]
    return sum(n * (p[:, 2 + n:2 + n + t] - p[:, 2 - n:2 - n + t]) for n in (1, 2)) / 10.0


def test_pretraining_mfcc_is_kaldi_13_plus_deltas(corpus):
    wave = torch.from_numpy(soundfile.read(corpus / "utt00.wav", dtype="float32")[0])
    feats = mfcc_features(wave)
    assert feats.shape == (1 + (wave.numel() - 400) // 160, 39)
    base = torchaudio.compliance.kaldi.mfcc(wave[None], use_energy=False).numpy()
    np.testing.assert_allclose(feats[:, :13].numpy(), base, rtol=1e-5, atol=1e-5)
    d1 = _delta_reference(base.T)
    np.testing.assert_allclose(feats[:, 13:26].numpy(), d1.T, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(feats[:, 26:].numpy(), _delta_reference(d1).T, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("preset", ["tiny", "base"])
def test_pretraining_label_frames_match_model_output(preset):
    args = model_args(preset, 10)
    extractor = build_model(args).wav2vec2.feature_extractor
    for n in (400, 719, 720, 1040, 16_000, 16_399, 33_333):
        wave = torch.randn(n)
        with torch.no_grad():
            frames = extractor(wave[None], None)[0].shape[1]
        assert num_frames(args, n) == frames
        mfcc = mfcc_features(wave)
        sub = subsample_to_model_rate(mfcc, frames, 320)
        assert sub.shape[0] == frames
        # label frame t <-> MFCC frame 2t (fairseq's 100 Hz -> 50 Hz mapping)
        assert torch.equal(sub, mfcc[::2][:frames])
    with pytest.raises(ValueError, match="cannot cover"):
        subsample_to_model_rate(torch.zeros(5, 39), 4, 320)


def test_pretraining_nearest_centroid_matches_kmeans_predict():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(c, 0.3, size=(200, 5)) for c in (-2, 0, 3)]).astype(np.float32)
    centroids = fit_kmeans(torch.from_numpy(x), 3, KMeansConfig(n_init=2, batch_size=256), seed=0)
    ours = nearest_centroid(torch.from_numpy(x), centroids)
    d2 = ((x[:, None, :].astype(np.float64) - centroids.numpy()[None]) ** 2).sum(-1)
    assert np.array_equal(ours.numpy(), d2.argmin(1))
    assert len(np.unique(ours.numpy())) == 3
    with pytest.raises(ValueError, match="at least 700 frames"):
        fit_kmeans(x, 700, KMeansConfig(), seed=0)


def test_pretraining_layer_features_follow_layer_convention(tmp_path):
    from layerprobe.models import load
    from pretraining.model import save_checkpoint

    args = model_args("tiny", 5, {"encoder_num_layers": 3})
    torch.manual_seed(0)
    model = build_model(args)
    ckpt = save_checkpoint(tmp_path / "ckpt.pt", args, model.state_dict(), {"iteration": 1})
    wave = torch.randn(12_345)
    reference = load(ckpt)
    states, _ = reference.hidden_states(wave[None], torch.tensor([wave.numel()]))
    assert states.shape[0] == 4
    for layer in range(4):
        ours = LayerFeatures(ckpt, layer)(wave)
        torch.testing.assert_close(ours, states[layer, 0], rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        block_outputs, _ = model.eval().wav2vec2.extract_features(wave[None])
    torch.testing.assert_close(LayerFeatures(ckpt, 2)(wave), block_outputs[1][0])
    with pytest.raises(ValueError, match="outside 0..3"):
        LayerFeatures(ckpt, 4)


def test_pretraining_labels_cover_every_utterance(corpus):
    audio = AudioSet(list_audio(corpus))
    args = model_args("tiny", 6)
    it = Iteration(1, 10, "mfcc", None, 6, 0.5)
    labels = compute_labels(audio.ids, audio.load, it, args, KMeansConfig(n_init=1), seed=0,
                            previous_ckpt=None, log=lambda _: None)
    assert set(labels.labels) == set(audio.ids)
    for i, uid in enumerate(audio.ids):
        wave = audio.load(i)
        assert labels.labels[uid].shape == (num_frames(args, wave.numel()),)
        # labels are the nearest centroid of the subsampled MFCC frames
        feats = mfcc_features(wave)[::2][:num_frames(args, wave.numel())]
        d = torch.cdist(feats.double(), labels.centroids.double())
        assert torch.equal(labels.labels[uid], d.argmin(1))
    again = compute_labels(audio.ids, audio.load, it, args, KMeansConfig(n_init=1), seed=0,
                           previous_ckpt=None, log=lambda _: None)
    assert all(torch.equal(labels.labels[k], again.labels[k]) for k in labels.labels)


# ---------------------------------------------------------------------------------------------
# batches


def test_pretraining_buckets_respect_padded_budget():
    rng = np.random.default_rng(1)
    durations = rng.uniform(0.5, 12.0, size=200).tolist()
    batches = bucket_batches(durations, 30.0, 10.0, seed=3)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(200))
    for b in batches:
        longest = max(min(durations[i], 10.0) for i in b)
        assert len(b) == 1 or len(b) * longest <= 30.0 + 1e-9
    assert batches == bucket_batches(durations, 30.0, 10.0, seed=3)
    assert batches != bucket_batches(durations, 30.0, 10.0, seed=4)


def test_pretraining_crop_keeps_labels_aligned():
    """Every utterance is cropped to the batch's shortest (capped) length: no padding."""
    args = model_args("tiny", 10)
    waves = [torch.arange(50_000, dtype=torch.float32), torch.arange(40_000, dtype=torch.float32)]
    labels = [torch.arange(num_frames(args, w.numel())) for w in waves]
    starts = set()
    for seed in range(5):
        for cap, n in ((32_000, 32_000), (45_000, 40_000)):
            batch = collate(waves, labels, args, cap, torch.Generator().manual_seed(seed))
            assert batch.waveforms.shape == (2, n)
            assert batch.labels.shape == (2, num_frames(args, n))
            assert batch.lengths.tolist() == [n, n]
            for row in range(2):
                start = int(batch.waveforms[row, 0])  # samples are their own index
                assert start % 320 == 0
                starts.add(start)
                assert torch.equal(batch.labels[row],
                                   torch.arange(num_frames(args, n)) + start // 320)
    assert len(starts) > 2  # random offsets
    with pytest.raises(ValueError, match="labels have"):
        collate(waves, [labels[0][:-1], labels[1]], args, 32_000, torch.Generator())


# ---------------------------------------------------------------------------------------------
# loss and training


def test_pretraining_loss_matches_reference():
    torch.manual_seed(0)
    logits = torch.randn(50, 9)
    logits[:, 3] = float("-inf")  # torchaudio masks the target's own column among negatives
    pen = torch.tensor(0.25)
    loss, stats = hubert_loss(logits, torch.randn(20, 9), pen, TrainConfig())
    ce = -torch.log_softmax(logits, dim=1)[:, 0].mean()
    assert math.isclose(float(loss), float(ce) + 10 * 0.25, rel_tol=1e-6)
    assert math.isclose(stats["acc_masked"], float((logits.argmax(1) == 0).float().mean()))
    with pytest.raises(ValueError, match="masked logits"):
        hubert_loss(torch.zeros(0, 9), None, pen, TrainConfig())


def test_pretraining_lr_warmup_then_linear_decay():
    f = [lr_factor(s, 100, 10) for s in range(100)]
    assert f[9] == 1.0 and f[0] == pytest.approx(0.1)
    assert all(a <= b for a, b in zip(f[:10], f[1:10], strict=False))
    assert all(a >= b for a, b in zip(f[10:], f[11:], strict=False))
    assert f[99] == pytest.approx(1 / 90)


def test_pretraining_one_step_decreases_loss_on_fixed_batch():
    args = model_args("tiny", 12, {"encoder_num_layers": 2})
    torch.manual_seed(0)
    model = build_model(args).train()
    n = 24_000
    waves = torch.randn(3, n)
    labels = torch.randint(0, 12, (3, num_frames(args, n)))
    lengths = torch.tensor([n, n, n - 4000])
    cfg = TrainConfig(lr=1e-3, warmup_fraction=0.0)
    opt, _ = make_optimizer(model, cfg, 100)

    def loss_with_fixed_mask() -> torch.Tensor:
        torch.manual_seed(123)  # same mask spans every time
        return hubert_loss(*model(waves, labels, lengths), cfg)[0]

    before = loss_with_fixed_mask()
    before.backward()
    opt.step()
    with torch.no_grad():
        after = loss_with_fixed_mask()
    assert float(after) < float(before.detach())


def _states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_pretraining_kill_and_resume_matches_uninterrupted_run(corpus, tmp_path):
    cfg = _tiny_config(corpus)
    full = run_pretraining(cfg, tmp_path / "full", log=lambda _: None)
    assert full.completed == (1, 2) and not full.stopped_early
    # stop mid-iteration 1 (between saves) and again mid-iteration 2, resuming each time
    killed = run_pretraining(cfg, tmp_path / "killed", stop_at=(1, 3), log=lambda _: None)
    assert killed.stopped_early and killed.completed == ()
    with pytest.raises(ValueError, match="--resume"):
        run_pretraining(cfg, tmp_path / "killed", log=lambda _: None)
    killed = run_pretraining(cfg, tmp_path / "killed", resume=True, stop_at=(2, 5),
                             log=lambda _: None)
    assert killed.stopped_early and killed.completed == (1,)
    resumed = run_pretraining(cfg, tmp_path / "killed", resume=True, log=lambda _: None)
    assert resumed.completed == (1, 2)
    for i in (1, 2):
        m_full, _, meta_full = load_checkpoint(tmp_path / "full" / f"it{i}" / "ckpt.pt")
        m_res, _, meta_res = load_checkpoint(tmp_path / "killed" / f"it{i}" / "ckpt.pt")
        assert _states_equal(m_full.state_dict(), m_res.state_dict())
        assert meta_full["plan"] == meta_res["plan"]
    assert m_full.logit_generator.label_embeddings.shape[0] == 12  # progressive-cluster: 8 -> 12
    other = cfg.with_changes(train={"weight_decay": 0.1})
    with pytest.raises(ValueError, match=r"\[train\] weight_decay"):
        run_pretraining(other, tmp_path / "killed", resume=True, log=lambda _: None)


def test_pretraining_init_from_previous_keeps_encoder(corpus, tmp_path):
    cfg = _tiny_config(corpus, init_from_previous=True)
    cfg = cfg.with_changes(schedule={"total_steps": 4})
    run_pretraining(cfg, tmp_path / "run", stop_at=(2, 1), log=lambda _: None)
    first, _, _ = load_checkpoint(tmp_path / "run" / "it1" / "ckpt.pt")
    state = torch.load(tmp_path / "run" / "state.pt", weights_only=False)
    assert state["iteration"] == 2 and state["step"] == 1
    # one step of training from the previous weights: close to them, far from a fresh init
    w1 = first.state_dict()["wav2vec2.encoder.transformer.layers.0.attention.k_proj.weight"]
    w2 = state["model"]["wav2vec2.encoder.transformer.layers.0.attention.k_proj.weight"]
    assert (w2 - w1).abs().max() < 0.01
    assert state["model"]["logit_generator.label_embeddings"].shape[0] == 12


# ---------------------------------------------------------------------------------------------
# checkpoints into layerprobe score, profiling


def test_pretraining_checkpoint_round_trips_into_score(corpus, tmp_path):
    from layerprobe.config import AnalysisConfig
    from layerprobe.score import score_model

    cfg = _tiny_config(corpus).with_changes(
        schedule={"iterations": 2, "total_steps": 4},
        profile={"enabled": True, "corpus": str(corpus), "probes": ["fbank", "phone", "word"]})
    run_pretraining(cfg, tmp_path / "run", log=lambda _: None)
    run = tmp_path / "run"
    for name in ("profile.json", "profile.png", "autoencoder.json", "it1/probe.json",
                 "it2/probe.json", "plan.json", "config.json", "it1/label_stage.json",
                 "it2/label_stage.json"):
        assert (run / name).is_file(), name
    import json

    stage = json.loads((run / "it2" / "label_stage.json").read_text())
    assert stage["seconds"] > 0 and stage["utterances"] == 12 and stage["skipped"] == []
    results = score_model(run / "it2" / "ckpt.pt", corpus,
                          AnalysisConfig(probes=("fbank",), metrics=cfg.profile.metrics),
                          label="it2", progress=False)
    assert len(results) == 1 and results[0].layers == [0, 1, 2]
    assert all(math.isfinite(s) for s in results[0].scores)
    from layerprobe.results import load_results

    profiled = [r for r in load_results(run / "profile.json") if r.probe == "fbank"]
    assert [r.label for r in profiled] == ["it1", "it2"]
    assert profiled[1].scores == pytest.approx(results[0].scores, rel=1e-6, abs=1e-9)


def _result(label: str, probe: str, scores: list[float], metric: str = "pwcca") -> Result:
    return Result(model="m", label=label, corpus="c", probe=probe, metric=metric,
                  layers=list(range(len(scores))), scores=scores)


def test_pretraining_autoencoder_index_on_hand_made_results():
    rows = autoencoder_index([
        _result("it1", "word", [0.1, 0.5, 0.8, 0.4]),
        _result("it1", "fbank", [0.9, 0.5, 0.3, 0.6]),
        _result("it1", "phone", [0.2, 0.3, 0.1, 0.0]),
        _result("it2", "word", [0.1, 0.2, 0.3, 0.3]),
        _result("it2", "word", [0.0, -0.1, 0.0], metric="mi"),
    ])
    by = {(r["label"], r["metric"]): r for r in rows}
    assert by[("it1", "pwcca")]["word_drop"] == pytest.approx((0.8 - 0.4) / 0.8)
    assert by[("it1", "pwcca")]["fbank_rise"] == pytest.approx(0.6 - 0.3)
    assert by[("it2", "pwcca")]["word_drop"] == 0.0 and "fbank_rise" not in by[("it2", "pwcca")]
    assert by[("it2", "mi")]["word_drop"] is None
    assert len(rows) == 3


def _write_toml(cfg: PretrainConfig, path: Path) -> Path:
    import json

    lines = []
    for section, values in cfg.to_dict().items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items() if k != "overrides"]
        if section == "model":
            lines.append("[model.overrides]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in values["overrides"].items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_pretraining_ddp_gloo_two_processes(corpus, tmp_path):
    """``torchrun`` with 2 CPU processes (gloo): trains and saves both ranks' RNG and data state."""
    import shutil
    import subprocess
    import sys

    cfg = _tiny_config(corpus, num_threads=1).with_changes(
        schedule={"iterations": 1, "total_steps": 4}, train={"save_every": 2})
    config_path = _write_toml(cfg, tmp_path / "ddp.toml")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--standalone", "-m", "pretraining", "--config", str(config_path),
           "--out", str(tmp_path / "run")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if done.returncode != 0 and any(s in done.stderr.lower() for s in
                                    ("address already in use", "rendezvous", "eaddrinuse")):
        # another process on the machine took the free port torchrun picked: try once more
        shutil.rmtree(tmp_path / "run", ignore_errors=True)
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    state = torch.load(tmp_path / "run" / "state.pt", weights_only=False)
    assert state["step"] == 4 and len(state["data"]) == len(state["rng"]) == 2
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])
    model, _, meta = load_checkpoint(tmp_path / "run" / "it1" / "ckpt.pt")
    assert meta["step"] == 4
    assert _states_equal(model.state_dict(), state["model"])


def test_pretraining_audio_listing_folder_and_fairseq_manifest(corpus, tmp_path):
    items = list_audio(corpus)
    assert [it.id for it in items] == [f"utt{u:02d}" for u in range(12)]
    wave, sr = soundfile.read(corpus / "utt03.wav")
    assert items[3].duration == pytest.approx(len(wave) / sr)
    manifest = tmp_path / "train.tsv"
    manifest.write_text(f"{corpus}\nutt01.wav\t{len(wave)}\nutt03.wav\t{len(wave)}\n")
    assert [(it.id, it.path) for it in list_audio(manifest)] == \
        [("utt01", corpus / "utt01.wav"), ("utt03", corpus / "utt03.wav")]
    with pytest.raises(FileNotFoundError, match="no such pretraining corpus"):
        list_audio(tmp_path / "missing")
    with pytest.raises(ValueError, match="no labels for 1 utterance"):
        BatchStream(AudioSet(items[:4]), {it.id: torch.zeros(1) for it in items[:3]},
                    model_args("tiny", 5), batch_seconds=10, max_sample_seconds=5, seed=0,
                    iteration=1)


def test_pretraining_sigkill_and_resume_from_the_command_line(corpus, tmp_path):
    """``python -m pretraining`` killed with SIGKILL mid-run, then ``--resume``: same weights."""
    import signal
    import subprocess
    import sys
    import time

    cfg = _tiny_config(corpus, num_threads=1).with_changes(
        schedule={"total_steps": 40}, train={"save_every": 3})
    config_path = _write_toml(cfg, tmp_path / "cfg.toml")

    def cmd(out: str, *extra: str) -> list[str]:
        return [sys.executable, "-m", "pretraining", "--config", str(config_path),
                "--out", str(tmp_path / out), *extra]

    full = subprocess.run(cmd("full"), capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr[-2000:]
    proc = subprocess.Popen(cmd("killed"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = tmp_path / "killed" / "state.pt"
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if state.is_file() and (tmp_path / "killed" / "it1" / "ckpt.pt").is_file():
            break  # somewhere in iteration 2 (or between iterations)
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = subprocess.run(cmd("killed", "--resume"), capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    for i in (1, 2):
        a, _, _ = load_checkpoint(tmp_path / "full" / f"it{i}" / "ckpt.pt")
        b, _, _ = load_checkpoint(tmp_path / "killed" / f"it{i}" / "ckpt.pt")
        assert _states_equal(a.state_dict(), b.state_dict())


def test_pretrain_seeds_pool_their_profiles(corpus, tmp_path, monkeypatch):
    import argparse
    import json
    import statistics

    import pretraining.cli as pretrain_cli
    from layerprobe.autoencoder import fbank_rise
    from layerprobe.results import load_results

    cfg = _tiny_config(corpus).with_changes(
        schedule={"iterations": 2, "total_steps": 4},
        profile={"enabled": True, "corpus": str(corpus), "probes": ["fbank"]})
    monkeypatch.setattr(pretrain_cli, "config_from_args", lambda args: cfg)
    parser = argparse.ArgumentParser()
    pretrain_cli.add_pretrain_arguments(parser)
    run = tmp_path / "run"
    with pytest.raises(ValueError, match="--seeds must be >= 1"):
        pretrain_cli.run_pretrain(parser.parse_args(["--out", str(run), "--seeds", "0"]))
    assert pretrain_cli.run_pretrain(parser.parse_args(["--out", str(run), "--seeds", "2"])) == 0
    seeds = [load_results(run / f"seed{s}" / "profile.json") for s in (0, 1)]
    pooled = load_results(run / "profile.json")
    assert [r.label for r in pooled] == ["it1", "it2"] and (run / "profile.png").is_file()
    assert seeds[0][1].scores != seeds[1][1].scores  # the seeds train different models
    for p, a, b in zip(pooled, *seeds, strict=True):
        pairs = list(zip(a.scores, b.scores, strict=True))
        assert p.scores == pytest.approx([(x + y) / 2 for x, y in pairs])
        assert p.std == pytest.approx([abs(x - y) / math.sqrt(2) for x, y in pairs])
    rows = json.loads((run / "autoencoder.json").read_text())
    assert rows[1]["fbank_rise_std"] == pytest.approx(
        statistics.stdev([fbank_rise(s[1].scores) for s in seeds]))
