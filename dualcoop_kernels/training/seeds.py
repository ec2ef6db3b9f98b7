"""Seeds derived from the run's seed. Every random choice of a run is a function of (the run's seed, a
stream, the numbers that identify the draw) alone, so a resumed run, with any number of data workers or
processes, draws what the uninterrupted run draws."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import UsageError

# Each stream's tag follows its numbers and keeps its seeds apart from the other streams'. The first two
# streams have none (they differ in how many numbers they take), as before tags existed: runs keep their
# numbers.
STREAM_TAGS = {
    "epoch order": (),  # (epoch): the order of an epoch's training images
    "augmentation": (),  # (epoch or cached view, image): an image's training augmentation
    "class subset": (1,),  # (epoch, step): the seen classes of a zero-shot batch
    "cached view": (2,),  # (epoch, image): which of a cache's views an epoch reads
}


def derived_seed(stream: str, seed: int, *numbers: int) -> int:
    """A 63-bit seed for a draw of ``stream`` (a key of ``STREAM_TAGS``), from the run's ``seed`` and
    the ``numbers`` that identify the draw."""
    if stream not in STREAM_TAGS:
        raise UsageError(f"stream must be one of {tuple(STREAM_TAGS)}, got {stream!r}")
    entropy = [int(seed), *(int(n) for n in numbers), *STREAM_TAGS[stream]]
    # shifted as a Python int: numpy 1.x refuses np.uint64 >> int
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0]) >> 1


def augmented(transform, image, seed: int, number: int, index: int):
    """An image's augmentation drawn from its own seed: (run seed, epoch or cached view, image index)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derived_seed("augmentation", seed, number, index))
        return transform(image)


def derived_generator(stream: str, seed: int, *numbers: int) -> torch.Generator:
    """A CPU generator seeded by :func:`derived_seed`."""
    return torch.Generator().manual_seed(derived_seed(stream, seed, *numbers))
