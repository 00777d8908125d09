"""Training throughput of HuBERT pretraining: the old step against the new one, same run.

old step: torchaudio's ``HuBERTPretrainModel`` forward (padding lengths, masks drawn on the host,
logits of every frame against every class) + ``hubert_loss`` + torch's default AdamW. new step:
``pretraining.model.PretrainStep`` (unpadded batch, masks drawn on the step's device, matmul
logits) + fused AdamW, as ``pretraining.train`` runs it. Both: batch × seconds of random
audio, random labels, grad clipping, 2 warm-up steps then ``--steps`` timed rounds, the kinds
interleaved within each round (median per kind). Prints audio
seconds per second, ms/step, TFLOP/step (``FlopCounterMode``), MFU of ``--peak-tflops`` (CUDA), the
compiled new step (compile time apart), peak CUDA memory per batch-second and the largest batch of
an 80 GB card (linear fit over two batch sizes).

    python benchmarks/train_throughput.py                      # base, batch 8 x 10 s, on CUDA
    python benchmarks/train_throughput.py --device cpu --batch 2 --seconds 4 --steps 3
    python benchmarks/train_throughput.py --device cpu --profile   # torch.profiler tables
    python benchmarks/train_throughput.py --label-stage 3600       # label stage on 1 h of audio
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import torch
from torch.utils.flop_counter import FlopCounterMode

import pretraining.model
from pretraining.config import KMeansConfig, TrainConfig
from pretraining.model import build_model, model_args, num_frames, save_checkpoint
from pretraining.train import hubert_loss, make_optimizer

SR = 16_000
CARD_BYTES = 80e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _no_phase(_: str) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


def make_step(preset: str, kind: str = "new", *, batch: int, seconds: float, device: torch.device,
              bf16: bool, compile_: bool = False, overrides: dict | None = None,
              impl: ModuleType = pretraining.model,
              batches: Iterator[tuple[torch.Tensor, torch.Tensor]] | None = None):
    """A closure running one training step of ``kind`` ("old" | "new").

    ``overrides``: ``model_args`` overrides; ``impl``: the module giving the new step's
    ``PretrainStep``, ``span_mask`` and ``layer_keep`` (another revision's, to compare);
    ``batches``: (waveforms [B, n], labels [B, T]) of each step of the new kind instead of the
    fixed random batch (``batch`` and ``seconds`` then only size the unused fixed one). The
    closure takes ``phase``: a function of a phase name ("forward", "backward", "optimizer")
    returning a context manager around that phase (e.g. a profiler), and returns the loss."""
    classes = 500 if preset == "base" else 50
    args = model_args(preset, classes, overrides)
    torch.manual_seed(0)
    model = build_model(args).to(device).train()
    cfg = TrainConfig(bf16=bf16)
    if batches is not None and kind != "new":
        raise ValueError("make_step: batches are for the new kind")
    opt, _ = make_optimizer(model, cfg, 1000, fused=kind == "new")
    params = list(model.parameters())
    n = int(seconds * SR)
    gen = torch.Generator().manual_seed(0)
    waves = torch.randn(batch, n, generator=gen).to(device)
    labels = torch.randint(0, classes, (batch, num_frames(args, n)), generator=gen).to(device)
    lengths = torch.full((batch,), n, dtype=torch.long, device=device)
    step_module = impl.PretrainStep(model, cfg.feature_penalty_weight)
    if compile_:
        step_module.compile_blocks(dynamic=True)
    transformer = model.wav2vec2.encoder.transformer
    host, device_gen = torch.Generator().manual_seed(1), torch.Generator(device).manual_seed(1)
    use_bf16 = bf16  # autocast on the CPU too where asked (--precision bf16)

    def step(phase: Callable[[str], contextlib.AbstractContextManager] = _no_phase
             ) -> torch.Tensor:
        with phase("forward"):
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                if kind == "old":
                    loss, _ = hubert_loss(*model(waves, labels, lengths), cfg)
                else:
                    w, y = (waves, labels) if batches is None else next(batches)
                    mask = impl.span_mask(y.shape[0], y.shape[1], mask_prob=0.8, mask_length=10,
                                          host=host, device_gen=device_gen, device=device)
                    keep = impl.layer_keep(len(transformer.layers), transformer.layer_drop, host)
                    loss = step_module(w, y, mask, keep)[0]
        with phase("backward"):
            loss.backward()
        with phase("optimizer"):
            if kind == "new" and hasattr(impl, "clip_grad_norm"):
                impl.clip_grad_norm(params, cfg.grad_clip)  # the list, as pretraining.train
            else:  # foreach for the new step, as torch picks on CUDA
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip,
                                               foreach=True if kind == "new" else None)
            opt.step()
        return loss

    return step


def measure_many(preset: str, kinds: dict[str, dict], *, batch: int, seconds: float,
                 steps: int, device: torch.device, bf16: bool, count_flops: bool = False
                 ) -> dict[str, dict]:
    """ms/step and audio-s/s of each step kind (``name -> make_step options``), timed
    interleaved (one step of each kind per round, median over ``steps`` rounds, so load on a
    shared machine hits every kind alike), after 2 warm-up steps (compiling happens there)."""
    out: dict[str, dict] = {}
    steps_of = {}
    for name, options in kinds.items():
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        step = make_step(preset, batch=batch, seconds=seconds, device=device, bf16=bf16,
                         **options)
        tic = time.perf_counter()
        step()
        _sync(device)
        first = time.perf_counter() - tic
        step()
        flops = None
        if count_flops and not options.get("compile_"):
            with FlopCounterMode(display=False) as counter:
                step()
            flops = counter.get_total_flops()
        _sync(device)
        peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
        steps_of[name] = step
        out[name] = {"first_step_s": first, "flops": flops, "peak_bytes": peak, "times": []}
    for _ in range(steps):
        for name, step in steps_of.items():
            tic = time.perf_counter()
            step()
            _sync(device)
            out[name]["times"].append(time.perf_counter() - tic)
    for r in out.values():
        r["step_s"] = statistics.median(r["times"])
        r["audio_per_s"] = batch * seconds / r["step_s"]
    return out


def report(name: str, r: dict, peak_tflops: float | None) -> None:
    line = f"{name:<28} {r['audio_per_s']:9.1f} audio-s/s {r['step_s'] * 1e3:9.1f} ms/step"
    if r["flops"]:
        line += f" {r['flops'] / 1e12:7.3f} TFLOP/step"
        if peak_tflops:
            line += f"  MFU {r['flops'] / r['step_s'] / (peak_tflops * 1e12):6.1%}"
    print(line, flush=True)


def profile_steps(preset: str, *, batch: int, seconds: float, device: torch.device,
                  bf16: bool, rows: int, kinds: tuple[str, ...] = ("old", "new")) -> None:
    """torch.profiler tables (self time) of one step of each kind after a warm-up step."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                           else [])
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    for kind in kinds:
        step = make_step(preset, kind, batch=batch, seconds=seconds, device=device, bf16=bf16)
        step()
        with profile(activities=activities) as prof:
            step()
            _sync(device)
        print(f"\n--- torch.profiler, {kind} step, {preset} batch {batch} x {seconds} s ---")
        print(prof.key_averages().table(sort_by=sort, row_limit=rows))


def memory_fit(preset: str, seconds: float, device: torch.device, bf16: bool) -> None:
    """Peak memory of the new step at two batch sizes; per batch-second and the 80 GB batch."""
    points = []
    for batch in (2, 4):
        r = measure_many(preset, {"new": {"kind": "new"}}, batch=batch, seconds=seconds, steps=1,
                         device=device, bf16=bf16)["new"]
        points.append((batch * seconds, r["peak_bytes"]))
        torch.cuda.empty_cache()
    (s1, m1), (s2, m2) = points
    per_second = (m2 - m1) / (s2 - s1)
    fixed = m1 - per_second * s1
    largest = (0.95 * CARD_BYTES - fixed) / per_second
    print(f"peak CUDA memory (new step, {'bf16' if bf16 else 'fp32'}): "
          f"{m1 / 1e9:.2f} GB at {s1:.0f} batch-s, {m2 / 1e9:.2f} GB at {s2:.0f} batch-s; "
          f"{per_second / 1e9:.3f} GB per batch-second + {fixed / 1e9:.2f} GB; "
          f"largest batch on an 80 GB card ~ {largest:.0f} audio-s "
          f"({largest / seconds:.0f} x {seconds:g} s)")


def label_stage(preset: str, audio_seconds: float, device: torch.device, layer: int) -> None:
    """Seconds of ``compute_labels`` (layer features of a checkpoint + k-means) on random audio
    in 10 s utterances."""
    from pretraining.schedules import Iteration
    from pretraining.targets import compute_labels

    args = model_args(preset, 100)
    torch.manual_seed(0)
    n_utts = max(1, round(audio_seconds / 10))
    gen = torch.Generator().manual_seed(0)
    waves = [0.1 * torch.randn(10 * SR, generator=gen) for _ in range(n_utts)]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = save_checkpoint(Path(tmp) / "ckpt.pt", args, build_model(args).state_dict(), {})
        it = Iteration(2, 1, "layer", layer, 500 if preset == "base" else 50, 0.1)
        tic = time.perf_counter()
        labels = compute_labels([f"u{i}" for i in range(n_utts)], waves.__getitem__, it, args,
                                KMeansConfig(n_init=1), previous_ckpt=ckpt, seed=0,
                                device=device, log=lambda _: None)
        _sync(device)
        took = time.perf_counter() - tic
    print(f"label stage ({preset}, layer {layer}, {it.clusters} clusters, k-means on 10%): "
          f"{took:.1f} s for {n_utts * 10 / 3600:.2f} h of audio on {device} "
          f"({n_utts * 10 / took:.0f} audio-s/s); {len(labels.labels)} utterances labelled")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="base", choices=("base", "tiny"))
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each utterance")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak")
    parser.add_argument("--compile", choices=("auto", "yes", "no"), default="auto",
                        help="also time the compiled new step (auto: on CUDA only)")
    parser.add_argument("--skip-old", action="store_true", help="time the new step only")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                        help="auto: bf16 then fp32 on CUDA, fp32 on the CPU")
    parser.add_argument("--no-memory", action="store_true", help="skip the CUDA memory fit")
    parser.add_argument("--cudnn-benchmark", action="store_true",
                        help="torch.backends.cudnn.benchmark = True (autotuned convolutions)")
    parser.add_argument("--profile", action="store_true", help="torch.profiler tables instead")
    parser.add_argument("--rows", type=int, default=15)
    parser.add_argument("--label-stage", type=float, default=0.0, metavar="SECONDS",
                        help="time the label stage on this much audio instead")
    parser.add_argument("--layer", type=int, default=6)
    a = parser.parse_args()
    torch.set_num_threads(a.threads)
    torch.backends.cudnn.benchmark = a.cudnn_benchmark
    from layerprobe.models import resolve_device

    device = resolve_device(a.device)
    cuda = device.type == "cuda"
    where = torch.cuda.get_device_name(device) if cuda else f"CPU, {a.threads} threads"
    print(f"torch {torch.__version__}, {where}; {a.preset}, batch {a.batch} x {a.seconds:g} s"
          + ("; cudnn.benchmark" if a.cudnn_benchmark else ""))
    if a.label_stage:
        label_stage(a.preset, a.label_stage, device, a.layer)
        return
    if a.profile:
        profile_steps(a.preset, batch=a.batch, seconds=a.seconds, device=device, bf16=cuda,
                      rows=a.rows, kinds=("new",) if a.skip_old else ("old", "new"))
        return
    peak = a.peak_tflops if cuda else None
    precisions = {"auto": (True, False) if cuda else (False,), "bf16": (True,),
                  "fp32": (False,)}[a.precision]
    with_compile = a.compile == "yes" or (a.compile == "auto" and cuda)
    for bf16 in precisions:
        tag = "bf16" if bf16 else "fp32"
        kinds: dict[str, dict] = {"new": {"kind": "new"}}
        if not a.skip_old:
            kinds["old"] = {"kind": "old"}
        if with_compile:
            kinds["compiled"] = {"kind": "new", "compile_": True}
        try:
            res = measure_many(a.preset, kinds, batch=a.batch, seconds=a.seconds, steps=a.steps,
                               device=device, bf16=bf16, count_flops=True)
        except Exception as err:  # the compiled step; training would fall back to eager
            if not with_compile:
                raise
            print(f"compiled new step failed ({type(err).__name__}: {str(err)[:200]})")
            kinds.pop("compiled")
            res = measure_many(a.preset, kinds, batch=a.batch, seconds=a.seconds, steps=a.steps,
                               device=device, bf16=bf16, count_flops=True)
        new = res["new"]
        report(f"new step, eager, {tag}", new, peak)
        if "old" in res:
            report(f"old step (torchaudio), {tag}", res["old"], peak)
            print(f"ratio new / old throughput ({tag}): "
                  f"{new['audio_per_s'] / res['old']['audio_per_s']:.2f}")
        if "compiled" in res:
            comp = {**res["compiled"], "flops": new["flops"]}
            report(f"new step, compiled, {tag}", comp, peak)
            print(f"compile + first step: {comp['first_step_s']:.1f} s "
                  f"(eager first step {new['first_step_s']:.1f} s); ratio compiled / eager: "
                  f"{comp['audio_per_s'] / new['audio_per_s']:.2f}")
    if cuda and not a.no_memory:
        memory_fit(a.preset, a.seconds, device, bf16=True)
    else:
        print("no CUDA device: MFU, bf16, compiled (unless --compile yes) and memory not measured")


if __name__ == "__main__":
    main()
