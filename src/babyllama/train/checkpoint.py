"""The trainer's resume state: what besides the weights a run needs to continue exactly.

The optimizer, the loss scaler and the RNG states are packed here (an FSDP run's sharded
states too); where they are stored (and the weights with them, atomically) is the run
directory's business (`babyllama.run.Run`).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from babyllama.atomic import atomic_path
from babyllama.lora import is_adapter_model, save_adapter
from babyllama.model.weights import load_weights, save_weights  # noqa: F401  (see below)
from babyllama.run import TRAINER_STATE, WEIGHTS, Run
from babyllama.textfile import read_json
from babyllama.train.fsdp import DCP_DIR, full_state_dict, load_sharded, save_sharded, unsharded_copy

# Weight files moved to babyllama.model.weights (below train/, where the API and the exporters
# can use them); save_weights and load_weights stay importable from here for scripts written
# against earlier versions.


def save_resume(run_dir: Path, model, optimizer, scaler, trainer_state: dict) -> None:
    """Write the complete resume state of a training run into `run_dir` (see Run.save_resume)."""
    state = {
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},
        **rng_state(),
    }
    Run(run_dir).save_resume(model, state, trainer_state)


def load_resume(resume_dir: Path, model, optimizer, scaler) -> dict:
    """Restore weights, optimizer, scaler and RNG states; returns the trainer state (JSON)."""
    state, trainer_state = Run(resume_dir.parent).load_resume(model, resume_dir)
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    set_rng_state(state)
    return trainer_state


def rng_state() -> dict:
    return {"torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])


def save_sharded_resume(run_dir: Path, model, optimizer, trainer_state: dict, rank: int) -> None:
    """The resume state of an FSDP run (train/fsdp.py), written by every rank together: the
    sharded model and optimizer states (DCP), each rank's RNG states, and the whole weights (a
    LoRA run: its adapter) on rank 0 so the run reads as any other; trainer_state last, as for
    `save_resume`. A collective: every rank calls it at the same step."""
    run = Run(run_dir)
    tmp = run.resume_staging_dir
    if rank == 0:
        run.start_resume()
    dist.barrier()  # the staging directory exists before any rank writes into it
    save_sharded(tmp / DCP_DIR, model, optimizer)
    with atomic_path(tmp / f"rng-{rank}.pt") as p:
        torch.save(rng_state(), p)
    if is_adapter_model(model):  # a LoRA run's weights are its adapter's
        adapter = full_state_dict(model, trainable_only=True)
        if rank == 0:
            # peft names the wrapped model's tensors from the wrapper, two levels above our Llama.
            save_adapter(model, tmp, trainer_state.get("base"),
                         state_dict={f"base_model.model.{k}": v for k, v in adapter.items()})
    else:
        whole = unsharded_copy(model, torch.device("cpu"))
        if rank == 0:
            save_weights(whole, tmp / WEIGHTS)
    dist.barrier()  # every rank's files are written
    if rank == 0:
        run.finish_resume(tmp, trainer_state)


def load_sharded_resume(resume_dir: Path, model, optimizer, rank: int) -> dict:
    """Restore an FSDP run's sharded model and optimizer states and this rank's RNG states (a
    rank the state has none for, after a change of process count, keeps its own); returns the
    trainer state. Raises UserError for a state saved without FSDP."""
    load_sharded(resume_dir / DCP_DIR, model, optimizer)
    rng_file = resume_dir / f"rng-{rank}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=True))
    return read_json(resume_dir / TRAINER_STATE)
