"""The training loop of one iteration: fused AdamW, warmup + linear decay, clipping,
accumulation, bf16 autocast on CUDA, DDP under ``torchrun``, atomic resume states.

The step is :class:`pretraining.model.PretrainStep` on unpadded batches (see
:mod:`pretraining.data`) prepared by a background thread (pinned memory on CUDA). Span masks are
drawn on the step's device and layer drop on the host, from generators seeded by (seed,
iteration, step, micro-batch, rank), so a resumed run draws the same ones. Loss, accuracy and
gradient norm stay on the device and are read (a host sync) only at log steps. With
``[train] compile`` the conv stack and each block are compiled (``dynamic=True``); an error of a
compiled step (compiling or running) redoes that step in eager mode and keeps eager for the rest
of the iteration, with a warning. (Under DDP a failure inside the backward pass may leave the
gradient reducer mid-way; the fallback is tested single-process.)

Loss (fairseq HuBERT criterion): mean cross-entropy over masked frames
+ ``feature_penalty_weight`` × mean squared conv feature. :func:`hubert_loss` is the same loss on
torchaudio's ``HuBERTPretrainModel`` outputs (kept as the reference the fast step is tested and
benchmarked against): its logits put the target class in column 0, so the target is 0 there.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from layerprobe.atomic import atomic_torch_save
from layerprobe.distributed import Dist
from layerprobe.fault_points import fault_point
from pretraining.config import TrainConfig
from pretraining.data import Batch, BatchStream, Prefetcher
from pretraining.faults import StepGuard
from pretraining.model import PretrainStep, clip_grad_norm, layer_keep, span_mask

STATE_FORMAT = "pretraining-state-v1"


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warmup over ``warmup`` steps to 1, then linear decay to 0 at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def hubert_loss(logit_m: torch.Tensor, logit_u: torch.Tensor | None, feature_pen: torch.Tensor,
                config: TrainConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """(loss, stats) from ``HuBERTPretrainModel``'s outputs."""
    if logit_m.dim() != 2 or logit_m.shape[0] == 0:
        raise ValueError("masked logits must be [n_masked > 0, classes + 1], got "
                         f"{tuple(logit_m.shape)}")
    target = torch.zeros(logit_m.shape[0], dtype=torch.long, device=logit_m.device)
    ce_m = F.cross_entropy(logit_m.float(), target)
    loss = ce_m + config.feature_penalty_weight * feature_pen.float()
    if config.unmasked_weight > 0 and logit_u is not None and logit_u.shape[0] > 0:
        target_u = torch.zeros(logit_u.shape[0], dtype=torch.long, device=logit_u.device)
        loss = loss + config.unmasked_weight * F.cross_entropy(logit_u.float(), target_u)
    with torch.no_grad():
        acc = (logit_m.argmax(dim=-1) == 0).float().mean()
    return loss, {"loss": float(loss.detach()), "ce_masked": float(ce_m.detach()),
                  "acc_masked": float(acc), "feature_pen": float(feature_pen.detach())}


