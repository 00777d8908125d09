"""Faults a long training run survives: non-finite losses or gradients, and out-of-memory batches.

* **Non-finite step** (NaN/inf loss or gradient norm, bf16 or fp32): the update is skipped on
  the device (fused AdamW's ``found_inf``: parameters and optimizer state untouched, no host
  sync), the step is counted, and the stats of the window leave it out. At each log step (the
  loop's one host sync) a new burst of bad steps is warned about once; ``max_bad_steps`` bad steps
  in a row stop the run with a :class:`TrainingStopped` naming the iteration, the steps, the last
  saved state and what to try.
* **Out of memory** (``torch.cuda.OutOfMemoryError`` in a forward or backward): as fairseq does,
  the step's gradients and the allocator's cache are freed and the batch is skipped (the step is
  redone on the next batch), counted and warned about; ``max_oom_batches`` in a row stop the run.
  Under DDP the other ranks would wait for the skipped step's gradients, so there an OOM stops
  the run at once.

Kills in any phase (the label stage, training, a checkpoint write, profiling) are covered by
atomic writes and phase marker files (:mod:`pretraining.run`), tested at the fault points of
:mod:`layerprobe.fault_points`.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from layerprobe.distributed import Dist


class TrainingStopped(RuntimeError):
    """The run cannot go on (the message says why, where, and what to try)."""


class StepGuard:
    """Skips bad steps of one iteration's loop and stops the run when they persist."""

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device, *, iteration: int,
                 state_path: Path, max_bad_steps: int, max_oom_batches: int,
                 dist_info: Dist = Dist()):
        self.optimizer, self.device, self.dist_info = optimizer, device, dist_info
        self.iteration, self.state_path = iteration, state_path
        self.max_bad_steps, self.max_oom_batches = max_bad_steps, max_oom_batches
        self.found_inf = torch.zeros((), device=device)
        optimizer.found_inf = self.found_inf  # read by the fused AdamW step: 1 skips the update
        self.window_bad = torch.zeros((), dtype=torch.int64, device=device)
        self.in_a_row = torch.zeros((), dtype=torch.int64, device=device)
        self.bad_total = 0
        self.in_burst = False
        self.oom_in_a_row = 0
        self.oom_total = 0
        self.saved_step: int | None = None  # the last step whose resume state was written

    def check(self, grad_norm: torch.Tensor, step_sums: torch.Tensor) -> torch.Tensor:
        """Whether this step's loss and gradients are finite (a device bool); a bad step's
        update will be skipped by the optimizer. Every rank decides the same (DDP: their
        gradients are all-reduced; the losses are reduced here)."""
        ok = torch.isfinite(grad_norm) & torch.isfinite(step_sums).all()
        if self.dist_info.enabled:
            import torch.distributed as dist

            flag = ok.to(torch.float32)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            ok = flag > 0
        self.found_inf.copy_((~ok).to(self.found_inf.dtype))
        self.window_bad.add_((~ok).to(torch.int64))
        self.in_a_row.add_(1).mul_(~ok)
        return ok

    def review(self, step: int) -> dict[str, int]:
        """At a log step (host sync): warn about a new burst of bad steps, stop after
        ``max_bad_steps`` in a row; returns the counts for the logged stats."""
        bad, in_a_row = int(self.window_bad), int(self.in_a_row)
        self.window_bad.zero_()
        self.bad_total += bad
        if bad and not self.in_burst:
            warnings.warn(f"iteration {self.iteration}: {bad} step(s) up to step {step} had a "
                          "non-finite loss or gradient; their updates were skipped",
                          RuntimeWarning, stacklevel=2)
        self.in_burst = in_a_row > 0
        if in_a_row >= self.max_bad_steps:
            raise TrainingStopped(
                f"iteration {self.iteration}, steps {step - in_a_row + 1}-{step}: {in_a_row} "
                f"steps in a row had a non-finite loss or gradient (updates skipped); "
                f"{self._last_good()}; lower [train] lr or raise [train] warmup_fraction in the "
                "config, then run the same command with --resume")
        return {"bad_steps": bad, "bad_steps_total": self.bad_total,
                "oom_batches_total": self.oom_total}

    def out_of_memory(self, step: int, err: BaseException, batch_seconds: float) -> None:
        """An out-of-memory batch at ``step``: free, count, warn; stop when they persist (or at
        once under DDP)."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.oom_in_a_row += 1
        self.oom_total += 1
        advice = (f"lower [train] batch_seconds (now {batch_seconds:g}) and raise grad_accum to "
                  "keep the batch, then run the same command with --resume")
        if self.dist_info.enabled:
            raise TrainingStopped(f"iteration {self.iteration}, step {step + 1}: out of memory on "
                                  f"rank {self.dist_info.rank} ({err}); under DDP the step "
                                  f"cannot be skipped on one rank alone; {self._last_good()}; "
                                  f"{advice}")
        if self.oom_in_a_row >= self.max_oom_batches:
            raise TrainingStopped(f"iteration {self.iteration}, step {step + 1}: out of memory on "
                                  f"{self.oom_in_a_row} batches in a row ({err}); "
                                  f"{self._last_good()}; {advice}")
        warnings.warn(f"iteration {self.iteration}, step {step + 1}: out of memory; batch "
                      f"skipped ({self.oom_total} so far)", RuntimeWarning, stacklevel=2)

    def step_done(self) -> None:
        """A step went through (whatever its values): the OOM streak ends."""
        self.oom_in_a_row = 0

    def _last_good(self) -> str:
        if self.saved_step is None:
            return (f"no state of iteration {self.iteration} was saved yet (--resume restarts "
                    "it)")
        return (f"the last saved state is {self.state_path} at step {self.saved_step} "
                "(parameters are never updated by a skipped step)")

    def summary(self) -> dict[str, Any]:
        return {"bad_steps_total": self.bad_total, "oom_batches_total": self.oom_total}
