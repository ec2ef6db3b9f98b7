"""What defines a run: every setting in one JSON-serialisable record, with the authors' values per preset.

docs/training.md says where each value comes from. Every field can be overridden (``dualcoop train
--lr 0.002``, or ``TrainConfig(**preset_config("coco"), lr=0.002)``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .._atomic import atomic_write_text
from ..data.protocols import PROTOCOLS
from ..options import WTA_ALIASES, WTA_MODES

DATASETS = ("coco", "voc", "nuswide", "bigearthnet", "csv")
SELECT_ON = ("val", "test")
MAX_IMAGE_SIZE = 2048
# the types settings may take, by their annotation
_TYPES = {"str": str, "str | None": str, "int": int, "int | None": int, "float": (int, float), "bool": bool}
PRECISIONS = ("fp32", "tf32", "bf16")


@dataclass
class TrainConfig:
    dataset: str = "coco"
    root: str = ""  # the dataset's folder (for csv: the training CSV file)
    test_root: str | None = None  # csv only: a CSV file of test images (else the validation split is reported)
    protocol: str = "dualcoop++"
    partial: float = 1.0  # proportion of the training labels known
    mask_seed: int | None = None  # seed of the partial-label draw (None: the run's seed; VOC's published masks: 0)
    mask_file: str | None = None  # a saved mask (.npy) to use instead of drawing one
    features: str | None = None  # a feature cache of the training split (dualcoop cache) instead of its images
    zero_shot: bool = False
    bigearthnet_classes: int = 19  # BigEarthNet's nomenclature: 19 classes, or the 43 original ones (v1.0)
    rgb_max: float = 2000  # BigEarthNet: the reflectance (x 10,000) that the RGB composite maps to 255
    clip: str = "RN101"  # an open_clip model name, or the path of an open_clip model config (.json)
    pretrained: str | None = "openai"  # an open_clip tag, a checkpoint file, or None for random weights
    image_size: int = 448
    n_ctx: int = 21
    csc: bool = True  # class-specific contexts
    wta: str = "pos_norm"
    epochs: int = 50
    batch_size: int = 64
    lr: float = 0.005
    warmup_lr: float = 1e-5  # the first epoch's constant rate
    momentum: float = 0.9
    weight_decay: float = 5e-4
    gamma_neg: float = 2.0
    gamma_pos: float = 1.0
    asl_clip: float = 0.05
    loss_weight: float = 0.02  # the summed loss is scaled by this
    crop_scale: tuple[float, float] = (0.5, 1.0)
    val_fraction: float = 0.05  # of the training images, held out to pick the best epoch
    select_on: str = "val"  # "test": pick the epoch on the test set, as the authors did
    max_train_classes: int = 100  # zero-shot: each batch trains on a random subset of this many seen classes
    top_k: int = 3
    seed: int = 1
    workers: int = 4
    device: str = "auto"
    precision: str = "fp32"  # the encoders': fp32 (the authors'), tf32 matmuls, or bf16 autocast
    compile_text: bool = False  # torch.compile the text encoder
    extra: dict = field(default_factory=dict)  # free-form notes kept with the run

    def __post_init__(self):
        self._check_types()
        self.wta = WTA_ALIASES.get(self.wta, self.wta)
        self.crop_scale = tuple(self.crop_scale)
        checks = [
            (self.dataset in DATASETS, f"dataset must be one of {DATASETS}, got {self.dataset!r}"),
            (self.protocol in PROTOCOLS, f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}"),
            (self.wta in WTA_MODES, f"wta must be one of {WTA_MODES}, got {self.wta!r}"),
            (self.select_on in SELECT_ON, f"select_on must be one of {SELECT_ON}, got {self.select_on!r}"),
            (self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}, got {self.precision!r}"),
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
                not (self.zero_shot and self.csc),
                "zero-shot runs need contexts shared by all classes (--shared-contexts, as the zero-shot presets set)",
            ),
            (
                not (self.mask_file and self.partial != 1.0),
                "--mask gives the known labels itself; leave --partial out (it applies to a drawn mask)",
            ),
        ]
        for passed, message in checks:
            if not passed:
                raise ValueError(message)
        if self.select_on == "val" and self.val_fraction == 0:
            raise ValueError("select_on='val' needs val_fraction > 0 (or select_on='test', the authors' way)")

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
                raise TypeError(f"{item.name} must be {item.type}, got {value!r}")
        if len(self.crop_scale) != 2 or not all(isinstance(v, (int, float)) for v in self.crop_scale):
            raise TypeError(f"crop_scale must be two numbers (low, high), got {self.crop_scale!r}")

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: Path) -> None:
        atomic_write_text(path, json.dumps(self.as_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> TrainConfig:
        try:
            values = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"cannot read the run's configuration {path}: {error}") from error
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{path}: unknown settings {unknown}")
        return cls(**values)


_PARTIAL = dict(clip="RN101", n_ctx=21, csc=True, epochs=50, lr=0.005, loss_weight=0.02)
_ZERO_SHOT = dict(
    zero_shot=True, clip="RN50", image_size=224, n_ctx=64, csc=False, batch_size=32, lr=0.002, loss_weight=0.01
)
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
        raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {name!r}")
    return dict(PRESETS[name])
