"""Training, evaluating and scoring with DualCoOp++ as the authors did (docs/training.md).

``config.py`` what defines a run, the presets, and the settings' flags; ``datasets.py`` a run's data
(partial labels, validation images, test sets); ``trainer.py`` the loop: set up, one epoch, pick, save,
the final evaluation; ``state.py`` where a run stands, its checkpoint and random generators;
``evaluation.py`` scoring, split metrics, epoch selection, other class lists; ``runs.py`` run folders:
the device, the run's model, new runs, resuming, the best prompts, log.txt; ``seeds.py`` seeds derived
from the run's; ``cache.py`` feature caches; ``distributed.py`` several processes under torchrun;
``plots.py`` the pictures a run writes (curves, per-class AP); ``tracking.py`` where else a run
reports (summary.csv, TensorBoard, W&B: ``--report-to``). The HTML report and the evidence maps
read runs from their own wing, ``reports/``.
"""

from .config import PRESETS, TrainConfig, preset_config
from .runs import build_model
from .trainer import learning_rate, train

__all__ = ["PRESETS", "TrainConfig", "build_model", "learning_rate", "preset_config", "train"]
