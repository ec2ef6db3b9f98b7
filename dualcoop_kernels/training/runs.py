"""Run folders: the device a run uses, the run's model, a new run's folder, the one way a run resumes,
a finished run's best prompts for evaluation and prediction, and the run's log (``log.txt``).

A run folder (docs/training.md) holds ``config.json``, ``mask.npy``, ``metrics.jsonl``, ``log.txt``,
``checkpoints/last.pt``, ``prompts.pt``, ``eval.json`` and pictures.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from pathlib import Path

import torch

from ..model import DualCoOpPlusPlus
from .config import TrainConfig
from .distributed import Ranks
from .state import atomic_torch_save, load_torch_file

CHECKPOINT = Path("checkpoints") / "last.pt"
PROMPTS = "prompts.pt"
LOG = "log.txt"
PACKAGE_LOGGER = logging.getLogger("dualcoop_kernels")  # every module's logger is a child
# settings that may change when a run resumes: they do not change its numbers
RUNTIME_SETTINGS = tuple(item.name for item in dataclasses.fields(TrainConfig) if item.metadata["runtime"])


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


def resumed_config(run: Path, runtime: dict) -> TrainConfig:
    """The settings of the run in ``run`` (its config.json, read here and nowhere else), with the
    runtime settings given (``workers``, ``device``) replacing the saved ones."""
    unknown = sorted(set(runtime) - set(RUNTIME_SETTINGS))
    if unknown:
        raise ValueError(f"a resumed run may change only {list(RUNTIME_SETTINGS)}, not {unknown}")
    return dataclasses.replace(TrainConfig.load(Path(run) / "config.json"), **runtime)


def open_run(config: TrainConfig, run: Path, resume: bool, ranks: Ranks) -> dict | None:
    """A new run's folder, created with its config.json (None returned); or, to resume, the checkpoint
    the run continues from, after checking that it was made with these settings."""
    checkpoint = Path(run) / CHECKPOINT
    if not resume:
        if checkpoint.exists():
            raise FileExistsError(f"{run} already holds a run: --resume continues it, or choose another --out")
        if ranks.main:
            Path(run).mkdir(parents=True, exist_ok=True)
            config.save(Path(run) / "config.json")
        return None
    if not checkpoint.exists():
        raise FileNotFoundError(
            f"{run} has no checkpoint: the run stopped before its first epoch ended; start it again "
            "without --resume (the folder is reused)"
        )
    saved = load_torch_file(checkpoint, "checkpoint")
    if not isinstance(saved, dict) or "config" not in saved:
        raise ValueError(f"{checkpoint} is not a checkpoint of this version of dualcoop_kernels; start the run again")
    made_with = dataclasses.replace(TrainConfig(**saved["config"]), **{n: getattr(config, n) for n in RUNTIME_SETTINGS})
    if made_with != config:
        different = [n for n in saved["config"] if getattr(made_with, n) != getattr(config, n)]
        raise ValueError(f"{run}: its checkpoint was made with other settings than these (they differ in {different})")
    return saved


def save_best_prompts(run: Path, prompts: dict, classnames: list[str], epoch: int) -> None:
    atomic_torch_save(Path(run) / PROMPTS, dict(prompts=prompts, classnames=list(classnames), epoch=epoch))


def load_best(run: Path, device: str | None = None) -> tuple[TrainConfig, DualCoOpPlusPlus, torch.device]:
    """A finished run's settings and its best epoch's model, on ``device`` (the run's own when None)."""
    config = resumed_config(run, {"device": device} if device else {})
    path = Path(run) / PROMPTS
    best = load_torch_file(path, "learned prompts")
    if not isinstance(best, dict) or not {"prompts", "classnames"} <= set(best):
        raise ValueError(f"{path} is not a prompts file of dualcoop_kernels (the best epoch's prompts and class names)")
    resolved = resolve_device(config.device)
    model = build_model(config, best["classnames"]).to(resolved)
    try:
        model.load_prompt_state_dict(best["prompts"])
    except ValueError as error:
        raise ValueError(
            f"{path} holds {describe_prompts(best['prompts'], best['classnames'])}, but this run's config.json "
            f"asks for {describe_settings(config, len(best['classnames']))}: it is another run's file"
        ) from error
    return config, model.eval(), resolved


def describe_prompts(prompts: dict, classnames: list[str]) -> str:
    """What a prompts file holds, in the user's words: its classes and its contexts."""
    contexts = [tensor for name, tensor in prompts.items() if "ctx_" in name]
    names = ", ".join(classnames[:5]) + (", ..." if len(classnames) > 5 else "")
    if not contexts:
        return f"no contexts for {len(classnames)} classes ({names})"
    shape = tuple(contexts[0].shape)
    kind = "class-specific contexts" if len(shape) == 3 else "contexts shared by all classes"
    return f"{len(contexts)} prompt sets of {kind} of {shape[-2]} tokens, for {len(classnames)} classes ({names})"


def describe_settings(config: TrainConfig, classes: int) -> str:
    kind = "class-specific contexts" if config.csc else "contexts shared by all classes"
    sets = 2 if config.protocol == "dualcoop" else 3
    return f"{sets} prompt sets of {kind} of {config.n_ctx} tokens, for {classes} classes"


@contextlib.contextmanager
def run_log(run: Path, ranks: Ranks):
    """``run/log.txt`` (in an existing run folder) gets the run's log lines, from the first rank, and any
    rank's failure, with its rank. Lines are appended: a resumed run continues the log."""
    handler, level = None, PACKAGE_LOGGER.level
    if ranks.main:
        handler = logging.FileHandler(Path(run) / LOG, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        PACKAGE_LOGGER.addHandler(handler)
        PACKAGE_LOGGER.setLevel(logging.INFO)
    try:
        yield
    except BaseException as error:
        with contextlib.suppress(OSError), open(Path(run) / LOG, "a", encoding="utf-8") as file:
            file.write(f"rank {ranks.rank} stopped: {type(error).__name__}: {error}\n")
        raise
    finally:
        if handler is not None:
            PACKAGE_LOGGER.removeHandler(handler)
            PACKAGE_LOGGER.setLevel(level)
            handler.close()
