"""Multi-label metrics as the DualCoOp and DualCoOp++ papers report them.

Every function takes N x C arrays (images x classes), torch tensors or numpy arrays, and computes in float64
numpy: ``scores`` rank the images of a class (higher means more likely present; :func:`ranking_scores` makes
them from the head's logits) and ``targets`` hold 1 (present), 0 or -1 (both count as not positive; only a
target equal to 1 is a positive; bool targets are read as True = positive). Percentages are in [0, 100].
Ties are broken deterministically: images with equal scores keep their order (earlier image ranked first)
and classes with equal scores keep theirs (lower class index first), by stable sorts. Scores holding NaN or
inf are refused, so that a diverged model gets an error rather than a metric.
"""

from __future__ import annotations

import numbers

import numpy as np
import torch

from .errors import UsageError, UsageTypeError

THRESHOLD_SUMMARY = ("CP", "CR", "CF1", "CF1_harmonic", "OP", "OR", "OF1")


def ranking_scores(logits):
    """B x 2 x C head logits (``[:, 0]`` P-, ``[:, 1]`` P+) -> B x C scores ``P+ - P-``.

    ``P+ - P-`` orders the images of a class as the papers' probabilities ``sigmoid(P+ - P-)`` do, without
    the ties at 1.0 where float32 sigmoids saturate, and ``P+ - P- > 0`` is ``P+ > P-``. A torch tensor gives
    a detached tensor of its dtype, a numpy array a numpy array.
    """
    if not isinstance(logits, (torch.Tensor, np.ndarray)):
        raise UsageTypeError(
            f"logits must be a torch.Tensor or numpy array of shape B x 2 x C, got {type(logits).__name__}"
        )
    if logits.ndim != 3 or logits.shape[1] != 2:
        raise UsageError(f"logits must have shape B x 2 x C, got {tuple(logits.shape)}")
    scores = logits[:, 1] - logits[:, 0]
    return scores.detach() if isinstance(scores, torch.Tensor) else scores


def average_precision(scores, targets, known=None) -> np.ndarray:
    """Average precision of each class: a numpy array of C floats in [0, 1].

    The images of a class are sorted by descending score; with ``r`` the rank of a positive (1-based) and
    ``TP(r)`` the number of positives within the top ``r``, ``AP = (1 / n_pos) * sum over positives of
    TP(r) / r``. A class without positives has AP 0. Ties: the sort is stable, so images with equal scores
    keep their order, the earlier image ranked first (the authors reversed numpy's default argsort, whose
    tie order is unspecified). ``known`` (N x C bool, optional): a class ranks only the images whose label
    for it is known.
    """
    scores, positives = _checked(scores, targets)
    known = _checked_known(known, scores.shape)
    if known is not None:
        values = np.zeros(scores.shape[1])
        for c in range(scores.shape[1]):
            if known[:, c].any():
                values[c] = average_precision(scores[known[:, c], c, None], positives[known[:, c], c, None])[0]
        return values
    order = np.argsort(-scores, axis=0, kind="stable")
    ranked = np.take_along_axis(positives, order, axis=0)
    ranks = np.arange(1, len(scores) + 1)[:, None]
    precision_at_rank = np.cumsum(ranked, axis=0) / ranks
    n_pos = positives.sum(axis=0)
    # a class without positives sums to 0; dividing by 1 instead of 0 gives its AP of 0
    return (precision_at_rank * ranked).sum(axis=0) / np.maximum(n_pos, 1)


def mean_average_precision(scores, targets) -> float:
    """mAP in percent: ``100 * mean`` of :func:`average_precision` over all C classes, a class without
    positives counting as 0."""
    return 100.0 * float(average_precision(scores, targets).mean())


