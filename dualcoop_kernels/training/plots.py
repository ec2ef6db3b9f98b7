"""Pictures of a run, for a person: the loss and the validation score over epochs, and each class's
test AP. PNG files in the run folder, when matplotlib is installed (the ``plot`` extra)."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

LOGGER = logging.getLogger(__name__)


def plot_run(run: Path, history: list[dict], results: dict) -> list[Path]:
    if importlib.util.find_spec("matplotlib") is None:
        LOGGER.warning("no plots (pip install matplotlib, or the 'plot' extra, draws them)")
        return []
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    written = []
    epochs = [record["epoch"] for record in history]
    score_key = next(key for key in history[0] if key.startswith(("val_", "test_")))
    figure, (loss_axis, score_axis) = pyplot.subplots(1, 2, figsize=(10, 4))
    loss_axis.plot(epochs, [record["train_loss"] for record in history], marker="o")
    loss_axis.set(xlabel="epoch", ylabel="training loss")
    score_axis.plot(epochs, [record[score_key] for record in history], marker="o")
    score_axis.set(xlabel="epoch", ylabel=score_key.replace("_", " "))
    figure.tight_layout()
    written.append(Path(run) / "curves.png")
    figure.savefig(written[-1])
    pyplot.close(figure)
    for name, evaluated in results.items():
        if not isinstance(evaluated, dict) or not isinstance(evaluated.get("per_class_AP"), dict):
            continue
        ap = evaluated["per_class_AP"]
        figure, axis = pyplot.subplots(figsize=(max(6, 0.25 * len(ap)), 4))
        axis.bar(range(len(ap)), list(ap.values()))
        axis.set_xticks(range(len(ap)), list(ap), rotation=90, fontsize=6)
        axis.set(ylabel="AP (%)", title=f"{name}: mAP {evaluated['mAP']:.1f}")
        figure.tight_layout()
        written.append(Path(run) / f"ap_{name}.png")
        figure.savefig(written[-1])
        pyplot.close(figure)
    return written
