"""Images as a vision encoder sees them: opened with Pillow, checked, and turned into pixel values
exactly as transformers' SigLIP image processor (the PIL one, `SiglipImageProcessorPil`;
`SiglipImageProcessor` before transformers 5) does it:

    proc = ImageProcessing(image_size=64)           # built from the vision config
    x = load_pixels(Path("a.jpg"), proc)            # torch.float32 (3, 64, 64)

The steps, in transformers' order: convert to RGB (an image with transparency is composited onto
white first), resize to (image_size, image_size) with the configured resample (bicubic), rescale
by 1/255 (in float64, then float32), normalise `(x - mean) / std` per channel in float32, and put
the channels first. tests/test_image_data.py checks equality with transformers to 1e-6.

Errors: `open_image` raises `UserError("PATH: problem")` (one line) for a missing file, a file
that is not an image, a corrupt or truncated image, and an image with more than `MAX_PIXELS`
pixels (a decompression bomb: a small file that would unpack to gigabytes).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from babyllama.errors import UserError

# Pillow's own default limit (about 89.5 million pixels, a 9459x9459 picture); above it an
# image is refused rather than decoded.
MAX_PIXELS = 89_478_485

RESAMPLE = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
            "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS,
            "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING}


@dataclass
class ImageProcessing:
    """What preprocessing needs from the vision encoder's config: the square side in pixels,
    the per-channel mean and std of normalisation, and the resample filter (a RESAMPLE key)."""

    image_size: int = 64
    image_mean: tuple = (0.5, 0.5, 0.5)
    image_std: tuple = (0.5, 0.5, 0.5)
    resample: str = "bicubic"

    def __post_init__(self) -> None:
        if self.image_size < 1:
            raise UserError(f"image_size must be at least 1, got {self.image_size}")
        if self.resample not in RESAMPLE:
            raise UserError(f"unknown resample {self.resample!r} (known: {', '.join(RESAMPLE)})")
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            if len(value) != 3:
                raise UserError(f"{name} must have 3 values (R, G, B), got {len(value)}")
        if any(s == 0 for s in self.image_std):
            raise UserError(f"image_std must not hold 0, got {tuple(self.image_std)}")


def to_rgb(image: Image.Image) -> Image.Image:
    """The image in RGB, as transformers converts it: transparency (an alpha band, or a
    palette or grey image's transparent colour) composited onto a white background."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def pixel_values(image: Image.Image, proc: ImageProcessing) -> torch.Tensor:
    """float32 (3, S, S) pixel values of a PIL image, S = proc.image_size (module docstring)."""
    size = proc.image_size
    rgb = to_rgb(image)
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), resample=RESAMPLE[proc.resample])
    x = (np.asarray(rgb, dtype=np.uint8).astype(np.float64) * (1 / 255)).astype(np.float32)
    mean = np.asarray(proc.image_mean, dtype=np.float32)
    std = np.asarray(proc.image_std, dtype=np.float32)
    x = (x - mean) / std
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def open_image(path: Path, *, max_pixels: int = MAX_PIXELS, draft: tuple[int, int] | None = None
               ) -> Image.Image:
    """The image at `path`, decoded in full (so a truncated or corrupt file fails here, not in
    the middle of training). `draft=(w, h)` lets a JPEG decode at a reduced scale no smaller
    than (w, h) (a cheap check that still reads every byte). Raises UserError "PATH: problem"
    for a missing file, a file that is not an image, a damaged image, or more than
    `max_pixels` pixels."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such image file" if not path.exists() else f"{path}: not a file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise UserError(f"{path}: image of {width}x{height} pixels is too large "
                                    f"(more than {max_pixels:,} pixels; a decompression bomb?)")
                if draft is not None and image.format == "JPEG":
                    image.draft(image.mode, draft)
                image.load()
                return image
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise UserError(f"{path}: image is too large to decode safely ({_one_line(e)})") from None
    except Image.UnidentifiedImageError:
        raise UserError(f"{path}: not a readable image (unknown or corrupt format)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        # Pillow says "image file is truncated (N bytes not processed)", "broken data stream
        # when reading image file", ...; SyntaxError and ValueError for some damaged headers.
        raise UserError(f"{path}: unreadable image: {_one_line(e)}") from None


def check_image(path: Path, *, max_pixels: int = MAX_PIXELS) -> None:
    """Raise UserError as `open_image` does when the image at `path` cannot be used; JPEGs are
    decoded at 1/8 scale, which reads every byte at a fraction of the cost."""
    open_image(path, max_pixels=max_pixels, draft=(1, 1))


def load_pixels(path: Path, proc: ImageProcessing) -> torch.Tensor:
    """pixel_values(open_image(path), proc): float32 (3, S, S); UserError as open_image."""
    return pixel_values(open_image(path), proc)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__