def threshold_metrics(scores, targets, threshold: float = 0.0, known=None) -> dict:
    """Precision, recall and F1 of the predictions ``score > threshold``, in percent.

    With :func:`ranking_scores` and the default threshold 0 a class is predicted where ``P+ > P-``. Per class
    ``c``: ``p_c = tp / (tp + fp)``, ``r_c = tp / (tp + fn)``, ``f_c = 2 p_c r_c / (p_c + r_c)``, each 0 where
    ``tp = 0``. Returns ``per_class_precision``, ``per_class_recall`` and ``per_class_f1`` (C-arrays),
    ``CP`` and ``CR`` (their means), ``CF1`` (the mean of ``f_c``, as DualCoOp reports it), ``CF1_harmonic``
    (``2 CP CR / (CP + CR)``, the usual form, 0 if both are 0), and ``OP``, ``OR`` (the same ratios on the
    counts pooled over all classes and images) with ``OF1 = 2 OP OR / (OP + OR)``. With ``known`` (N x C
    bool) only the known labels count.
    """
    scores, positives = _checked(scores, targets)
    known = _checked_known(known, scores.shape)
    counted = np.ones_like(positives) if known is None else known
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
        raise UsageTypeError(f"threshold must be a real number, got {type(threshold).__name__}")
    if np.isnan(threshold):
        raise UsageError("threshold must be a number, got NaN")
    predicted = scores > threshold
    tp = (predicted & positives & counted).sum(axis=0)
    fp = (predicted & ~positives & counted).sum(axis=0)
    fn = (~predicted & positives & counted).sum(axis=0)
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    f1 = _ratio(2 * precision * recall, precision + recall)
    class_precision, class_recall = 100.0 * float(precision.mean()), 100.0 * float(recall.mean())
    overall_precision = 100.0 * float(_ratio(tp.sum(), tp.sum() + fp.sum()))
    overall_recall = 100.0 * float(_ratio(tp.sum(), tp.sum() + fn.sum()))
    return {
        "per_class_precision": 100.0 * precision,
        "per_class_recall": 100.0 * recall,
        "per_class_f1": 100.0 * f1,
        "CP": class_precision,
        "CR": class_recall,
        "CF1": 100.0 * float(f1.mean()),
        "CF1_harmonic": _harmonic_mean(class_precision, class_recall),
        "OP": overall_precision,
        "OR": overall_recall,
        "OF1": _harmonic_mean(overall_precision, overall_recall),
    }


def top_k_metrics(scores, targets, k: int = 3, known=None) -> dict:
    """Precision, recall and F1 at top k, in percent: ``precision``, ``recall``, ``f1``.

    Each image predicts its k highest-scoring classes, equal scores taken by lower class index first (a
    stable sort). ``TP`` = sum over images of the positives among their top k; ``P@k = TP / (k N)``,
    ``R@k = TP / (number of positives)`` and ``F1 = 2 P R / (P + R)``, each 0 where ``TP = 0``. Needs
    ``1 <= k <= C``. With ``known`` (N x C bool) only the known labels count: a predicted class whose
    label is unknown is neither right nor wrong (``P@k = TP / the predictions with a known label``).
    """
    scores, positives = _checked(scores, targets)
    known = _checked_known(known, scores.shape)
    counted = np.ones_like(positives) if known is None else known
    n_classes = scores.shape[1]
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise UsageTypeError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= k <= n_classes:
        raise UsageError(f"k must satisfy 1 <= k <= C = {n_classes}, got {k}")
    top_k = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    picked_known = np.take_along_axis(counted, top_k, axis=1)
    tp = int((np.take_along_axis(positives, top_k, axis=1) & picked_known).sum())
    precision = 100.0 * float(_ratio(tp, picked_known.sum()))
    recall = 100.0 * float(_ratio(tp, (positives & counted).sum()))
    return {"precision": precision, "recall": recall, "f1": _harmonic_mean(precision, recall)}


