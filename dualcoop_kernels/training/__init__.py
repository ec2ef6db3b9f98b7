"""Training, evaluating and scoring with DualCoOp++ as the authors did (docs/training.md).

``config.py`` what defines a run and the presets; ``datasets.py`` a run's data (partial labels,
validation images, test sets); ``trainer.py`` the loop, checkpoints and the final evaluation;
``cache.py`` feature caches; ``distributed.py`` several processes under torchrun; ``checkpoint.py``
checkpoints and random states; ``plots.py`` pictures of a run.
"""

from .config import PRESETS, TrainConfig, preset_config
from .trainer import build_model, learning_rate, train

__all__ = ["PRESETS", "TrainConfig", "build_model", "learning_rate", "preset_config", "train"]
