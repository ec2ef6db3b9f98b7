"""The datasets of a run: training images (with their partial labels), the held-out validation images
and the test set(s), as the run's configuration names them."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..data import (
    COCO_CLASSES,
    COCO_SEEN,
    COCO_UNSEEN,
    MultiLabelDataset,
    known_mask,
    load_mask,
    read_bigearthnet,
    read_coco,
    read_csv_labels,
    read_nuswide,
    read_nuswide_tags,
    read_voc,
    save_mask,
)
from ..data.csv_labels import listed_lines
from ..data.dataset import DatasetError
from ..data.image_check import check_image_files
from ..errors import UsageError
from .config import TrainConfig
from .distributed import Ranks

VALIDATION_SEED = 0  # the held-out images are the same for every run and proportion


@dataclass
class RunData:
    train: MultiLabelDataset  # partial labels applied
    validation: MultiLabelDataset | None  # drawn from the training images, with their partial labels
    tests: dict[str, MultiLabelDataset]  # "test"; zero-shot: "zsl" (unseen classes) and "gzsl" (all)
    mask: torch.Tensor  # N x C bool over the whole training split, True where a label is known
    train_indices: np.ndarray  # of the training images in the whole training split (a cache's order)


def _joined(first: MultiLabelDataset, second: MultiLabelDataset, name: str) -> MultiLabelDataset:
    """The same images with both datasets' classes (seen tags and unseen concepts, say)."""
    return replace(
        first,
        labels=torch.cat([first.labels, second.labels], dim=1),
        classnames=first.classnames + second.classnames,
        name=name,
    )


def training_split(config: TrainConfig) -> MultiLabelDataset:
    """The whole training split with its complete labels: what a feature cache holds."""
    return _splits(config)[0]


def official_validation(config: TrainConfig) -> MultiLabelDataset | None:
    """A dataset's own validation split, where it has one (BigEarthNet); the others hold images out."""
    if config.dataset == "bigearthnet":
        return read_bigearthnet(config.root, "val", classes=config.bigearthnet_classes, rgb_max=config.rgb_max)
    return None


def _splits(config: TrainConfig) -> tuple[MultiLabelDataset, dict[str, MultiLabelDataset]]:
    root = config.root
    if config.dataset == "bigearthnet":
        if config.zero_shot:
            raise UsageError("BigEarthNet has no zero-shot split; zero-shot runs use coco, nuswide or csv")
        options = dict(classes=config.bigearthnet_classes, rgb_max=config.rgb_max)
        return read_bigearthnet(root, "train", **options), {"test": read_bigearthnet(root, "test", **options)}
    if config.dataset == "coco":
        train = read_coco(root, "train", protocol=config.protocol)
        test = read_coco(root, "val", protocol=config.protocol)
        if config.zero_shot:
            if len(train.classnames) != len(COCO_CLASSES):
                raise UsageError(
                    f"COCO's zero-shot split indexes its 80 classes; {root} lists {len(train.classnames)} categories"
                )
            unseen, everything = test.classes(COCO_UNSEEN), test.classes(COCO_SEEN + COCO_UNSEEN)
            return train.classes(COCO_SEEN), {"zsl": unseen, "gzsl": everything}
        return train, {"test": test}
    if config.dataset == "nuswide":
        if config.zero_shot:
            unseen = read_nuswide(root, "test")
            return read_nuswide_tags(root, "train"), {
                "zsl": unseen,
                "gzsl": _joined(read_nuswide_tags(root, "test"), unseen, "nuswide-gzsl-test"),
            }
        return read_nuswide(root, "train"), {"test": read_nuswide(root, "test")}
    if config.dataset == "voc":
        if config.zero_shot:
            raise UsageError("VOC has no zero-shot split; zero-shot runs use coco, nuswide or csv")
        return read_voc(root, "trainval"), {"test": read_voc(root, "test")}
    train = read_csv_labels(root)
    if config.test_root is None:
        if config.zero_shot:
            raise UsageError("a zero-shot csv run needs test_root: a CSV whose header names the unseen classes")
        return train, {}
    test = read_csv_labels(config.test_root)
    if not config.zero_shot:
        if test.classnames != train.classnames:
            raise UsageError(f"{config.test_root}: its classes differ from the training CSV's {train.classnames}")
        return train, {"test": test}
    unseen = [i for i, name in enumerate(test.classnames) if name not in train.classnames]
    if not unseen:
        raise UsageError(f"{config.test_root}: a zero-shot test CSV must name classes the training CSV lacks")
    return train, {"zsl": test.classes(unseen), "gzsl": test}


def mask_seed(config: TrainConfig) -> int:
    """VOC's published masks were drawn with seed 0 for every run; the others with the run's seed."""
    if config.mask_seed is not None:
        return config.mask_seed
    return 0 if config.dataset == "voc" else config.seed


