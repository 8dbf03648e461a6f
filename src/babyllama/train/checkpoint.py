"""Weights and resume state on disk.

Weights are safetensors (no code runs when they load). The resume state adds the optimizer,
the loss scaler and the RNG states, stored with `torch.save` and read back with
`torch.load(weights_only=True)`, which only accepts tensors and plain containers: nothing is
ever loaded by unpickling arbitrary objects.

`resume/` is replaced atomically: the new state is written to `resume.tmp/`, then the old
directory is moved aside and the new one renamed into place. A run killed at any instant
leaves either the old or the new complete state (`find_resume_dir` handles the moment between
the two renames).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from babyllama.atomic import atomic_path, atomic_write_text
from babyllama.errors import UserError
from babyllama.textfile import read_json


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict to save: transformers' keys; a tied LM head is not stored twice."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    return state


def save_weights(model: torch.nn.Module, path: Path) -> None:
    state = {k: v.cpu() for k, v in model_state(model).items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})


def load_weights(model: torch.nn.Module, path: Path) -> None:
    try:
        state = load_file(str(path))
    except FileNotFoundError:
        raise UserError(f"{path}: no such weights file") from None
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise UserError(f"{path}: not a readable safetensors file ({e})") from None
    load_state(model, state, path)


def load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source) -> None:
    """Load `state` into `model` after checking it has exactly the model's keys and shapes
    (a tied LM head may be absent); a mismatch is one line naming `source`."""
    current = model.state_dict()
    expected = set(current)
    if getattr(model.config, "tie_word_embeddings", False):
        expected.discard("lm_head.weight")
        state.pop("lm_head.weight", None)
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise UserError(f"{source}: weights do not match the model config "
                        f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    for k, v in state.items():
        want = current[k].shape
        if v.shape != want:
            raise UserError(f"{source}: {k} has shape {tuple(v.shape)}, the config needs {tuple(want)}")
    model.load_state_dict(state, strict=False)


def is_adapter_model(model) -> bool:
    """A peft-wrapped model: its checkpoints hold the adapter only (the base never changes)."""
    return hasattr(model, "peft_config")


def save_resume(run_dir: Path, model, optimizer, scaler, trainer_state: dict) -> None:
    run_dir = Path(run_dir)
    tmp, final, old = run_dir / "resume.tmp", run_dir / "resume", run_dir / "resume.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if is_adapter_model(model):
        from babyllama.lora import save_adapter

        save_adapter(model, tmp, trainer_state.get("base"))
    else:
        save_weights(model, tmp / "model.safetensors")
    extra = {
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    with atomic_path(tmp / "optimizer.pt") as p:
        torch.save(extra, p)
    # trainer.json is written last: its presence marks the directory as complete.
    atomic_write_text(tmp / "trainer.json", json.dumps(trainer_state, indent=1))
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


WEIGHT_FILES = ("model.safetensors", "adapter_config.json", "adapter_model.safetensors")


def publish_weights(run_dir: Path) -> None:
    """Make the latest resume weights (`model.safetensors`, or a LoRA run's adapter files) the
    run's own without serialising them a second time: a hard link (safe because files here are
    only ever replaced, never modified in place), or a copy where there are no hard links."""
    run_dir = Path(run_dir)
    for name in WEIGHT_FILES:
        source = run_dir / "resume" / name
        if not source.exists():
            continue
        with atomic_path(run_dir / name) as tmp:
            tmp.unlink()
            try:
                os.link(source, tmp)
            except OSError:
                shutil.copyfile(source, tmp)


def find_resume_dir(run_dir: Path) -> Path | None:
    for name in ("resume", "resume.old"):
        d = Path(run_dir) / name
        if (d / "trainer.json").exists():
            return d
    return None


def load_resume(resume_dir: Path, model, optimizer, scaler) -> dict:
    if is_adapter_model(model):
        from peft import set_peft_model_state_dict

        weights = resume_dir / "adapter_model.safetensors"
        if not weights.exists():
            raise UserError(f"{resume_dir}: holds no adapter; this run was not started with LoRA")
        set_peft_model_state_dict(model, load_file(str(weights)))
    else:
        load_weights(model, resume_dir / "model.safetensors")
    extra = torch.load(resume_dir / "optimizer.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(extra["optimizer"])
    if scaler is not None and extra["scaler"]:
        scaler.load_state_dict(extra["scaler"])
    torch.set_rng_state(extra["torch_rng"])
    if extra["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(extra["cuda_rng"])
    return read_json(resume_dir / "trainer.json")
