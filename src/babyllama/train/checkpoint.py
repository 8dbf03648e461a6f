"""The trainer's resume state: what besides the weights a run needs to continue exactly.

The optimizer, the loss scaler and the RNG states are packed here; where they are stored (and
the weights with them, atomically) is the run directory's business (`babyllama.run.Run`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from babyllama.model.weights import load_weights, save_weights  # noqa: F401  (see below)
from babyllama.run import Run

# Weight files moved to babyllama.model.weights (below train/, where the API and the exporters
# can use them); save_weights and load_weights stay importable from here for scripts written
# against earlier versions.


def save_resume(run_dir: Path, model, optimizer, scaler, trainer_state: dict) -> None:
    """Write the complete resume state of a training run into `run_dir` (see Run.save_resume)."""
    state = {
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    Run(run_dir).save_resume(model, state, trainer_state)


def load_resume(resume_dir: Path, model, optimizer, scaler) -> dict:
    """Restore weights, optimizer, scaler and RNG states; returns the trainer state (JSON)."""
    state, trainer_state = Run(resume_dir.parent).load_resume(model, resume_dir)
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return trainer_state
