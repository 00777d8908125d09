"""Benchmark: reading an aligned corpus and computing fbank targets for 1 h of synthetic audio.

Synthesizes ~1 h (festival diphone voices, the fastest; cached under --cache), then times
(1) load_corpus (headers + TextGrids), (2) load_audio for every file, (3) log_mel_fbank, and
prints seconds per hour of audio for each and the ratio to real time.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from layerprobe.corpus import load_audio, load_corpus
from layerprobe.probes import ProbeConfig, build_probes
from layerprobe.synth import synthesize_corpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/layerprobe-bench-1h"))
    parser.add_argument("--minutes", type=float, default=60.0)
    args = parser.parse_args()
    if not (args.cache / "synth.json").is_file():
        t = time.perf_counter()
        synthesize_corpus(args.cache, voices=["kal_diphone", "ked_diphone"],
                          minutes=args.minutes, seed=0, progress=True)
        print(f"synthesis: {time.perf_counter() - t:.1f} s")
    t0 = time.perf_counter()
    corpus = load_corpus(args.cache)
    t1 = time.perf_counter()
    probes = build_probes(corpus, ["fbank", "phone", "word"],
                          ProbeConfig(fbank_max_utterances=10**9))
    t2 = time.perf_counter()
    waves = [load_audio(u.audio_path) for u in corpus.utterances]
    t3 = time.perf_counter()
    for i, wave in enumerate(waves):
        n_frames = (wave.shape[0] - 400) // 320 + 1
        probes["fbank"].targets(i, wave, n_frames, 50.0)
    t4 = time.perf_counter()
    for i, wave in enumerate(waves):
        n_frames = (wave.shape[0] - 400) // 320 + 1
        probes["phone"].targets(i, wave, n_frames, 50.0)
        probes["word"].targets(i, wave, n_frames, 50.0)
    t5 = time.perf_counter()
    hours = corpus.duration / 3600
    print(f"corpus: {len(corpus.utterances)} utterances, {hours:.3f} h of audio")
    for name, sec in (("load_corpus (headers + TextGrids)", t1 - t0),
                      ("build_probes (phone, word, fbank)", t2 - t1),
                      ("load_audio (FLAC decode)", t3 - t2),
                      ("fbank targets (log-mel + frame map)", t4 - t3),
                      ("phone + word targets", t5 - t4),
                      ("total", t5 - t0)):
        print(f"{name:38s} {sec / hours:8.2f} s per hour of audio "
              f"({hours * 3600 / sec:8.0f}x real time)")


if __name__ == "__main__":
    main()
