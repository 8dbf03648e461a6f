"""Which torch device a command runs on: the one place a device name is read and checked."""

from __future__ import annotations

import torch

from babyllama.errors import UserError

DEVICE_NAMES = "auto, cpu, cuda, cuda:N, mps"


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """The device `name` names ("auto": CUDA (GPU `local_rank`, as torchrun numbers them), then
    Apple's MPS, then CPU).

    Raises UserError (one line) for a name torch does not know, or a device this machine or
    this torch build lacks, rather than failing later inside torch."""
    if name != "auto":
        return checked_device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    if mps_available():
        return torch.device("mps")
    return torch.device("cpu")


def mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def checked_device(name: str) -> torch.device:
    """`torch.device(name)` after checking this machine has it (see `pick_device`)."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise UserError(f"device {name!r} is not a device name ({DEVICE_NAMES})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is a CPU build" if torch.version.cuda is None else "no GPU is visible"
            raise UserError(f"device {name!r}: CUDA is not available ({why}); use auto or cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"device {name!r}: there are {torch.cuda.device_count()} GPU(s)")
    elif device.type == "mps":
        if not mps_available():
            raise UserError(f"device {name!r}: Apple's MPS is not available here; use auto or cpu")
    elif device.type != "cpu":
        raise UserError(f"device {name!r}: not supported ({DEVICE_NAMES})")
    return device
