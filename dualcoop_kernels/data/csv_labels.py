"""Your own data: a CSV file with a header ``image,<class 1>,<class 2>,...`` and one row per image.

Values: ``1`` present, ``0`` absent, empty unknown. Image paths are relative to the CSV file (or
absolute), each listed once. The class names come from the header, in its order.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import torch

from ..errors import UsageTypeError
from .dataset import DatasetError, MultiLabelDataset

VALUES = {"1": 1, "0": -1, "": 0}


def read_csv_labels(path) -> MultiLabelDataset:
    """A labelled CSV file as a :class:`MultiLabelDataset` (+1 present, -1 absent, 0 unknown)."""
    if isinstance(path, (bytes, bytearray)) or not isinstance(path, (str, Path)):
        raise UsageTypeError(f"path must be a path to a CSV file, got {type(path).__name__}")
    path = Path(path)
    if path.is_dir():
        raise DatasetError(
            f"{path} is a folder; a csv dataset's --root is its CSV file, as --test-root is (image,<class 1>,...)"
        )
    if not path.is_file():
        raise FileNotFoundError(f"label file {path} does not exist")
    try:
        with open(path, newline="", encoding="utf-8-sig") as file:
            rows = list(csv.reader(file))
    except UnicodeDecodeError as error:
        raise DatasetError(f"{path} is not UTF-8 text ({error}): save it as UTF-8 (Excel: CSV UTF-8)") from error
    if not rows or not rows[0] or rows[0][0].strip() != "image" or len(rows[0]) < 2:
        raise DatasetError(f"{path}, line 1: the header must be image,<class 1>,<class 2>,...")
    classnames = [name.strip() for name in rows[0][1:]]
    if any(not name for name in classnames) or len(set(classnames)) != len(classnames):
        raise DatasetError(f"{path}, line 1: class names must be distinct and not empty, got {classnames}")
    images, labels, lines = [], [], {}
    for number, row in enumerate(rows[1:], 2):
        if not any(field.strip() for field in row):
            continue
        if len(row) != len(rows[0]):
            raise DatasetError(f"{path}, line {number}: {len(row)} fields, the header has {len(rows[0])}")
        values = [field.strip() for field in row[1:]]
        bad = [value for value in values if value not in VALUES]
        if bad or not row[0].strip():
            problem = f"values must be 1, 0 or empty, got {bad[0]!r}" if bad else "the image path is empty"
            raise DatasetError(f"{path}, line {number}: {problem}")
        image = path.parent / row[0].strip()
        spelled = os.path.abspath(image)  # a/../x.png is x.png
        if spelled in lines:
            raise DatasetError(
                f"{path}, line {number}: image {row[0].strip()} is listed again (first on line {lines[spelled]}); "
                "list each image once"
            )
        lines[spelled] = number
        images.append(image)
        labels.append([VALUES[value] for value in values])
    if not images:
        raise DatasetError(f"{path}: no images listed")
    return MultiLabelDataset(images, torch.tensor(labels, dtype=torch.int8), classnames, name=path.name)


def listed_lines(path) -> dict[str, str]:
    """Where each image of a labelled CSV file is listed ("labels.csv line 5"), by its path as the
    dataset holds it: for messages about the images."""
    with open(path, newline="", encoding="utf-8-sig") as file:
        rows = enumerate(csv.reader(file), 1)
        return {str(Path(path).parent / row[0].strip()): f"{Path(path).name} line {n}" for n, row in rows if row}
