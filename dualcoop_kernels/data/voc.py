"""PASCAL VOC 2007 for multi-label recognition.

``root`` is the ``VOC2007`` folder: ``ImageSets/Main/{trainval,test}.txt`` list the image ids,
``Annotations/<id>.xml`` their objects and ``JPEGImages/<id>.jpg`` the images. An object marked
difficult does not count, so a class present only as difficult is negative. Class names are VOC's own
(``diningtable``, ``pottedplant``, ``tvmonitor``, ``motorbike``), which both code bases feed to the
tokenizer as they are.
"""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from pathlib import Path

import torch

from ..errors import UsageError
from .dataset import DatasetError, MultiLabelDataset

VOC_CLASSES = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]  # fmt: skip
SPLITS = ("trainval", "test", "train", "val")


def _image_ids(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"VOC image list {path} does not exist")
    ids = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 1:
            raise DatasetError(f"{path}, line {number}: expected one image id, got {line!r}")
        ids.append(fields[0])
    if not ids:
        raise DatasetError(f"{path}: the split has no images")
    return ids


def _present_classes(path: Path) -> set[str]:
    """The classes with at least one object not marked difficult."""
    if not path.is_file():
        raise FileNotFoundError(f"VOC annotation {path} does not exist")
    try:
        objects = ElementTree.parse(path).getroot().findall("object")
    except ElementTree.ParseError as error:
        raise DatasetError(f"{path} is not valid XML: {error}") from error
    present = set()
    for item in objects:
        name = (item.findtext("name") or "").strip()
        if name not in VOC_CLASSES:
            raise DatasetError(f"{path}: unknown class {name!r}; VOC 2007's are {VOC_CLASSES}")
        if (item.findtext("difficult") or "0").strip() != "1":
            present.add(name)
    return present


def read_voc(root, split: str = "trainval") -> MultiLabelDataset:
    """VOC 2007 ``trainval`` (the papers' training set) or ``test`` with +1 / -1 labels."""
    if split not in SPLITS:
        raise UsageError(f"split must be one of {SPLITS}, got {split!r}")
    root = Path(root)
    ids = _image_ids(root / "ImageSets" / "Main" / f"{split}.txt")
    labels = -torch.ones(len(ids), len(VOC_CLASSES), dtype=torch.int8)
    for row, image in enumerate(ids):
        for name in _present_classes(root / "Annotations" / f"{image}.xml"):
            labels[row, VOC_CLASSES.index(name)] = 1
    paths = [root / "JPEGImages" / f"{image}.jpg" for image in ids]
    return MultiLabelDataset(paths, labels, VOC_CLASSES, name=f"voc2007-{split}")
