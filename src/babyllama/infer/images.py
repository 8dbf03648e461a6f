"""Images in prompts: the one place a prompt's image placeholders become image positions.

A prompt holds one `<|image|>` token per image (the chat template renders the placeholder a
message carries); the image-text model needs K positions per image, filled by its projected
features at prefill (`model/vlm.py`). Training examples are expanded the same way
(`train/vision.py` calls `expand_image_tokens` too), so the model sees at inference the layout
it was trained on.
"""

from __future__ import annotations

from pathlib import Path

import torch

from babyllama.errors import UserError
from babyllama.model.vlm import expand_image_tokens

IMAGE_PLACEHOLDER = "<|image|>"


def is_vision_model(model) -> bool:
    """Whether `model` (possibly under a peft wrapper) reads images."""
    return getattr(model, "vlm_config", None) is not None


def image_prompt(model, ids: list[int], images: list[torch.Tensor]) -> tuple[list[int], torch.Tensor | None]:
    """(`ids` with each image token expanded to the model's K image positions, the images'
    pixel values stacked (N, C, S, S), or None without images).

    Raises UserError when images are given to a text-only model, or when the number of
    `<|image|>` tokens in `ids` is not the number of images."""
    if not images:
        return ids, None
    if not is_vision_model(model):
        raise UserError("this model reads no images (it is a text model); train an image-text "
                        "model with `babyllama align` / `babyllama instruct`")
    c = model.vlm_config
    n = sum(1 for t in ids if t == c.image_token_id)
    if n != len(images):
        raise UserError(f"the prompt has {n} image placeholder(s) ({IMAGE_PLACEHOLDER}) for "
                        f"{len(images)} image(s)")
    return expand_image_tokens(ids, c.image_token_id, c.image_tokens), torch.stack(images)


def image_positions(model) -> int:
    """K: the prompt positions one image takes (0 for a text model)."""
    return model.vlm_config.image_tokens if is_vision_model(model) else 0


def load_image_pixels(model, path: str | Path) -> torch.Tensor:
    """The image at `path` as the model's encoder expects it: (C, S, S) float32, resized and
    normalised by its vision config. Raises UserError for a text model, a missing or
    unreadable image."""
    from babyllama.data.images import ImageProcessing, load_pixels

    if not is_vision_model(model):
        raise UserError("this model reads no images (it is a text model)")
    v = model.vlm_config.vision
    return load_pixels(Path(path), ImageProcessing(v.image_size, tuple(v.image_mean), tuple(v.image_std)))
