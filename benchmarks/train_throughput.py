"""Training throughput of the HuBERT pretraining loop (audio seconds per wall second).

CPU: the ``tiny`` preset, fp32, at two batch sizes, and the same step's forward alone.
CUDA (when available): the ``base`` preset in fp32 and in bf16 autocast, with model FLOPs
utilisation (MFU) = counted FLOPs of a training step / step time / peak bf16 FLOP/s
(``--peak-tflops``, default 989 for an H100 SXM dense bf16).

    python benchmarks/train_throughput.py [--steps 10] [--seconds 4] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from pretraining.config import TrainConfig
from pretraining.model import build_model, model_args, num_frames
from pretraining.train import hubert_loss, make_optimizer

SR = 16_000


def _batch(args: dict, batch: int, seconds: float, device: torch.device, classes: int):
    n = int(seconds * SR)
    gen = torch.Generator().manual_seed(0)
    waves = torch.randn(batch, n, generator=gen).to(device)
    labels = torch.randint(0, classes, (batch, num_frames(args, n)), generator=gen).to(device)
    lengths = torch.full((batch,), n, dtype=torch.long, device=device)
    return waves, labels, lengths


def measure(preset: str, *, batch: int, seconds: float, steps: int, device: torch.device,
            bf16: bool, forward_only: bool = False, count_flops: bool = False) -> dict:
    """Audio seconds per wall second of ``steps`` training steps (after 2 warm-up steps)."""
    classes = 500 if preset == "base" else 50
    args = model_args(preset, classes)
    torch.manual_seed(0)
    model = build_model(args).to(device).train()
    cfg = TrainConfig(bf16=bf16)
    opt, _ = make_optimizer(model, cfg, 1000)
    waves, labels, lengths = _batch(args, batch, seconds, device, classes)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(waves, labels, lengths)
        loss, _ = hubert_loss(*out, cfg)
        if not forward_only:
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()

    flops = None
    if count_flops:
        with FlopCounterMode(display=False) as counter:
            step()
        flops = counter.get_total_flops()
    for _ in range(2):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    tic = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = (time.perf_counter() - tic) / steps
    return {"step_s": elapsed, "audio_per_s": batch * seconds / elapsed, "flops": flops}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=4.0, help="length of each utterance")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    a = parser.parse_args()
    torch.set_num_threads(a.threads)
    cpu = torch.device("cpu")
    print(f"torch {torch.__version__}, {a.threads} CPU threads, utterances of {a.seconds} s")
    small = measure("tiny", batch=4, seconds=a.seconds, steps=a.steps, device=cpu, bf16=False)
    large = measure("tiny", batch=16, seconds=a.seconds, steps=a.steps, device=cpu, bf16=False,
                    count_flops=True)
    fwd = measure("tiny", batch=16, seconds=a.seconds, steps=a.steps, device=cpu, bf16=False,
                  forward_only=True)
    print(f"tiny CPU, batch 4:  {small['audio_per_s']:8.1f} audio s / wall s "
          f"({small['step_s'] * 1e3:.0f} ms/step)")
    print(f"tiny CPU, batch 16: {large['audio_per_s']:8.1f} audio s / wall s "
          f"({large['step_s'] * 1e3:.0f} ms/step, {large['flops'] / 1e9:.1f} GFLOP/step, "
          f"{large['flops'] / large['step_s'] / 1e9:.1f} GFLOP/s)")
    print(f"ratio batch 16 / batch 4 throughput: {large['audio_per_s'] / small['audio_per_s']:.2f}")
    print(f"ratio training step / forward alone (batch 16): {large['step_s'] / fwd['step_s']:.2f}")
    if not torch.cuda.is_available():
        print("no CUDA device: base-preset throughput and MFU not measured")
        return
    gpu = torch.device("cuda")
    print(f"GPU: {torch.cuda.get_device_name(0)}")
    fp32 = measure("base", batch=8, seconds=10.0, steps=a.steps, device=gpu, bf16=False)
    bf16 = measure("base", batch=8, seconds=10.0, steps=a.steps, device=gpu, bf16=True,
                   count_flops=True)
    mfu = bf16["flops"] / bf16["step_s"] / (a.peak_tflops * 1e12)
    print(f"base GPU fp32: {fp32['audio_per_s']:8.1f} audio s / wall s")
    print(f"base GPU bf16: {bf16['audio_per_s']:8.1f} audio s / wall s, "
          f"{bf16['flops'] / 1e12:.2f} TFLOP/step, MFU {mfu:.1%} of {a.peak_tflops:.0f} TFLOP/s")
    print(f"ratio bf16 / fp32 throughput: {bf16['audio_per_s'] / fp32['audio_per_s']:.2f}")


if __name__ == "__main__":
    main()
