"""Cached region features: the frozen image encoder run once over a split, stored for training.

A cache is a folder: ``manifest.json`` says what made the features (backbone, a checksum of its image
weights, image side, transform, views, the images) and their layout; ``features.npy`` holds them,
views x N x regions x width, float16 by default, memory-mapped; ``done/<chunk>`` marks a chunk of
images whose features are on disk. Extraction writes chunk by chunk and marks a chunk only after its
features are flushed, so a crash loses at most the chunks in progress, a rerun resumes where it
stopped, and a half-written chunk is never read as valid. Several processes (ranks) write disjoint
chunks of one cache. Training reads a cache only when it is complete and its manifest matches the run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path

import numpy as np
import torch

from .._atomic import atomic_write_text
from ..data import MultiLabelDataset
from ..data.transforms import train_transform
from ..errors import UsageError
from . import distributed
from .config import TrainConfig
from .datasets import training_split
from .distributed import SINGLE_PROCESS, Ranks
from .runs import build_model, resolve_device
from .seeds import augmented, derived_seed

CHUNK_IMAGES = 256
LOGGER = logging.getLogger(__name__)
DTYPES = {"float16": np.float16, "float32": np.float32}
# the manifest's name of each augmentation ("train" and "test" as caches made before there was a choice)
TRANSFORM_NAMES = {"authors": "train", "crop-flip": "crop-flip", "none": "test"}


def weights_checksum(module: torch.nn.Module) -> str:
    """SHA-256 of a module's parameters and buffers, by name: two CLIPs with the same image weights
    give the same features."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def images_checksum(dataset: MultiLabelDataset) -> str:
    return hashlib.sha256("\n".join(str(path) for path in dataset.image_paths).encode()).hexdigest()


def expected_manifest(config: TrainConfig, model, dataset: MultiLabelDataset, views: int, augment: bool) -> dict:
    """What the features of ``dataset`` under ``config`` are made of; a cache must match it. ``augment``:
    views of the run's training augmentation (``config.augment``), else the test transform."""
    return dict(
        clip=str(config.backbone),  # the key of 0.1.0's caches, which stay valid
        image_weights=weights_checksum(model.clip.visual),
        image_size=config.image_size,
        protocol=config.protocol,
        transform=TRANSFORM_NAMES[config.augment] if augment else "test",
        crop_scale=list(config.crop_scale) if augment else None,
        views=views,
        seed=config.seed if augment else None,
        images=images_checksum(dataset),
        rgb_max=config.rgb_max if config.dataset == "bigearthnet" else None,
        count=len(dataset),
    )


def applied_augmentation(config: TrainConfig) -> str:
    """The augmentation the run's training images had, in --augment's words: a feature cache's own, which
    is none for one made with the test transform whatever the run's --augment says."""
    if not config.features:
        return config.augment
    manifest = FeatureCache(config.features).manifest()
    if manifest.get("transform") == "test":
        return f"none (cached features of the test transform, {config.features})"
    return f"{config.augment} ({manifest.get('views')} cached views of each image, {config.features})"


