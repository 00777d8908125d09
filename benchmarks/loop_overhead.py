"""What the training loop adds to the HuBERT pretraining step when the step is host-bound.

The Base preset's depth and structure at the tiny width of ``step_host_overhead.py`` (compute is
negligible, so a step costs what the host spends dispatching it, as Base's step does on an H200:
GPU busy 22.6 of 31 ms), on a synthetic corpus of ~3 s utterances of noise with random labels,
cropped short (``--max-sample-seconds``) so that a batch of several utterances costs little
compute but the data path (one crop per utterance) does its per-utterance work.
Audio-s/s of, interleaved round by round (medians over rounds):

(a) the step alone on a fixed batch of the corpus (``train_throughput.make_step``);
(b) the same step fed by ``BatchStream`` + ``Prefetcher`` (a background thread), no DDP;
(c) ``pretraining.train.train_iteration`` on the same corpus and config, no DDP;
(d) ``train_iteration`` in a one-process gloo DDP group (``Dist(launched=True)``, as under
    ``torchrun --nproc_per_node 1``), with layer drop (``find_unused_parameters=True``) and without;
    (c) without layer drop too, so that the DDP cost is read against the same model; and (d0), (d)
    with ``gradient_as_bucket_view=False`` (train_iteration before it kept gradients as views).

``train_iteration``'s throughput is its own ``audio_per_s`` of the second log window (the first
holds the warm-up). Also printed: the prefetch thread's wall and CPU time per batch (``next`` of
the stream, timed in the thread) and the top-level aten ops (dispatches: host work each; those on
device tensors launch a kernel on a GPU) of one micro-step without DDP and with it.

    python benchmarks/loop_overhead.py 2>/dev/null            # tqdm's bars go to stderr
    python benchmarks/loop_overhead.py --batch-seconds 7.25 --rounds 2   # 29 utterances a batch
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile
import torch
import torch.distributed as torch_dist
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_host_overhead import TINY_WIDTH, count_ops  # noqa: E402
from train_throughput import make_step  # noqa: E402

import pretraining.train  # noqa: E402
from layerprobe.distributed import Dist  # noqa: E402
from pretraining.config import TrainConfig  # noqa: E402
from pretraining.data import SAMPLE_RATE, AudioSet, Batch, BatchStream, Prefetcher, list_audio  # noqa: E402,E501
from pretraining.model import (  # noqa: E402
    PretrainStep,
    build_model,
    clip_grad_norm,
    layer_keep,
    model_args,
    num_frames,
    span_mask,
)
from pretraining.train import StepRandom, make_optimizer, train_iteration  # noqa: E402

CLASSES = 500


def write_noise_corpus(root: Path, n_utts: int, low: float, high: float, seed: int = 0) -> Path:
    """``n_utts`` wav files of noise, durations uniform in [low, high] s."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for u in range(n_utts):
        n = int(rng.uniform(low, high) * SAMPLE_RATE)
        soundfile.write(root / f"utt{u:04d}.wav", (0.1 * rng.standard_normal(n)).astype(np.float32),
                        SAMPLE_RATE)
    return root


