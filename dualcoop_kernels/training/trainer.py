"""Training a run: the authors' schedule, the best epoch picked on held-out images, atomic checkpoints
that resume exactly, and the final evaluation.

Determinism: the order of an epoch's images, the class subsets of zero-shot batches and every image's
augmentation are functions of (seed, epoch, step or image index) alone, so a run resumed from any
checkpoint, with any number of workers, computes what the uninterrupted run computes.
"""

from __future__ import annotations

import json
import math
import signal
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from .._atomic import atomic_write_text
from ..data.transforms import test_transform, train_transform
from ..loss import AsymmetricLoss
from ..metrics import average_precision, evaluate, ranking_scores, top_k_metrics
from ..model import DualCoOpPlusPlus
from . import distributed
from .cache import CachedRegions, FeatureCache
from .checkpoint import atomic_torch_save, load_torch_file, random_states, restore_random_states
from .config import TrainConfig
from .datasets import load_run_data, training_split
from .plots import plot_run

CHECKPOINT = Path("checkpoints") / "last.pt"
RUNTIME_SETTINGS = ("workers", "device")  # may change when a run resumes: they do not change its numbers


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but torch sees no CUDA GPU here")
    return device


def learning_rate(config: TrainConfig, epoch: int) -> float:
    """Epoch 0 at the constant warm-up rate, then cosine from the base rate over ``epochs``, stepped
    once per epoch (the authors' schedule: the last of 50 epochs runs at 0.0039 x the base rate)."""
    if epoch == 0:
        return config.warmup_lr
    return config.lr * (1 + math.cos(math.pi * (epoch - 1) / config.epochs)) / 2


def _mix(*numbers: int) -> int:
    """A seed from several integers (the run's seed, the epoch, a step or an image)."""
    return int(np.random.SeedSequence([int(n) for n in numbers]).generate_state(1, np.uint64)[0] >> 1)


class _Augmented(Dataset):
    """The training images, each augmented from a seed of its own: (run seed, epoch, image index)."""

    def __init__(self, dataset, transform, seed: int):
        self.dataset, self.transform, self.seed, self.epoch = dataset, transform, seed, 0

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        image, labels, _ = self.dataset[index]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_mix(self.seed, self.epoch, index))
            return self.transform(image), labels, index


def build_model(config: TrainConfig, classnames: list[str], clip=None) -> DualCoOpPlusPlus:
    """The run's model for ``classnames``; ``clip`` reuses an already loaded CLIP (zero-shot evaluation
    builds a model per class list around the same frozen CLIP)."""
    variant = "dualcoop" if config.protocol == "dualcoop" else "dualcoop++"
    pretrained = None if config.pretrained in (None, "none") else config.pretrained
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)  # random weights and contexts: the same for a run's every rebuild
        return DualCoOpPlusPlus(
            clip if clip is not None else config.clip,
            classnames,
            pretrained=pretrained if clip is None else None,
            n_ctx=config.n_ctx,
            csc=config.csc,
            wta=config.wta,
            variant=variant,
        )


def model_for(model: DualCoOpPlusPlus, config: TrainConfig, classnames: list[str]) -> DualCoOpPlusPlus:
    """The trained prompts scoring other classes: needs contexts shared by all classes."""
    if classnames == model.prompts.classnames:
        return model
    if config.csc:
        raise ValueError("class-specific contexts cannot score classes they were not trained on (use csc=False)")
    other = build_model(config, classnames, clip=model.clip).to(next(model.prompts.parameters()).device)
    other.load_prompt_state_dict(model.prompt_state_dict())
    return other


@torch.no_grad()
def scores_of(model, dataset, config: TrainConfig, device: torch.device, progress=None) -> np.ndarray:
    """N x C ranking scores (P+ - P-) of a dataset's images, with the test transform."""
    model.eval()
    view = replace(dataset, transform=test_transform(config.image_size, config.protocol))
    loader = DataLoader(view, batch_size=config.batch_size, num_workers=config.workers)
    batches = []
    if progress is not None:
        loader = progress(loader, desc=f"scoring {dataset.name}", leave=False)
    for images, _, _ in loader:
        batches.append(ranking_scores(model(images.to(device)).float()).cpu())
    return torch.cat(batches).numpy()


def known_average_precisions(scores: np.ndarray, labels: torch.Tensor) -> np.ndarray:
    """Each class's AP over its known labels only (validation images keep their partial labels): the
    class ranks the images whose label for it is known; a class without a known positive has AP 0."""
    labels = labels.numpy()
    values = np.zeros(labels.shape[1])
    for column in range(labels.shape[1]):
        known = labels[:, column] != 0
        if known.any():
            values[column] = average_precision(scores[known, column, None], labels[known, column, None])[0]
    return values


