"""Probe targets: fbank vs librosa, spans at 20 ms frames, pooling, caps, stratified splits."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from layerprobe.cca import assign_splits, shard_groups
from layerprobe.corpus import Corpus, Segment, Utterance, load_audio, load_corpus
from layerprobe.phones import ARPABET39
from layerprobe.probes import (
    ProbeConfig,
    _pool_by_matmul,
    build_probes,
    fbank_frame_indices,
    log_mel_fbank,
    phone_span,
    pool_spans,
    word_span,
)


def librosa_fbank(wave: np.ndarray) -> np.ndarray:
    """The reference recipe, with librosa (method.md; imported here: the GPU machine lacks it)."""
    librosa = pytest.importorskip("librosa")
    y = wave.astype(np.float64)
    y = y / np.abs(y).max() * 0.999
    y = librosa.effects.preemphasis(y, coef=0.97)
    mel = librosa.feature.melspectrogram(y=y, sr=16000, n_fft=2048, hop_length=160,
                                         win_length=400, n_mels=80, fmin=50, power=1.0)
    return (librosa.amplitude_to_db(mel, ref=1.0, amin=1e-5, top_db=80) / 80 + 1).T


def test_log_mel_fbank_matches_librosa() -> None:
    corpus = load_corpus(None)
    for utt in corpus.utterances[::40]:
        wave = load_audio(utt.audio_path)
        ours = log_mel_fbank(wave).numpy()
        ref = librosa_fbank(wave.numpy())
        assert ours.shape == ref.shape == (wave.shape[0] // 160 + 1, 80)
        assert np.abs(ours - ref).max() < 1e-4
    noise = torch.from_numpy(np.random.default_rng(0).standard_normal(5000).astype(np.float32))
    assert np.abs(log_mel_fbank(noise).numpy() - librosa_fbank(noise.numpy())).max() < 1e-4


def ref_phone_frames(start: float, end: float, n_frames: int) -> list[int]:
    """method.md at 20 ms, written out with exact decimal arithmetic."""
    from decimal import Decimal
    s = math.floor(Decimal(str(start)) / Decimal("0.02"))
    e = math.ceil(Decimal(str(end)) / Decimal("0.02"))
    off = (e - s + 1) // 3
    frames = list(range(s + off, e - off))
    if not frames:
        frames = [s + off]
    frames = [f for f in frames if f < n_frames]
    return frames or [n_frames - 1]


@pytest.mark.parametrize("start,end,frames", [
    (0.10, 0.34, [7, 8, 9, 10, 11, 12]),  # floor 5, ceil 17, offset 4 -> 9..12? see below
])
def test_phone_span_examples(start: float, end: float, frames: list[int]) -> None:
    # start 5, end 17 (0.34 s is exactly frame 17), offset floor(13/3) = 4 -> frames 9..12
    a, b = phone_span(start, end, 50.0)
    assert list(range(a, b)) == [9, 10, 11, 12] == ref_phone_frames(start, end, 100)
    assert word_span(start, end, 50.0) == (5, 17)
    assert phone_span(0.0, 0.02, 50.0) == (0, 1)  # one frame: offset 0
    assert phone_span(0.01, 0.03, 50.0) == (1, 2)  # s=0, e=2, offset 1 -> [1]


def test_phone_spans_against_reference_on_random_segments() -> None:
    rng = np.random.default_rng(0)
    for _ in range(2000):
        a = round(float(rng.uniform(0, 5)), 3)
        b = round(a + float(rng.uniform(0.005, 0.4)), 3)
        s, e = phone_span(a, b, 50.0)
        assert list(range(s, e)) == ref_phone_frames(a, b, 10**6)


def test_pool_spans_matches_loop() -> None:
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 40, 5, generator=g)
    spans = torch.tensor([[0, 1], [3, 9], [10, 11], [39, 40], [0, 40], [5, 6]])
    want = torch.stack([hidden[:, a:b].mean(1) for a, b in spans.tolist()], 1)
    torch.testing.assert_close(pool_spans(hidden, spans), want)
    ones = spans[[0, 2, 3, 5]]
    torch.testing.assert_close(pool_spans(hidden, ones), hidden[:, [0, 10, 39, 5]])
    assert pool_spans(hidden, torch.zeros(0, 2, dtype=torch.int64)).shape == (3, 0, 5)
    for bad in ([[3, 3]], [[-1, 2]], [[30, 41]]):
        with pytest.raises(ValueError, match="spans"):
            pool_spans(hidden, torch.tensor(bad))
    # the matmul path of other devices (no atomics), here on the CPU: the same means
    torch.testing.assert_close(_pool_by_matmul(hidden, spans[:, 0], spans[:, 1]), want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pool_spans_on_cuda_gives_the_same_bits_every_call() -> None:
    """CUDA's index_add_ adds in a varying order; the matmul path does not (many overlapping
    spans of one long utterance, as the phone and word probes pool them)."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(13, 1500, 768, generator=g)
    start = torch.randint(0, 1400, (400,), generator=g)
    spans = torch.stack([start, start + torch.randint(1, 100, (400,), generator=g)], 1)
    first = pool_spans(hidden.cuda(), spans)
    for _ in range(5):
        assert torch.equal(pool_spans(hidden.cuda(), spans), first)
    torch.testing.assert_close(first.cpu(), pool_spans(hidden, spans), rtol=1e-5, atol=1e-6)


