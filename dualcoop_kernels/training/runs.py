"""Run folders: the device a run uses, the run's model, a new run's folder, the one way a run resumes,
a finished run's best prompts for evaluation and prediction, and the run's log (``log.txt``).

A run folder (docs/training.md) holds ``config.json``, ``mask.npy``, ``metrics.jsonl``, ``log.txt``,
``checkpoints/last.pt``, ``model/`` (the best prompts, to share), ``eval.json``, ``scores/`` and pictures.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import traceback
from pathlib import Path

import torch

from .._atomic import load_torch_file
from ..errors import UsageError
from ..model import DualCoOpPlusPlus
from ..model.pretrained import read_config, read_folder
from .config import TrainConfig
from .distributed import Ranks

CHECKPOINT = Path("checkpoints") / "last.pt"
MODEL = "model"  # the best epoch's prompts, a folder to share (model/pretrained.py)
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
        raise UsageError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {name!r} asked for, but torch sees no CUDA GPU here")
    return device


def build_model(config: TrainConfig, classnames: list[str], clip=None) -> DualCoOpPlusPlus:
    """The run's model for ``classnames``, its random parts (CLIP weights without a tag, the initial
    contexts) from the run's seed: the same for every rebuild; ``clip`` reuses a loaded CLIP."""
    return DualCoOpPlusPlus.from_settings(config.model_settings(), classnames, clip)


def resumed_config(run: Path, runtime: dict) -> TrainConfig:
    """The settings of the run in ``run`` (its config.json, read here and nowhere else), with the
    runtime settings given (``workers``, ``device``) replacing the saved ones."""
    unknown = sorted(set(runtime) - set(RUNTIME_SETTINGS))
    if unknown:
        raise UsageError(f"a resumed run may change only {list(RUNTIME_SETTINGS)}, not {unknown}")
    return dataclasses.replace(TrainConfig.load(Path(run) / "config.json"), **runtime)


def refuse_other_settings(run: Path, config: TrainConfig, asked: dict) -> None:
    """A resumed run continues as configured: settings given again are welcome where they come to the
    run's own values (aliases resolved, ``--wta pos_norm_det`` with the temperature it freezes); the
    others are refused, each named with both values (runtime settings may change)."""
    wanted = TrainConfig(**{**config.as_dict(), **asked})  # the values as the run would hold them
    different = [
        f"{item.name} {getattr(wanted, item.name)!r} (the run's: {getattr(config, item.name)!r})"
        for item in dataclasses.fields(TrainConfig)
        if not item.metadata["runtime"] and getattr(wanted, item.name) != getattr(config, item.name)
    ]
    if different:
        raise UsageError(
            f"--resume continues {run} as its config.json says, and these settings differ: "
            f"{', '.join(different)}; drop them (only --workers, --device and --report-to may change)"
        )


def open_run(config: TrainConfig, run: Path, resume: bool, ranks: Ranks) -> dict | None:
    """A new run's folder, created with its config.json (None returned); or, to resume, the checkpoint
    the run continues from, after checking that it was made with these settings."""
    checkpoint = Path(run) / CHECKPOINT
    if not resume:
        if checkpoint.exists():
            raise FileExistsError(f"{run} already holds a run: --resume continues it, or choose another --out")
        _refuse_other_files(Path(run))
        ranks.barrier()  # every rank has looked before rank 0 writes
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
        raise UsageError(f"{checkpoint} is not a checkpoint of this version of dualcoop_kernels; start the run again")
    made_with = TrainConfig.from_dict(saved["config"], checkpoint)
    made_with = dataclasses.replace(made_with, **{n: getattr(config, n) for n in RUNTIME_SETTINGS})
    if made_with != config:
        names = [item.name for item in dataclasses.fields(config)]
        different = [name for name in names if getattr(made_with, name) != getattr(config, name)]
        raise UsageError(f"{run}: its checkpoint was made with other settings than these (they differ in {different})")
    return saved


