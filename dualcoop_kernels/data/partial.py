"""Partial labels exactly as the authors made them, and the mask files a run saves and loads.

DualCoOp++ keeps each (image, class) label when a uniform draw is below the proportion: after
``np.random.seed(seed)``, ``np.random.random((N, C)) < proportion`` over the dataset's own image
order, which is what ``RandomState(seed).random_sample((N, C))`` draws. VOC's published masks are this
with seed 0 for every run; COCO and NUS-WIDE use the run's seed. For one seed the masks nest: what is
known at 0.3 is known at 0.6. The original DualCoOp drew unseeded; its protocol here draws the same way,
seeded, so that runs repeat.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .._atomic import atomic_open
from .._checks import check_choice, finite_number
from ..errors import UsageError
from ..options import PROTOCOLS


def known_mask(shape: tuple[int, int], proportion, *, seed: int) -> torch.Tensor:
    """N x C bool: True where the label is kept."""
    proportion = finite_number("proportion", proportion)
    if not 0 < proportion <= 1:
        raise UsageError(f"proportion must be in (0, 1] (the fraction of labels kept), got {proportion}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UsageError(f"seed must be a non-negative int, got {seed!r}")
    draws = np.random.RandomState(int(seed)).random_sample(shape)
    return torch.from_numpy(draws < proportion)


def partial_labels(labels, proportion, *, seed: int, protocol: str = "dualcoop++") -> torch.Tensor:
    """N x C labels of +1 / -1 to +1 / -1 / 0 (0 = unknown), keeping each with probability ``proportion``."""
    check_choice("protocol", protocol, PROTOCOLS)
    labels = torch.as_tensor(labels)
    if labels.dim() != 2:
        raise UsageError(f"labels must be N x C, got shape {tuple(labels.shape)}")
    if not bool(((labels == 1) | (labels == -1)).all()):
        raise UsageError("labels must be complete: +1 (present) or -1 (absent) everywhere")
    return labels * known_mask(tuple(labels.shape), proportion, seed=seed).to(labels.dtype)


def save_mask(path, mask: torch.Tensor) -> None:
    """Write an N x C bool mask as a .npy file, atomically (a temporary file renamed into place)."""
    with atomic_open(path, "wb") as file:
        np.save(file, mask.cpu().numpy().astype(bool))


def load_mask(path, shape: tuple[int, int]) -> torch.Tensor:
    """An N x C bool mask saved by :func:`save_mask` (or any .npy of 0/1 or bools) for a dataset of ``shape``."""
    path = Path(path)
    try:
        array = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"mask file {path} does not exist") from None
    except (ValueError, OSError) as error:
        raise UsageError(f"mask file {path} is not a readable .npy array: {error}") from error
    if array.shape != tuple(shape):
        raise UsageError(f"mask file {path} is {array.shape}, the dataset's labels are {tuple(shape)}")
    if array.dtype != bool and not np.isin(array, (0, 1)).all():
        raise UsageError(f"mask file {path} must hold bools or 0/1")
    return torch.from_numpy(array.astype(bool))
