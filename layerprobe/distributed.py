"""Process groups for ``torchrun``, shared by scoring and pretraining.

Under ``torchrun`` :func:`init_distributed` joins the process group (nccl on CUDA, gloo on the
CPU) and gives each rank its own GPU (``cuda:LOCAL_RANK``); it does so with one process too
(``--nproc_per_node 1``), so a one-GPU launch runs DDP and NCCL as a many-GPU one does. Outside
``torchrun`` the process is rank 0 of 1 and nothing is started.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from layerprobe.models import resolve_device as layerprobe_device

__all__ = ["Dist", "destroy_distributed", "init_distributed", "resolve_device"]


@dataclass(frozen=True)
class Dist:
    """Process-group facts (rank 0 of 1 when not under ``torchrun``)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launched: bool = False  # under torchrun: the process group is joined even with one rank

    @property
    def enabled(self) -> bool:
        return self.world_size > 1 or self.launched

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (``[obj]`` in a single process)."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def gather_object(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` in rank order on rank 0; None on the other ranks."""
        if not self.enabled:
            return [obj]
        out: list[Any] | None = [None] * self.world_size if self.main else None
        dist.gather_object(obj, out, dst=0)
        return out


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """layerprobe's device rule; a bare ``cuda`` (or ``auto`` on a GPU) is this rank's GPU."""
    resolved = layerprobe_device(device)
    if resolved.type == "cuda" and resolved.index is None:
        resolved = torch.device("cuda", local_rank)
    return resolved


def init_distributed(device: str) -> tuple[Dist, torch.device]:
    """Join the process group under ``torchrun`` (``TORCHELASTIC_RUN_ID`` set, any number of
    ranks) or when ``WORLD_SIZE`` > 1: nccl on CUDA, else gloo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    launched = "TORCHELASTIC_RUN_ID" in os.environ
    dev = resolve_device(device, local)
    if (world > 1 or launched) and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank=rank, world_size=world, local_rank=local, launched=launched), dev


def destroy_distributed(dist_info: Dist) -> None:
    """Leave the process group (a gloo rank can abort at interpreter exit otherwise)."""
    if dist_info.enabled and dist.is_initialized():
        dist.destroy_process_group()
