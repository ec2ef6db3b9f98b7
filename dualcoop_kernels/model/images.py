"""Images as the model expects them: CLIP's preprocessing, and the check that refuses anything else."""

from __future__ import annotations

import torch
from torch import nn

from .._checks import check_tensor, has_values
from ..options import CLIP_MEAN, CLIP_STD

# Normalised images lie within about [-1.8, 2.2]; pixels in 0..255 are far outside
MAX_NORMALISED_PIXEL = 10.0


def _pil_as_rgb(image):
    """PIL images of any mode as RGB (torchvision's RGB step refuses an alpha channel)."""
    from PIL import Image

    return image.convert("RGB") if isinstance(image, Image.Image) and image.mode != "RGB" else image


def check_images(images) -> None:
    """Images must be normalised float batches: integer pixels, or 0..255 floats, would be scored
    without a word."""
    hint = "model.image_transform() turns PIL images or uint8 tensors into them"
    check_tensor("images", images, 4, "B x 3 x H x W")
    if images.shape[1] != 3:
        raise ValueError(f"images must have shape B x 3 x H x W (RGB), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"images must be normalised floating tensors, got {images.dtype}: {hint}")
    if has_values(images) and images.numel() and float(images.abs().amax()) > MAX_NORMALISED_PIXEL:
        raise ValueError(
            f"images must be normalised with CLIP's mean and std (values within about [-2, 2.5]), got values "
            f"up to {float(images.abs().amax()):.4g}, as 0..255 pixels would be: {hint}"
        )


def clip_image_transform(visual: nn.Module, image_size: int | None = None):
    """CLIP's preprocessing for an open_clip image tower, as a torchvision transform: PIL images (any
    mode), H x W x 3 NumPy arrays or uint8 tensors to float32, a bicubic resize to a square of
    ``image_size`` pixels (the tower's own size when None) and the tower's mean and std."""
    from torchvision.transforms import InterpolationMode, v2

    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1):
        raise ValueError(f"image_size must be a positive number of pixels (an int), or None, got {image_size!r}")
    side = image_size or visual.image_size
    side = side if isinstance(side, int) else side[0]
    mean = getattr(visual, "image_mean", None) or CLIP_MEAN
    std = getattr(visual, "image_std", None) or CLIP_STD
    return v2.Compose(
        [
            v2.Lambda(_pil_as_rgb),
            v2.ToImage(),
            v2.RGB(),
            v2.Resize((side, side), interpolation=InterpolationMode.BICUBIC, antialias=True),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
        ]
    )
