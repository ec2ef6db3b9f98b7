"""What defines a run: every setting in one JSON-serialisable record, with the authors' values per preset.

docs/training.md says where each value comes from. Every field can be overridden (``dualcoop train
--lr 0.002``, or ``TrainConfig(**{**preset_config("coco"), "lr": 0.002})``): the command line's settings are
generated from the fields' metadata (:func:`setting`), so a field, its flag, its help and its choices are
written once, here.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from .._atomic import atomic_write_text
from .._checks import wta_mode
from ..data.transforms import AUGMENTATIONS
from ..errors import UsageError, UsageTypeError
from ..model.settings import ModelSettings, renamed_settings
from ..options import PROTOCOLS, WTA_CHOICES, WTA_TRAINING_ALIASES

DATASETS = ("coco", "voc", "nuswide", "bigearthnet", "csv")
SELECT_ON = ("val", "test")  # where the best epoch is picked: held-out training images, or the authors' test set
PRECISIONS = ("fp32", "tf32", "bf16")  # of the encoders: float32, TF32 matmuls, bf16 autocast
MAX_IMAGE_SIZE = 2048
DEFAULT_WORKERS = min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
# the types settings may take, by their annotation
_TYPES = {"str": str, "str | None": str, "int": int, "int | None": int, "float": (int, float), "bool": bool}


class _CommaSeparated(tuple):
    """The names a setting may list, comma-separated: a value is "in" them when each of its names is
    (argparse and TrainConfig check a value with ``in``); "" lists none."""

    def __contains__(self, value) -> bool:
        return isinstance(value, str) and all(tuple.__contains__(self, name) for name in listed(value))


def listed(value: str) -> list[str]:
    """The names in a comma-separated setting's value, each once, in order."""
    return list(dict.fromkeys(name.strip() for name in value.split(",") if name.strip()))


# where a run reports its epochs besides metrics.jsonl and log.txt (training/tracking.py)
REPORT_TO = _CommaSeparated(("tensorboard", "wandb", "csv"))


