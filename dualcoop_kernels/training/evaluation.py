"""Scoring and evaluating a run's model: the papers' metrics of a split, the score that picks the best
epoch, the learned prompts around other class lists (zero-shot splits, open-vocabulary names), and the
findings that say what the numbers are worth (chance, a noisy pick, classes the data cannot teach)."""

from __future__ import annotations

import logging
import math
from dataclasses import replace

import numpy as np
import torch
from torch.utils.data import DataLoader

from .._atomic import atomic_open
from ..data import load_image
from ..data.transforms import test_transform
from ..errors import UsageError
from ..metrics import average_precision, evaluate, ranking_scores, top_k_metrics
from .config import TrainConfig
from .datasets import degenerate_class_warnings, fractions_in_words, load_run_data
from .runs import load_best, saved_model_info, scored_epoch, unfinished

SUMMARY_COLUMNS = ("mAP", "CP", "CR", "CF1", "OP", "OR", "OF1")
TOP_K_COLUMNS = (("P", "precision"), ("R", "recall"), ("F1", "f1"))
LOGGER = logging.getLogger(__name__)
MIN_SELECTION_POSITIVES = 10  # a median of fewer known positives per class makes a picking mAP mostly noise
FAR_APART = 15.0  # mAP points between the picking images and the test images that say the pick did not carry over
METRIC_MEANINGS = (
    "mAP: each class's average precision (images ranked by P+ - P-), averaged over classes; a class without a "
    "positive counts 0; chance: the mAP of a random ranking (each class's share of positives among its known labels)",
    "CP CR CF1: precision, recall and F1 of the predictions P+ > P-, per class, averaged over classes",
    "OP OR OF1: the same over every (image, class) pair pooled",
    "P@k R@k F1@k: each image's k highest-scoring classes taken as its predictions, pooled over images",
)


def model_for(model, config: TrainConfig, classnames: list[str]):
    """The trained prompts scoring ``classnames``: the model itself for its own classes; for others,
    the learned contexts around their names (``model.for_classes``: the same CLIP and head, text
    features in chunks), which only contexts shared by all classes can give."""
    if classnames == model.prompts.classnames:
        return model
    if not config.shared_contexts:
        raise UsageError(
            "scoring other classes needs a run trained with contexts shared by all classes (--zero-shot or "
            "--shared-contexts); this run learned class-specific contexts, which exist only for its own classes"
        )
    return model.for_classes(classnames).eval()


def scoring(model, config: TrainConfig, classnames: list[str] | None):
    """The model that scores ``classnames`` (all the run's classes when None) and the columns of its
    output they are: the run's own model where every name is one of its classes (its scores, whatever
    contexts it learned), else the learned contexts around the names (shared contexts only)."""
    own = model.prompts.classnames
    if classnames is None or all(name in own for name in classnames):
        return model, [own.index(name) for name in classnames or own]
    return model_for(model, config, classnames), list(range(len(classnames)))


@torch.no_grad()
def scores_of(model, dataset, config: TrainConfig, device: torch.device, progress=None) -> np.ndarray:
    """N x C ranking scores (P+ - P-) of a dataset's images, with the test transform."""
    model.eval()
    view = replace(dataset, transform=test_transform(config.image_size, config.protocol))
    loader = DataLoader(view, batch_size=config.batch_size, num_workers=config.workers)
    if progress is not None:
        loader = progress(loader, desc=f"scoring {dataset.name}", leave=False)
    batches = [ranking_scores(model(images.to(device)).float()).cpu() for images, _, _ in loader]
    return torch.cat(batches).numpy()


def evaluate_split(model, dataset, config: TrainConfig, device, progress=None, scores_file=None) -> dict:
    """The papers' metrics of a split (docs/data.md) and its image count; the per-image scores also go
    to ``scores_file`` when given (:func:`save_scores`). Where some labels are unknown (held-out
    training images, blanks in a CSV) every metric counts the known labels only, as the epoch was
    picked. Warns of what makes a number misleading: classes without a positive (they count 0 in the
    mAP, the papers' rule) and top-k metrics of a split with k classes or fewer."""
    scores = scores_of(model_for(model, config, dataset.classnames), dataset, config, device, progress)
    if scores_file is not None:
        save_scores(scores_file, scores, dataset)
    labels, classes = dataset.labels.numpy(), len(dataset.classnames)
    known = labels != 0
    k = min(config.top_k, classes)
    results = dict(images=len(dataset), **evaluate(scores, labels, dataset.classnames, k=k, known=known))
    if not known.all():
        unknown = 100 * (1 - known.mean())
        results["unknown_labels"] = f"{unknown:.1f} % of the labels are unknown: every metric counts the known ones"
    if config.top_k >= classes:
        results["top_k"].update(k=config.top_k, picks=k, trivial=f"{classes} classes, all in every image's top k")
        LOGGER.warning(
            "%s: top-%d metrics are trivial with %d classes (every class is in every image's top %d)",
            *(dataset.name, config.top_k, classes, config.top_k),
        )
    results["findings"] = split_findings(results, scores, labels, known)
    for finding in results["findings"]:
        LOGGER.warning("%s: %s", dataset.name, finding)
    missing = results["classes_without_positives"]
    if missing:
        LOGGER.warning(
            "%s: %d class(es) without a positive count 0 in the mAP, the papers' rule (%s); over the classes "
            "with one, mAP %.2f",
            *(dataset.name, len(missing), ", ".join(map(str, missing[:10])), results["mAP_classes_with_positives"]),
        )
    return results


