"""The one kind of dataset every reader returns: image paths, signed labels and class names.

Labels are an N x C int8 matrix: +1 present, -1 absent, 0 unknown (DualCoOp++'s encoding, which
``dualcoop_kernels.split_signed_labels`` turns into the loss's targets and mask). Images are opened
only when an item is read.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import Dataset

from .._checks import check_classnames
from ..errors import UsageError, UsageTypeError


class DatasetError(UsageError):
    """A dataset file that cannot be read as its format says: the message names the file (and line or id)."""


@dataclass
class MultiLabelDataset(Dataset):
    """Images with signed multi-label annotations.

    ``dataset[i]`` is ``(image, labels[i], i)``: the image as ``transform`` makes it (an RGB PIL image
    when ``transform`` is None), its C labels and its index, so that a batch can be matched to a mask
    or a cache.
    """

    image_paths: list[Path]
    labels: torch.Tensor  # N x C int8: +1 present, -1 absent, 0 unknown
    classnames: list[str]
    name: str = "dataset"
    transform: Callable | None = field(default=None, repr=False)
    loader: Callable | None = field(default=None, repr=False)  # path -> RGB PIL image; None: an image file

    def __post_init__(self):
        self.classnames = check_classnames(self.classnames)
        if isinstance(self.image_paths, (str, Path)):
            raise UsageTypeError(f"{self.name}: image_paths must be a list of paths, not one path {self.image_paths!r}")
        self.image_paths = [Path(path) for path in self.image_paths]
        labels = torch.as_tensor(self.labels)
        if labels.dtype == torch.bool:
            raise UsageTypeError(
                f"{self.name}: labels must be +1 / -1 / 0 numbers; bool labels would read False as unknown"
            )
        if labels.dim() != 2 or labels.shape != (len(self.image_paths), len(self.classnames)):
            raise UsageError(
                f"{self.name}: labels must be N x C = {len(self.image_paths)} x {len(self.classnames)}, "
                f"got {tuple(labels.shape)}"
            )
        if not bool(((labels == 1) | (labels == -1) | (labels == 0)).all()):
            raise UsageError(f"{self.name}: labels must hold only +1 (present), -1 (absent) and 0 (unknown)")
        self.labels = labels.to(torch.int8)

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, index: int):
        path = self.image_paths[index]
        image = self.loader(path) if self.loader is not None else load_image(path, self.name)
        if self.transform is not None:
            image = self.transform(image)
        return image, self.labels[index], index

    def subset(self, indices) -> MultiLabelDataset:
        """The images at ``indices`` (in that order), with their labels."""
        indices = torch.as_tensor(indices, dtype=torch.long)
        return replace(self, image_paths=[self.image_paths[i] for i in indices.tolist()], labels=self.labels[indices])

    def with_labels(self, labels: torch.Tensor) -> MultiLabelDataset:
        """The same images with other labels (a partial-label mask applied, say)."""
        return replace(self, labels=labels)

    def classes(self, indices) -> MultiLabelDataset:
        """Only the classes at ``indices`` (a zero-shot split's seen classes, say)."""
        indices = list(indices)
        return replace(self, labels=self.labels[:, indices], classnames=[self.classnames[i] for i in indices])


def load_image(path: Path, dataset: str = "dataset"):
    """An RGB PIL image; a missing or unreadable file raises an error that names it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{dataset}: image {path} does not exist") from error
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as error:
        raise DatasetError(f"{dataset}: image {path} cannot be read as an image ({error})") from error
