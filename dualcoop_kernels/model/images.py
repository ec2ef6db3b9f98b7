"""Images as the model expects them: CLIP's preprocessing, and the check that refuses anything else."""

from __future__ import annotations

import os

import torch
from torch import nn

from .._checks import check_tensor, has_values
from ..errors import UsageError, UsageTypeError
from ..options import CLIP_MEAN, CLIP_STD

# Normalised images lie within about [-1.8, 2.2]; pixels in 0..255 are far outside
MAX_NORMALISED_PIXEL = 10.0


def _as_rgb(image):
    """PIL images of any mode and H x W x C NumPy arrays (C = 1, 3 or 4, or none) as RGB, an alpha
    channel dropped as PIL drops it; anything but an image is refused, naming what it is."""
    import numpy as np
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB") if image.mode != "RGB" else image
    if isinstance(image, np.ndarray):
        if image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 1):
            return np.repeat(image.reshape(*image.shape[:2], 1), 3, axis=2)
        if image.ndim == 3 and image.shape[2] in (3, 4):
            return image[:, :, :3]
        raise UsageError(f"a NumPy image must be H x W, H x W x 1, 3 or 4 (RGB or RGBA), got shape {image.shape}")
    if isinstance(image, torch.Tensor):
        if image.dim() in (3, 4) and image.shape[-3] == 3:
            return image
        raise UsageError(f"an image tensor must be 3 x H x W or B x 3 x H x W (uint8), got {tuple(image.shape)}")
    opened = isinstance(image, (str, os.PathLike))
    hint = ": open the file first (PIL.Image.open, or dualcoop_kernels.data.load_image)" if opened else ""
    raise UsageTypeError(
        "the image transform takes an image (a PIL image, an H x W x 3 NumPy array or a 3 x H x W uint8 "
        f"tensor), got {type(image).__name__}{hint}"
    )


def check_images(images) -> None:
    """Images must be normalised float batches: integer pixels, or 0..255 floats, would be scored
    without a word."""
    hint = "model.image_transform() turns PIL images or uint8 tensors into them"
    check_tensor("images", images, 4, "B x 3 x H x W")
    if images.shape[1] != 3:
        raise UsageError(f"images must have shape B x 3 x H x W (RGB), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise UsageTypeError(f"images must be normalised floating tensors, got {images.dtype}: {hint}")
    if has_values(images) and images.numel() and float(images.abs().amax()) > MAX_NORMALISED_PIXEL:
        raise UsageError(
            f"images must be normalised with CLIP's mean and std (values within about [-2, 2.5]), got values "
            f"up to {float(images.abs().amax()):.4g}, as 0..255 pixels would be: {hint}"
        )


def clip_image_transform(visual: nn.Module, image_size: int | None = None):
    """CLIP's preprocessing for an open_clip image tower, as a torchvision transform: PIL images (any
    mode), H x W x 3 NumPy arrays or uint8 tensors to float32, a bicubic resize to a square of
    ``image_size`` pixels (the tower's own size when None) and the tower's mean and std."""
    from torchvision.transforms import InterpolationMode, v2

    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1):
        raise UsageError(f"image_size must be a positive number of pixels (an int), or None, got {image_size!r}")
    side = image_size or visual.image_size
    side = side if isinstance(side, int) else side[0]
    mean = getattr(visual, "image_mean", None) or CLIP_MEAN
    std = getattr(visual, "image_std", None) or CLIP_STD
    return v2.Compose(
        [
            v2.Lambda(_as_rgb),
            v2.ToImage(),
            v2.RGB(),
            v2.Resize((side, side), interpolation=InterpolationMode.BICUBIC, antialias=True),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
        ]
    )