def evaluate(scores, targets, classnames=None, k: int | None = None, known=None) -> dict:
    """A JSON-serialisable summary in percent (plain floats, lists and dicts).

    ``mAP`` and ``chance_mAP`` (what a random ranking would score, :func:`chance_average_precision`);
    ``per_class_AP``, a dict name -> AP when ``classnames`` (C distinct strings) are given, else a
    list in class order; the summary values of :func:`threshold_metrics` at threshold 0 (``CP``, ``CR``,
    ``CF1``, ``CF1_harmonic``, ``OP``, ``OR``, ``OF1``); and, when ``k`` is given, ``top_k``: ``k`` with the
    ``precision``, ``recall`` and ``f1`` of :func:`top_k_metrics`. Beside the mAP (the papers': a class
    without a positive counts 0), ``mAP_classes_with_positives`` averages the classes with one, named
    in ``classes_without_positives``. ``known`` (N x C bool): every metric counts the known labels only.
    """
    average_precisions = average_precision(scores, targets, known)
    per_class_ap = (100.0 * average_precisions).tolist()
    names = list(range(len(per_class_ap))) if classnames is None else _checked_classnames(classnames, len(per_class_ap))
    if classnames is not None:
        per_class_ap = dict(zip(names, per_class_ap))
    scores, positives = _checked(scores, targets)
    known = _checked_known(known, scores.shape)
    with_positive = (positives & (True if known is None else known)).any(axis=0)
    thresholded = threshold_metrics(scores, targets, known=known)
    summary = {"mAP": 100.0 * float(average_precisions.mean()), "per_class_AP": per_class_ap}
    summary["mAP_classes_with_positives"] = (
        100.0 * float(average_precisions[with_positive].mean()) if with_positive.any() else 0.0
    )
    summary["classes_without_positives"] = [names[c] for c in np.flatnonzero(~with_positive)]
    summary["chance_mAP"] = 100.0 * float(chance_average_precision(positives, known).mean())
    summary.update({key: thresholded[key] for key in THRESHOLD_SUMMARY})
    if k is not None:
        summary["top_k"] = {**top_k_metrics(scores, targets, k, known=known), "k": int(k)}
    return summary


def chance_average_precision(positives: np.ndarray, known: np.ndarray | None = None) -> np.ndarray:
    """Each class's AP under a random ranking, in expectation about its prevalence: the share of
    positives among its known labels (0 for a class without a known label)."""
    counted = np.ones_like(positives, dtype=bool) if known is None else known
    return (positives & counted).sum(axis=0) / np.maximum(counted.sum(axis=0), 1)


def _as_numpy(name: str, value, kinds: str) -> np.ndarray:
    """``value`` as an N x C numpy array whose dtype kind is one of ``kinds``."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        # numpy has no bfloat16
        value = (value.float() if value.dtype == torch.bfloat16 else value).numpy()
    array = np.asarray(value)
    if array.dtype.kind not in kinds:
        raise UsageTypeError(f"{name} must hold real numbers, got dtype {array.dtype}")
    if array.ndim != 2 or 0 in array.shape:
        raise UsageError(f"{name} must have shape N x C (2-d, N >= 1, C >= 1), got {array.shape}")
    return array


def _checked(scores, targets) -> tuple[np.ndarray, np.ndarray]:
    """Validated float64 scores and the boolean mask of positives (``targets == 1``)."""
    scores = _as_numpy("scores", scores, kinds="iuf").astype(np.float64)
    targets = _as_numpy("targets", targets, kinds="biuf")
    if targets.shape != scores.shape:
        raise UsageError(f"targets must have the shape N x C of scores, {scores.shape}, got {targets.shape}")
    if not np.isfinite(scores).all():
        raise UsageError("scores hold NaN or inf values (a diverged model?); metrics need finite scores")
    if not np.isin(targets, (-1, 0, 1)).all():
        raise UsageError("targets must hold only -1, 0 and 1 (1 positive; 0 and -1 not positive)")
    return scores, targets == 1


def _checked_known(known, shape) -> np.ndarray | None:
    """The N x C bool mask of known labels, or None where every label is known."""
    if known is None:
        return None
    known = _as_numpy("known", known, kinds="b")
    if known.shape != shape:
        raise UsageError(f"known must have the shape N x C of scores, {shape}, got {known.shape}")
    return None if known.all() else known


def _checked_classnames(classnames, n_classes: int) -> list[str]:
    if isinstance(classnames, str):
        raise UsageTypeError("classnames must be a sequence of C class names, got a single string")
    names = list(classnames)
    if not all(isinstance(name, str) for name in names):
        raise UsageTypeError("classnames must be strings")
    if len(names) != n_classes:
        raise UsageError(f"classnames must have C = {n_classes} names, got {len(names)}")
    if len(set(names)) != n_classes:
        raise UsageError("classnames must be distinct (they key per_class_AP)")
    return names


def _ratio(numerator, denominator):
    """``numerator / denominator``, 0 where the numerator is 0 (where the denominator may be 0 too)."""
    numerator = np.asarray(numerator, dtype=np.float64)
    return np.divide(numerator, denominator, out=np.zeros_like(numerator), where=numerator != 0)


def _harmonic_mean(a: float, b: float) -> float:
    """``2 a b / (a + b)``, 0 when either is 0."""
    return float(_ratio(2 * a * b, a + b))