def test_fbank_probe_every_second_frame_truncated() -> None:
    corpus = load_corpus(None, max_utterances=4)
    probe = build_probes(corpus, ["fbank"], ProbeConfig(fbank_max_utterances=2))["fbank"]
    sampled = [i for i in range(4) if i in probe.utterances]
    assert len(sampled) == 2
    i = sampled[0]
    wave = load_audio(corpus.utterances[i].audio_path)
    n_frames = (wave.shape[0] - 400) // 320 + 1  # HuBERT's frame count at 50 Hz
    t = probe.targets(i, wave, n_frames, 50.0)
    fb = log_mel_fbank(wave)
    assert t.y.shape == (n_frames, 80)
    torch.testing.assert_close(t.y, fb[::2][:n_frames])
    assert t.spans[:, 0].tolist() == list(range(n_frames))
    assert (t.spans[:, 1] - t.spans[:, 0] == 1).all() and (t.labels == -1).all()
    assert t.split.min() >= 0 and t.split.max() < ProbeConfig().n_shards
    assert torch.equal(t.split, probe.targets(i, wave, n_frames, 50.0).split)
    other = next(j for j in range(4) if j not in probe.utterances)
    assert probe.targets(other, wave, n_frames, 50.0).spans.shape == (0, 2)
    assert fbank_frame_indices(5, 25.0, 100).tolist() == [0, 4, 8, 12, 16]
    assert fbank_frame_indices(5, 50.0, 7).tolist() == [0, 2, 4, 6]


def synthetic_corpus(n_utt: int, seed: int = 0, splits: list[str | None] | None = None) -> Corpus:
    """A corpus object with random alignments (no audio needed for segment probes)."""
    rng = np.random.default_rng(seed)
    vocab = [f"w{i}" for i in range(30)]
    utts = []
    for u in range(n_utt):
        t, words, phones = 0.0, [], []
        for _ in range(int(rng.integers(3, 9))):
            w = vocab[min(int(rng.zipf(1.5)) - 1, 29)]
            ws = t
            for _ in range(int(rng.integers(1, 4))):
                d = round(float(rng.uniform(0.03, 0.15)), 3)
                phones.append(Segment(ARPABET39[int(rng.integers(0, 39))], round(t, 3),
                                      round(t + d, 3)))
                t += d
            words.append(Segment(w, round(ws, 3), round(t, 3)))
        split = splits[u] if splits else None
        utts.append(Utterance(f"u{u}", Path(f"u{u}.wav"), None, "s", split, t + 0.1,
                              tuple(words), tuple(phones)))
    return Corpus("synthetic", Path("."), tuple(utts), ())


def collect(probe, corpus: Corpus, rate: float = 50.0):
    out = []
    for i, u in enumerate(corpus.utterances):
        n_frames = int(u.duration * rate)
        out.append(probe.targets(i, torch.zeros(1), n_frames, rate))
    return out


def test_caps_and_stratified_splits() -> None:
    corpus = synthetic_corpus(120)
    config = ProbeConfig(phone_cap=12, word_cap=7, n_splits=5, seed=3)
    probes = build_probes(corpus, ["phone", "word"], config)
    for name, cap in (("phone", 12), ("word", 7)):
        targets = collect(probes[name], corpus)
        labels = torch.cat([t.labels for t in targets]).numpy()
        split = torch.cat([t.split for t in targets]).numpy()
        available = Counter()
        for u in corpus.utterances:
            segs = u.phones if name == "phone" else u.words
            available.update(s.label for s in segs)
        counts = Counter(labels.tolist())
        for c, n in counts.items():
            assert n == min(cap, available[probes[name].classes[c]])
        for c in counts:
            per = np.bincount(split[labels == c] % 5, minlength=5)
            assert per.max() - per.min() <= 1  # stratified: every class spread evenly
            # other split seeds re-deal whole shards: still within one item per shard per split
            groups = shard_groups(config.n_shards, 5, 1, seed=3)
            per = np.array([np.isin(split[labels == c], g).sum() for g in groups])
            assert per.sum() == counts[c] and per.max() - per.min() <= config.shards_per_split
        y = torch.cat([t.y for t in targets])
        assert torch.equal(y.argmax(1), torch.from_numpy(labels)) and torch.all(y.sum(1) == 1)
    again = build_probes(corpus, ["phone"], config)["phone"]
    assert [t.spans.tolist() for t in collect(again, corpus)] == \
        [t.spans.tolist() for t in collect(probes["phone"], corpus)]
    other = build_probes(corpus, ["phone"], ProbeConfig(phone_cap=12, n_splits=5, seed=4))
    assert [t.spans.tolist() for t in collect(other["phone"], corpus)] != \
        [t.spans.tolist() for t in collect(probes["phone"], corpus)]