def setting(
    default, help: str, *, flag=None, aliases=(), choices=None, path=None, runtime=False, shown=None, bare=None
):
    """A field of :class:`TrainConfig` with what the command line needs to offer it.

    ``flag``: the option's name (``--`` and the field's name with dashes by default); ``aliases``: other
    names of the flag; ``choices``: the values allowed; ``path``: "always" a file or folder, or a name
    or a path ("if it exists"); paths are made absolute, so that the run folder works from any working
    folder; ``runtime``: may change when a run resumes (it does not change the run's numbers);
    ``shown``: the default in the user's words, for ``--help``; ``bare``: the value of the flag given
    without one."""
    metadata = dict(
        help=help, flag=flag, aliases=aliases, choices=choices, path=path, runtime=runtime, shown=shown, bare=bare
    )
    if isinstance(default, (dict, list)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    """Every setting of a training run, in one JSON-serialisable record (a run's config.json).

    Each field is made with :func:`setting`, so its flag, help, choices and default are written once:
    ``dualcoop train --help`` lists them all, and docs/training.md says where each value comes from.
    ``TrainConfig(**{**preset_config("coco"), "lr": 0.002})`` overrides a preset's value. The values are
    checked when the record is made: a wrong value or type raises a ``UsageError`` that names the setting.
    """

    dataset: str = setting("coco", "the dataset's reader", choices=DATASETS)
    root: str = setting("", "the dataset's folder (csv: the training CSV file)", path="always", shown="none; needed")
    test_root: str | None = setting(
        None, "csv: a CSV file of test images", path="always", shown="none: the held-out validation images are reported"
    )
    protocol: str = setting(
        "dualcoop++", "whose protocol and model: DualCoOp++ or the original DualCoOp", choices=PROTOCOLS
    )
    partial: float = setting(1.0, "proportion of the training labels known, in (0, 1]")
    mask_seed: int | None = setting(
        None, "seed of the partial-label draw", shown="the run's seed; VOC: 0, as its published masks"
    )
    mask_file: str | None = setting(
        None, "a saved mask (.npy, N x C, True: known) instead of a drawn one", flag="--mask", path="always"
    )
    features: str | None = setting(
        None, "a feature cache of the training split (dualcoop cache) instead of its images", path="always"
    )
    zero_shot: bool = setting(False, "train on the seen classes; evaluate on the unseen (zsl) and all (gzsl)")
    bigearthnet_classes: int = setting(19, "BigEarthNet: 19 classes, or the 43 original ones (v1.0)", choices=(19, 43))
    rgb_max: float = setting(2000, "BigEarthNet: the reflectance (x 10,000) that the RGB composite maps to 255")
    backbone: str = setting(
        "RN101", "an open_clip model name, or an open_clip model config file (.json)", aliases=("--clip",),
        path="if it exists",
    )  # fmt: skip
    pretrained: str | None = setting(
        "openai", "an open_clip tag, a checkpoint file, or 'none' for random weights", path="if it exists"
    )
    image_size: int = setting(448, "image side in pixels")
    n_ctx: int = setting(21, "learned context tokens per prompt")
    shared_contexts: bool = setting(
        False,
        "one set of contexts shared by all classes (zero-shot runs need it; it can score unseen names)",
        shown="off: class-specific contexts",
    )
    wta: str = setting(
        "pos_norm",
        "winner-take-all across classes (the authors' names too: pos_norm_det freezes the temperature)",
        choices=WTA_CHOICES,
    )
    freeze_temperature: bool = setting(
        False,
        "keep the spatial temperature at its start instead of learning it (the authors' pos_norm_det)",
        shown="off: the temperature learns",
    )
    epochs: int = setting(50, "epochs (the first at the warm-up rate)")
    batch_size: int = setting(64, "images per step (over all processes)")
    lr: float = setting(0.005, "the base learning rate (cosine-decayed over the epochs)")
    warmup_lr: float = setting(1e-5, "the first epoch's constant learning rate")
    momentum: float = setting(0.9, "SGD momentum")
    weight_decay: float = setting(5e-4, "SGD weight decay")
    gamma_neg: float = setting(2.0, "the asymmetric loss's focusing exponent of negatives")
    gamma_pos: float = setting(1.0, "the asymmetric loss's focusing exponent of positives")
    asl_clip: float = setting(0.05, "the asymmetric loss's probability shift of negatives")
    loss_weight: float = setting(0.02, "scales the summed loss")
    augment: str = setting(
        "authors",
        "training augmentation: the authors' (crop or cutout, colour operations, flip), crop-flip (crop and "
        "flip only: for classes told by colour), none (the test transform); the cache command: of its views",
        choices=AUGMENTATIONS,
        bare="authors",
        shown="authors; the cache command: none",
    )
    crop_scale: tuple[float, float] = setting((0.5, 1.0), "the random crop's range of areas (low high)")
    val_fraction: float = setting(0.05, "of the training images, held out to pick the best epoch")
    val_images: int | None = setting(
        None, "training images held out to pick the best epoch, instead of a fraction", shown="none: --val-fraction"
    )
    select_on: str = setting(
        "val", "where the best epoch is picked (test: on the test set, the authors' way)", choices=SELECT_ON
    )
    max_train_classes: int = setting(100, "zero-shot: seen classes per batch (a random subset drawn each batch)")
    top_k: int = setting(3, "k of the top-k metrics (precision, recall, F1 at k)")
    seed: int = setting(1, "seed of the random weights and contexts, the image order, augmentation and masks")
    workers: int = setting(
        DEFAULT_WORKERS, "data-loading processes", runtime=True, shown="the machine's cores, at most 4"
    )
    device: str = setting("auto", "auto, cpu, cuda or cuda:N", runtime=True, shown="auto: a GPU where there is one")
    precision: str = setting("fp32", "of the encoders: float32, TF32 matmuls or bf16 autocast", choices=PRECISIONS)
    compile_text: bool = setting(False, "torch.compile the text encoder")
    report_to: str = setting(
        "",
        "where else the run reports its epochs, comma-separated: tensorboard, wandb, csv (summary.csv)",
        choices=REPORT_TO,
        runtime=True,
        shown="none: metrics.jsonl and log.txt only",
    )
    extra: dict = setting({}, "free-form notes kept with the run (KEY=VALUE, repeatable)", shown="none")  # noqa: RUF009 (a field with a default factory)

    def __post_init__(self):
        self._check_types()
        self.crop_scale = tuple(self.crop_scale)
        self.report_to = ",".join(listed(self.report_to))
        checks = [
            (getattr(self, item.name) in item.metadata["choices"], _choice_error(item, getattr(self, item.name)))
            for item in dataclasses.fields(self)
            if item.metadata["choices"]
        ]
        checks += [
            (0 < self.partial <= 1, f"partial must be in (0, 1], got {self.partial}"),
            (0 <= self.val_fraction < 1, f"val_fraction must be in [0, 1), got {self.val_fraction}"),
            (self.epochs >= 1 and self.batch_size >= 1, "epochs and batch_size must be at least 1"),
            (self.lr > 0 and self.warmup_lr > 0, "lr and warmup_lr must be > 0"),
            (self.image_size >= 16, f"image_size must be at least 16 pixels, got {self.image_size}"),
            (self.workers >= 0, f"workers must be >= 0, got {self.workers}"),
            (self.top_k >= 1 and self.max_train_classes >= 1, "top_k and max_train_classes must be >= 1"),
        ]
        checks += [
            (
                all(math.isfinite(v) for v in (self.lr, self.warmup_lr, self.loss_weight)),
                "lr, warmup_lr and loss_weight must be finite",
            ),
            (self.loss_weight > 0, f"loss_weight must be > 0, got {self.loss_weight}"),
            (0 <= self.momentum < 1 and 0 <= self.weight_decay < 1, "momentum and weight_decay must be in [0, 1)"),
            (
                self.image_size <= MAX_IMAGE_SIZE,
                f"image_size must be at most {MAX_IMAGE_SIZE} pixels, got {self.image_size}",
            ),
            (
                not (self.zero_shot and not self.shared_contexts),
                "zero-shot runs need contexts shared by all classes (--shared-contexts, as the zero-shot presets set)",
            ),
            (
                not (self.mask_file and self.partial != 1.0),
                "--mask gives the known labels itself; leave --partial out (it applies to a drawn mask)",
            ),
        ]
        for passed, message in checks:
            if not passed:
                raise UsageError(message)
        for name, value in WTA_TRAINING_ALIASES.get(self.wta, {}).items():  # a mode and a setting
            setattr(self, name, value)
        self.wta = wta_mode(self.wta)
        if self.val_images is not None and self.val_images < 1:
            raise UsageError(f"val_images must be at least 1, got {self.val_images}")
        if self.select_on == "val" and self.val_fraction == 0 and self.val_images is None:
            raise UsageError("select_on='val' needs val_fraction > 0 (or select_on='test', the authors' way)")

    def _check_types(self) -> None:
        """Settings of the wrong type fail here, naming the setting, not later inside the run."""
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if isinstance(value, Path):
                value = str(value)
                setattr(self, item.name, value)
            expected = _TYPES.get(item.type)
            if expected is None or (value is None and "None" in item.type):
                continue
            if isinstance(value, bool) != (expected is bool) or not isinstance(value, expected):
                raise UsageTypeError(f"{item.name} must be {item.type}, got {value!r}")
        pair = isinstance(self.crop_scale, (tuple, list)) and len(self.crop_scale) == 2
        if not pair or not all(isinstance(v, (int, float)) for v in self.crop_scale):
            raise UsageTypeError(f"crop_scale must be two numbers (low, high), got {self.crop_scale!r}")

    def as_dict(self) -> dict:
        """The settings as a JSON-serialisable dict, one key a field: what :meth:`save` writes."""
        return dataclasses.asdict(self)

    def model_settings(self) -> ModelSettings:
        """What builds this run's model."""
        return ModelSettings(
            backbone=self.backbone, pretrained=None if self.pretrained in (None, "none") else self.pretrained,
            n_ctx=self.n_ctx, shared_contexts=self.shared_contexts, wta=self.wta, protocol=self.protocol,
            freeze_temperature=self.freeze_temperature, seed=self.seed,
        )  # fmt: skip

    def save(self, path: Path) -> None:
        """Write the settings to ``path`` as indented JSON (a run's config.json), atomically: a crash
        leaves the old file or the new one, never half of one."""
        atomic_write_text(path, json.dumps(self.as_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> TrainConfig:
        """The settings :meth:`save` wrote to ``path`` (0.1.0's keys mapped); an unreadable file, an unknown
        setting or a wrong value is a ``UsageError``."""
        try:
            values = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise UsageError(f"cannot read the run's configuration {path}: {error}") from error
        return cls.from_dict(values, path)

    @classmethod
    def from_dict(cls, values, source) -> TrainConfig:
        """The settings in ``values`` (a config.json's or a checkpoint's, 0.1.0's keys mapped); ``source``
        names where they come from in an error."""
        if not isinstance(values, dict):
            raise UsageError(f"{source}: expected the run's settings as a JSON object, got {type(values).__name__}")
        values = renamed_settings(values)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UsageError(f"{source}: unknown settings {unknown}")
        return cls(**values)


def _choice_error(item: dataclasses.Field, value) -> str:
    choices = item.metadata["choices"]
    if isinstance(choices, _CommaSeparated) and isinstance(value, str):
        unknown = [name for name in listed(value) if name not in choices]
        return f"{item.name} names {unknown}: its names, separated by commas, must be among {tuple(choices)}"
    return f"{item.name} must be one of {choices}, got {value!r}"


_PARTIAL = dict(backbone="RN101", n_ctx=21, shared_contexts=False, epochs=50, lr=0.005, loss_weight=0.02)
_ZERO_SHOT = dict(
    zero_shot=True, backbone="RN50", image_size=224, n_ctx=64, shared_contexts=True, batch_size=32, lr=0.002,
    loss_weight=0.01,
)  # fmt: skip
PRESETS = {
    "coco": dict(_PARTIAL, dataset="coco", image_size=448, batch_size=64, wta="pos_norm"),
    "voc": dict(_PARTIAL, dataset="voc", image_size=512, batch_size=64, wta="pos_softmax"),
    "nuswide": dict(
        _PARTIAL, dataset="nuswide", image_size=448, batch_size=192, wta="pos_softmax", crop_scale=(0.6, 1.0)
    ),
    "bigearthnet": dict(_PARTIAL, dataset="bigearthnet", image_size=224, batch_size=64, wta="pos_norm"),
    "coco-zsl": dict(_ZERO_SHOT, dataset="coco", wta="pos_norm"),
    "nuswide-zsl": dict(_ZERO_SHOT, dataset="nuswide", wta="pos_softmax", crop_scale=(0.6, 1.0)),
}


def preset_config(name: str) -> dict:
    """The settings of a preset, to be overridden as needed."""
    if name not in PRESETS:
        raise UsageError(f"preset must be one of {tuple(PRESETS)}, got {name!r}")
    return dict(PRESETS[name])
