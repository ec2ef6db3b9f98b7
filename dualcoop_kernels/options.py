"""The options of the package, written once: every backend, check, tool and setting reads them here.

The numbers are docs/math.md's (Notation, and the presets).
"""

from __future__ import annotations

import math

# Winner-take-all across classes (docs/math.md): each mode weighs the positive logits by u = gamma * M * s+
# and the negative ones by u- = gamma * m * s+ (M, m: the largest and smallest s+ of the region), as
# "one" (no weight), "norm" exp(u - max u), "softmax" softmax(u) or "one_plus_softmax" 1 + softmax(u).
WTA_WEIGHTS = {  # mode: (weight of the positive logits, weight of the negative logits)
    "pos_norm": ("norm", "one"),
    "pos_softmax": ("one_plus_softmax", "one"),
    "pos_pure_softmax": ("softmax", "one"),
    "pos_neg_softmax": ("one_plus_softmax", "one_plus_softmax"),
    "pos_neg_pure_softmax": ("softmax", "softmax"),
    "none": ("one", "one"),
}
WTA_MODES = tuple(WTA_WEIGHTS)
# the authors' names (cfg.MODE of their trainers/Caption_tri_wta_soft.py), accepted too
WTA_ALIASES = {
    "pos200": "pos_softmax",
    "pos_test": "pos_pure_softmax",
    "pos_neg": "pos_neg_softmax",
    "pos_neg_test": "pos_neg_pure_softmax",
}
# The authors' pos_norm_det is pos_norm with the log temperature frozen at its start: a WTA mode plus
# a training option (freeze_temperature of DualCoOpHead and DualCoOpPlusPlus), so no mode of the head.
WTA_TRAINING_ALIASES = {"pos_norm_det": dict(wta="pos_norm", freeze_temperature=True)}
WTA_CHOICES = (*WTA_MODES, *WTA_ALIASES, *WTA_TRAINING_ALIASES)  # every name a run's --wta accepts
WTA_WEIGHT_CODES = {"one": 0, "norm": 1, "one_plus_softmax": 2, "softmax": 3}  # the Triton kernels' constexprs

DEFAULT_WTA_GAMMA = 200.0  # gamma, the WTA sharpness
DEFAULT_LOGIT_SCALE = math.exp(3.0)  # k, the constant scale of the logits (DualCoOp++)
DEFAULT_LOG_SPATIAL_TEMP = 3.0  # theta, the learned log temperature's start (tau = e^3, about 20)
ORIGINAL_TEMPERATURE, ORIGINAL_LOGIT_SCALE = 20.0, 100.0  # the original DualCoOp's fixed tau and k

REDUCTIONS = {"sum": 1, "mean": 2, "none": 0}  # of the loss, with the C++ extension's codes
# The loss's defaults are the ASL library's; DualCoOp++ trains with gamma_neg 2 and scales the sum by 0.02.
DEFAULT_GAMMA_NEG, DEFAULT_GAMMA_POS, DEFAULT_CLIP, DEFAULT_EPS = 4.0, 1.0, 0.05, 1e-8

# Whose code a run and its model follow: DualCoOp++ (the default), or the original DualCoOp (read by the
# model and the data; a run's other choices live with their owners: training/config.py, data/transforms.py)
PROTOCOLS = ("dualcoop++", "dualcoop")
# CLIP's image normalisation (OpenAI's), for the transforms and for models that carry none of their own
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
