"""Checkpoints and the random generators' states; written atomically, read back with a clear error."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from .._atomic import atomic_open


def atomic_torch_save(path: Path, value) -> None:
    with atomic_open(path, "wb") as file:
        torch.save(value, file)


def load_torch_file(path: Path, what: str, weights_only: bool = False):
    """A file written by :func:`atomic_torch_save`; anything unreadable is refused with its name.
    ``weights_only`` for files that may come from elsewhere (prompts: tensors, names and numbers);
    checkpoints hold numpy's and Python's random states, which only the full unpickler reads."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as error:  # a truncated or foreign file: pickle, zip and torch errors alike
        raise ValueError(f"{what} {path} cannot be read ({type(error).__name__}: {error})") from error


def random_states() -> dict:
    """Every random generator a run draws from, to be restored on resume."""
    return dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate())


def restore_random_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
