"""Process-group setup for `torchrun`: NCCL on GPUs, gloo on CPU.

Without torchrun's environment variables everything runs as a single process (rank 0 of 1).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from babyllama.errors import UserError


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """The device `name` names ("auto": CUDA, then MPS, then CPU).

    Raises UserError (one line) for a name torch does not know, or a device this machine or
    this torch build lacks, rather than failing later inside torch."""
    if name != "auto":
        return _check_device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    if _mps_available():
        return torch.device("mps")
    return torch.device("cpu")


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def _check_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise UserError(f"device {name!r} is not a device name (auto, cpu, cuda, cuda:N, mps)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is a CPU build" if torch.version.cuda is None else "no GPU is visible"
            raise UserError(f"device {name!r}: CUDA is not available ({why}); use auto or cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"device {name!r}: there are {torch.cuda.device_count()} GPU(s)")
    elif device.type == "mps":
        if not _mps_available():
            raise UserError(f"device {name!r}: Apple's MPS is not available here; use auto or cpu")
    elif device.type != "cpu":
        raise UserError(f"device {name!r}: not supported (auto, cpu, cuda, cuda:N, mps)")
    return device


def init_distributed(device_name: str = "auto") -> tuple[DistInfo, torch.device]:
    info = DistInfo(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                    int(os.environ.get("LOCAL_RANK", 0)))
    device = pick_device(device_name, info.local_rank)
    if info.enabled and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
    return info, device


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
