"""Datasets, partial labels, zero-shot splits and image transforms, as the authors made them.

Every reader returns a :class:`MultiLabelDataset` (image paths, N x C labels in +1 / -1 / 0, class
names) that loads images lazily. docs/data.md states the rules each reader follows.
"""

from ..options import PROTOCOLS
from .bigearthnet import read_bigearthnet
from .coco import COCO_CLASSES, read_coco
from .csv_labels import read_csv_labels
from .dataset import DatasetError, MultiLabelDataset, load_image
from .nuswide import NUSWIDE_CONCEPTS, read_nuswide, read_nuswide_tags
from .partial import known_mask, load_mask, partial_labels, save_mask
from .voc import VOC_CLASSES, read_voc
from .zero_shot import COCO_SEEN, COCO_UNSEEN

__all__ = [
    "COCO_CLASSES",
    "COCO_SEEN",
    "COCO_UNSEEN",
    "NUSWIDE_CONCEPTS",
    "PROTOCOLS",
    "VOC_CLASSES",
    "DatasetError",
    "MultiLabelDataset",
    "known_mask",
    "load_image",
    "load_mask",
    "partial_labels",
    "read_bigearthnet",
    "read_coco",
    "read_csv_labels",
    "read_nuswide",
    "read_nuswide_tags",
    "read_voc",
    "save_mask",
]
