"""The training and test image transforms of DualCoOp++ and of the original DualCoOp, on torchvision's v2 ops.

DualCoOp++ trains on one of two views, chosen with probability 1/2 each: a RandomResizedCrop to the square
side (scale 0.5 to 1 by default, NUS-WIDE 0.6 to 1; bicubic), or the whole image resized to the square
(bilinear) with a cutout, a square of 0.4 x the side filled with one random colour; then one sub-policy of
the authors' multi-label AutoAugment table (``mlc_autoaugment_policy.json`` beside this module: two ops at
fixed magnitudes, each applied with its own probability), a horizontal flip with probability 1/2, and
CLIP's normalisation. The original DualCoOp resizes to the square, always cuts out a square of half the
side and applies torchvision's RandAugment (two ops), with neither crop nor flip. For data whose classes
are told by colour (the authors' colour operations and cutout erase them), ``augmentation="crop-flip"``
keeps only DualCoOp++'s RandomResizedCrop and the flip, and ``"none"`` is the test transform. Both test on a plain
resize to the square (bicubic for DualCoOp++, bilinear for the original). Every random draw comes from
torch's global generator, so ``torch.manual_seed`` (which DataLoader applies to each worker) replays an
augmentation exactly. Inputs are PIL images of any mode (made RGB); outputs float32 3 x side x side.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import PIL.Image
import torch
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as F

from .._checks import check_choice
from ..errors import UsageError
from ..options import CLIP_MEAN, CLIP_STD, PROTOCOLS

AUGMENTATIONS = ("authors", "crop-flip", "none")  # of training images: the authors', crop and flip only, none

CROP_PROBABILITY = 0.5  # DualCoOp++: the RandomResizedCrop view, else the resized image with a cutout
CUTOUT_FRACTIONS = {"dualcoop++": 0.4, "dualcoop": 0.5}  # the cutout's side, as a fraction of the image's
TEST_INTERPOLATIONS = {"dualcoop++": InterpolationMode.BICUBIC, "dualcoop": InterpolationMode.BILINEAR}
RANDAUGMENT_OPS = 2  # the original DualCoOp's RandAugment: two ops per image, at torchvision's default magnitude

POLICY_FILE = "mlc_autoaugment_policy.json"
MAGNITUDE_LEVELS = 10  # a sub-policy's magnitude_index picks one of linspace(lo, hi, 10)
GREY_FILL = [128.0, 128.0, 128.0]  # the authors' fill of the areas that shear, translate and rotate uncover
SIGNED_OPS = frozenset({"shearx", "sheary", "translatex", "translatey", "color", "contrast", "sharpness", "brightness"})
MAGNITUDE_FREE_OPS = frozenset({"autocontrast", "equalize", "invert"})


def _affine(image, interpolation: InterpolationMode, translate=(0.0, 0.0), shear=(0.0, 0.0), center=None):
    """A shear and a shift, no rotation or scale; the areas they uncover are grey."""
    return F.affine(
        image,
        angle=0.0,
        translate=list(translate),
        scale=1.0,
        shear=list(shear),
        interpolation=interpolation,
        fill=GREY_FILL,
        center=center,
    )


def _shear(image, magnitude: float, horizontal: bool):
    # The authors' PIL op maps by (1, m, 0, 0, 1, 0) about the top-left corner; v2 takes the shear as an
    # angle, which is atan(m) in degrees (as torchvision's own AutoAugment converts it)
    angle = math.degrees(math.atan(magnitude))
    # v2's affine has no bicubic for tensors; bilinear is the closest it offers there
    is_pil = isinstance(image, PIL.Image.Image)
    interpolation = InterpolationMode.BICUBIC if is_pil else InterpolationMode.BILINEAR
    shear = (angle, 0.0) if horizontal else (0.0, angle)
    return _affine(image, interpolation, shear=shear, center=[0.0, 0.0])


def _translate(image, fraction: float, horizontal: bool):
    height, width = F.get_size(image)
    offset = (fraction * width, 0.0) if horizontal else (0.0, fraction * height)
    return _affine(image, InterpolationMode.NEAREST, translate=offset)


def _solarize(image, threshold: float):
    # Threshold 256 (magnitude index 0) inverts nothing; v2's tensor kernel refuses thresholds above 255
    return image if threshold > 255 else F.solarize(image, threshold=threshold)


# Each op takes the image and its magnitude: already signed for SIGNED_OPS, None for MAGNITUDE_FREE_OPS.
# The enhance ops use the factor 1 + magnitude; rotate turns counter-clockwise by magnitude degrees.
POLICY_OPS: dict[str, Callable[[Any, Any], Any]] = {
    "shearx": lambda image, m: _shear(image, m, horizontal=True),
    "sheary": lambda image, m: _shear(image, m, horizontal=False),
    "translatex": lambda image, m: _translate(image, m, horizontal=True),
    "translatey": lambda image, m: _translate(image, m, horizontal=False),
    "rotate": lambda image, m: F.rotate(image, angle=m, interpolation=InterpolationMode.NEAREST, fill=GREY_FILL),
    "color": lambda image, m: F.adjust_saturation(image, saturation_factor=1.0 + m),
    "contrast": lambda image, m: F.adjust_contrast(image, contrast_factor=1.0 + m),
    "sharpness": lambda image, m: F.adjust_sharpness(image, sharpness_factor=1.0 + m),
    "brightness": lambda image, m: F.adjust_brightness(image, brightness_factor=1.0 + m),
    "posterize": lambda image, m: F.posterize(image, bits=m),
    "solarize": _solarize,
    "autocontrast": lambda image, _: F.autocontrast(image),
    "equalize": lambda image, _: F.equalize(image),
    "invert": lambda image, _: F.invert(image),
}


@dataclass(frozen=True)
class PolicyStep:
    """One op of a sub-policy: applied with ``probability`` at ``magnitude`` (unsigned; the SIGNED_OPS take
    a random sign per call; None for the MAGNITUDE_FREE_OPS)."""

    op: str
    probability: float
    magnitude: float | int | None

    def apply(self, image, sign: int = 1):
        """The op on a PIL image or a uint8 tensor; ``sign`` (+1 or -1) matters to the SIGNED_OPS only."""
        magnitude = sign * self.magnitude if self.op in SIGNED_OPS else self.magnitude
        return POLICY_OPS[self.op](image, magnitude)


def _policy_step(sub_policy: dict, position: int, ranges: dict, where: str) -> PolicyStep:
    op, probability = sub_policy[f"op{position}"], float(sub_policy[f"p{position}"])
    if op not in POLICY_OPS:
        raise UsageError(f"{where}: unknown op {op!r} in op{position}; known ops: {', '.join(sorted(POLICY_OPS))}")
    if not 0.0 <= probability <= 1.0:
        raise UsageError(f"{where}: p{position} must lie in [0, 1], got {probability}")
    if op in MAGNITUDE_FREE_OPS:
        return PolicyStep(op, probability, None)
    if op not in ranges:
        raise UsageError(f"{where}: op {op!r} takes a magnitude, but magnitude_ranges has no range for it")
    index = sub_policy[f"magnitude_index{position}"]
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < MAGNITUDE_LEVELS:
        raise UsageError(
            f"{where}: magnitude_index{position} must be an int in 0..{MAGNITUDE_LEVELS - 1}, got {index!r}"
        )
    low, high = ranges[op]
    magnitude = torch.linspace(low, high, MAGNITUDE_LEVELS, dtype=torch.float64)[index].item()
    return PolicyStep(op, probability, round(magnitude) if op == "posterize" else magnitude)


@cache
def load_policy(policy_file: str | Path | None = None) -> tuple[tuple[PolicyStep, PolicyStep], ...]:
    """The sub-policies of a multi-label AutoAugment table (the packaged one by default), read once per
    file; a ValueError names the first op, probability or magnitude index that cannot be applied."""
    if policy_file is None:
        text = resources.files(__package__).joinpath(POLICY_FILE).read_text(encoding="utf-8")
        name = POLICY_FILE
    else:
        text, name = Path(policy_file).read_text(encoding="utf-8"), str(policy_file)
    table = json.loads(text)
    ranges = table["magnitude_ranges"]
    sub_policies = tuple(
        (
            _policy_step(sub_policy, 1, ranges, f"{name}, sub-policy {i}"),
            _policy_step(sub_policy, 2, ranges, f"{name}, sub-policy {i}"),
        )
        for i, sub_policy in enumerate(table["sub_policies"])
    )
    if not sub_policies:
        raise UsageError(f"{name}: the table has no sub-policies")
    return sub_policies


class _Transform(v2.Transform):
    """A v2 transform for both of torchvision's APIs: 0.21 and newer call ``make_params`` and ``transform``,
    older releases ``_get_params`` and ``_transform``."""

    def _get_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return self.make_params(flat_inputs)

    def _transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self.transform(inpt, params)


class MultiLabelAutoAugment(_Transform):
    """DualCoOp++'s AutoAugment: one sub-policy of the table, picked uniformly at random per call, applies
    its first op with its probability, then its second op with its own (PIL images or uint8 tensors)."""

    def __init__(self, policy_file: str | Path | None = None):
        super().__init__()
        self.sub_policies = load_policy(policy_file)

    def extra_repr(self) -> str:
        return f"{len(self.sub_policies)} sub-policies"  # the table itself is too long to print

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        sub_policy = self.sub_policies[int(torch.randint(len(self.sub_policies), ()))]
        applied = []
        for step in sub_policy:
            if torch.rand(()) < step.probability:
                sign = 1 - 2 * int(torch.randint(2, ())) if step.op in SIGNED_OPS else 1
                applied.append((step, sign))
        return {"applied": applied}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        for step, sign in params["applied"]:
            inpt = step.apply(inpt, sign)
        return inpt


class RandomCutout(_Transform):
    """Fills a square of ``fraction`` x the image side (on each axis, rounded) with one random RGB colour
    (each channel uniform in 0..255); its centre is uniform over the pixels and it is clipped at the
    borders (PIL images or uint8 tensors)."""

    def __init__(self, fraction: float):
        super().__init__()
        if not 0.0 < fraction <= 1.0:
            raise UsageError(f"fraction must lie in (0, 1] (the cutout's side over the image's), got {fraction!r}")
        self.fraction = fraction

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = F.get_size(flat_inputs[0])
        cut_height, cut_width = round(self.fraction * height), round(self.fraction * width)
        top = int(torch.randint(height, ())) - cut_height // 2
        left = int(torch.randint(width, ())) - cut_width // 2
        bottom, right = min(top + cut_height, height), min(left + cut_width, width)
        top, left = max(top, 0), max(left, 0)
        colour = torch.randint(256, (3, 1, 1), dtype=torch.uint8)
        return {"i": top, "j": left, "h": bottom - top, "w": right - left, "v": colour}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return F.erase(inpt, **params)


def _check_image_size(image_size) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, numbers.Integral) or image_size < 1:
        raise UsageError(f"image_size must be a positive int (the square side in pixels), got {image_size!r}")
    return int(image_size)


def _check_crop_scale(crop_scale) -> tuple[float, float]:
    message = f"crop_scale must be two numbers 0 < lo <= hi <= 1 (the crop's area fractions), got {crop_scale!r}"
    if not isinstance(crop_scale, Sequence) or len(crop_scale) != 2:
        raise UsageError(message)
    if any(isinstance(x, bool) or not isinstance(x, numbers.Real) for x in crop_scale):
        raise UsageError(message)
    low, high = float(crop_scale[0]), float(crop_scale[1])
    if not 0.0 < low <= high <= 1.0:
        raise UsageError(message)
    return low, high


def _normalised_tensor(mean, std) -> list[v2.Transform]:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]


def test_transform(image_size: int, protocol: str = "dualcoop++", mean=CLIP_MEAN, std=CLIP_STD) -> v2.Compose:
    """The evaluation transform: a resize to ``image_size`` x ``image_size`` (bicubic for DualCoOp++,
    bilinear for the original DualCoOp), then float32 normalised with ``mean`` and ``std``; no crop."""
    side = _check_image_size(image_size)
    check_choice("protocol", protocol, PROTOCOLS)
    interpolation = TEST_INTERPOLATIONS[protocol]
    return v2.Compose([v2.RGB(), v2.Resize((side, side), interpolation=interpolation), *_normalised_tensor(mean, std)])


test_transform.__test__ = False  # a builder, not a test: pytest would collect it wherever it is imported


def train_transform(
    image_size: int,
    protocol: str = "dualcoop++",
    crop_scale=(0.5, 1.0),
    mean=CLIP_MEAN,
    std=CLIP_STD,
    augmentation: str = "authors",
) -> v2.Compose:
    """The training augmentation of ``protocol`` (see the module doc) to float32 ``image_size`` x
    ``image_size`` images normalised with ``mean`` and ``std``. ``crop_scale`` bounds the area of
    DualCoOp++'s RandomResizedCrop (NUS-WIDE used (0.6, 1.0)); the original DualCoOp crops nothing.
    ``augmentation``: ``"authors"`` (the protocol's own), ``"crop-flip"`` (the crop and a flip, no
    colour operation or cutout, for any protocol) or ``"none"`` (the test transform)."""
    check_choice("augmentation", augmentation, AUGMENTATIONS)
    if augmentation == "none":
        return test_transform(image_size, protocol, mean, std)
    side = _check_image_size(image_size)
    check_choice("protocol", protocol, PROTOCOLS)
    crop = v2.RandomResizedCrop(
        side, scale=_check_crop_scale(crop_scale), ratio=(3 / 4, 4 / 3), interpolation=InterpolationMode.BICUBIC
    )
    resize = v2.Resize((side, side), interpolation=InterpolationMode.BILINEAR)
    resize_with_cutout = [resize, RandomCutout(CUTOUT_FRACTIONS[protocol])]
    if augmentation == "crop-flip":
        augment = [crop, v2.RandomHorizontalFlip(p=0.5)]
    elif protocol == "dualcoop":
        augment = [*resize_with_cutout, v2.RandAugment(num_ops=RANDAUGMENT_OPS)]
    else:
        view = v2.RandomChoice([crop, v2.Compose(resize_with_cutout)], p=[CROP_PROBABILITY, 1.0 - CROP_PROBABILITY])
        augment = [view, MultiLabelAutoAugment(), v2.RandomHorizontalFlip(p=0.5)]
    return v2.Compose([v2.RGB(), *augment, *_normalised_tensor(mean, std)])
