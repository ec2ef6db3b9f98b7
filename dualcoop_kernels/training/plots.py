"""Pictures of a run, for a person: the loss and the validation score over epochs with the picked
epoch marked, and each class's test AP, sorted, with a zero-shot run's unseen classes told apart. PNG
files in the run folder, when matplotlib is installed (the ``plot`` extra)."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from .._atomic import atomic_open
from .evaluation import is_split

LOGGER = logging.getLogger(__name__)
LABELLED_CLASSES = 120  # more bars than this get no class names (they could not be read)


def plot_run(run: Path, history: list[dict], results: dict) -> list[Path]:
    if importlib.util.find_spec("matplotlib") is None:
        LOGGER.warning("no plots (pip install matplotlib, or the 'plot' extra, draws them)")
        return []
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    written = [_curves(pyplot, Path(run) / "curves.png", history, results.get("best_epoch"))]
    unseen = set(results["zsl"]["per_class_AP"]) if isinstance(results.get("zsl"), dict) else set()
    for name, evaluated in results.items():
        if is_split(evaluated):
            written.append(_class_aps(pyplot, Path(run) / f"ap_{name}.png", name, evaluated, unseen))
    return written


def _curves(pyplot, path: Path, history: list[dict], best_epoch) -> Path:
    epochs = [record["epoch"] for record in history]
    score_key = selection_key(history)
    figure, (loss_axis, score_axis) = pyplot.subplots(1, 2, figsize=(10, 4))
    loss_axis.plot(epochs, [record["train_loss"] for record in history], marker="o")
    loss_axis.set(xlabel="epoch", ylabel="training loss", title="training loss (mean over the epoch)")
    score_axis.plot(epochs, [record[score_key] for record in history], marker="o")
    label = score_key.replace("_", " ")
    score_axis.set(xlabel="epoch", ylabel=label, title=f"{label}, which picks the epoch")
    if best_epoch is not None:
        for axis in (loss_axis, score_axis):
            axis.axvline(best_epoch, color="tab:green", linestyle="--", label=f"picked: epoch {best_epoch}")
        score_axis.legend()
    figure.tight_layout()
    _save(figure, path)
    pyplot.close(figure)
    return path


def _class_aps(pyplot, path: Path, split: str, evaluated: dict, unseen: set) -> Path:
    """Each class's AP, best first; unseen classes (a zero-shot run's) in another colour."""
    ranked = sorted(evaluated["per_class_AP"].items(), key=lambda item: -item[1])
    labelled = len(ranked) <= LABELLED_CLASSES
    figure, axis = pyplot.subplots(figsize=(min(max(6, 0.22 * len(ranked)), 30), 4.5))
    colours = ["tab:orange" if name in unseen else "tab:blue" for name, _ in ranked]
    axis.bar(range(len(ranked)), [ap for _, ap in ranked], color=colours, width=0.8)
    if labelled:
        axis.set_xticks(range(len(ranked)), [name for name, _ in ranked], rotation=90, fontsize=7)
    else:
        axis.set_xticks([])
        axis.set_xlabel(f"{len(ranked)} classes, best first (too many to name; eval.json lists them)")
    if unseen and split != "zsl" and any(name in unseen for name, _ in ranked):
        handles = [pyplot.Rectangle((0, 0), 1, 1, color=c) for c in ("tab:blue", "tab:orange")]
        axis.legend(handles, ["seen", "unseen"])
    axis.set(ylabel="AP (%)", ylim=(0, 100), title=f"{split}: mAP {evaluated['mAP']:.1f}, per class")
    _save(figure, path, bbox_inches="tight")  # room for long class names
    pyplot.close(figure)
    return path


def selection_key(history: list[dict]) -> str:
    """The key of the score that picked the epoch in a run's records (val_mAP, test_F1@3, ...)."""
    return next(key for key in history[0] if key.startswith(("val_", "test_")))


def _save(figure, path: Path, **options) -> None:
    """A PNG written atomically, as every file of a run."""
    with atomic_open(path, "wb") as file:
        figure.savefig(file, format="png", **options)
