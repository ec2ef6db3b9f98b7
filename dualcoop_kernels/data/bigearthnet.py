"""BigEarthNet-S2 (Sentinel-2 patches of Europe, multi-label land cover from CORINE 2018) as released.

v1.0: ``root/BigEarthNet-v1.0/<patch>/`` holds one GeoTIFF per band (``<patch>_B02.tif``, ...) and
``<patch>_labels_metadata.json`` with the CORINE label names (43 classes); ``root/{train,val,test}.csv``
list the patches of each split (one name a line, as the official 19-class models' splits), and
``root/patches_with_seasonal_snow.csv`` and ``root/patches_with_cloud_and_shadow.csv`` the patches left
out. v2.0: ``root/metadata.parquet`` holds each patch's ``patch_id``, ``labels`` (19-class names) and
``split``, and ``root/BigEarthNet-S2/<tile>/<patch>/`` the band files (the patches with snow, clouds or
shadows are not in that table). Reading v2.0's table needs pyarrow (the ``bigearthnet`` extra).

Labels: the 43 original classes (v1.0) or the 19-class nomenclature that merges and drops some of them
(both versions). Images for CLIP: the RGB composite of bands B04, B03, B02 (10 m, 120 x 120 pixels);
16-bit reflectances (x 10,000) are clipped to ``[0, rgb_max]`` and scaled linearly to 0..255.
"""

from __future__ import annotations

import functools
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ..errors import MissingExtra, UsageError
from .dataset import DatasetError, MultiLabelDataset

CLASSES_43 = [
    "Continuous urban fabric", "Discontinuous urban fabric", "Industrial or commercial units",
    "Road and rail networks and associated land", "Port areas", "Airports", "Mineral extraction sites",
    "Dump sites", "Construction sites", "Green urban areas", "Sport and leisure facilities",
    "Non-irrigated arable land", "Permanently irrigated land", "Rice fields", "Vineyards",
    "Fruit trees and berry plantations", "Olive groves", "Pastures", "Annual crops associated with permanent crops",
    "Complex cultivation patterns",
    "Land principally occupied by agriculture, with significant areas of natural vegetation",
    "Agro-forestry areas", "Broad-leaved forest", "Coniferous forest", "Mixed forest", "Natural grassland",
    "Moors and heathland", "Sclerophyllous vegetation", "Transitional woodland/shrub", "Beaches, dunes, sands",
    "Bare rock", "Sparsely vegetated areas", "Burnt areas", "Inland marshes", "Peatbogs", "Salt marshes",
    "Salines", "Intertidal flats", "Water courses", "Water bodies", "Coastal lagoons", "Estuaries", "Sea and ocean",
]  # fmt: skip
CLASSES_19 = [
    "Urban fabric", "Industrial or commercial units", "Arable land", "Permanent crops", "Pastures",
    "Complex cultivation patterns",
    "Land principally occupied by agriculture, with significant areas of natural vegetation",
    "Agro-forestry areas", "Broad-leaved forest", "Coniferous forest", "Mixed forest",
    "Natural grassland and sparsely vegetated areas", "Moors, heathland and sclerophyllous vegetation",
    "Transitional woodland, shrub", "Beaches, dunes, sands", "Inland wetlands", "Coastal wetlands",
    "Inland waters", "Marine waters",
]  # fmt: skip
# The standard mapping of the 43 classes onto the 19 (by index); the 11 left out map to nothing.
TO_19 = {
    0: 0, 1: 0, 2: 1, 11: 2, 12: 2, 13: 2, 14: 3, 15: 3, 16: 3, 18: 3, 17: 4, 19: 5, 20: 6, 21: 7, 22: 8,
    23: 9, 24: 10, 25: 11, 31: 11, 26: 12, 27: 12, 28: 13, 29: 14, 33: 15, 34: 15, 35: 16, 36: 16, 38: 17,
    39: 17, 40: 18, 41: 18, 42: 18,
}  # fmt: skip
RGB_BANDS = ("B04", "B03", "B02")
DEFAULT_RGB_MAX = 2000  # reflectance x 10,000: 0.2, bright enough for the typical land cover of these patches
SPLITS = ("train", "val", "test")
EXCLUDED_LISTS = ("patches_with_seasonal_snow.csv", "patches_with_cloud_and_shadow.csv")


def load_rgb(patch: Path, rgb_max: float = DEFAULT_RGB_MAX):
    """The RGB composite of a v1.0 or v2.0 patch folder as an 8-bit PIL image."""
    from PIL import Image, UnidentifiedImageError

    channels = []
    for band in RGB_BANDS:
        path = patch / f"{patch.name}_{band}.tif"
        try:
            with Image.open(path) as image:
                values = np.asarray(image, dtype=np.float32)
        except FileNotFoundError:
            raise FileNotFoundError(f"BigEarthNet patch {patch.name}: band file {path} is missing") from None
        except (UnidentifiedImageError, OSError) as error:
            raise DatasetError(f"BigEarthNet patch {patch.name}: {path} cannot be read as a TIFF ({error})") from error
        if channels and values.shape != channels[0].shape:
            raise DatasetError(
                f"BigEarthNet patch {patch.name}: {path} is {values.shape}, {RGB_BANDS[0]} is {channels[0].shape}"
            )
        channels.append(values)
    rgb = np.clip(np.stack(channels, axis=-1), 0, rgb_max) * (255.0 / rgb_max)
    return Image.fromarray(np.round(rgb).astype(np.uint8), "RGB")


def _names(path: Path, what: str) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"BigEarthNet {what} {path} does not exist")
    return [line.split(",")[0].strip() for line in path.read_text().splitlines() if line.strip()]


