"""Where a run stands, and the files that keep it: the run state, its checkpoint, the random generators.

A checkpoint holds only tensors, numbers, strings and containers of them, so it is read with
``torch.load(weights_only=True)``, which runs no code: a run folder received from someone else can be
resumed or evaluated safely. Every file is written atomically.
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .._atomic import atomic_torch_save


@dataclass
class RunState:
    """What a run has done: the epoch in progress and its steps, the epoch's running loss, one record per
    finished epoch, and the best epoch so far with its prompts. Together with the prompts, the optimizer
    and the random generators (:func:`save_checkpoint`), enough to continue exactly."""

    epoch: int = 0  # the epoch in progress (the next one, between epochs)
    step: int = 0  # steps of it done
    loss_sum: float = 0.0  # the epoch's training loss, summed over its images so far
    images: int = 0
    history: list[dict] = field(default_factory=list)  # one record per finished epoch
    best_score: float = -math.inf
    best_epoch: int | None = None
    best_prompts: dict | None = None

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / max(self.images, 1)

    def add_step(self, loss: float, images: int) -> None:
        """A step done: ``loss`` is the batch's mean loss over its ``images``."""
        self.step += 1
        self.loss_sum += loss * images
        self.images += images

    def end_epoch(self, record: dict | None = None, score: float = -math.inf, prompts: dict | None = None) -> bool:
        """The epoch is over: keep its record; its prompts become the best if ``score`` beats the best
        (the first of equal scores stays). Whether they did. Ranks other than the first pass nothing."""
        improved = score > self.best_score
        if record is not None:
            self.history.append(record)
        if improved:
            self.best_score, self.best_epoch, self.best_prompts = score, self.epoch, prompts
        self.epoch, self.step, self.loss_sum, self.images = self.epoch + 1, 0, 0.0, 0
        return improved

    def state_dict(self) -> dict:
        return dict(dataclasses.asdict(self), random=random_states())

    def load_state_dict(self, state: dict) -> None:
        for item in dataclasses.fields(self):
            setattr(self, item.name, state[item.name])
        restore_random_states(state["random"])


def save_checkpoint(path: Path, state: RunState, model, optimizer, classnames: list[str], config: dict) -> None:
    """Everything a resumed run needs, in one file: the state, the prompts, the optimizer, the classes
    and the settings it was made with."""
    value = dict(
        state.state_dict(),
        prompts=model.prompt_state_dict(),
        optimizer=optimizer.state_dict(),
        classnames=list(classnames),
        config=config,
    )
    atomic_torch_save(path, value)


def random_states() -> dict:
    """Every global random generator, as tensors and plain numbers. The run's own draws come from
    derived seeds (seeds.py); these are kept for what else draws from the global generators (a
    transform's library, a user's callback), so that a resumed run sees them where they were."""
    kind, keys, position, has_gauss, cached_gauss = np.random.get_state()
    numpy_state = dict(kind=kind, keys=torch.from_numpy(keys.astype(np.int64)), position=int(position))
    numpy_state.update(has_gauss=int(has_gauss), cached_gauss=float(cached_gauss))
    return dict(torch=torch.get_rng_state(), numpy=numpy_state, python=random.getstate())


def restore_random_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    saved = states["numpy"]
    keys = saved["keys"].numpy().astype(np.uint32)
    np.random.set_state((saved["kind"], keys, saved["position"], saved["has_gauss"], saved["cached_gauss"]))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