class FeatureCache:
    def __init__(self, folder):
        self.folder = Path(folder)

    @property
    def manifest_path(self) -> Path:
        return self.folder / "manifest.json"

    def manifest(self) -> dict:
        try:
            return json.loads(self.manifest_path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(
                f"feature cache {self.folder}: no manifest.json (not a cache, or not started)"
            ) from None
        except json.JSONDecodeError as error:
            raise UsageError(f"feature cache {self.folder}: manifest.json is not valid JSON ({error})") from error

    def chunks(self, manifest: dict) -> int:
        return math.ceil(manifest["count"] / manifest["chunk_images"])

    def done(self) -> set[int]:
        folder = self.folder / "done"
        return {int(path.name) for path in folder.iterdir() if path.name.isdigit()} if folder.is_dir() else set()

    def open(self, manifest: dict, mode: str) -> np.memmap:
        shape = (manifest["views"], manifest["count"], manifest["regions"], manifest["width"])
        return np.lib.format.open_memmap(
            self.folder / "features.npy",
            mode=mode,
            dtype=DTYPES[manifest["dtype"]],
            shape=shape if mode == "w+" else None,
        )

    def read_for(self, config: TrainConfig, model, dataset: MultiLabelDataset) -> np.memmap:
        """The features of ``dataset`` for a run, refused unless the cache is complete and matches it."""
        manifest = self.manifest()
        augment = manifest.get("transform") != "test"  # the cache tells; an augmented one must be the run's
        return self.read(expected_manifest(config, model, dataset, manifest.get("views"), augment))

    def read(self, expected: dict) -> np.memmap:
        """The features, when the cache is complete and was made as ``expected`` says."""
        manifest = self.manifest()
        mismatched = {key: (manifest.get(key), value) for key, value in expected.items() if manifest.get(key) != value}
        if mismatched:
            listing = "; ".join(_mismatch(key, got, want) for key, (got, want) in mismatched.items())
            raise UsageError(f"feature cache {self.folder} was made otherwise than this run needs ({listing})")
        missing = sorted(set(range(self.chunks(manifest))) - self.done())
        if missing:
            raise UsageError(
                f"feature cache {self.folder} is incomplete: {len(missing)} chunks missing "
                "(run the same dualcoop cache command again to finish it)"
            )
        try:
            features = self.open(manifest, "r")
        except (OSError, ValueError) as error:
            raise UsageError(f"feature cache {self.folder}: features.npy cannot be read ({error})") from error
        wanted = (manifest["views"], manifest["count"], manifest["regions"], manifest["width"])
        if features.shape != wanted:
            raise UsageError(
                f"feature cache {self.folder}: features.npy is {features.shape}, the manifest says {wanted}"
            )
        return features


def _mismatch(key: str, cached, wanted) -> str:
    """One difference between a cache and a run, in the command line's words (--augment's choices)."""
    if key == "transform":
        words = {name: choice for choice, name in TRANSFORM_NAMES.items()}
        return f"augment: cache {words.get(cached, cached)!r}, run {words.get(wanted, wanted)!r}"
    return f"{key}: cache {cached!r}, run {wanted!r}"


@torch.no_grad()
def extract(
    config: TrainConfig,
    model,
    dataset: MultiLabelDataset,
    folder,
    *,
    views: int = 1,
    augment: bool = False,
    dtype: str = "float16",
    device: torch.device | None = None,
    ranks: Ranks = SINGLE_PROCESS,
    progress=None,
) -> FeatureCache:
    """Write (or finish) the cache of ``dataset``'s region features: ``views`` augmented views of every
    image with the run's training augmentation when ``augment``, else one view with the test transform. Under
    torchrun rank 0 creates the cache and every rank writes its own chunks (``rank``, ``rank + world``,
    ...)."""
    if dtype not in DTYPES:
        raise UsageError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    augment = augment and config.augment != "none"
    if isinstance(views, bool) or not isinstance(views, int) or views < 1 or (views > 1 and not augment):
        raise UsageError(f"views must be a positive int, and 1 without augmentation (--augment), got {views!r}")
    cache = FeatureCache(folder)
    device = device or next(model.parameters()).device
    model.eval()
    augmentation = config.augment if augment else "none"
    transform = train_transform(config.image_size, config.protocol, config.crop_scale, augmentation=augmentation)
    probe = model.encode_regions(transform(dataset[0][0])[None].to(device))
    manifest = dict(
        expected_manifest(config, model, dataset, views, augment),
        regions=probe.shape[1],
        width=probe.shape[2],
        dtype=dtype,
        chunk_images=CHUNK_IMAGES,
    )
    _create_or_check(cache, manifest, ranks)
    ranks.barrier()  # the other ranks write into what rank 0 created
    size = views * len(dataset) * manifest["regions"] * manifest["width"] * np.dtype(DTYPES[dtype]).itemsize
    todo = [c for c in range(cache.chunks(manifest)) if c % ranks.world == ranks.rank and c not in cache.done()]
    if ranks.main:
        LOGGER.info(
            f"{len(dataset)} images x {views} view(s) x {manifest['regions']} regions x "
            f"{manifest['width']} ({dtype}): {size / 2**30:.2f} GiB in {cache.folder}; "
            f"{cache.chunks(manifest) - len(cache.done())} of {cache.chunks(manifest)} chunks to do"
        )
    features = cache.open(manifest, "r+")
    (cache.folder / "done").mkdir(exist_ok=True)
    chunks = todo if progress is None else progress(todo, desc=f"caching (rank {ranks.rank})")
    for chunk in chunks:
        _write_chunk(features, chunk, dataset, model, transform, config, views, device)
        features.flush()  # msync: the chunk is on disk before it is marked done
        atomic_write_text(cache.folder / "done" / str(chunk), "")
    del features
    ranks.barrier()
    return cache


def _create_or_check(cache: FeatureCache, manifest: dict, ranks: Ranks) -> None:
    """A new cache's manifest and features file (rank 0's), or the check that an existing cache is
    the one asked for."""
    if cache.manifest_path.exists():
        found = cache.manifest()
        if found != manifest:
            different = sorted(key for key in manifest if found.get(key) != manifest[key])
            raise UsageError(
                f"{cache.folder} holds a cache made otherwise (differs in {different}); choose another --out"
            )
    elif ranks.main:
        cache.folder.mkdir(parents=True, exist_ok=True)
        cache.open(manifest, "w+").flush()  # allocates the file; chunks fill it
        atomic_write_text(cache.manifest_path, json.dumps(manifest, indent=2) + "\n")


def _write_chunk(features: np.memmap, chunk: int, dataset, model, transform, config: TrainConfig, views, device):
    """Every view of the chunk's images, batch by batch, into ``features``."""
    indices = range(chunk * CHUNK_IMAGES, min((chunk + 1) * CHUNK_IMAGES, len(dataset)))
    images = [dataset[index][0] for index in indices]
    for view in range(views):
        for start in range(0, len(images), config.batch_size):
            batch = [
                augmented(transform, image, config.seed, view, index)
                for image, index in zip(images[start : start + config.batch_size], indices[start:])
            ]
            regions = model.encode_regions(torch.stack(batch).to(device))
            first = indices[start]
            features[view, first : first + len(batch)] = regions.float().cpu().numpy().astype(features.dtype)


class CachedRegions(torch.utils.data.Dataset):
    """Training items from a cache: (regions of one view, labels, index); the view of an image in an
    epoch is a function of (seed, epoch, image) alone."""

    def __init__(self, features: np.ndarray, labels: torch.Tensor, indices: np.ndarray, seed: int):
        self.features, self.labels, self.indices, self.seed, self.epoch = features, labels, indices, seed, 0

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, item):
        index = int(self.indices[item])
        views = self.features.shape[0]
        view = derived_seed("cached view", self.seed, self.epoch, index) % views
        return torch.from_numpy(np.array(self.features[view, index], dtype=np.float32)), self.labels[item], item


def cache_training_split(config: TrainConfig, folder, *, show_progress: bool = True, **options) -> FeatureCache:
    """``dualcoop cache``: the run's model on its device (this rank's, under torchrun), then
    :func:`extract` of the training split into ``folder`` (``options``: views, augment, dtype)."""
    dataset = training_split(config)
    ranks, device = distributed.start(resolve_device(config.device))
    try:
        model = build_model(config, dataset.classnames).to(device)
        progress = None
        if show_progress and ranks.main:
            from tqdm.auto import tqdm as progress
        return extract(config, model, dataset, folder, **options, device=device, ranks=ranks, progress=progress)
    finally:
        distributed.stop(ranks)