def evaluate_split(model, dataset, config: TrainConfig, device, progress=None) -> dict:
    """The papers' metrics of a split (docs/data.md); where some labels are unknown (held-out training
    images), AP and mAP rank each class's known labels only, as the epoch was picked."""
    scores = scores_of(model_for(model, config, dataset.classnames), dataset, config, device, progress)
    results = evaluate(scores, dataset.labels.numpy(), dataset.classnames, k=min(config.top_k, scores.shape[1]))
    if bool((dataset.labels == 0).any()):
        per_class = 100 * known_average_precisions(scores, dataset.labels)
        results.update(
            mAP=float(per_class.mean()),
            per_class_AP=dict(zip(dataset.classnames, per_class.tolist())),
            unknown_labels="left out of AP and mAP; counted as negatives by the threshold and top-k metrics",
        )
    return results


def selection_metric(config: TrainConfig, classes: int) -> str:
    """What picks the best epoch: mAP (over known labels), or F1 at k for zero-shot runs (unless
    they have k classes or fewer, where every class is in the top k and F1 at k cannot change)."""
    return f"F1@{config.top_k}" if config.zero_shot and classes > config.top_k else "mAP"


def selection_score(model, dataset, config: TrainConfig, device, progress=None) -> float:
    scores = scores_of(model, dataset, config, device, progress)
    if selection_metric(config, scores.shape[1]) != "mAP":
        return top_k_metrics(scores, dataset.labels.numpy(), k=config.top_k)["f1"]
    return 100 * float(known_average_precisions(scores, dataset.labels).mean())


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


def _write_history(run: Path, history: list[dict]) -> None:
    atomic_write_text(run / "metrics.jsonl", "".join(json.dumps(record) + "\n" for record in history))