def validation_indices(count: int, fraction: float, images: int | None = None) -> np.ndarray:
    """A fixed random ``fraction`` of the training images (at least one), or ``images`` of them when
    given, sorted. The draw is the same for every run: more images extend fewer."""
    if fraction == 0 and images is None:
        return np.zeros(0, dtype=np.int64)
    held = max(1, round(fraction * count)) if images is None else images
    if held >= count:
        asked = f"--val-fraction {fraction}" if images is None else f"--val-images {images}"
        raise UsageError(f"{asked} leaves no training images of {count}")
    return np.sort(np.random.RandomState(VALIDATION_SEED).permutation(count)[:held])


def load_run_data(config: TrainConfig, run: Path | None) -> RunData:
    """The run's datasets. The partial-label mask is drawn over the whole training split in its own
    order (the authors' draw), saved as ``run/mask.npy`` (or read from ``config.mask_file``); then the
    validation images are held out with the labels they have."""
    train, tests = _splits(config)
    shape = tuple(train.labels.shape)
    if config.mask_file:
        drawn = load_mask(config.mask_file, shape)
    else:
        drawn = known_mask(shape, config.partial, seed=mask_seed(config))
    mask = drawn & (train.labels != 0)  # a label the dataset leaves blank is never known
    if run is not None:
        save_mask(run / "mask.npy", mask)
    train = train.with_labels(train.labels * mask.to(train.labels.dtype))
    validation, rest = None, np.arange(len(train))
    if config.select_on == "val" and config.dataset == "bigearthnet":
        validation = official_validation(config)
    elif config.select_on == "val":
        held = validation_indices(len(train), config.val_fraction, config.val_images)
        rest = np.setdiff1d(rest, held)
        train, validation = train.subset(rest), replace(train.subset(held), name=f"{train.name} (validation)")
    _check_disjoint(train, {"validation": validation, **tests})
    return RunData(train=train, validation=validation, tests=tests, mask=mask, train_indices=rest)


def _check_disjoint(train: MultiLabelDataset, others: dict[str, MultiLabelDataset | None]) -> None:
    """No image of the validation or test sets may be a training image."""
    training = {os.path.abspath(path) for path in train.image_paths}
    for name, other in others.items():
        shared = [
            path for path in (other.image_paths if other is not None else []) if os.path.abspath(path) in training
        ]
        if shared:
            raise UsageError(
                f"the {name} images ({other.name}) share {len(shared)} image(s) with the training images, "
                f"e.g. {shared[0]}: a score on them would not be a held-out score"
            )


def check_run_images(config: TrainConfig, data: RunData, ranks: Ranks, progress=None) -> list[str]:
    """Every image file the run will read, opened by the first rank before training
    (data/image_check.py): one error on every rank naming each unreadable image with its CSV line, or
    the warnings (tiny images). A run on cached features reads no training image, and checks none."""
    outcome = None
    if ranks.main:
        splits = [None if config.features else data.train, data.validation, *data.tests.values()]
        files = [path for split in splits if split is not None and split.loader is None for path in split.image_paths]
        try:
            outcome = check_image_files(
                files, where=lambda: csv_lines(config), workers=config.workers, progress=progress
            )
        except DatasetError as error:
            outcome = error
    outcome = ranks.shared(outcome)
    if isinstance(outcome, DatasetError):
        raise outcome
    return outcome


def csv_lines(config: TrainConfig) -> dict[str, str]:
    """Where a csv run's CSV files list each image ("labels.csv line 5"); nothing for other datasets."""
    lines = {}
    if config.dataset == "csv":
        for listed in filter(None, (config.root, config.test_root)):
            lines.update(listed_lines(listed))
    return lines


def known_fractions(data: RunData) -> dict[str, float]:
    """The fraction of labels known (not blank, kept by the partial-label draw), overall and per split."""
    fractions = {"overall": float(data.mask.float().mean())}
    splits = {"train": data.train, "validation": data.validation, **data.tests}
    fractions.update({name: float((d.labels != 0).float().mean()) for name, d in splits.items() if d is not None})
    return fractions


def fractions_in_words(fractions: dict[str, float]) -> str:
    """Known-label fractions (:func:`known_fractions`) as one line of percentages."""
    return ", ".join(f"{name} {100 * share:.1f} %" for name, share in fractions.items())


def degenerate_class_warnings(train: MultiLabelDataset) -> list[str]:
    """What a training split cannot teach: classes with no known positive, and with no known negative,
    by name (their prompts never see the class present, or never see it absent)."""
    warnings = []
    for value, side in ((1, "positive"), (-1, "negative")):
        names = [name for name, count in zip(train.classnames, (train.labels == value).sum(dim=0)) if count == 0]
        if names:
            shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
            warnings.append(
                f"{len(names)} class(es) have no known {side} training label ({shown}): the prompts never see "
                f"them {'present' if value == 1 else 'absent'}, so their scores are not learned"
            )
    return warnings
