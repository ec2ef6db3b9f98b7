"""Files a run writes, written atomically: a temporary file in the same folder, flushed to disk, then
renamed into place. A run killed at any moment leaves either the previous file or the new one, never
half of one."""

from __future__ import annotations

import os
import random
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch


@contextmanager
def _atomic(path: Path, mode: str):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, mode) as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    with _atomic(path, "w") as file:
        file.write(text)


def atomic_torch_save(path: Path, value) -> None:
    with _atomic(path, "wb") as file:
        torch.save(value, file)


def load_torch_file(path: Path, what: str):
    """A file written by :func:`atomic_torch_save`; anything unreadable is refused with its name."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # a truncated or foreign file: pickle, zip and torch errors alike
        raise ValueError(f"{what} {path} cannot be read ({type(error).__name__}: {error})") from error


def random_states() -> dict:
    """Every random generator a run draws from, to be restored on resume."""
    return dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate())


def restore_random_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