class TimedStream:
    """A ``BatchStream`` whose ``next`` records its wall and thread-CPU seconds."""

    def __init__(self, stream: BatchStream):
        self.stream = stream
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.utterances: list[int] = []

    def __next__(self) -> Batch:
        wall, cpu = time.perf_counter(), time.thread_time()
        batch = next(self.stream)
        self.cpu.append(time.thread_time() - cpu)
        self.wall.append(time.perf_counter() - wall)
        self.utterances.append(batch.waveforms.shape[0])
        return batch

    def __iter__(self) -> TimedStream:
        return self

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def join_one_process_group() -> Dist:
    """rank 0 of a gloo group of one, as ``init_distributed`` joins under ``torchrun``."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29_500 + os.getpid() % 1000))
    torch_dist.init_process_group("gloo", rank=0, world_size=1)
    return Dist(rank=0, world_size=1, launched=True)


def ddp_dispatches(args: dict, batch: Batch, dist_info: Dist) -> None:
    """Top-level aten ops (dispatches; on device tensors a kernel launch each) of one step of
    ``train_iteration``'s micro-step: no DDP, DDP copying gradients out of its buckets, DDP with
    gradients as bucket views (the seeds, batch and model the same)."""
    counts = {}
    b, t = batch.labels.shape
    for name, options in {"no DDP": None, "DDP, copied gradients": False,
                          "DDP, bucket views": True}.items():
        torch.manual_seed(0)
        model = build_model(args).train()
        step_module = PretrainStep(model, 10.0)
        net = step_module if options is None else DistributedDataParallel(
            step_module, find_unused_parameters=True, gradient_as_bucket_view=options)
        opt, _ = make_optimizer(model, TrainConfig(), 100)
        params = list(model.parameters())
        randoms = StepRandom(0, 1, 0, torch.device("cpu"))

        def step(phase, net=net, opt=opt, params=params, randoms=randoms) -> torch.Tensor:
            with phase("forward"):
                opt.zero_grad(set_to_none=True)
                host, device_gen = randoms.at(0, 0)
                mask = span_mask(b, t, mask_prob=0.8, mask_length=10, host=host,
                                 device_gen=device_gen)
                keep = layer_keep(12, 0.05, host)
                loss = net(batch.waveforms, batch.labels, mask, keep)[0]
            with phase("backward"):
                loss.backward()
            with phase("optimizer"):
                clip_grad_norm(params, 10.0)
                opt.step()
            return loss

        step(lambda _: contextlib.nullcontext())
        counts[name] = count_ops(step)[0]
        del net
    for name, phases in counts.items():
        print(f"  dispatches per step, {name:<22}: " + ", ".join(
            f"{p} {c[0]}" for p, c in phases.items())
            + f"; total {sum(c[0] for c in phases.values())}")
    assert dist_info.enabled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-seconds", type=float, default=2.0,
                        help="[train] batch_seconds (87.5 in the Base recipe)")
    parser.add_argument("--max-sample-seconds", type=float, default=0.25,
                        help="crop of every utterance: short, so that compute stays negligible "
                             "while a batch holds as many utterances as batch_seconds / crop")
    parser.add_argument("--utterances", type=int, default=200)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    a = parser.parse_args()
    torch.set_num_threads(a.threads)
    device = torch.device("cpu")
    tmp = Path(tempfile.mkdtemp())
    root = write_noise_corpus(tmp / "corpus", a.utterances, 2.5, 3.5)
    audio = AudioSet(list_audio(root))
    gen = torch.Generator().manual_seed(0)
    args = {preset_drop: model_args("base", CLASSES, {**TINY_WIDTH, **extra})
            for preset_drop, extra in (("drop", {}), ("no drop", {"encoder_layer_drop": 0.0}))}
    labels = {uid: torch.randint(0, CLASSES, (num_frames(args["drop"], int(d * SAMPLE_RATE)),),
                                 generator=gen)
              for uid, d in zip(audio.ids, audio.durations, strict=True)}
    for i in range(len(audio)):
        audio.load(i)  # the corpus is cached in memory, as a corpus under an hour is

    def stream(seed: int = 0) -> BatchStream:
        return BatchStream(audio, labels, args["drop"], batch_seconds=a.batch_seconds,
                           max_sample_seconds=a.max_sample_seconds, seed=seed, iteration=1)

    first = [next(stream(1)) for _ in range(21)]
    fixed = sorted(first, key=lambda b: b.seconds)[10]  # the batch of median seconds
    print(f"torch {torch.__version__}, CPU, torch.set_num_threads({a.threads}) (the prefetch "
          f"thread has the other core); Base depth, tiny width {TINY_WIDTH['encoder_embed_dim']}; "
          f"{len(audio)} utterances of 2.5-3.5 s cropped to {a.max_sample_seconds:g} s, "
          f"batch_seconds {a.batch_seconds:g} "
          f"(fixed batch of (a): {fixed.waveforms.shape[0]} x "
          f"{fixed.waveforms.shape[1] / SAMPLE_RATE:.2f} s)")

    step_a = make_step("base", batch=1, seconds=0.1, device=device, bf16=False,
                       overrides=TINY_WIDTH,
                       batches=itertools.repeat((fixed.waveforms, fixed.labels)))
    timed_b = TimedStream(stream(2))
    prefetch_b = Prefetcher(timed_b, device)  # type: ignore[arg-type]
    seconds_b: list[float] = []

    def feed_b():
        while True:
            batch = next(prefetch_b)
            seconds_b.append(batch.seconds)
            yield batch.waveforms, batch.labels

    step_b = make_step("base", batch=1, seconds=0.1, device=device, bf16=False,
                       overrides=TINY_WIDTH, batches=feed_b())
    dist_info = join_one_process_group()
    models = {key: build_model(args[key]) for key in ("drop", "no drop")}
    config = TrainConfig(batch_seconds=a.batch_seconds, device="cpu", bf16=False,
                         log_every=a.steps, save_every=10**9, warmup_fraction=0.0, lr=1e-5)
    timed_loops: dict[str, TimedStream] = {}

    def copying_ddp(*args, **kwargs) -> DistributedDataParallel:
        return DistributedDataParallel(*args, **{**kwargs, "gradient_as_bucket_view": False})

    def loop(name: str, drop: str, ddp: bool, bucket_view: bool = True):
        def run() -> tuple[float, float]:
            timed = TimedStream(stream(3))
            into = timed_loops.setdefault(name, TimedStream(timed.stream))
            if not bucket_view:  # train_iteration as it was: gradients copied out of buckets
                pretraining.train.DistributedDataParallel = copying_ddp
            tic = time.perf_counter()
            try:
                stats = train_iteration(models[drop], timed,  # type: ignore[arg-type]
                                        iteration=1, steps=2 * a.steps, config=config,
                                        device=device, state_path=tmp / "state.pt",
                                        dist_info=dist_info if ddp else Dist(),
                                        log=lambda _: None)
            finally:
                pretraining.train.DistributedDataParallel = DistributedDataParallel
            total = time.perf_counter() - tic
            into.wall.extend(timed.wall[2:])  # after the thread's start
            into.cpu.extend(timed.cpu[2:])
            into.utterances.extend(timed.utterances[2:])
            return stats["audio_per_s"], total
        return run

    def steps_of(step, seconds: list[float] | None, audio_s: float):
        def run() -> tuple[float, float]:
            step()  # warm-up of this round
            if seconds is not None:
                seconds.clear()
            tic = time.perf_counter()
            for _ in range(a.steps):
                step()
            took = time.perf_counter() - tic
            return (sum(seconds) if seconds is not None else a.steps * audio_s) / took, took
        return run

    variants = {
        "(a) step, fixed batch": steps_of(step_a, None, fixed.seconds),
        "(b) step + BatchStream + Prefetcher": steps_of(step_b, seconds_b, 0.0),
        "(c) train_iteration, no DDP": loop("c", "drop", ddp=False),
        "(c') train_iteration, no DDP, no layer drop": loop("c'", "no drop", ddp=False),
        "(d) train_iteration, DDP gloo x1, layer drop (find_unused)": loop("d", "drop", True),
        "(d') train_iteration, DDP gloo x1, no layer drop": loop("d'", "no drop", True),
        "(d0) as (d), gradients copied out of the buckets (before)": loop("d0", "drop", True,
                                                                          bucket_view=False),
    }
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(a.rounds + 1):  # round 0 warms up
        for name, run in variants.items():
            rate, _ = run()
            if round_ > 0:
                rates[name].append(rate)
    prefetch_b.close()
    ddp_dispatches(args["drop"], fixed, dist_info)
    torch_dist.destroy_process_group()
    med = {name: statistics.median(r) for name, r in rates.items()}
    base = med["(a) step, fixed batch"]
    print(f"audio-s/s, median of {a.rounds} interleaved rounds of {a.steps} steps (ratio to (a); "
          f"ms/step at {fixed.seconds:g} s a batch; spread min-max):")
    for name, value in med.items():
        print(f"  {name:<60} {value:7.1f}  {value / base:6.3f}  "
              f"{fixed.seconds / value * 1e3:6.1f} ms  "
              f"({min(rates[name]):.1f}-{max(rates[name]):.1f})")
    c, c_, d, d_, d0 = list(med.values())[2:]
    print(f"  DDP against the same model: (d)/(c) {d / c:.3f}, (d')/(c') {d_ / c_:.3f}, "
          f"(d0)/(c) {d0 / c:.3f}; bucket views: (d)/(d0) {d / d0:.3f}")
    for name, timed in {"(b)": timed_b, **{f"({k})": v for k, v in timed_loops.items()}}.items():
        if timed.wall:
            print(f"  prefetch thread {name}: {statistics.median(timed.wall) * 1e3:.2f} ms wall, "
                  f"{statistics.median(timed.cpu) * 1e3:.2f} ms thread CPU per batch (median; "
                  f"{statistics.mean(timed.utterances):.1f} utterances per batch)")


if __name__ == "__main__":
    main()
