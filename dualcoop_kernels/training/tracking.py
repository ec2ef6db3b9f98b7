"""Where a run reports besides metrics.jsonl and log.txt (``--report-to``): ``summary.csv`` (a row per
epoch, as timm writes it), TensorBoard (``RUN/tensorboard``) and Weights & Biases (``RUN/wandb``).

Each destination is a class with three methods, called on the first rank alone: ``log_epoch`` once an
epoch is saved, ``log_final`` after the final evaluation, ``close``. Epochs are logged at step = epoch,
and only those a session trains: a resumed run continues its curves without repeating a step. They are
logged after the checkpoint is written, so a kill in between loses a point rather than doubling one.
"""

from __future__ import annotations

import contextlib
import csv
import importlib
import io
import json
import os
import re
import secrets
from pathlib import Path

import torch

from .._atomic import atomic_write_text
from ..errors import MissingExtra
from .config import TrainConfig, listed
from .distributed import Ranks
from .evaluation import is_split, load_scores

SUMMARY = "summary.csv"
TENSORBOARD = "tensorboard"
WANDB_ID = "wandb-id.txt"  # a resumed run logs to the same W&B run
TAGS = {"train_loss": "train/loss", "lr": "train/lr", "seconds": "train/seconds"}  # others: val_mAP -> val/mAP


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _tag(name: str) -> str:
    return re.sub(r"[^-/\w.]", "_", name)  # the characters TensorBoard keeps (F1@3 -> F1_3)


def epoch_scalars(record: dict) -> dict:
    """An epoch's numbers by tag: train/loss, train/lr, train/seconds and the score that picks the epoch."""
    return {
        _tag(TAGS.get(key, key.replace("_", "/", 1))): value
        for key, value in record.items()
        if key != "epoch" and _is_number(value)
    }


def final_scalars(results: dict) -> dict:
    """The final evaluation's numbers by tag: final/best_epoch, final/test/mAP, final/test/top_k/f1, ..."""
    scalars = {}
    for name, value in results.items():
        if is_split(value):
            top_k = {f"top_k/{key}": number for key, number in value.get("top_k", {}).items()}
            scalars.update({f"final/{name}/{key}": v for key, v in {**value, **top_k}.items() if _is_number(v)})
        elif _is_number(value):
            scalars[f"final/{name}"] = value
    return {_tag(tag): value for tag, value in scalars.items()}


class CsvTracker:
    """``RUN/summary.csv``: a row per epoch of its record's scalars, rewritten whole from the history, so
    that a resumed run's file holds every epoch once whatever the previous session managed to write."""

    def __init__(self, config: TrainConfig, run: Path, module=None):
        self.path = run / SUMMARY

    def log_epoch(self, history: list[dict]) -> None:
        scalar = (int, float, str)
        columns = dict.fromkeys(key for record in history for key, value in record.items() if isinstance(value, scalar))
        text = io.StringIO()
        writer = csv.DictWriter(text, list(columns), extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(history)
        atomic_write_text(self.path, text.getvalue())

    def log_final(self, results: dict) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardTracker:
    """``RUN/tensorboard``: the epochs' scalars and the settings as text where a session starts; after the
    final evaluation, its numbers with the settings as hparams (TensorBoard's table comparing runs) and
    each class's precision-recall curve on each evaluated split."""

    def __init__(self, config: TrainConfig, run: Path, module):
        self.config, self.run, self.started = config, run, False
        self.writer = module.SummaryWriter(log_dir=str(run / TENSORBOARD))

    def log_epoch(self, history: list[dict]) -> None:
        epoch = history[-1]["epoch"]
        if not self.started:  # each session's settings (the runtime ones may change on resume)
            settings = json.dumps(self.config.as_dict(), indent=2).splitlines()
            self.writer.add_text("config", "\n".join("    " + line for line in settings), epoch)  # a code block
            self.started = True
        for tag, value in epoch_scalars(history[-1]).items():
            self.writer.add_scalar(tag, value, epoch)
        self.writer.flush()  # a killed run keeps the curves of the epochs it saved

    def log_final(self, results: dict) -> None:
        step = results.get("best_epoch") or 0
        for split, metrics in results.items():
            scores_file = self.run / "scores" / f"{split}.npz"
            if is_split(metrics) and scores_file.is_file():
                self._pr_curves(split, load_scores(scores_file), step)
        settings = {
            key: value if isinstance(value, (int, float, str, bool)) else json.dumps(value)
            for key, value in self.config.as_dict().items()
        }
        self.writer.add_hparams(settings, final_scalars(results), run_name=".", global_step=step)  # "." : this run
        self.writer.flush()

    def _pr_curves(self, split: str, saved: dict, step: int) -> None:
        probabilities = torch.sigmoid(torch.from_numpy(saved["scores"]))  # P+ > P- at 0.5, as predict says
        for column, name in enumerate(saved["classnames"]):
            labels = saved["labels"][:, column]
            known = labels != 0  # 1 present, -1 absent, 0 unknown (a blank, or masked)
            if known.any():
                curve = probabilities[torch.from_numpy(known), column]
                self.writer.add_pr_curve(_tag(f"pr/{split}/{name}"), labels[known] == 1, curve, step)

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A Weights & Biases run in ``RUN/wandb``, named after the run folder; its id, kept in
    ``RUN/wandb-id.txt``, makes a resumed run continue it. The settings are its config, the final
    numbers its summary. WANDB_MODE (offline: ``wandb sync`` later), WANDB_PROJECT (by default
    dualcoop) and WANDB_ENTITY are the user's."""

    def __init__(self, config: TrainConfig, run: Path, module):
        id_file = run / WANDB_ID
        if not id_file.is_file():
            atomic_write_text(id_file, secrets.token_hex(8) + "\n")
        self.wandb_run = module.init(
            dir=str(run), project=os.environ.get("WANDB_PROJECT", "dualcoop"), name=run.resolve().name,
            config=config.as_dict(), id=id_file.read_text().strip(), resume="allow",
        )  # fmt: skip

    def log_epoch(self, history: list[dict]) -> None:
        self.wandb_run.log(epoch_scalars(history[-1]), step=history[-1]["epoch"])

    def log_final(self, results: dict) -> None:
        self.wandb_run.summary.update(final_scalars(results))

    def close(self) -> None:
        self.wandb_run.finish()


TRACKERS = {"csv": CsvTracker, "tensorboard": TensorBoardTracker, "wandb": WandbTracker}
PACKAGES = {"tensorboard": "torch.utils.tensorboard", "wandb": "wandb"}  # torch's writer needs tensorboard


def _module(name: str):
    """What a destination writes with (None: the standard library); a missing package is named with
    the extra that installs it."""
    if name not in PACKAGES:
        return None
    try:
        return importlib.import_module(PACKAGES[name])
    except ImportError as error:
        raise MissingExtra(
            f"--report-to {name} needs the {name} package: pip install 'dualcoop_kernels[{name}]'"
        ) from error


def packages(config: TrainConfig) -> dict:
    """What each of the run's destinations writes with, imported: a missing package stops the run
    before it sets up (every rank asks)."""
    return {name: _module(name) for name in listed(config.report_to)}


@contextlib.contextmanager
def trackers(config: TrainConfig, run: Path, ranks: Ranks, modules: dict):
    """The run's trackers (``config.report_to``, with :func:`packages`' modules), closed when the run
    ends; the first rank's, none on the others."""
    with contextlib.ExitStack() as stack:
        made = []
        for name in modules if ranks.main else []:
            made.append(TRACKERS[name](config, Path(run), modules[name]))
            stack.callback(made[-1].close)
        yield tuple(made)