def split_findings(results: dict, scores: np.ndarray, labels: np.ndarray, known: np.ndarray) -> list[str]:
    """What makes a split's numbers worth less than they look, in words: a ranking near or below
    chance, and predictions (P+ > P-) that do not depend on the image."""
    findings = []
    mean_ap, chance = results["mAP"], results["chance_mAP"]
    if mean_ap <= chance + max(2.0, 0.1 * chance):
        where = "below" if mean_ap < chance else "near"
        findings.append(
            f"mAP {mean_ap:.1f} is {where} chance ({chance:.1f}, what a random ranking scores): the prompts rank "
            "images little better than at random"
        )
    predicted = scores[known] > 0
    if predicted.size and predicted.all():
        findings.append("every class is predicted present in every image: CR is 100 and CP the prevalence")
    elif predicted.size and not predicted.any():
        findings.append("no class is predicted present in any image: CP, CR and the F1s are 0")
    return findings


def save_scores(path, scores: np.ndarray, dataset) -> None:
    """A split's N x C ranking scores with its labels, image paths and class names: a NumPy .npz file
    (no pickled objects), written atomically, which the report reads instead of scoring again."""
    with atomic_open(path, "wb") as file:
        np.savez(
            file,
            scores=scores.astype(np.float32),
            labels=dataset.labels.numpy(),
            paths=np.array([str(p) for p in dataset.image_paths], dtype=str),
            classnames=np.array(dataset.classnames, dtype=str),
        )


def load_scores(path) -> dict:
    """What :func:`save_scores` wrote, as plain arrays and lists."""
    try:
        with np.load(path, allow_pickle=False) as saved:
            return dict(
                scores=saved["scores"],
                labels=saved["labels"],
                paths=saved["paths"].tolist(),
                classnames=saved["classnames"].tolist(),
            )
    except (OSError, KeyError, ValueError) as error:
        raise UsageError(f"scores file {path} cannot be read ({error})") from error


def evaluate_run(run, splits: list[str] | None = None, device: str | None = None, workers: int | None = None) -> dict:
    """A run's best prompts on ``splits`` (test, zsl, gzsl, val; by default its test sets, or its
    held-out images where it has none): each split's metrics, by name, after ``scored`` (which epoch
    that is and whether the run finished) and the run's ``findings`` (:func:`run_findings`)."""
    if workers is not None and workers < 0:
        raise UsageError(f"--workers must be >= 0 (data-loading processes), got {workers}")
    config, model, resolved = load_best(run, device)
    if workers is not None:
        config.workers = workers
    data = load_run_data(config, None)
    sets = dict(data.tests)
    if data.validation is not None:
        sets["val"] = data.validation
    chosen = splits or [name for name in sets if name != "val"] or ["val"]
    unknown = [name for name in chosen if name not in sets]
    if unknown:
        raise UsageError(f"--split {unknown[0]!r}: this run's splits are {sorted(sets)}")
    results = {"scored": scored_epoch(run, config)}
    results |= {name: evaluate_split(model, sets[name], config, resolved) for name in chosen}
    info = saved_model_info(run)
    picked = info.get("selection", {}).get("val_mAP")  # the key the run saved its pick under
    results["findings"] = run_findings(config, data, {"best_epoch": info.get("epoch"), **results}, picked)
    results["findings"] += unfinished(run, config)
    for finding in results["findings"]:
        LOGGER.warning(finding)
    return results


def selection_split(data):
    """The images that pick the best epoch: the held-out ones, else the zero-shot or the test split."""
    chosen = data.validation if data.validation is not None else data.tests.get("zsl", data.tests.get("test"))
    if chosen is None:
        raise UsageError("select_on='test' needs a test set")
    return chosen


def training_findings(config: TrainConfig, data) -> list[str]:
    """What a run's data and settings make of it before it trains, in words: classes it cannot learn,
    a best epoch picked on too few positives, a single epoch (the warm-up alone)."""
    findings = degenerate_class_warnings(data.train)
    selection = selection_split(data)
    positives = (selection.labels == 1).sum(dim=0).float().median().item()
    if selection_metric(config, len(selection.classnames)) == "mAP" and positives < MIN_SELECTION_POSITIVES:
        findings.append(
            f"the {len(selection)} {'validation' if config.select_on == 'val' else 'test'} images that pick the best "
            f"epoch hold a median of {positives:.0f} known positives per class: the pick is mostly noise; hold out "
            "more with --val-fraction or --val-images"
        )
    if config.epochs == 1:
        findings.append(
            f"epochs 1 trains nothing at the base rate: epoch 0 is the warm-up at {config.warmup_lr:g}; ask for 2 "
            "or more"
        )
    return findings