def _label_matrix(label_lists: list[list[str]], patches: list[str], where: str, classes: int) -> torch.Tensor:
    names = CLASSES_43 if classes == 43 else CLASSES_19
    index = {name: i for i, name in enumerate(names)}
    labels = -torch.ones(len(patches), classes, dtype=torch.int8)
    for row, (patch, found) in enumerate(zip(patches, label_lists)):
        for name in found:
            if name not in index:
                raise DatasetError(f"{where(patch)}: unknown label {name!r} for the {classes}-class nomenclature")
            labels[row, index[name]] = 1
    return labels


def _v1_labels(folder: Path, patch: str) -> list[str]:
    path = folder / patch / f"{patch}_labels_metadata.json"
    try:
        labels = json.loads(path.read_text())["labels"]
    except FileNotFoundError:
        raise FileNotFoundError(f"BigEarthNet patch {patch}: {path} is missing") from None
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise DatasetError(f"BigEarthNet patch {patch}: {path} holds no list of labels ({error})") from error
    if not isinstance(labels, list) or not all(isinstance(name, str) for name in labels):
        raise DatasetError(f"BigEarthNet patch {patch}: {path}: labels must be a list of names")
    return labels


def _in_19(labels_43: list[str]) -> list[str]:
    return sorted({CLASSES_19[TO_19[CLASSES_43.index(name)]] for name in labels_43 if CLASSES_43.index(name) in TO_19})


def _read_v1(root: Path, split: str, classes: int) -> tuple[list[Path], torch.Tensor]:
    folder = root / "BigEarthNet-v1.0"
    excluded = {
        name for listed in EXCLUDED_LISTS if (root / listed).is_file() for name in _names(root / listed, "list")
    }
    patches = [name for name in _names(root / f"{split}.csv", "split list") if name not in excluded]
    if not patches:
        raise DatasetError(f"BigEarthNet {root / f'{split}.csv'}: the split has no patches")
    label_lists = [_v1_labels(folder, patch) for patch in patches]
    for patch, found in zip(patches, label_lists):
        unknown = [name for name in found if name not in CLASSES_43]
        if unknown:
            raise DatasetError(
                f"BigEarthNet patch {patch}: unknown label {unknown[0]!r} (not a CORINE class of the 43)"
            )
    if classes == 19:
        label_lists = [_in_19(found) for found in label_lists]
    where = lambda patch: str(folder / patch / f"{patch}_labels_metadata.json")  # noqa: E731
    return [folder / patch for patch in patches], _label_matrix(label_lists, patches, where, classes)


def _read_v2(root: Path, split: str, classes: int) -> tuple[list[Path], torch.Tensor]:
    if classes != 19:
        raise UsageError("BigEarthNet v2.0 labels only the 19-class nomenclature; use classes=19")
    try:
        import pyarrow.parquet as parquet
    except ImportError as error:
        raise MissingExtra(
            "reading BigEarthNet v2.0's metadata.parquet needs pyarrow: pip install 'dualcoop_kernels[bigearthnet]'"
        ) from error
    path = root / "metadata.parquet"
    try:
        table = parquet.read_table(path, columns=["patch_id", "labels", "split"]).to_pydict()
    except Exception as error:  # pyarrow's own errors: a missing column, a file that is not parquet
        raise DatasetError(f"BigEarthNet {path} cannot be read as the v2.0 metadata table ({error})") from error
    rows = [i for i, name in enumerate(table["split"]) if name == split]
    if not rows:
        raise DatasetError(f"BigEarthNet {path}: no patch has split {split!r}")
    patches = [table["patch_id"][i] for i in rows]
    where = lambda patch: f"{path} (patch {patch})"  # noqa: E731
    labels = _label_matrix([list(table["labels"][i]) for i in rows], patches, where, classes)
    # a v2.0 patch lives in the folder of its tile: the patch name less its last two fields
    paths = [root / "BigEarthNet-S2" / "_".join(patch.split("_")[:-2]) / patch for patch in patches]
    return paths, labels


def read_bigearthnet(
    root, split: str = "train", *, classes: int = 19, rgb_max: float = DEFAULT_RGB_MAX
) -> MultiLabelDataset:
    """BigEarthNet-S2 v1.0 or v2.0 (found from the layout) as a dataset of RGB composites with +1 / -1
    labels in the 43-class (v1.0 only) or the 19-class nomenclature."""
    if split not in SPLITS:
        raise UsageError(f"split must be one of {SPLITS}, got {split!r}")
    if classes not in (19, 43):
        raise UsageError(f"classes must be 19 or 43 (the nomenclature), got {classes!r}")
    if not (isinstance(rgb_max, (int, float)) and not isinstance(rgb_max, bool) and rgb_max > 0):
        raise UsageError(f"rgb_max must be a positive reflectance (x 10,000), got {rgb_max!r}")
    root = Path(root)
    version_2 = (root / "metadata.parquet").is_file()
    if not version_2 and not (root / "BigEarthNet-v1.0").is_dir():
        raise FileNotFoundError(
            f"{root} holds neither BigEarthNet v2.0 (metadata.parquet) nor v1.0 (BigEarthNet-v1.0/)"
        )
    paths, labels = (_read_v2 if version_2 else _read_v1)(root, split, classes)
    names = CLASSES_43 if classes == 43 else CLASSES_19
    dataset = MultiLabelDataset(paths, labels, names, name=f"bigearthnet-{'v2' if version_2 else 'v1'}-{split}")
    return replace(dataset, loader=functools.partial(load_rgb, rgb_max=rgb_max))
