"""Training a run: the authors' schedule, the best epoch picked on held-out images, atomic checkpoints
that resume exactly, and the final evaluation.

:func:`train` is a short sequence of phases: :func:`set_up` (the data, the model, the optimizer, and the
state a resumed run continues from), then for each epoch :func:`train_one_epoch` and :func:`end_epoch`
(score it, keep the best prompts, save), then :func:`final_evaluation` of the best epoch.

Determinism: the order of an epoch's images, the class subsets of zero-shot batches and every image's
augmentation are functions of (seed, epoch, step or image index) alone (``seeds.py``), so a run resumed
from any checkpoint, with any number of workers, computes what the uninterrupted run computes.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from .._atomic import atomic_write_text
from ..data import MultiLabelDataset
from ..data.transforms import train_transform
from ..errors import UsageError
from ..loss import AsymmetricLoss
from ..model import DualCoOpPlusPlus
from ..model.regions import check_image_side
from . import distributed, tracking
from .cache import CachedRegions, FeatureCache, applied_augmentation
from .config import TrainConfig
from .datasets import RunData, check_run_images, fractions_in_words, known_fractions, load_run_data, training_split
from .distributed import Ranks
from .evaluation import (
    evaluate_split,
    is_split,
    results_table,
    run_findings,
    selection_metric,
    selection_score,
    selection_split,
    training_findings,
)
from .plots import plot_run
from .runs import CHECKPOINT, build_model, open_run, resolve_device, run_log, save_best_model
from .seeds import augmented, derived_generator
from .state import RunState, save_checkpoint

LOGGER = logging.getLogger(__name__)


def learning_rate(config: TrainConfig, epoch: int) -> float:
    """Epoch 0 at the constant warm-up rate, then cosine from the base rate over ``epochs``, stepped
    once per epoch (the authors' schedule: the last of 50 epochs runs at 0.0039 x the base rate)."""
    if epoch == 0:
        return config.warmup_lr
    return config.lr * (1 + math.cos(math.pi * (epoch - 1) / config.epochs)) / 2


@dataclass
class Session:
    """What a run works with once set up; ``state`` is what it has done (and what a checkpoint keeps)."""

    config: TrainConfig
    run: Path
    ranks: Ranks
    device: torch.device
    data: RunData
    model: DualCoOpPlusPlus
    network: torch.nn.Module  # the model, or its distributed wrapper
    optimizer: torch.optim.Optimizer
    loss_fn: AsymmetricLoss
    autocast: torch.autocast  # of the encoders; the head and the loss compute in float32
    items: Dataset  # what the loop reads: augmented images or cached regions
    steps_per_epoch: int
    selection_set: MultiLabelDataset  # what picks the best epoch
    metric: str
    state: RunState
    progress: Callable | None  # tqdm, on the first rank, unless the run is quiet
    image_warnings: list[str]  # what the check of the images before training found
    trackers: tuple = ()  # where else the run reports (--report-to: tracking.py), on the first rank

    @property
    def score_name(self) -> str:
        """What the epochs' score is recorded as (val_mAP, test_F1@3, ...)."""
        return f"{self.config.select_on}_{self.metric}"


def train(config: TrainConfig, run: Path, *, resume: bool = False, show_progress: bool = True) -> dict:
    """Train, pick the best epoch, evaluate it on the test set(s); returns what ``eval.json`` holds."""
    run = Path(run)
    ranks, device = distributed.start(resolve_device(config.device))
    try:
        checkpoint = open_run(config, run, resume, ranks)
        with run_log(run, ranks):
            modules = tracking.packages(config)
            session = set_up(config, run, ranks, device, checkpoint, show_progress)
            if ranks.main:
                announce(session, resumed=checkpoint is not None)
            with tracking.trackers(config, run, ranks, modules) as session.trackers, _Interrupt() as interrupt:
                epochs = _epochs(session)
                for epoch in epochs:
                    started = time.perf_counter()
                    train_one_epoch(session, epoch, interrupt)
                    score = end_epoch(session, epoch, started, interrupt)
                    if session.progress is not None:
                        epochs.set_postfix(score=f"{score:.2f}", best=f"epoch {session.state.best_epoch}")
                return final_evaluation(session)
    finally:
        distributed.stop(ranks)


def set_up(config: TrainConfig, run: Path, ranks: Ranks, device, checkpoint: dict | None, show_progress) -> Session:
    """The run's data, model and optimizer, at the state of ``checkpoint`` when it resumes."""
    if ranks.world > 1 and config.batch_size % ranks.world:
        raise UsageError(f"batch_size {config.batch_size} must be a multiple of the {ranks.world} processes")
    data = load_run_data(config, run if ranks.main else None)
    model = build_model(config, data.train.classnames).to(device)
    check_image_side(model.clip.visual, config.image_size)
    image_warnings = check_run_images(config, data, ranks, _tqdm() if show_progress and ranks.main else None)
    if config.compile_text:
        model.text_encoder = torch.compile(model.text_encoder)
    network = model
    if ranks.world > 1:  # averages the prompts' gradients over the ranks
        cuda = device.type == "cuda"
        network = DistributedDataParallel(model, device_ids=[device] if cuda else None, broadcast_buffers=False)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = config.precision == "tf32"
    optimizer = torch.optim.SGD(
        model.learnable_parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
    state = RunState()
    if checkpoint is not None:
        model.load_prompt_state_dict(checkpoint["prompts"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        state.load_state_dict(checkpoint)
    steps_per_epoch = len(data.train) // config.batch_size
    if steps_per_epoch == 0:
        raise UsageError(
            f"batch_size {config.batch_size} exceeds the {len(data.train)} training images (batches drop the last)"
        )
    selection_set = selection_split(data)
    return Session(
        config=config,
        run=run,
        ranks=ranks,
        device=device,
        data=data,
        model=model,
        network=network,
        optimizer=optimizer,
        loss_fn=AsymmetricLoss(gamma_neg=config.gamma_neg, gamma_pos=config.gamma_pos, clip=config.asl_clip),
        autocast=torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16"),
        items=_training_items(config, model, data),
        steps_per_epoch=steps_per_epoch,
        selection_set=selection_set,
        metric=selection_metric(config, len(selection_set.classnames)),
        state=state,
        progress=_tqdm() if show_progress and ranks.main else None,
        image_warnings=image_warnings,
    )


def announce(session: Session, resumed: bool) -> None:
    """The run's start in the log: what it trains on and with; and the warnings its settings call for."""
    config, data = session.config, session.data
    sets = {"train": data.train, "validation": data.validation, **data.tests}
    counts = ", ".join(f"{name} {len(dataset)}" for name, dataset in sets.items() if dataset is not None)
    known = fractions_in_words(known_fractions(data))
    parameters = session.model.learnable_parameter_count()
    LOGGER.info(
        "%s: %d classes; images: %s; labels known: %s; %s on %s; %s learnable parameters",
        *(session.run, len(data.train.classnames), counts, known, config.backbone, session.device, f"{parameters:,}"),
    )
    if resumed and session.state.epoch >= config.epochs:
        LOGGER.info("the run had finished its %d epochs: its best epoch is evaluated again", config.epochs)
    elif resumed:
        LOGGER.info(
            "resuming at epoch %d, step %d of %d", session.state.epoch, session.state.step, session.steps_per_epoch
        )
    for finding in session.image_warnings + training_findings(config, data):
        LOGGER.warning(finding)


def train_one_epoch(session: Session, epoch: int, interrupt: _Interrupt) -> None:
    """The epoch's steps, from the step the state has reached (a resumed run continues inside its epoch)."""
    lr = learning_rate(session.config, epoch)
    for group in session.optimizer.param_groups:
        group["lr"] = lr
    session.items.epoch = epoch
    session.network.train()
    started = time.perf_counter()
    batches = _epoch_loader(session, epoch)
    if session.progress is not None:
        batches = session.progress(
            batches, desc=f"epoch {epoch}", leave=False, initial=session.state.step, total=session.steps_per_epoch
        )
    for images, labels, _ in batches:
        loss = train_step(session, epoch, images, labels)
        session.state.add_step(loss, session.config.batch_size)
        if session.progress is not None:
            rate = session.state.images / max(time.perf_counter() - started, 1e-9)
            batches.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.1f}")
        if interrupt.asked:
            _save(session)
            raise KeyboardInterrupt(f"stopped at epoch {epoch}, step {session.state.step}; saved: --resume continues")


def train_step(session: Session, epoch: int, images: torch.Tensor, labels: torch.Tensor) -> float:
    """One optimizer step on this rank's share of a batch; the loss of the whole batch (all ranks)."""
    subset = _class_subset(session, epoch)
    if subset is not None:
        labels, subset = labels[:, subset], subset.to(session.device)
    labels = labels.to(session.device)
    targets, mask = (labels == 1).float(), labels != 0
    inputs = {"regions" if session.config.features else "images": images.to(session.device)}
    with session.autocast:
        logits = session.network(**inputs, classes=subset)
    loss = session.config.loss_weight * session.loss_fn(logits.float(), targets, mask)
    if not torch.isfinite(loss) and session.config.features and not torch.isfinite(images).all():
        raise UsageError(
            f"the feature cache {session.config.features} holds NaN or infinite features (epoch {epoch}, step "
            f"{session.state.step}): it is damaged; make it again with dualcoop cache"
        )
    if not torch.isfinite(loss):
        raise UsageError(
            f"training diverged at epoch {epoch}, step {session.state.step}: the loss is {loss.item()}; lower --lr "
            "or --loss-weight"
            + (
                " (checkpoints/last.pt holds the run as the last epoch left it)"
                if (session.run / CHECKPOINT).exists()
                else ""
            )
        )
    session.optimizer.zero_grad(set_to_none=True)
    (loss * session.ranks.world).backward()  # the loss sums over the global batch; DDP averages
    session.optimizer.step()
    (total,) = session.ranks.total(loss.item())
    return total


def end_epoch(session: Session, epoch: int, started: float, interrupt: _Interrupt) -> float:
    """The first rank scores the epoch, keeps the best prompts and saves the run; the others wait.
    The epoch's score (NaN on the other ranks)."""
    score = math.nan
    if session.ranks.main:
        score = selection_score(session.model, session.selection_set, session.config, session.device, session.progress)
        key = session.score_name
        record = dict(
            epoch=epoch,
            lr=learning_rate(session.config, epoch),
            train_loss=session.state.mean_loss,
            **{key: score},
            seconds=time.perf_counter() - started,
        )
        if session.state.end_epoch(record, score, session.model.prompt_state_dict()):
            save_best_model(session.run, session.model, session.config, epoch=epoch, selection={key: score})
        _save(session)
        atomic_write_text(session.run / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in session.state.history))
        for tracker in session.trackers:
            tracker.log_epoch(session.state.history)
        LOGGER.info(
            "epoch %d: lr %.2e, training loss %.4f, %s %.2f, %.1f s (best: epoch %d)",
            *(epoch, record["lr"], record["train_loss"], key.replace("_", " "), score, record["seconds"]),
            session.state.best_epoch,
        )
    else:
        session.state.end_epoch()
    session.ranks.barrier()
    if interrupt.asked:  # Ctrl-C while the epoch was being scored
        raise KeyboardInterrupt(f"stopped after epoch {epoch}; saved: --resume continues")
    return score


def final_evaluation(session: Session) -> dict:
    """The best epoch's prompts on the test set(s), or on the held-out images where there is none:
    ``eval.json``, the pictures and the log's last lines. The first rank's; the others return {}."""
    if not session.ranks.main:
        return {}
    session.model.load_prompt_state_dict(session.state.best_prompts)
    parameters = session.model.learnable_parameter_count()
    results = dict(
        best_epoch=session.state.best_epoch, selected_on=session.config.select_on, selection_metric=session.metric
    )
    results.update(learnable_parameters=parameters, labels_known=known_fractions(session.data))
    results.update(augmentation=applied_augmentation(session.config))
    reported = session.data.tests or ({"val": session.data.validation} if session.data.validation is not None else {})
    for name, dataset in reported.items():
        scores_file = session.run / "scores" / f"{name}.npz"
        results[name] = evaluate_split(
            session.model, dataset, session.config, session.device, session.progress, scores_file
        )
    picked = session.state.best_score if (session.metric, session.config.select_on) == ("mAP", "val") else None
    results["findings"] = session.image_warnings + run_findings(session.config, session.data, results, picked)
    atomic_write_text(session.run / "eval.json", json.dumps(results, indent=2) + "\n")
    for tracker in session.trackers:
        tracker.log_final(results)
    summary = {name: {key: m[key] for key in ("mAP", "CF1", "OF1")} for name, m in results.items() if is_split(m)}
    save_best_model(
        session.run,
        session.model,
        session.config,
        epoch=session.state.best_epoch,
        selection={session.score_name: session.state.best_score},
        metrics=summary,
    )
    plot_run(session.run, session.state.history, results)
    for finding in results["findings"]:
        LOGGER.warning(finding)
    splits = {name: metrics for name, metrics in results.items() if is_split(metrics) or name == "findings"}
    LOGGER.info(  # the command prints the table itself
        "best epoch %d, picked by %s on %s\n%s",
        *(session.state.best_epoch, session.metric, session.config.select_on, results_table(splits)),
        extra={"run_log_only": True},
    )
    return results


def _epochs(session: Session):
    epochs = range(session.state.epoch, session.config.epochs)
    if session.progress is not None:
        epochs = session.progress(epochs, desc="epochs", initial=session.state.epoch, total=session.config.epochs)
    return epochs


def _epoch_loader(session: Session, epoch: int) -> DataLoader:
    """This rank's share of the epoch's batches, from the step the state has reached."""
    size = session.config.batch_size
    order = torch.randperm(
        len(session.data.train), generator=derived_generator("epoch order", session.config.seed, epoch)
    )
    batches = order[: session.steps_per_epoch * size].view(session.steps_per_epoch, size)[session.state.step :]
    shards = [session.ranks.slice(batch) for batch in batches.tolist()]
    return DataLoader(session.items, batch_sampler=shards, num_workers=session.config.workers)


def _class_subset(session: Session, epoch: int) -> torch.Tensor | None:
    """Zero-shot runs with many seen classes train each batch on a fresh random subset of them."""
    classes = len(session.data.train.classnames)
    if not (session.config.zero_shot and classes > session.config.max_train_classes):
        return None
    picker = derived_generator("class subset", session.config.seed, epoch, session.state.step)
    return torch.randperm(classes, generator=picker)[: session.config.max_train_classes].sort().values


def _save(session: Session) -> None:
    if session.ranks.main:
        config = session.config.as_dict()
        save_checkpoint(
            session.run / CHECKPOINT,
            session.state,
            session.model,
            session.optimizer,
            session.data.train.classnames,
            config,
        )


class _Augmented(Dataset):
    """The training images, each augmented from a seed of its own: (run seed, epoch, image index)."""

    def __init__(self, dataset, transform, seed: int):
        self.dataset, self.transform, self.seed, self.epoch = dataset, transform, seed, 0

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        image, labels, _ = self.dataset[index]
        return augmented(self.transform, image, self.seed, self.epoch, index), labels, index


def _training_items(config: TrainConfig, model, data) -> Dataset:
    """What the loop reads: cached region features (one view an epoch), or images augmented afresh."""
    if config.features:
        cached = FeatureCache(config.features).read_for(config, model, training_split(config))
        return CachedRegions(cached, data.train.labels, data.train_indices, config.seed)
    transform = train_transform(config.image_size, config.protocol, config.crop_scale, augmentation=config.augment)
    return _Augmented(data.train, transform, config.seed)


def _tqdm():
    from tqdm.auto import tqdm

    return tqdm


class _Interrupt:
    """Ctrl-C sets a flag: the step in progress finishes, the run saves and stops."""

    def __init__(self):
        self.asked = False

    def __enter__(self):
        self.previous = signal.signal(signal.SIGINT, self._ask)
        return self

    def _ask(self, *_):
        self.asked = True

    def __exit__(self, *_):
        signal.signal(signal.SIGINT, self.previous)
