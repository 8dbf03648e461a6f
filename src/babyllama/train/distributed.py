"""Process-group setup for `torchrun`: NCCL on GPUs, gloo on CPU.

Without torchrun's environment variables everything runs as a single process (rank 0 of 1)
with no process group. Under torchrun the group is set up even for one process, so
`torchrun --nproc_per_node 1` runs the same DDP/FSDP code that many GPUs run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from babyllama.device import pick_device
from babyllama.train.fsdp import check_launched


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launched: bool = False  # started by torchrun (a process group exists, maybe of one)

    @property
    def enabled(self) -> bool:
        """There is a process group: collectives, DDP/FSDP wrapping and barriers apply."""
        return self.launched or self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_main_process() -> bool:
    """Rank 0 of a torchrun job, or a single process: the one that prints a command's summary."""
    return int(os.environ.get("RANK", "0")) == 0


def init_distributed(device_name: str = "auto", strategy: str = "ddp") -> tuple[DistInfo, torch.device]:
    """This process's rank and device, with the process group set up under torchrun. Raises
    UserError at once for train.strategy=fsdp without torchrun (before any data is read)."""
    # torchrun sets these four; RANK/WORLD_SIZE alone may be a cluster's own variables.
    launched = all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))
    info = DistInfo(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                    int(os.environ.get("LOCAL_RANK", 0)), launched)
    check_launched(strategy, launched)
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


def broadcast_float(value: float, info: DistInfo, device: torch.device) -> float:
    """Rank 0's `value` on every rank (a single process returns it unchanged)."""
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64 if device.type != "mps" else torch.float32, device=device)
    dist.broadcast(t, src=0)
    return float(t.item())


def cleanup(info: DistInfo) -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
