"""What rebuilds a model, in one record: :class:`ModelSettings`. A run's ``TrainConfig`` builds it, a
model built by hand makes its own (``model.settings``), and a shared folder's config.json holds it.

Files written by 0.1.0 named three of these settings otherwise; :func:`renamed_settings` maps their
keys, so that their runs and shared folders keep loading.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import UsageError


@dataclass(frozen=True)
class ModelSettings:
    """How a DualCoOp++ model was built, enough to build it again (the learned prompts aside).

    ``backbone``: the open_clip model's name (None for a CLIP given as a module, which must be named
    before the model is shared); ``pretrained``: its weights (an open_clip tag or a file; None for
    random ones, drawn from ``seed``); ``n_ctx``: context tokens per prompt; ``shared_contexts``: one
    set of contexts for all classes rather than one per class; ``wta``: the head's winner-take-all
    mode; ``protocol``: whose code the model follows (``"dualcoop++"`` or the original
    ``"dualcoop"``); ``freeze_temperature``: the spatial temperature stays at its start; ``seed``: of
    the random parts (the CLIP weights without a tag, the initial contexts); ``clip_config``: an
    open_clip model config kept in full when ``backbone`` named a .json file of one."""

    backbone: str | None = None
    pretrained: str | None = None
    n_ctx: int | None = None
    shared_contexts: bool = False
    wta: str = "pos_norm"
    protocol: str = "dualcoop++"
    freeze_temperature: bool = False
    seed: int | None = None
    clip_config: dict | None = None

    def __post_init__(self):  # random weights are None, however named ("none": the command line's word)
        if self.pretrained == "none":
            object.__setattr__(self, "pretrained", None)

    def as_dict(self) -> dict:
        """The settings as a JSON-serialisable dict, one key a field: a shared folder's config.json holds
        them beside the class names."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict, source: str) -> ModelSettings:
        """The settings among ``values`` (a config.json's, old keys mapped); other keys are ignored.
        ``source`` names the file in an error."""
        values = renamed_settings(values)
        known = {field.name for field in dataclasses.fields(cls)}
        settings = cls(**{key: value for key, value in values.items() if key in known})
        if not isinstance(settings.n_ctx, int) or isinstance(settings.n_ctx, bool) or settings.n_ctx < 1:
            raise UsageError(f"{source}: n_ctx must be a positive integer, got {settings.n_ctx!r}")
        return settings

    def differences(self, other: ModelSettings) -> list[str]:
        """The settings (seed and CLIP config aside) in which ``other`` differs."""
        ignored = ("seed", "clip_config")
        return [
            field.name
            for field in dataclasses.fields(self)
            if field.name not in ignored and getattr(self, field.name) != getattr(other, field.name)
        ]


# 0.1.0's keys, by their names now: a key and whether its value is negated
OLD_KEYS = {
    "clip": ("backbone", False),
    "csc": ("shared_contexts", True),
    "learn_temperature": ("freeze_temperature", True),
}


def renamed_settings(values: dict) -> dict:
    """``values`` with 0.1.0's keys (``clip``, ``csc``, ``learn_temperature``) under their names now
    (``backbone``, ``shared_contexts``, ``freeze_temperature``: the last two negated)."""
    renamed = dict(values)
    for old, (new, negated) in OLD_KEYS.items():
        if old in renamed and new not in renamed:
            value = renamed.pop(old)
            if negated and value is None:  # 0.1.0 read a missing value as the default: so does this
                continue
            renamed[new] = (not value) if negated and isinstance(value, bool) else value
    return renamed
