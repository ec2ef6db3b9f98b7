"""Every image opened before a run uses it: one error that lists every unreadable image (with its CSV
line where it has one), warnings for images too small to hold a region, and a record of the images
found good (by path, size and modification time) so that the next run over them does not pay again."""

from __future__ import annotations

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


def checked_images_file() -> Path:
    """Where the images found good are recorded: DUALCOOP_CACHE, else the user's cache folder."""
    cache = os.environ.get("DUALCOOP_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return Path(cache) / "dualcoop_kernels" / "checked_images.json"


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


def check_images(paths, *, where=None, workers: int = 0, progress=None, what: str = "image") -> list[str]:
    """Open every image of ``paths`` (in ``workers`` processes) unless the record says it was found
    good as it is now. Raises one DatasetError naming every unreadable image (``where``: a path's CSV
    line, when known); returns a warning for the images with a side under MIN_SIDE pixels."""
    record_file, where = checked_images_file(), where or {}
    record = _read_record(record_file)
    stamps = {str(path): _stamp(path) for path in dict.fromkeys(map(str, paths))}
    todo = [path for path, stamp in stamps.items() if stamp is None or record.get(path, [None])[:2] != stamp]
    results = dict(zip(todo, _checked(todo, workers, progress)))
    bad = {path: result for path, result in results.items() if isinstance(result, str)}
    if bad:
        named = [f"{where[path]}: {path} {why}" if path in where else f"{path} {why}" for path, why in bad.items()]
        named = named[:LISTED]
        more = f"; and {len(bad) - LISTED} more" if len(bad) > LISTED else ""
        raise DatasetError(f"{len(bad)} {what}(s) cannot be used: " + "; ".join(named) + more)
    record.update({path: [*stamps[path], *size] for path, size in results.items()})
    if results:
        _write_record(record_file, record)
    small = [path for path in stamps if min(record[path][2:]) < MIN_SIDE]
    if not small:
        return []
    shown = ", ".join(f"{path} ({record[path][2]} x {record[path][3]})" for path in small[:5])
    return [
        f"{len(small)} {what}(s) have a side under {MIN_SIDE} pixels ({shown}{', ...' if len(small) > 5 else ''}): "
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
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # none yet, or unreadable: every image is checked again
    return record if isinstance(record, dict) else {}


def _write_record(path: Path, record: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(record))
    except OSError as error:  # a read-only home: the check stands, the next run checks again
        LOGGER.warning("the record of checked images cannot be written to %s (%s)", path, error)