def train(config: TrainConfig, run: Path, *, resume: bool = False, show_progress: bool = True) -> dict:
    """Train, pick the best epoch, evaluate it on the test set(s); returns what ``eval.json`` holds."""
    from tqdm.auto import tqdm

    run = Path(run)
    progress = tqdm if show_progress else None
    checkpoint_path = run / CHECKPOINT
    state = _saved_state(config, run, resume)
    ranks, device = distributed.start(resolve_device(config.device))
    if ranks.world > 1 and config.batch_size % ranks.world:
        raise ValueError(f"batch_size {config.batch_size} must be a multiple of the {ranks.world} processes")
    if not ranks.main:
        progress = None
    elif state is None:
        run.mkdir(parents=True, exist_ok=True)
        config.save(run / "config.json")
    data = load_run_data(config, run if ranks.main else None)
    model = build_model(config, data.train.classnames).to(device)
    if config.compile_text:
        model.text_encoder = torch.compile(model.text_encoder)
    network = model
    if ranks.world > 1:  # averages the prompts' gradients over the ranks
        network = DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None, broadcast_buffers=False
        )
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = config.precision == "tf32"
    optimizer = torch.optim.SGD(
        model.learnable_parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
    loss_fn = AsymmetricLoss(gamma_neg=config.gamma_neg, gamma_pos=config.gamma_pos, clip=config.asl_clip)
    start_epoch, step, history, best = 0, 0, [], {"score": -math.inf, "epoch": None, "prompts": None}
    running = {"loss": 0.0, "images": 0}
    if state is not None:
        model.load_prompt_state_dict(state["prompts"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, step, running = state["epoch"], state["step"], state["running"]
        history, best = state["history"], state["best"]
        restore_random_states(state["random"])

    def save(epoch_, step_):
        if not ranks.main:
            return
        atomic_torch_save(
            checkpoint_path,
            dict(
                prompts=model.prompt_state_dict(),
                optimizer=optimizer.state_dict(),
                epoch=epoch_,
                step=step_,
                history=history,
                best=best,
                running=running,
                random=random_states(),
                classnames=data.train.classnames,
            ),
        )

    augmented = _training_items(config, model, data)
    classes = len(data.train.classnames)
    steps_per_epoch = len(data.train) // config.batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"batch_size {config.batch_size} exceeds the {len(data.train)} training images (batches drop the last)"
        )
    selection_set = data.validation if data.validation is not None else data.tests.get("zsl", data.tests.get("test"))
    if selection_set is None:
        raise ValueError("select_on='test' needs a test set")
    metric = selection_metric(config, len(selection_set.classnames))
    with _Interrupt() as interrupt:
        epochs = range(start_epoch, config.epochs)
        if progress is not None:
            epochs = progress(epochs, desc="epochs", initial=start_epoch, total=config.epochs)
        for epoch in epochs:
            lr = learning_rate(config, epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(_mix(config.seed, epoch)))
            batches = order[: steps_per_epoch * config.batch_size].view(steps_per_epoch, config.batch_size)[step:]
            augmented.epoch = epoch
            shards = [ranks.slice(batch) for batch in batches.tolist()]
            loader = DataLoader(augmented, batch_sampler=shards, num_workers=config.workers)
            network.train()
            started = time.perf_counter()
            bar = loader
            if progress is not None:
                bar = progress(loader, desc=f"epoch {epoch}", leave=False, initial=step, total=steps_per_epoch)
            for images, labels, _ in bar:
                subset = None
                if config.zero_shot and classes > config.max_train_classes:
                    picker = torch.Generator().manual_seed(_mix(config.seed, epoch, step, 1))
                    subset = torch.randperm(classes, generator=picker)[: config.max_train_classes].sort().values
                    labels = labels[:, subset]
                    subset = subset.to(device)
                labels = labels.to(device)
                targets, mask = (labels == 1).float(), labels != 0
                inputs = {"regions" if config.features else "images": images.to(device)}
                with autocast:  # the encoders; the head and the loss compute in float32
                    logits = network(**inputs, classes=subset)
                loss = config.loss_weight * loss_fn(logits.float(), targets, mask)
                if not torch.isfinite(loss):
                    raise ValueError(
                        f"training diverged at epoch {epoch}, step {step}: the loss is {loss.item()}; lower --lr "
                        "or --loss-weight (checkpoints/last.pt holds the run as the last epoch left it)"
                    )
                optimizer.zero_grad(set_to_none=True)
                (loss * ranks.world).backward()  # the loss sums over the global batch; DDP averages
                optimizer.step()
                step += 1
                (batch_loss,) = ranks.total(loss.item())
                running["loss"] += batch_loss * config.batch_size
                running["images"] += config.batch_size
                if progress is not None:
                    rate = running["images"] / max(time.perf_counter() - started, 1e-9)
                    bar.set_postfix(loss=f"{batch_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.1f}")
                if interrupt.asked:
                    save(epoch, step)
                    raise KeyboardInterrupt(f"stopped at epoch {epoch}, step {step}; saved: --resume continues")
            if not ranks.main:  # rank 0 picks the epoch and writes the files
                step, running = 0, {"loss": 0.0, "images": 0}
                ranks.barrier()
                continue
            score = selection_score(model, selection_set, config, device, progress)
            record = dict(
                epoch=epoch,
                lr=lr,
                train_loss=running["loss"] / max(running["images"], 1),
                **{f"{config.select_on}_{metric}": score},
                seconds=time.perf_counter() - started,
            )
            history.append(record)
            if score > best["score"]:  # the first of equal scores stays
                best = {"score": score, "epoch": epoch, "prompts": model.prompt_state_dict()}
                atomic_torch_save(
                    run / "prompts.pt", dict(prompts=best["prompts"], classnames=data.train.classnames, epoch=epoch)
                )
            step, running = 0, {"loss": 0.0, "images": 0}
            save(epoch + 1, 0)
            _write_history(run, history)
            ranks.barrier()
            if interrupt.asked:  # Ctrl-C while the epoch was being scored
                raise KeyboardInterrupt(f"stopped after epoch {epoch}; saved: --resume continues")
    if not ranks.main:
        distributed.stop(ranks)
        return {}
    model.load_prompt_state_dict(best["prompts"])
    results = dict(best_epoch=best["epoch"], selected_on=config.select_on, selection_metric=metric)
    reported = data.tests or ({"val": data.validation} if data.validation is not None else {})
    for name, dataset in reported.items():
        results[name] = evaluate_split(model, dataset, config, device, progress)
    atomic_write_text(run / "eval.json", json.dumps(results, indent=2) + "\n")
    plot_run(run, history, results)
    distributed.stop(ranks)
    return results


def _saved_state(config: TrainConfig, run: Path, resume: bool) -> dict | None:
    """The checkpoint a resumed run continues from (None for a new run), after checking that the run
    folder holds what the call expects."""
    checkpoint_path = run / CHECKPOINT
    if not resume:
        if checkpoint_path.exists():
            raise FileExistsError(f"{run} already holds a run: --resume continues it, or choose another --out")
        return None
    saved = TrainConfig.load(run / "config.json")
    if replace(saved, **{name: getattr(config, name) for name in RUNTIME_SETTINGS}) != config:
        raise ValueError(
            f"{run}: --resume continues the run as configured in its config.json; other settings were given"
        )
    if not checkpoint_path.exists():
        raise FileNotFoundError(
            f"{run} has no checkpoint: the run stopped before its first epoch ended; start it again "
            "without --resume (the folder is reused)"
        )
    return load_torch_file(checkpoint_path, "checkpoint")


def _training_items(config: TrainConfig, model, data) -> Dataset:
    """What the loop reads: cached region features (one view an epoch), or images augmented afresh."""
    if config.features:
        cached = FeatureCache(config.features).read_for(config, model, training_split(config))
        return CachedRegions(cached, data.train.labels, data.train_indices, config.seed)
    transform = train_transform(config.image_size, config.protocol, config.crop_scale)
    return _Augmented(data.train, transform, config.seed)