def run_findings(config: TrainConfig, data, results: dict, picked: float | None) -> list[str]:
    """The run's findings beyond each split's, in words: :func:`training_findings`, a best epoch that
    is the untrained warm-up, and the validation mAP that picked the best epoch (``picked``; None
    when something else picked it) far from the test mAP."""
    findings = training_findings(config, data)
    if results.get("best_epoch") == 0 and config.epochs > 1:
        findings.append(
            f"the best epoch is epoch 0, the warm-up at {config.warmup_lr:g}: no trained epoch scored better than "
            f"the untrained prompts on the {config.select_on} images (train longer, or hold out more images)"
        )
    test = results.get("test")
    if picked is not None and test and abs(picked - test["mAP"]) > FAR_APART:
        findings.append(
            f"validation mAP {picked:.1f} at the picked epoch against test mAP {test['mAP']:.1f}: the two are far "
            "apart, so the validation images do not predict the test score (too few, or unlike the test images)"
        )
    return findings


def selection_metric(config: TrainConfig, classes: int) -> str:
    """What picks the best epoch: mAP (over known labels), or F1 at k for zero-shot runs (unless
    they have k classes or fewer, where every class is in the top k and F1 at k cannot change)."""
    return f"F1@{config.top_k}" if config.zero_shot and classes > config.top_k else "mAP"


def selection_score(model, dataset, config: TrainConfig, device, progress=None) -> float:
    scores = scores_of(model, dataset, config, device, progress)
    labels = dataset.labels.numpy()
    if selection_metric(config, scores.shape[1]) != "mAP":
        return top_k_metrics(scores, labels, k=config.top_k, known=labels != 0)["f1"]
    return 100 * float(average_precision(scores, labels, known=labels != 0).mean())


@torch.no_grad()
def image_probabilities(model, paths, config: TrainConfig, device, batch_size: int, unreadable: dict, sizes: dict):
    """Each image's class probabilities ``sigmoid(P+ - P-)``, batch by batch: (paths, B x C) pairs.
    Images that cannot be read are left out, with the reason, in ``unreadable``; the others' (width,
    height) go to ``sizes``."""
    model.eval()
    transform = test_transform(config.image_size, config.protocol)
    for start in range(0, len(paths), batch_size):
        chunk, images = [], []
        for path in paths[start : start + batch_size]:
            try:
                image = load_image(path, "predict")
            except (OSError, ValueError) as error:
                unreadable[path] = str(error)
                continue
            sizes[path] = image.size
            images.append(transform(image))
            chunk.append(path)
        if chunk:
            yield chunk, torch.sigmoid(ranking_scores(model(torch.stack(images).to(device)).float())).cpu()


def is_split(value) -> bool:
    """Whether a value of a run's results is a split's metrics (not its settings or findings)."""
    return isinstance(value, dict) and "mAP" in value


def results_table(results: dict) -> str:
    """A readable table of evaluated splits, one row each with its image count, after the results'
    other entries, then the findings and what each metric family means."""
    splits = {name: metrics for name, metrics in results.items() if is_split(metrics)}
    others = {name: value for name, value in results.items() if name not in splits and name != "findings"}
    lines = [f"{name}: {_in_words(value)}" for name, value in others.items()]
    if splits:
        lines += _split_rows(splits)
    lines += [f"{name}: {m['unknown_labels']}" for name, m in splits.items() if "unknown_labels" in m]
    lines += [f"finding: {finding}" for finding in results.get("findings", [])]
    lines += [f"{name}: {finding}" for name, m in splits.items() for finding in m.get("findings", [])]
    lines += [
        f"{name}: top-k {m['top_k']['trivial']}" for name, m in splits.items() if m.get("top_k", {}).get("trivial")
    ]
    k = _top_k(splits)
    return "\n".join([*lines, *(METRIC_MEANINGS[: 3 + bool(k)] if splits else [])])


def _top_k(splits: dict) -> int | None:
    return next((m["top_k"]["k"] for m in splits.values() if m.get("top_k")), None)


def _split_rows(splits: dict) -> list[str]:
    k = _top_k(splits)
    columns = ["mAP", "chance", *SUMMARY_COLUMNS[1:], *([f"{label}@{k}" for label, _ in TOP_K_COLUMNS] if k else [])]
    rows = [f"{'split':>6} {'images':>7} " + " ".join(f"{column:>6}" for column in columns)]
    for name, metrics in splits.items():
        values = [metrics["mAP"], metrics.get("chance_mAP", math.nan), *(metrics[c] for c in SUMMARY_COLUMNS[1:])]
        if k:
            values += [metrics["top_k"][key] if metrics.get("top_k") else math.nan for _, key in TOP_K_COLUMNS]
        rows.append(f"{name:>6} {metrics.get('images', ''):>7} " + " ".join(f"{value:6.2f}" for value in values))
    return rows


def _in_words(value) -> str:
    """A results entry as a line: fractions (the known labels by split) as percentages."""
    return fractions_in_words(value) if isinstance(value, dict) else str(value)
