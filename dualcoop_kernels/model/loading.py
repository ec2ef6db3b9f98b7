"""Loading open_clip CLIP models: by name, with weights from a checkpoint file or an open_clip tag.

Offline, a tag that is not in the download cache fails at once with a clear message (open_clip would
otherwise retry downloads): a quick probe of the hub decides, and ``HF_HUB_OFFLINE`` is applied as it
is at load time.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import tempfile

from torch import nn

from .._checks import error_gist
from ..errors import MissingExtra, UsageError

LOGGER = logging.getLogger(__name__)
MODEL_CONFIG_KEYS = ("embed_dim", "vision_cfg", "text_cfg")  # what every open_clip model config holds


def open_clip_module():
    try:
        import open_clip
    except ImportError as error:
        raise MissingExtra("the CLIP model needs open_clip_torch: pip install 'dualcoop_kernels[clip]'") from error
    return open_clip


def _reachable(host: str, timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


class WeightsUnavailable(RuntimeError):
    """Pretrained weights that cannot be had here (offline, not in the cache)."""


class _OpenClipLogs(logging.Filter):
    """On the root logger while open_clip runs: open_clip's warnings said in this package's log, by
    name; its other lines dropped (its errors come before an exception this package words itself, and
    its note that no pretrained weights were loaded is what random weights ask for)."""

    def __init__(self, folder: str):
        super().__init__()
        self.folder = folder

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name != "root" or not record.pathname.startswith(self.folder):
            return True
        if record.levelno == logging.WARNING and "No pretrained weights loaded" not in record.getMessage():
            LOGGER.warning("open_clip: %s", record.getMessage())
        return False


@contextlib.contextmanager
def _open_clip_logs(open_clip):
    """open_clip logs on the root logger, which, left unconfigured, prints its lines as 'WARNING:root:...'
    and stays configured after: its lines are filtered (:class:`_OpenClipLogs`), and an unconfigured
    root gets a silent handler meanwhile, which keeps ``logging.warning`` from configuring it."""
    root, log_filter = logging.getLogger(), _OpenClipLogs(os.path.dirname(open_clip.__file__))
    silent = logging.NullHandler() if not root.handlers else None
    root.addFilter(log_filter)
    if silent:
        root.addHandler(silent)
    try:
        yield
    finally:
        root.removeFilter(log_filter)
        if silent:
            root.removeHandler(silent)


def registered_name(model: str) -> str:
    """The open_clip name of a model given by name or by the path of its config (.json), which this
    registers with open_clip under the file's stem."""
    if not str(model).endswith(".json"):
        if os.path.isfile(model):
            raise UsageError(
                f"{model} is a file but not an open_clip model config: give a model name (RN50, ViT-B-16, ...) or "
                "a .json file holding embed_dim, vision_cfg and text_cfg"
            )
        return model
    if not os.path.isfile(model):
        raise FileNotFoundError(f"open_clip model config {model} does not exist")
    try:
        with open(model, encoding="utf-8") as file:
            config = json.load(file)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UsageError(f"open_clip model config {model} is not readable JSON ({error})") from error
    missing = [key for key in MODEL_CONFIG_KEYS if not isinstance(config, dict) or key not in config]
    if missing:
        raise UsageError(
            f"open_clip model config {model} lacks {missing}: it must be a JSON object with embed_dim, "
            "vision_cfg and text_cfg, as open_clip's model configs are (docs/training.md shows one)"
        )
    open_clip_module().add_model_config(model)
    return os.path.splitext(os.path.basename(model))[0]


def registered_config(name: str, config: dict) -> str:
    """Register an open_clip model config kept in full (a shared folder's) under ``name``; returns the name."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, f"{name}.json")
        with open(path, "w", encoding="utf-8") as file:
            json.dump(config, file)
        return registered_name(path)


def load_clip(model_name: str, pretrained: str | None = None) -> nn.Module:
    """An open_clip model by name (or by the path of an open_clip model config, a .json file), with
    weights from a local checkpoint file or an open_clip tag
    (from its download cache, or downloaded), or randomly initialised when ``pretrained`` is None.

    Offline, a tag that is not in the cache fails at once with a clear message instead of retrying;
    with ``HF_HUB_OFFLINE=1`` open_clip looks in its cache only.
    """
    open_clip = open_clip_module()
    given, model_name = model_name, registered_name(model_name)
    if model_name not in open_clip.list_models():
        raise UsageError(f"unknown open_clip model {model_name!r}; e.g. RN50, RN101, RN50x4, ViT-B-16, ViT-L-14")
    if pretrained is None:
        try:
            with _open_clip_logs(open_clip):
                return open_clip.create_model(model_name)
        except (TypeError, ValueError, KeyError) as error:  # a config file's values open_clip cannot build
            if given == model_name:
                raise
            raise UsageError(f"open_clip cannot build a model from the config {given} ({error_gist(error)})") from error
    if os.path.isfile(pretrained):
        try:
            with _open_clip_logs(open_clip):
                return open_clip.create_model(model_name, pretrained=pretrained)
        except Exception as error:  # not a checkpoint, or one of another model: torch's and pickle's errors
            raise UsageError(
                f"pretrained file {pretrained} is not a checkpoint of {model_name} ({error_gist(error)}); it "
                "must hold the model's state dict (a torch .pt/.bin or .safetensors file, as open_clip saves them)"
            ) from error
    if pretrained not in open_clip.list_pretrained_tags_by_model(model_name):
        raise UsageError(
            f"pretrained={pretrained!r} is neither a file nor an open_clip tag of {model_name}; "
            f"tags: {open_clip.list_pretrained_tags_by_model(model_name)}"
        )
    offline = _hub_offline()
    if not offline and not _reachable("huggingface.co"):
        raise WeightsUnavailable(
            f"cannot download the {pretrained!r} weights of {model_name}: huggingface.co is unreachable. "
            "Pass pretrained=<a checkpoint file> (--pretrained FILE on the command line), or set HF_HUB_OFFLINE=1 "
            "to use open_clip's download cache."
        )
    with _hub_offline_now(offline), _open_clip_logs(open_clip):
        try:
            return open_clip.create_model(model_name, pretrained=pretrained)
        except Exception as error:
            if not offline:
                raise
            raise WeightsUnavailable(
                f"the {pretrained!r} weights of {model_name} are not in the download cache and HF_HUB_OFFLINE "
                f"is set ({error}); pass pretrained=<a checkpoint file>, or download them once online"
            ) from error


def _hub_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it (1, true, yes or on)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


@contextlib.contextmanager
def _hub_offline_now(offline: bool):
    """huggingface_hub reads HF_HUB_OFFLINE once, when it is imported; this applies the variable as it
    is now, so that setting it from Python after the import works too (instead of retrying downloads)."""
    from huggingface_hub import constants  # open_clip's own dependency

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = offline or before
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before
