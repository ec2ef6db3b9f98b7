"""Files written atomically: a temporary file in the same folder, flushed to disk, then renamed into
place. A process killed at any moment leaves either the previous file or the new one, never half of one.
And torch files read back without running code (``weights_only``)."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from ._checks import error_gist
from .errors import UsageError


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


UMASK = _umask()  # read once, at import: setting it to read it would race with other threads' files


@contextmanager
def atomic_open(path, mode: str = "wb"):
    """A file object for writing ``path``; it appears there only when the block ends without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.chmod(temporary, 0o666 & ~UMASK)  # mkstemp's 0600 would hide results from the owner's group
    try:
        with os.fdopen(descriptor, mode) as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def atomic_write_text(path, text: str) -> None:
    with atomic_open(path, "w") as file:
        file.write(text)


def atomic_torch_save(path: Path, value) -> None:
    with atomic_open(path, "wb") as file:
        torch.save(value, file)


def load_torch_file(path: Path, what: str):
    """A file written by :func:`atomic_torch_save`, read without running code (``weights_only``);
    anything unreadable, or holding more than tensors, numbers and strings, is refused with its name."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file: pickle, zip and torch errors alike
        raise UsageError(
            f"{what} {path} cannot be read as a file of tensors, numbers and strings ({error_gist(error)})"
        ) from error
