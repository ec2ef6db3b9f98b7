"""NUS-WIDE as released: the 81 human-labelled concepts, and the 1,000 user tags for zero-shot.

``root`` is the release's folder: ``Concepts81.txt`` (also found in ``ConceptsList/``), the image lists
``ImageList/{Train,Test}Imagelist.txt`` (Windows paths such as ``actor\\0001_2124494179.jpg``), the
per-concept ground truth ``Groundtruth/TrainTestLabels/Labels_<concept>_{Train,Test}.txt`` (one 0 or 1
a line, in image-list order), and the images below ``Flickr/`` (or ``images=``). For zero-shot, the tags:
``NUS_WID_Tags/TagList1k.txt`` and ``NUS_WID_Tags/{Train,Test}_Tags1k.dat`` (one row of 1,000 0/1
values per image).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UsageError
from .dataset import DatasetError, MultiLabelDataset

SPLITS = {"train": "Train", "test": "Test"}
# The 81 concepts in the order of the release's Concepts81.txt (the unseen classes of zero-shot runs)
NUSWIDE_CONCEPTS = [
    "airport", "animal", "beach", "bear", "birds", "boats", "book", "bridge", "buildings", "cars", "castle", "cat",
    "cityscape", "clouds", "computer", "coral", "cow", "dancing", "dog", "earthquake", "elk", "fire", "fish",
    "flags", "flowers", "food", "fox", "frost", "garden", "glacier", "grass", "harbor", "horses", "house", "lake",
    "leaf", "map", "military", "moon", "mountain", "nighttime", "ocean", "person", "plane", "plants", "police",
    "protest", "railroad", "rainbow", "reflection", "road", "rocks", "running", "sand", "sign", "sky", "snow",
    "soccer", "sports", "statue", "street", "sun", "sunset", "surf", "swimmers", "tattoo", "temple", "tiger",
    "tower", "town", "toy", "train", "tree", "valley", "vehicle", "water", "waterfall", "wedding", "whales",
    "window", "zebra",
]  # fmt: skip


def _lines(path: Path, what: str) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"NUS-WIDE {what} {path} does not exist")
    try:
        return [line.strip() for line in path.read_text(errors="strict").splitlines()]
    except UnicodeDecodeError as error:
        raise DatasetError(f"NUS-WIDE {what} {path} is not UTF-8 text ({error})") from error


def _concepts_file(root: Path) -> Path:
    for candidate in (root / "Concepts81.txt", root / "ConceptsList" / "Concepts81.txt"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"NUS-WIDE concept list Concepts81.txt is not in {root} or {root / 'ConceptsList'}")


def _names(path: Path, what: str) -> list[str]:
    names = [line for line in _lines(path, what) if line]
    if len(set(names)) != len(names) or not names:
        raise DatasetError(f"{path}: {what} must list distinct names, one a line")
    return names


def _image_paths(root: Path, split: str, images: Path | None) -> list[Path]:
    path = root / "ImageList" / f"{SPLITS[split]}Imagelist.txt"
    entries = [line for line in _lines(path, "image list") if line]
    if not entries:
        raise DatasetError(f"{path}: the split has no images")
    folder = Path(images) if images is not None else root / "Flickr"
    return [folder / entry.replace("\\", "/") for entry in entries]


def _binary_column(path: Path, count: int) -> torch.Tensor:
    values = [line for line in _lines(path, "label file") if line]
    if len(values) != count:
        raise DatasetError(f"{path}: {len(values)} labels for {count} images of the image list")
    for number, value in enumerate(values, 1):
        if value not in ("0", "1"):
            raise DatasetError(f"{path}, line {number}: expected 0 or 1, got {value!r}")
    return torch.tensor([value == "1" for value in values])


def read_nuswide(root, split: str = "train", *, images=None) -> MultiLabelDataset:
    """NUS-WIDE-81 ``train`` or ``test`` with +1 / -1 labels from the human-labelled ground truth."""
    if split not in SPLITS:
        raise UsageError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
    root = Path(root)
    concepts = _names(_concepts_file(root), "the concept list")
    paths = _image_paths(root, split, images)
    folder = root / "Groundtruth" / "TrainTestLabels"
    present = torch.stack(
        [_binary_column(folder / f"Labels_{concept}_{SPLITS[split]}.txt", len(paths)) for concept in concepts], dim=1
    )
    return MultiLabelDataset(paths, present.to(torch.int8) * 2 - 1, concepts, name=f"nuswide-{split}")


def read_nuswide_tags(root, split: str = "train", *, images=None) -> MultiLabelDataset:
    """The 925 seen tags of NUS-WIDE's zero-shot split (Huynh and Elhamifar, CVPR 2020): the release's
    1,000 tags less those among the 81 concepts, with +1 / -1 labels from the user tags."""
    if split not in SPLITS:
        raise UsageError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
    root = Path(root)
    concepts = set(_names(_concepts_file(root), "the concept list"))
    tags = _names(root / "NUS_WID_Tags" / "TagList1k.txt", "the tag list")
    seen = [index for index, tag in enumerate(tags) if tag not in concepts]
    paths = _image_paths(root, split, images)
    path = root / "NUS_WID_Tags" / f"{SPLITS[split]}_Tags1k.dat"
    rows = [line for line in _lines(path, "tag file") if line]
    if len(rows) != len(paths):
        raise DatasetError(f"{path}: {len(rows)} rows for {len(paths)} images of the image list")
    present = torch.zeros(len(paths), len(tags), dtype=torch.bool)
    for number, line in enumerate(rows, 1):
        values = line.split()
        if len(values) != len(tags) or any(value not in ("0", "1") for value in values):
            raise DatasetError(f"{path}, line {number}: expected {len(tags)} values of 0 or 1")
        present[number - 1] = torch.tensor([value == "1" for value in values])
    seen_names = [tags[index] for index in seen]
    labels = present[:, seen].to(torch.int8) * 2 - 1
    return MultiLabelDataset(paths, labels, seen_names, name=f"nuswide-tags-{split}")
