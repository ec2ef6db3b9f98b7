"""Image files opened before a run uses them: one error that lists every unreadable image (with its CSV
line where it has one), a warning for images too small to hold a region, and a record of the images
found good (by path, size and modification time) so that the next run over them does not pay again.
One record per list of images (a dataset's), so that each stays the size of its dataset."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from .._atomic import atomic_write_text
from .dataset import DatasetError

LOGGER = logging.getLogger(__name__)
MIN_SIDE = 32  # under every CLIP's patch (ViT-B/32's is 32 pixels): the image is mostly upsampling
LISTED = 20  # unreadable images named in the error; the rest are counted


def record_file(paths: list[str]) -> Path:
    """Where the images of ``paths`` found good are recorded: DUALCOOP_CACHE, else the user's cache
    folder, in a file named after the list."""
    cache = os.environ.get("DUALCOOP_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    digest = hashlib.sha256("\n".join(sorted(paths)).encode()).hexdigest()[:24]
    return Path(cache) / "dualcoop_kernels" / "checked_images" / f"{digest}.json"


def check_image(path: str) -> tuple[int, int] | str:
    """A readable image's (width, height), else why it cannot be used. Decodes every byte (a JPEG at
    a reduced scale, which still reads it all), as training would."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            size = image.size
            image.draft("RGB", (4 * MIN_SIDE, 4 * MIN_SIDE))
            image.load()
        return size
    except FileNotFoundError:
        return "does not exist"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        return f"cannot be read as an image ({error})"


def check_image_files(paths, *, where=None, workers: int = 0, progress=None) -> list[str]:
    """Open every image of ``paths`` (in ``workers`` processes) unless the record says it was found
    good as it is now. Raises one DatasetError naming every unreadable image (``where()``: each path's
    CSV line, asked for only then); returns a warning for images with a side under MIN_SIDE pixels."""
    paths = list(dict.fromkeys(map(str, paths)))
    stored = record_file(paths)
    record = _read_record(stored)
    stamps = {path: _stamp(path) for path in paths}
    todo = [path for path in paths if stamps[path] is None or record.get(path, [None])[:2] != stamps[path]]
    results = dict(zip(todo, _checked(todo, workers, progress)))
    bad = {path: why for path, why in results.items() if isinstance(why, str)}
    if bad:
        lines = where() if where else {}
        named = [f"{lines[path]}: {path} {why}" if path in lines else f"{path} {why}" for path, why in bad.items()]
        more = f"; and {len(bad) - LISTED} more" if len(bad) > LISTED else ""
        raise DatasetError(f"{len(bad)} image(s) cannot be used: " + "; ".join(named[:LISTED]) + more)
    record = {path: record[path] for path in paths if path not in results} | {
        path: [*stamps[path], *size] for path, size in results.items()
    }
    if results:
        _write_record(stored, record)
    return small_images_warning({path: tuple(record[path][2:]) for path in paths})


def small_images_warning(sizes: dict) -> list[str]:
    """A warning naming the images (path: (width, height)) with a side under MIN_SIDE pixels; none if none."""
    small = {path: size for path, size in sizes.items() if min(size) < MIN_SIDE}
    if not small:
        return []
    shown = ", ".join(f"{path} ({width} x {height})" for path, (width, height) in list(small.items())[:5])
    return [
        f"{len(small)} image(s) have a side under {MIN_SIDE} pixels ({shown}{', ...' if len(small) > 5 else ''}): "
        "upsampled to the model's side, they hold little a region can find"
    ]


def _stamp(path: str) -> list[int] | None:
    try:
        status = os.stat(path)
    except OSError:
        return None
    return [status.st_size, status.st_mtime_ns]


def _checked(paths: list[str], workers: int, progress):
    """What :func:`check_image` says of each path, in order; the progress bar shows after a second."""
    if not paths:
        return []
    shown = (lambda items: progress(items, total=len(paths), desc="checking images", delay=1)) if progress else iter
    if workers > 0 and len(paths) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            return list(shown(pool.map(check_image, paths, chunksize=max(1, min(256, len(paths) // (4 * workers))))))
    return [check_image(path) for path in shown(paths)]


def _read_record(path: Path) -> dict:
    """The record's entries that are what this module writes ([size, mtime, width, height]); none when
    it is missing or damaged, so that every image is checked again."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(record, dict):
        return {}
    return {
        path: entry
        for path, entry in record.items()
        if isinstance(entry, list) and len(entry) == 4 and all(type(value) is int for value in entry)
    }


def _write_record(path: Path, record: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(record))
    except OSError as error:  # a read-only home: the check stands, the next run checks again
        LOGGER.warning("the record of checked images cannot be written to %s (%s)", path, error)