def test_segment_spans_at_20ms_and_clipping() -> None:
    corpus = synthetic_corpus(5)
    probes = build_probes(corpus, ["phone", "word"], ProbeConfig())
    utt = corpus.utterances[0]
    t = probes["phone"].targets(0, torch.zeros(1), 10**4, 50.0)
    ref = [ref_phone_frames(p.start, p.end, 10**4) for p in utt.phones]
    want = sorted((f[0], f[-1] + 1) for f in ref)
    assert sorted(map(tuple, t.spans.tolist())) == want
    w = probes["word"].targets(0, torch.zeros(1), 10**4, 50.0)
    assert sorted(map(tuple, w.spans.tolist())) == sorted(
        (math.floor(s.start * 50 + 1e-6), math.ceil(s.end * 50 - 1e-6)) for s in utt.words)
    short = probes["word"].targets(0, torch.zeros(1), 20, 50.0)
    assert (short.spans[:, 1] <= 20).all() and (short.spans[:, 1] > short.spans[:, 0]).all()
    assert short.spans.shape[0] == int((w.spans[:, 0] < 20).sum())


def test_word_vocab_from_training_part() -> None:
    n = 60
    corpus = synthetic_corpus(n, splits=["train" if i < 40 else "test" for i in range(n)])
    probe = build_probes(corpus, ["word"], ProbeConfig(word_vocab=5))["word"]
    counts = Counter(w.label for u in corpus.utterances[:40] for w in u.words)
    top = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:5]]
    assert list(probe.classes) == top and probe.dy == 5


def test_word_embedding_probe(tmp_path: Path) -> None:
    corpus = synthetic_corpus(30)
    glove = tmp_path / "glove.txt"
    vectors = {f"w{i}": np.arange(4, dtype=np.float32) + i for i in range(0, 30, 2)}
    glove.write_text("".join(f"{w} " + " ".join(f"{x:g}" for x in v) + "\n"
                             for w, v in vectors.items()))
    config = ProbeConfig(word_embeddings=glove)
    probe = build_probes(corpus, ["word-embedding"], config)["word-embedding"]
    assert probe.dy == 4 and set(probe.classes) <= set(vectors)
    t = probe.targets(0, torch.zeros(1), 10**4, 50.0)
    for label, y in zip(t.labels.tolist(), t.y, strict=True):
        assert torch.equal(y, torch.from_numpy(vectors[probe.classes[label]]))
    with pytest.raises(ValueError, match="word_embeddings"):
        build_probes(corpus, ["word-embedding"], ProbeConfig())


def test_stratified_splits_small_classes() -> None:
    labels = np.repeat(np.arange(7), [1, 2, 3, 10, 25, 4, 9])
    split = assign_splits(len(labels), labels=labels, n_splits=10, seed=0)
    for c in range(7):
        per = np.bincount(split[labels == c], minlength=10)
        assert per.max() - per.min() <= 1
    assert np.bincount(split, minlength=10).max() - np.bincount(split, minlength=10).min() <= 4


def test_probe_config_from_dict() -> None:
    cfg = ProbeConfig.from_dict({"phone_cap": 5, "seed": 2, "word_embeddings": ""})
    assert cfg.phone_cap == 5 and cfg.seed == 2 and cfg.word_embeddings is None
    with pytest.raises(ValueError, match="unknown key.*bogus"):
        ProbeConfig.from_dict({"bogus": 1})
    with pytest.raises(ValueError, match="phone_cap must be an integer"):
        ProbeConfig.from_dict({"phone_cap": "5"})
    with pytest.raises(ValueError, match="n_splits"):
        ProbeConfig(n_splits=2)
    with pytest.raises(ValueError, match="unknown probe"):
        build_probes(synthetic_corpus(2), ["bogus"], ProbeConfig())


def test_bundled_corpus_probes_have_enough_classes() -> None:
    corpus = load_corpus(None)
    probes = build_probes(corpus, ["phone", "word"], ProbeConfig())
    word_counts = Counter(it.label for items in probes["word"].items for it in items)
    assert sum(n >= 4 for n in word_counts.values()) >= 36
    assert len({it.label for items in probes["phone"].items for it in items}) == 39