def _refuse_other_files(run: Path) -> None:
    """A new run writes into an absent or empty folder, or one where an attempt stopped before its first
    checkpoint (its config.json there): never among other files (a dataset, another model's config.json)."""
    entries = sorted(entry.name for entry in run.iterdir()) if run.is_dir() else []
    if not entries:
        return
    try:
        TrainConfig.load(run / "config.json")
    except (ValueError, TypeError):
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise FileExistsError(
            f"--out {run} holds other files ({shown}) and no run's config.json: a new run needs a new or empty folder"
        ) from None


def save_best_model(run: Path, model: DualCoOpPlusPlus, config: TrainConfig, **info) -> None:
    """The best epoch's prompts as a folder to share as it is: ``RUN/model`` (config.json and
    model.safetensors, model/pretrained.py), with ``info`` (the epoch, its scores)."""
    model.save_pretrained(Path(run) / MODEL, image_size=config.image_size, **info)


def load_best(run: Path, device: str | None = None) -> tuple[TrainConfig, DualCoOpPlusPlus, torch.device]:
    """A finished run's settings and its best epoch's model, on ``device`` (the run's own when None).
    Runs of 0.1.0 may hold ``prompts.pt`` instead of ``model/``: read weights-only."""
    config = resumed_config(run, {"device": device} if device else {})
    folder = Path(run) / MODEL
    if not (folder / "model.safetensors").is_file() and not (Path(run) / "prompts.pt").is_file():
        raise FileNotFoundError(
            f"{run} holds no trained prompts yet ({MODEL}/ appears when the first epoch ends): "
            "dualcoop train --resume --out RUN continues it"
        )
    saved, ours = read_folder(run)[0], config.model_settings()  # compared before a CLIP is loaded
    different = [key for key in ours.differences(saved) if key != "backbone"]
    if saved.backbone not in (ours.backbone, Path(ours.backbone).stem):  # a config file's is kept by its stem
        different.insert(0, "backbone")
    if different:
        raise UsageError(
            f"{folder} holds another run's prompts: its settings differ from {run}/config.json in {different}"
        )
    resolved = resolve_device(config.device)
    return config, DualCoOpPlusPlus.from_pretrained(run).to(resolved), resolved


def saved_model_info(run: Path) -> dict:
    """What the run saved beside its best prompts (``model/config.json``): the epoch and its selection score."""
    return read_config(Path(run) / MODEL) if (Path(run) / MODEL / "config.json").is_file() else {}


def epochs_trained(run: Path) -> int:
    history = Path(run) / "metrics.jsonl"
    return len(history.read_text().splitlines()) if history.is_file() else 0


def scored_epoch(run: Path, config: TrainConfig) -> str:
    """Which epoch the run's prompts (``model/``) are, of how many trained, in words."""
    saved, done = saved_model_info(run), epochs_trained(run)
    picked = f"epoch {saved['epoch']}" if isinstance(saved.get("epoch"), int) else "the saved epoch"
    if done >= config.epochs:
        return f"{picked} (epochs count from 0), the best of the run's {config.epochs}"
    return f"{picked} (epochs count from 0), the best of the {done} trained of the run's {config.epochs}"


def unfinished(run: Path, config: TrainConfig) -> list[str]:
    """That the run stopped before its last epoch, with what continues it, as a finding; none if it did not."""
    done = epochs_trained(run)
    if done >= config.epochs:
        return []
    return [
        f"the run is unfinished ({done} of {config.epochs} epochs): dualcoop train --resume --out {run} continues it"
    ]


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
            file.write(f"rank {ranks.rank} stopped: {type(error).__name__}: {error}\n{traceback.format_exc()}")
        raise
    finally:
        if handler is not None:
            PACKAGE_LOGGER.removeHandler(handler)
            PACKAGE_LOGGER.setLevel(level)
            handler.close()
