"""Model weights on disk: safetensors files with transformers' parameter names.

safetensors runs no code when it loads (unlike a pickle), and its keys here are exactly
`LlamaForCausalLM`'s, so the same file opens in transformers. A tied LM head is stored once
(as transformers does), under the embedding's name.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from babyllama.atomic import atomic_path
from babyllama.errors import UserError


# Where a tied LM head sits: a Llama's, or an image-text model's language model's (transformers'
# LLaVA checkpoint layout).
TIED_HEADS = ("lm_head.weight", "language_model.lm_head.weight")


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict to save: transformers' keys; a tied LM head is not stored twice."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        for key in TIED_HEADS:
            state.pop(key, None)
    return state


def save_weights(model: torch.nn.Module, path: Path) -> None:
    """Write the model's weights (moved to CPU) to `path` atomically."""
    state = {k: v.cpu() for k, v in model_state(model).items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file. Raises UserError for a missing or unreadable file."""
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise UserError(f"{path}: no such weights file") from None
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise UserError(f"{path}: not a readable safetensors file ({e})") from None


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Load `path` into `model` (checked by `load_state`)."""
    load_state(model, read_weights(path), path)


def load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source) -> None:
    """Load `state` into `model` after checking it has exactly the model's keys and shapes
    (a tied LM head may be absent); a mismatch is one line naming `source`."""
    current = model.state_dict()
    expected = set(current)
    if getattr(model.config, "tie_word_embeddings", False):
        for key in TIED_HEADS:
            expected.discard(key)
            head = state.pop(key, None)
            embedding = state.get(key.replace("lm_head.weight", "model.embed_tokens.weight"))
            if head is not None and embedding is not None and not torch.equal(head, embedding):
                # transformers 5 would use this head and 4.x the embedding: no answer is exact.
                raise UserError(f"{source}: the config ties the LM head to the embeddings "
                                f"(tie_word_embeddings true) but the weights hold a different {key}; "
                                "set tie_word_embeddings to false to use that head")
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise UserError(f"{source}: weights do not match the model config "
                        f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    for k, v in state.items():
        want = current[k].shape
        if v.shape != want:
            raise UserError(f"{source}: {k} has shape {tuple(v.shape)}, the config needs {tuple(want)}")
    model.load_state_dict(state, strict=False)
