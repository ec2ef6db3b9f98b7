"""Scoring and evaluating a run's model: the papers' metrics of a split, the score that picks the best
epoch, and the learned prompts around other class lists (zero-shot splits, open-vocabulary names)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..data import load_image
from ..data.transforms import test_transform
from ..metrics import evaluate, known_average_precision, ranking_scores, top_k_metrics
from .config import TrainConfig
from .datasets import load_run_data
from .runs import build_model, load_best

SUMMARY_COLUMNS = ("mAP", "CP", "CR", "CF1", "OP", "OR", "OF1")
TOP_K_COLUMNS = (("P", "precision"), ("R", "recall"), ("F1", "f1"))


def model_for(model, config: TrainConfig, classnames: list[str]):
    """The trained prompts scoring ``classnames``: the model itself for its own classes; for others,
    the learned contexts around their names, which only contexts shared by all classes can give."""
    if classnames == model.prompts.classnames:
        return model
    if config.csc:
        raise ValueError(
            "scoring other classes needs a run trained with contexts shared by all classes (--zero-shot or "
            "--shared-contexts); this run learned class-specific contexts, which exist only for its own classes"
        )
    other = build_model(config, classnames, clip=model.clip).to(next(model.prompts.parameters()).device)
    other.load_prompt_state_dict(model.prompt_state_dict())
    return other.eval()


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


def evaluate_split(model, dataset, config: TrainConfig, device, progress=None) -> dict:
    """The papers' metrics of a split (docs/data.md); where some labels are unknown (held-out training
    images), AP and mAP rank each class's known labels only, as the epoch was picked."""
    scores = scores_of(model_for(model, config, dataset.classnames), dataset, config, device, progress)
    results = evaluate(scores, dataset.labels.numpy(), dataset.classnames, k=min(config.top_k, scores.shape[1]))
    if bool((dataset.labels == 0).any()):
        per_class = 100 * known_average_precision(scores, dataset.labels)
        results.update(
            mAP=float(per_class.mean()),
            per_class_AP=dict(zip(dataset.classnames, per_class.tolist())),
            unknown_labels="left out of AP and mAP; counted as negatives by the threshold and top-k metrics",
        )
    return results


def evaluate_run(run, splits: list[str] | None = None, device: str | None = None, workers: int | None = None) -> dict:
    """A finished run's best prompts on ``splits`` (test, zsl, gzsl, val; by default its test sets, or
    its held-out images where it has none): each split's metrics, by name."""
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
        raise ValueError(f"--split {unknown[0]!r}: this run's splits are {sorted(sets)}")
    return {name: evaluate_split(model, sets[name], config, resolved) for name in chosen}


def selection_metric(config: TrainConfig, classes: int) -> str:
    """What picks the best epoch: mAP (over known labels), or F1 at k for zero-shot runs (unless
    they have k classes or fewer, where every class is in the top k and F1 at k cannot change)."""
    return f"F1@{config.top_k}" if config.zero_shot and classes > config.top_k else "mAP"


def selection_score(model, dataset, config: TrainConfig, device, progress=None) -> float:
    scores = scores_of(model, dataset, config, device, progress)
    if selection_metric(config, scores.shape[1]) != "mAP":
        return top_k_metrics(scores, dataset.labels.numpy(), k=config.top_k)["f1"]
    return 100 * float(known_average_precision(scores, dataset.labels).mean())


@torch.no_grad()
def image_probabilities(model, paths, config: TrainConfig, device, batch_size: int):
    """Each image's class probabilities ``sigmoid(P+ - P-)``, batch by batch: (paths, B x C) pairs."""
    model.eval()
    transform = test_transform(config.image_size, config.protocol)
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        images = torch.stack([transform(load_image(path, "predict")) for path in chunk]).to(device)
        yield chunk, torch.sigmoid(ranking_scores(model(images).float())).cpu()


def results_table(results: dict) -> str:
    """A readable table of evaluated splits: one row each."""
    lines = []
    for name, metrics in results.items():
        if not isinstance(metrics, dict) or "mAP" not in metrics:
            lines.append(f"{name}: {metrics}")
            continue
        row = "  ".join(f"{column} {metrics[column]:6.2f}" for column in SUMMARY_COLUMNS)
        top = metrics.get("top_k")
        if top:
            row += "".join(f"  {label}@{top['k']} {top[key]:6.2f}" for label, key in TOP_K_COLUMNS)
        lines.append(f"{name:>6}  {row}")
    return "\n".join(lines)
