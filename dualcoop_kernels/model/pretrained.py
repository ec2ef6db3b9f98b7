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
import tempfile
from pathlib import Path

import torch

from .._atomic import atomic_open, atomic_write_text, load_torch_file
from ..errors import UsageError
from ..version import __version__

CONFIG, WEIGHTS = "config.json", "model.safetensors"
FORMAT = "dualcoop_kernels prompts"
OLD_PROMPTS = "prompts.pt"  # what runs wrote before: a torch file of the prompts and class names
# what rebuilds a model (the keys of a run's settings that build_from_settings reads)
SETTINGS = ("clip", "pretrained", "n_ctx", "csc", "wta", "protocol", "seed", "learn_temperature")


def build_from_settings(settings: dict, classnames: list[str], clip=None):
    """The model that ``settings`` describe (a run's config.json, or a shared folder's), for
    ``classnames``, its random parts (CLIP weights without a tag, the initial contexts) drawn from
    ``settings["seed"]``; ``clip`` reuses an already loaded CLIP."""
    from .dualcoop import DualCoOpPlusPlus

    pretrained = settings.get("pretrained")
    pretrained = None if pretrained in (None, "none") else pretrained
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.get("seed") or 0)
        model = DualCoOpPlusPlus(
            clip if clip is not None else _registered_clip(settings),
            classnames,
            pretrained=pretrained if clip is None else None,
            n_ctx=settings["n_ctx"],
            csc=settings["csc"],
            wta=settings["wta"],
            variant=settings.get("protocol", "dualcoop++"),
            learn_temperature=settings.get("learn_temperature") is not False,
        )
    model.settings.update({key: settings.get(key) for key in (*SETTINGS, "clip_config") if key in settings})
    return model


def save_pretrained(model, folder, settings: dict, **info) -> Path:
    """Write ``model``'s learned prompts and ``settings`` (:data:`SETTINGS`; a CLIP model config file
    is kept in full) with ``info`` (epoch, metrics, image size, ...) into ``folder``; returns it."""
    folder = Path(folder)
    from safetensors.torch import save

    if settings.get("pretrained") in (None, "none") and settings.get("seed") is None:
        raise UsageError(
            "the model's CLIP has random weights, which the receiver can rebuild only from their seed: build "
            "it under torch.manual_seed(seed) and pass settings={'seed': seed}"
        )
    if not settings.get("clip"):
        raise UsageError("settings must name the open_clip model (clip=...): a CLIP given as a module has no name")

    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.prompt_state_dict().items()}
    weights = save(state, metadata={"format": "pt"})
    with atomic_open(folder / WEIGHTS, "wb") as file:
        file.write(weights)
    config = dict(format=FORMAT, package_version=__version__, classnames=list(model.prompts.classnames))
    config.update({key: settings.get(key) for key in SETTINGS})
    clip = str(settings.get("clip"))
    if clip.endswith(".json") and Path(clip).is_file():
        config.update(clip=Path(clip).stem, clip_config=json.loads(Path(clip).read_text()))
    elif settings.get("clip_config"):  # a model built from a shared folder, shared again
        config.update(clip_config=settings["clip_config"])
    config.update(learnable_parameters=model.learnable_parameter_count(), **info)
    config.update(weights_sha256=hashlib.sha256(weights).hexdigest())
    atomic_write_text(folder / CONFIG, json.dumps(config, indent=2) + "\n")
    return folder


def load_pretrained(source, *, clip=None, pretrained: str | None = None):
    """The model saved in ``source``: a folder of :func:`save_pretrained`, a run folder (its ``model/``),
    or a run folder of an older version (``prompts.pt``, read weights-only). ``clip`` (a loaded CLIP)
    or ``pretrained`` (another copy of the CLIP weights) stand in for those the folder names."""
    folder = Path(source)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder of trained prompts or a run folder")
    if (folder / "model" / CONFIG).is_file():
        folder = folder / "model"
    if not (folder / WEIGHTS).is_file() and (folder / OLD_PROMPTS).is_file():
        settings, classnames, state = _old_run(folder)
    else:
        settings, classnames, state = _shared_folder(folder)
    if pretrained is not None:
        settings = dict(settings, pretrained=pretrained)
    model = build_from_settings(settings, classnames, clip)
    try:
        model.load_prompt_state_dict(state)
    except ValueError as error:
        raise UsageError(
            f"{folder} holds {describe_prompts(state, classnames)}, but its settings ask for "
            f"{describe_settings(settings, len(classnames))}: the prompts are another run's ({error})"
        ) from error
    return model.eval()


def describe_prompts(prompts: dict, classnames: list[str]) -> str:
    """What learned prompts are, in the user's words: their classes and their contexts."""
    contexts = [tensor for name, tensor in prompts.items() if "ctx_" in name]
    names = ", ".join(classnames[:5]) + (", ..." if len(classnames) > 5 else "")
    if not contexts:
        return f"no contexts for {len(classnames)} classes ({names})"
    shape = tuple(contexts[0].shape)
    kind = "class-specific contexts" if len(shape) == 3 else "contexts shared by all classes"
    return f"{len(contexts)} prompt sets of {kind} of {shape[-2]} tokens, for {len(classnames)} classes ({names})"


def describe_settings(settings: dict, classes: int) -> str:
    kind = "class-specific contexts" if settings["csc"] else "contexts shared by all classes"
    sets = 2 if settings.get("protocol") == "dualcoop" else 3
    return f"{sets} prompt sets of {kind} of {settings['n_ctx']} tokens, for {classes} classes"


def read_config(folder: Path) -> dict:
    path = Path(folder) / CONFIG
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UsageError(f"{path} cannot be read as JSON ({error})") from error
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise UsageError(f'{path} is not the config of dualcoop_kernels prompts (no "format": "{FORMAT}")')
    return config


def _shared_folder(folder: Path) -> tuple[dict, list[str], dict]:
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
    return config, config["classnames"], state


def _old_run(folder: Path) -> tuple[dict, list[str], dict]:
    """A run folder of an older version: its settings (config.json) and its prompts.pt, weights-only."""
    try:
        settings = json.loads((folder / CONFIG).read_text()) if (folder / CONFIG).is_file() else None
    except (OSError, json.JSONDecodeError) as error:
        raise UsageError(f"{folder / CONFIG} cannot be read as JSON ({error})") from error
    if not isinstance(settings, dict):
        raise UsageError(f"{folder} holds {OLD_PROMPTS} but no config.json of its run's settings")
    best = load_torch_file(folder / OLD_PROMPTS, "learned prompts")
    if not isinstance(best, dict) or not {"prompts", "classnames"} <= set(best):
        raise UsageError(f"{folder / OLD_PROMPTS} is not a prompts file of dualcoop_kernels")
    return settings, best["classnames"], best["prompts"]


def _registered_clip(settings: dict) -> str:
    """The open_clip model name; a model config kept in full is registered with open_clip first."""
    if not settings.get("clip_config"):
        return settings["clip"]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"{settings['clip']}.json"
        path.write_text(json.dumps(settings["clip_config"]))
        from .loading import registered_name

        return registered_name(str(path))
