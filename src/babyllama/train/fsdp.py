"""Fully sharded data parallel training (`train.strategy=fsdp`): FSDP2 and distributed checkpoints.

FSDP2 (`torch.distributed.fsdp.fully_shard`, Zhao et al. 2023 "PyTorch FSDP"; the per-parameter
DTensor rewrite in torch >= 2.4) keeps each process's 1/world_size share of every weight,
gradient and optimizer state, and all-gathers a layer's weights just before its forward and
backward. DDP instead holds a whole copy per process: FSDP is what lets a model whose Adam states
do not fit on one GPU train at all.

Each decoder layer is its own FSDP unit (one all-gather per layer, overlapped with the previous
layer's compute); the embeddings, final norm and LM head form the root unit. The training loop
is the trainer's own: only the wrapping, the gradient-sync switch for accumulation, the
checkpoints and getting a whole copy of the weights differ, and they live here.

Checkpoints are `torch.distributed.checkpoint` (DCP) directories: every process writes its own
shards in parallel, and a resume on the same or another number of processes reads them back
(DCP reshards on load). The run's `model.safetensors` is written beside them from the gathered
weights at every checkpoint, so every other command reads an FSDP run as any other;
`consolidate` turns a DCP directory into plain weights offline.
"""

from __future__ import annotations

import warnings
from copy import deepcopy
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from babyllama.errors import UserError
from babyllama.lora import is_adapter_model
from babyllama.model.llama import DecoderLayer, Llama

DCP_DIR = "dcp"  # inside resume/: the sharded model and optimizer states


def check_launched(strategy: str, launched: bool) -> None:
    """Raise UserError for train.strategy=fsdp outside torchrun (what else FSDP cannot run is
    refused with the config: `babyllama.config.fsdp_problems`)."""
    if strategy == "fsdp" and not launched:
        raise UserError("train.strategy=fsdp shards the model across the processes torchrun starts; "
                        "this is a single process, with nothing to shard: run it under "
                        "`torchrun --nproc_per_node N -m babyllama.cli ...` (N=1 works too, and resumes "
                        "an FSDP run on one device); a new run may leave train.strategy at ddp")


def mixed_precision_policy(precision: str) -> MixedPrecisionPolicy:
    """FSDP's policy for `train.precision`: bf16-mixed all-gathers and computes with bf16 copies
    of the fp32 sharded weights and reduces gradients in fp32 (the choice torchtitan makes: a
    bf16 reduce-scatter over many ranks loses precision); fp32 and bf16-true (whose weights are
    already bf16) compute in the weights' own dtype."""
    if precision == "bf16-mixed":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def sharded_root(model: torch.nn.Module) -> torch.nn.Module:
    """The module `shard_model` makes FSDP's root: our Llama, also under a LoRA (peft) wrapper,
    whose forward calls it."""
    return model.get_base_model() if is_adapter_model(model) else model


def shard_model(model: torch.nn.Module, precision: str) -> torch.nn.Module:
    """Shard `model` in place, each DecoderLayer a unit and the rest the root; returns it.
    The model must already be on its device (and in bf16 for bf16-true). Under LoRA the
    frozen base weights are sharded with the adapters beside them (FSDP2 keeps a unit's frozen
    and trainable parameters apart: only the adapters get gradients and optimizer states)."""
    policy = mixed_precision_policy(precision)
    root = sharded_root(model)
    for module in root.modules():
        if isinstance(module, DecoderLayer):
            fully_shard(module, mp_policy=policy)
    fully_shard(root, mp_policy=policy)
    # Evaluation scores positions through `hidden_states` and the LM head rather than forward
    # (eval/scoring.py): FSDP must gather the root's weights for that call too.
    register_fsdp_forward_method(root, "hidden_states")
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    return isinstance(sharded_root(model), FSDPModule)


def set_gradient_sync(model: torch.nn.Module, sync: bool) -> None:
    """FSDP's counterpart of DDP's `no_sync`: with `sync` False the backward keeps unsharded
    gradients and skips the reduce-scatter (accumulation's micro-steps but the last)."""
    sharded_root(model).set_requires_gradient_sync(sync)


def state_options(model: torch.nn.Module, **kwargs) -> StateDictOptions:
    """A LoRA run's states leave out the frozen base (it is the base run's weights, which the
    run loads again on resume): its checkpoints are the adapters' size."""
    frozen_out = is_adapter_model(model)
    return StateDictOptions(ignore_frozen_params=frozen_out, strict=not frozen_out, **kwargs)


def full_state_dict(model: torch.nn.Module, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """The whole weights (`trainable_only`: the adapters') on CPU, on rank 0, named as in
    `sharded_root(model)`; other ranks get {}. A collective: every rank must call it at the
    same point."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    return get_model_state_dict(sharded_root(model), options=options)


def unsharded_copy(model: torch.nn.Module, device: torch.device) -> torch.nn.Module | None:
    """A plain (unsharded) copy of `model` (LoRA: with its adapters) on `device` on rank 0, for
    what only the main process runs (samples, evaluation tasks); None on the other ranks. A
    collective."""
    state = full_state_dict(model)
    if dist.get_rank() != 0:
        return None
    copy = Llama(sharded_root(model).config)
    if is_adapter_model(model):
        import peft  # only LoRA runs get here, and they have peft

        copy = peft.get_peft_model(copy, deepcopy(model.peft_config["default"]))
    sharded_root(copy).load_state_dict(state)
    # In the sharded weights' dtype (bf16-true keeps bf16, as a single process saves it).
    dtype = next(p.dtype for p in sharded_root(model).parameters() if p.is_floating_point())
    return copy.to(device=device, dtype=dtype).eval()


def save_sharded(directory: Path, model: torch.nn.Module, optimizer) -> None:
    """Every rank writes its shards of the model and optimizer states into `directory` (which
    all ranks must see: one machine, or a shared file system)."""
    model_state, optimizer_state = get_state_dict(sharded_root(model), optimizer, options=state_options(model))
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=directory)


def load_sharded(directory: Path, model: torch.nn.Module, optimizer) -> None:
    """Load `save_sharded`'s states into the sharded `model` and its `optimizer` (on any number
    of ranks: DCP reshards). Raises UserError when `directory` holds none (a DDP run's state)."""
    if not (directory / ".metadata").exists():
        raise UserError(f"{directory.parent}: this resume state was not saved with train.strategy=fsdp; "
                        "resume with the strategy it was trained with")
    root, options = sharded_root(model), state_options(model)
    model_state, optimizer_state = get_state_dict(root, optimizer, options=options)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=directory)
    set_state_dict(root, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=options)


def consolidate(directory: Path, model: torch.nn.Module) -> torch.nn.Module:
    """Load the weights of a DCP checkpoint (`RUN/resume/dcp`) into a plain, unsharded `model`
    in this one process, without a process group; returns `model`. Raises UserError when the
    directory holds no such checkpoint."""
    if not (Path(directory) / ".metadata").exists():
        raise UserError(f"{directory}: not a distributed checkpoint (no .metadata)")
    saved = dcp.FileSystemReader(str(directory)).read_metadata().state_dict_metadata
    if not any(k.startswith("model.") and "lora_" not in k and "embed_tokens" in k for k in saved):
        raise UserError(f"{directory}: holds a LoRA run's adapters only (its base is the base run's "
                        "weights); the run's adapter files are already its consolidated form")
    state = {"model": model.state_dict()}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=directory, no_dist=True)
    model.load_state_dict(state["model"])
    return model