def make_optimizer(model: torch.nn.Module, config: TrainConfig, total_steps: int, *,
                   fused: bool = True
                   ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW and the warmup + linear decay schedule.

    ``fused``: one fused kernel for all parameters (CUDA and CPU). On the CPU with the Base preset
    torch's default per-parameter AdamW took 8.4 s of a 33 s step (torch.profiler: mul_, add_,
    sqrt, addcdiv_ over 198 tensors), the fused one 0.8 s.
    """
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=config.betas, eps=config.eps,
                            weight_decay=config.weight_decay, fused=fused)
    warmup = int(config.warmup_fraction * total_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total_steps, warmup))
    return opt, sched


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def step_seed(seed: int, iteration: int, step: int, micro: int, rank: int) -> int:
    """Seed of the mask and layer-drop draws of one micro-batch."""
    return (((seed * 1_000_003 + iteration) * 1_000_003 + step) * 257 + micro) * 4099 + rank \
        & (2**63 - 1)


class StepRandom:
    """The host and device generators of each micro-batch, re-seeded by :func:`step_seed`."""

    def __init__(self, seed: int, iteration: int, rank: int, device: torch.device):
        self.seed, self.iteration, self.rank = seed, iteration, rank
        self.host = torch.Generator()
        self.device = torch.Generator(device=device)

    def at(self, step: int, micro: int) -> tuple[torch.Generator, torch.Generator]:
        s = step_seed(self.seed, self.iteration, step, micro, self.rank)
        return self.host.manual_seed(s), self.device.manual_seed(s)


def check_mask_settings(model: torch.nn.Module) -> tuple[float, int]:
    """(mask_prob, mask_length) of a model whose masking the fast step reproduces."""
    gen = model.mask_generator
    if gen.mask_selection != "static" or gen.no_mask_overlap or gen.mask_channel_prob > 0:
        raise ValueError("the training step implements HuBERT's static, overlapping span masks "
                         "without channel masking; got mask_selection="
                         f"{gen.mask_selection!r}, no_mask_overlap={gen.no_mask_overlap}, "
                         f"mask_channel_prob={gen.mask_channel_prob}")
    return float(gen.mask_prob), int(gen.mask_length)


def train_iteration(model: torch.nn.Module, stream: BatchStream, *, iteration: int, steps: int,
                    config: TrainConfig, device: torch.device, state_path: Path,
                    resume: dict[str, Any] | None = None, dist_info: Dist = Dist(),
                    extra_state: dict[str, Any] | None = None, stop_at_step: int | None = None,
                    snapshot_every: int = 0,
                    on_snapshot: Callable[[int, dict[str, Any]], None] | None = None,
                    log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train ``model`` for ``steps`` optimizer steps; returns the last logged stats.

    A resume state is written to ``state_path`` every ``save_every`` steps and after the last
    step. ``resume`` (a state of the same iteration) restores model, optimizer, scheduler, RNG
    and data position. ``stop_at_step`` returns early after that step's state is saved (used to
    test kill-and-resume). ``extra_state`` is stored verbatim in every state.
    ``on_snapshot(step, last_stats)`` is called on the main rank after every ``snapshot_every``-th
    step before the last (e.g. to save a checkpoint for a learning curve); it changes nothing
    in the training.
    """
    model.to(device).train()
    mask_prob, mask_length = check_mask_settings(model)
    opt, sched = make_optimizer(model, config, steps)
    params = list(model.parameters())  # walking the module tree costs ~1 ms a step
    step = 0
    if resume is not None:
        if resume["iteration"] != iteration:
            raise ValueError(f"{state_path}: state of iteration {resume['iteration']}, "
                             f"resuming iteration {iteration}")
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        # the config's lr and warmup, which a resume may change (e.g. after a divergence)
        sched.base_lrs = [config.lr] * len(opt.param_groups)
        for group in opt.param_groups:
            group["initial_lr"] = config.lr
            group["lr"] = config.lr * sched.lr_lambdas[0](sched.last_epoch)
        step = int(resume["step"])
        stream.epoch, stream.position = resume["data"][dist_info.rank]["epoch"], \
            resume["data"][dist_info.rank]["position"]
        stream._batches = None
        set_rng_state(resume["rng"][dist_info.rank])
    step_module = PretrainStep(model, config.feature_penalty_weight)
    if config.compile:
        step_module.compile_blocks(dynamic=True)
    transformer = model.wav2vec2.encoder.transformer
    net: torch.nn.Module = step_module
    if dist_info.enabled:
        # gradient_as_bucket_view: the gradients are views into DDP's buckets, so the reduced
        # buckets need no copy back into ~200 gradients (one dispatch each) per step; the values
        # are the same (benchmarks/loop_overhead.py)
        net = DistributedDataParallel(
            step_module, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=transformer.layer_drop > 0, gradient_as_bucket_view=True)
    use_bf16 = config.bf16 and device.type == "cuda"
    randoms = StepRandom(config.seed, iteration, dist_info.rank, device)
    data_state = stream.state()
    batches = Prefetcher(stream, device)
    bar = tqdm(total=steps, initial=step, desc=f"iteration {iteration}", disable=not dist_info.main,
               dynamic_ncols=True, leave=True)
    stats: dict[str, Any] = {}
    sums = torch.zeros(4, device=device)  # loss, ce_masked, acc_masked, feature_pen
    window_audio, window_start, skipped = 0.0, time.perf_counter(), 0

    def micro_steps(micro_batches: list[Batch]) -> torch.Tensor:
        out = torch.zeros(4, device=device)
        for micro, batch in enumerate(micro_batches):
            host, device_gen = randoms.at(step, micro)
            b, t = batch.labels.shape
            mask = span_mask(b, t, mask_prob=mask_prob, mask_length=mask_length, host=host,
                             device_gen=device_gen, device=device)
            keep = layer_keep(len(transformer.layers), transformer.layer_drop, host)
            sync = micro == len(micro_batches) - 1 or not dist_info.enabled
            with contextlib.nullcontext() if sync else net.no_sync():
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                    loss, ce, acc, pen = net(batch.waveforms, batch.labels, mask, keep)
                (loss / len(micro_batches)).backward()
            out += torch.stack([loss.detach().float(), ce.float(), acc.float(), pen.float()])
        return out

    guard = StepGuard(opt, device, iteration=iteration, state_path=state_path,
                      max_bad_steps=config.max_bad_steps, max_oom_batches=config.max_oom_batches,
                      dist_info=dist_info)
    if resume is not None:
        guard.saved_step = step
    good_micro = torch.zeros((), device=device)  # micro-batches of finite steps in the window

    def forward_backward(micro_batches: list[Batch]) -> torch.Tensor:
        """The step's forward and backward passes (eager again if the compiled ones fail)."""
        if not step_module.compiled:
            return micro_steps(micro_batches)
        try:
            return micro_steps(micro_batches)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as err:  # any compile/runtime error of the compiled path
            warnings.warn(f"torch.compile failed ({type(err).__name__}: "
                          f"{str(err)[:300]}); training in eager mode", stacklevel=2)
            step_module.use_eager()
            opt.zero_grad(set_to_none=True)
            return micro_steps(micro_batches)

    try:
        while step < steps:
            opt.zero_grad(set_to_none=True)
            micro_batches = [next(batches) for _ in range(config.grad_accum)]
            fault_point("train-step")
            try:
                step_sums = forward_backward(micro_batches)
            except torch.cuda.OutOfMemoryError as err:
                guard.out_of_memory(step, err, config.batch_seconds)
                del micro_batches
                continue
            guard.step_done()
            for batch in micro_batches:
                window_audio += batch.seconds * dist_info.world_size
                skipped += len(batch.skipped)
            data_state = micro_batches[-1].state_after
            grad_norm = clip_grad_norm(params, config.grad_clip)
            ok = guard.check(grad_norm, step_sums)  # a bad step's update is skipped
            sums += torch.where(ok, step_sums, torch.zeros_like(step_sums))
            good_micro += ok.to(good_micro.dtype) * len(micro_batches)
            opt.step()
            sched.step()
            step += 1
            bar.update(1)
            if step % config.log_every == 0 or step == steps:
                good = float(good_micro)  # the host sync of the log step
                means = (sums / max(good, 1.0)).tolist() if good else [math.nan] * 4
                elapsed = time.perf_counter() - window_start
                stats = dict(zip(("loss", "ce_masked", "acc_masked", "feature_pen"), means,
                                 strict=True))
                stats.update(step=step, lr=sched.get_last_lr()[0], grad_norm=float(grad_norm),
                             audio_per_s=window_audio / max(elapsed, 1e-9),
                             skipped_utterances=skipped, **guard.review(step))
                bar.set_postfix(loss=f"{stats['loss']:.3f}", acc=f"{stats['acc_masked']:.3f}",
                                audio_s_per_s=f"{stats['audio_per_s']:.1f}")
                if dist_info.main:
                    write = tqdm.write if log is print else log
                    write(f"it{iteration} step {step}/{steps} loss {stats['loss']:.4f} "
                          f"acc_masked {stats['acc_masked']:.3f} lr {stats['lr']:.2e} "
                          f"audio {stats['audio_per_s']:.1f} s/s"
                          + (f" skipped {stats['bad_steps']} non-finite step(s)"
                             if stats["bad_steps"] else ""))
                sums.zero_()
                good_micro.zero_()
                window_audio, window_start = 0.0, time.perf_counter()
            if step % config.save_every == 0 or step in (steps, stop_at_step):
                rngs = dist_info.all_gather_object(rng_state())
                positions = dist_info.all_gather_object(dict(data_state))
                if dist_info.main:
                    atomic_torch_save({"format": STATE_FORMAT, "iteration": iteration,
                                       "step": step, "model": model.state_dict(),
                                       "optimizer": opt.state_dict(),
                                       "scheduler": sched.state_dict(), "rng": rngs,
                                       "data": positions, **(extra_state or {})}, state_path)
                guard.saved_step = step
                dist_info.barrier()
            if snapshot_every and step % snapshot_every == 0 and step < steps and dist_info.main \
                    and on_snapshot is not None:
                on_snapshot(step, stats)
            if stop_at_step is not None and step >= stop_at_step:
                break
    finally:
        batches.close()
        bar.close()
    return stats
