"""MS-COCO 2014 for multi-label recognition, read with the json module (no pycocotools).

``root`` holds ``annotations/instances_{train,val}2014.json`` and the images in ``{train,val}2014/``.
Classes are COCO's categories ordered by id. Protocol ``dualcoop++``: every image of the split, in the
order of the file's ``images`` list (an image without annotations is negative for every class), crowd
annotations left out, and, in train only, boxes under 1 pixel wide or high dropped; class names as the
DualCoOp++ code writes them ("motor bike" and "aeroplane"). Protocol ``dualcoop``: only the images with
at least one annotation, in the order of their first annotation, crowd annotations counted, COCO's names.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .._checks import check_choice
from ..errors import UsageError
from ..options import PROTOCOLS
from .dataset import DatasetError, MultiLabelDataset

# COCO's 80 category names ordered by id (the zero-shot splits index this list)
COCO_CLASSES = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
]  # fmt: skip
SPLITS = ("train", "val")  # val2014 is the test split of every paper in this line
DUALCOOP_PLUS_PLUS_NAMES = {"motorcycle": "motor bike", "airplane": "aeroplane"}


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"COCO annotations {path} do not exist")
    try:
        with open(path, encoding="utf-8") as file:
            content = json.load(file)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DatasetError(f"{path} is not valid JSON: {error}") from error
    missing = [key for key in ("images", "annotations", "categories") if key not in content]
    if missing:
        raise DatasetError(f"{path} lacks {missing}: not a COCO instances file")
    return content


def read_coco(root, split: str = "train", *, protocol: str = "dualcoop++") -> MultiLabelDataset:
    """COCO 2014 ``train`` or ``val`` as a :class:`MultiLabelDataset` with +1 / -1 labels."""
    if split not in SPLITS:
        raise UsageError(f"split must be one of {SPLITS}, got {split!r}")
    check_choice("protocol", protocol, PROTOCOLS)
    root = Path(root)
    path = root / "annotations" / f"instances_{split}2014.json"
    content = _read_json(path)
    categories = sorted(content["categories"], key=lambda category: category["id"])
    column = {category["id"]: index for index, category in enumerate(categories)}
    names = [category["name"] for category in categories]
    if protocol == "dualcoop++":
        names = [DUALCOOP_PLUS_PLUS_NAMES.get(name, name) for name in names]
    try:
        row = {image["id"]: index for index, image in enumerate(content["images"])}
        files = [image["file_name"] for image in content["images"]]
        names = [str(name) for name in names]
    except (KeyError, TypeError) as error:
        raise DatasetError(
            f"{path}: an entry of images or categories lacks its id, file_name or name ({error!r})"
        ) from error
    if len(row) != len(files):
        raise DatasetError(f"{path}: image ids repeat ({len(files) - len(row)} duplicates)")
    present = torch.zeros(len(row), len(names), dtype=torch.bool)
    first_seen: dict[int, int] = {}  # image row -> order of its first annotation
    for annotation in content["annotations"]:
        image, category = annotation.get("image_id"), annotation.get("category_id")
        if image not in row:
            raise DatasetError(f"{path}: annotation {annotation.get('id')} refers to unknown image id {image}")
        if category not in column:
            raise DatasetError(f"{path}: annotation {annotation.get('id')} has unknown category id {category}")
        first_seen.setdefault(row[image], len(first_seen))
        if protocol == "dualcoop++":
            if annotation.get("iscrowd", 0):
                continue
            try:
                width, height = (float(side) for side in annotation.get("bbox", [0, 0, 1, 1])[2:4])
            except (TypeError, ValueError) as error:
                raise DatasetError(f"{path}: annotation {annotation.get('id')} has a malformed bbox") from error
            if split == "train" and (width < 1 or height < 1):
                continue
        present[row[image], column[category]] = True
    # ++: every image, in the file's order; the original: annotated images, in order of first annotation
    keep = list(range(len(row))) if protocol == "dualcoop++" else sorted(first_seen, key=first_seen.get)
    if not keep:
        raise DatasetError(f"{path}: the split has no images")
    labels = present[keep].to(torch.int8) * 2 - 1
    paths = [root / f"{split}2014" / files[index] for index in keep]
    return MultiLabelDataset(paths, labels, names, name=f"coco-{split}")
