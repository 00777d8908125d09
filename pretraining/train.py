"""The training loop of one iteration: AdamW, warmup + linear decay, clipping, accumulation,
bf16 autocast on CUDA, DDP under ``torchrun``, atomic resume states.

Loss (fairseq HuBERT criterion): mean cross-entropy over masked frames
+ ``unmasked_weight`` × mean cross-entropy over unmasked frames (0 by default, not computed then)
+ ``feature_penalty_weight`` × mean squared conv feature. torchaudio's logits put the target class
in column 0, so the cross-entropy target is 0 and masked accuracy is ``argmax == 0``.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from layerprobe.atomic import atomic_torch_save
from layerprobe.distributed import Dist
from pretraining.config import TrainConfig
from pretraining.data import Batch, BatchStream

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


def make_optimizer(model: torch.nn.Module, config: TrainConfig, total_steps: int
                   ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=config.betas, eps=config.eps,
                            weight_decay=config.weight_decay)
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


def _gather(obj: Any, dist_info: Dist) -> list[Any]:
    if not dist_info.enabled:
        return [obj]
    out: list[Any] = [None] * dist_info.world_size
    dist.all_gather_object(out, obj)
    return out


def train_iteration(model: torch.nn.Module, stream: BatchStream, *, iteration: int, steps: int,
                    config: TrainConfig, device: torch.device, state_path: Path,
                    resume: dict[str, Any] | None = None, dist_info: Dist = Dist(),
                    extra_state: dict[str, Any] | None = None, stop_at_step: int | None = None,
                    log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train ``model`` for ``steps`` optimizer steps; returns the last logged stats.

    A resume state is written to ``state_path`` every ``save_every`` steps and after the last
    step. ``resume`` (a state of the same iteration) restores model, optimizer, scheduler, RNG
    and data position. ``stop_at_step`` returns early after that step's state is saved (used to
    test kill-and-resume). ``extra_state`` is stored verbatim in every state.
    """
    model.to(device).train()
    opt, sched = make_optimizer(model, config, steps)
    step = 0
    if resume is not None:
        if resume["iteration"] != iteration:
            raise ValueError(f"{state_path}: state of iteration {resume['iteration']}, "
                             f"resuming iteration {iteration}")
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        step = int(resume["step"])
        stream.epoch, stream.position = resume["data"][dist_info.rank]["epoch"], \
            resume["data"][dist_info.rank]["position"]
        stream._batches = None
        set_rng_state(resume["rng"][dist_info.rank])
    net: torch.nn.Module = model
    if dist_info.enabled:
        net = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=model.wav2vec2.encoder.transformer.layer_drop > 0)
    use_bf16 = config.bf16 and device.type == "cuda"
    bar = tqdm(total=steps, initial=step, desc=f"iteration {iteration}", disable=not dist_info.main,
               dynamic_ncols=True, leave=True)
    stats: dict[str, Any] = {}
    window_audio, window_start = 0.0, time.perf_counter()
    while step < steps:
        opt.zero_grad(set_to_none=True)
        micro_stats = []
        for micro in range(config.grad_accum):
            batch: Batch = next(stream)
            sync = micro == config.grad_accum - 1 or not dist_info.enabled
            ctx = contextlib.nullcontext() if sync else net.no_sync()
            with ctx:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                    logit_m, logit_u, pen = net(batch.waveforms.to(device),
                                                batch.labels.to(device),
                                                batch.lengths.to(device))
                loss, s = hubert_loss(logit_m, logit_u, pen, config)
                (loss / config.grad_accum).backward()
            micro_stats.append(s)
            window_audio += batch.seconds * dist_info.world_size
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        opt.step()
        sched.step()
        step += 1
        bar.update(1)
        if step % config.log_every == 0 or step == steps:
            elapsed = time.perf_counter() - window_start
            stats = {k: sum(m[k] for m in micro_stats) / len(micro_stats) for k in micro_stats[0]}
            stats.update(step=step, lr=sched.get_last_lr()[0], grad_norm=float(grad_norm),
                         audio_per_s=window_audio / max(elapsed, 1e-9))
            if not math.isfinite(stats["loss"]):
                raise FloatingPointError(f"iteration {iteration} step {step}: "
                                         f"loss is {stats['loss']}")
            bar.set_postfix(loss=f"{stats['loss']:.3f}", acc=f"{stats['acc_masked']:.3f}",
                            audio_s_per_s=f"{stats['audio_per_s']:.1f}")
            if dist_info.main:
                write = tqdm.write if log is print else log
                write(f"it{iteration} step {step}/{steps} loss {stats['loss']:.4f} "
                      f"acc_masked {stats['acc_masked']:.3f} lr {stats['lr']:.2e} "
                      f"audio {stats['audio_per_s']:.1f} s/s")
            window_audio, window_start = 0.0, time.perf_counter()
        if step % config.save_every == 0 or step in (steps, stop_at_step):
            rngs = _gather(rng_state(), dist_info)
            positions = _gather(stream.state(), dist_info)
            if dist_info.main:
                atomic_torch_save({"format": STATE_FORMAT, "iteration": iteration, "step": step,
                                   "model": model.state_dict(), "optimizer": opt.state_dict(),
                                   "scheduler": sched.state_dict(), "rng": rngs,
                                   "data": positions, **(extra_state or {})}, state_path)
            dist_info.barrier()
        if stop_at_step is not None and step >= stop_at_step:
            break
    bar.close()
    return stats
