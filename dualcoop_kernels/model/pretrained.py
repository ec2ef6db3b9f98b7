"""Trained prompts to share: a folder in the layout of a Hugging Face ``PyTorchModelHubMixin`` model,
``config.json`` (what the model needs to be rebuilt, and what it scored) beside ``model.safetensors``
(the learned contexts and log temperature), read without running any code.

    model.save_pretrained("my-prompts", epoch=12, metrics={...})   # or a run's own RUN/model
    model = DualCoOpPlusPlus.from_pretrained("my-prompts")          # a folder, a run folder, or an old run

The CLIP weights are not in the folder: the config names the open_clip model and the tag (or file) of
its weights (a model config file's contents are kept in full), and the seed of random weights, so that
the receiver builds the same CLIP. ``config.json`` records the digest of ``model.safetensors`` and is
written after it: a pair written by two different saves (a save killed half-way) is refused.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

from .._atomic import atomic_open, atomic_write_text, load_torch_file
from ..errors import UsageError
from ..version import __version__
from .settings import ModelSettings

CONFIG, WEIGHTS = "config.json", "model.safetensors"
FORMAT = "dualcoop_kernels prompts"
OLD_PROMPTS = "prompts.pt"  # what runs of 0.1.0 wrote at first: a torch file of the prompts and class names


def write_folder(folder, settings: ModelSettings, classnames: list[str], state: dict, info: dict) -> Path:
    """Write learned prompts (``state``, CPU tensors) with their ``settings``, ``classnames`` and
    ``info`` (epoch, metrics, image size, ...) into ``folder``; returns it. A CLIP model config file
    named by ``settings.backbone`` is kept in full."""
    from safetensors.torch import save

    folder = Path(folder)
    reserved = sorted(set(info) & {*settings.as_dict(), "format", "package_version", "classnames", "weights_sha256"})
    if reserved:
        raise UsageError(f"{reserved} are written from the model's settings, not as info: pass them by their own name")
    if settings.pretrained is None and settings.seed is None:
        raise UsageError(
            "the model's CLIP has random weights, which the receiver can rebuild only from their seed: build "
            "it under torch.manual_seed(seed) and pass seed=seed"
        )
    if not settings.backbone:
        raise UsageError("a CLIP given as a module has no name: pass backbone=<its open_clip model name>")
    backbone = str(settings.backbone)
    if backbone.endswith(".json") and Path(backbone).is_file():
        settings = replace(settings, backbone=Path(backbone).stem, clip_config=json.loads(Path(backbone).read_text()))
    weights = save(state, metadata={"format": "pt"})
    with atomic_open(folder / WEIGHTS, "wb") as file:
        file.write(weights)
    config = dict(format=FORMAT, package_version=__version__, classnames=list(classnames), **settings.as_dict())
    config.update(info, weights_sha256=hashlib.sha256(weights).hexdigest())
    atomic_write_text(folder / CONFIG, json.dumps(config, indent=2) + "\n")
    return folder


def read_folder(source) -> tuple[ModelSettings, list[str], dict, Path]:
    """What ``source`` holds: a folder of :func:`write_folder`, a run folder (its ``model/``), or a run
    folder of 0.1.0 with ``prompts.pt`` (read weights-only). Returns the settings, the class names,
    the prompts' state and the folder they came from."""
    folder = Path(source)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder of trained prompts or a run folder")
    if (folder / "model" / CONFIG).is_file():
        folder = folder / "model"
    if not (folder / WEIGHTS).is_file() and (folder / OLD_PROMPTS).is_file():
        return (*_old_run(folder), folder)
    if not (folder / WEIGHTS).is_file() and not (folder / CONFIG).is_file():
        raise FileNotFoundError(
            f"{folder} is not a model: it holds neither {CONFIG} and {WEIGHTS} (save_pretrained, or a run "
            "folder's model/) nor a run's prompts"
        )
    return (*_shared_folder(folder), folder)


def describe_prompts(prompts: dict, classnames: list[str]) -> str:
    """What learned prompts are, in the user's words: their classes and their contexts."""
    contexts = [tensor for name, tensor in prompts.items() if "ctx_" in name]
    names = ", ".join(classnames[:5]) + (", ..." if len(classnames) > 5 else "")
    if not contexts:
        return f"no contexts for {len(classnames)} classes ({names})"
    shape = tuple(contexts[0].shape)
    kind = "class-specific contexts" if len(shape) == 3 else "contexts shared by all classes"
    return f"{len(contexts)} prompt sets of {kind} of {shape[-2]} tokens, for {len(classnames)} classes ({names})"


def describe_settings(settings: ModelSettings, classes: int) -> str:
    kind = "contexts shared by all classes" if settings.shared_contexts else "class-specific contexts"
    sets = 2 if settings.protocol == "dualcoop" else 3
    return f"{sets} prompt sets of {kind} of {settings.n_ctx} tokens, for {classes} classes"


def read_config(folder: Path) -> dict:
    path = Path(folder) / CONFIG
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UsageError(f"{path} cannot be read as JSON ({error})") from error
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise UsageError(f'{path} is not the config of dualcoop_kernels prompts (no "format": "{FORMAT}")')
    return config


def _shared_folder(folder: Path) -> tuple[ModelSettings, list[str], dict]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    config = read_config(folder)
    try:
        weights = (folder / WEIGHTS).read_bytes()
        state = load(weights)
    except (OSError, SafetensorError) as error:
        raise UsageError(f"{folder / WEIGHTS} cannot be read as safetensors ({error})") from error
    if hashlib.sha256(weights).hexdigest() != config.get("weights_sha256"):
        raise UsageError(
            f"{folder}: {WEIGHTS} is not the file {CONFIG} was written with (a save stopped half-way?); "
            "save the prompts again"
        )
    return ModelSettings.from_dict(config, str(folder / CONFIG)), config["classnames"], state


def _old_run(folder: Path) -> tuple[ModelSettings, list[str], dict]:
    """A run folder of 0.1.0's first format: its settings (config.json) and its prompts.pt, weights-only."""
    try:
        settings = json.loads((folder / CONFIG).read_text()) if (folder / CONFIG).is_file() else None
    except (OSError, json.JSONDecodeError) as error:
        raise UsageError(f"{folder / CONFIG} cannot be read as JSON ({error})") from error
    if not isinstance(settings, dict):
        raise UsageError(f"{folder} holds {OLD_PROMPTS} but no config.json of its run's settings")
    best = load_torch_file(folder / OLD_PROMPTS, "learned prompts")
    if not isinstance(best, dict) or not {"prompts", "classnames"} <= set(best):
        raise UsageError(f"{folder / OLD_PROMPTS} is not a prompts file of dualcoop_kernels")
    return ModelSettings.from_dict(settings, str(folder / CONFIG)), best["classnames"], best["prompts"]
