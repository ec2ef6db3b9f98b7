"""Multi-label metrics: hand-computed cases, the tie conventions, a brute-force AP, and the input checks."""

import json
import warnings

import numpy as np
import pytest
import torch

from dualcoop_kernels.metrics import (
    average_precision,
    evaluate,
    mean_average_precision,
    ranking_scores,
    threshold_metrics,
    top_k_metrics,
)

# 5 images x 3 classes, distinct scores within each class
HAND_SCORES = np.array(
    [
        [0.9, 0.1, 0.5],
        [0.8, 0.7, 0.4],
        [0.3, 0.6, -0.3],
        [0.2, 0.9, -0.2],
        [0.1, 0.2, -0.1],
    ]
)
HAND_TARGETS = np.array(
    [
        [1, 0, -1],
        [0, 1, 0],
        [1, 0, 0],
        [-1, 1, -1],
        [1, 0, 1],
    ]
)
# class 0, ranked images 0..4: positives at ranks 1, 3, 5 -> (1/1 + 2/3 + 3/5) / 3 = 34/45
# class 1, ranked images 3, 1, 2, 4, 0: positives at ranks 1, 2 -> (1/1 + 2/2) / 2 = 1
# class 2, ranked images 0, 1, 4, 3, 2: the positive (image 4) at rank 3 -> 1/3
HAND_APS = [34 / 45, 1.0, 1 / 3]

# 4 images x 3 classes of P+ - P- scores, for the predictions score > 0
THRESHOLD_SCORES = np.array(
    [
        [2.0, -1.0, 0.5],
        [1.0, 0.0, -0.5],
        [-1.0, 1.5, -2.0],
        [0.5, -0.5, 1.0],
    ]
)
THRESHOLD_TARGETS = np.array(
    [
        [1, 1, 1],
        [1, 1, -1],
        [1, 0, 0],
        [1, -1, 0],
    ]
)
# class 0: predicted images 0, 1, 3; positives all 4 -> tp 3, fp 0, fn 1: p 1, r 3/4, f 6/7
# class 1: predicted image 2 only (0.0 is not > 0); positives 0, 1 -> tp 0, fp 1, fn 2: p = r = f = 0
# class 2: predicted images 0, 3; positive 0 -> tp 1, fp 1, fn 0: p 1/2, r 1, f 2/3
# pooled: TP 4, FP 2, FN 3 -> OP 4/6, OR 4/7, OF1 8/13
THRESHOLD_EXPECTED = {
    "per_class_precision": [100.0, 0.0, 50.0],
    "per_class_recall": [75.0, 0.0, 100.0],
    "per_class_f1": [600 / 7, 0.0, 200 / 3],
    "CP": 50.0,  # (1 + 0 + 1/2) / 3
    "CR": 700 / 12,  # (3/4 + 0 + 1) / 3
    "CF1": 3200 / 63,  # (6/7 + 0 + 2/3) / 3
    "CF1_harmonic": 700 / 13,  # 2 (1/2)(7/12) / (1/2 + 7/12)
    "OP": 400 / 6,
    "OR": 400 / 7,
    "OF1": 800 / 13,
}

# 3 images x 4 classes with ties across classes (lower class index first)
TOP_K_SCORES = np.array(
    [
        [0.9, 0.1, 0.9, 0.3],  # top 1: class 0 (tied with 2); top 2: classes 0, 2
        [0.2, 0.5, 0.5, 0.5],  # top 1: class 1; top 2: classes 1, 2 (class 3, tied, left out)
        [0.4, 0.3, 0.2, 0.1],  # top 1: class 0; top 2: classes 0, 1
    ]
)
TOP_K_TARGETS = np.array(
    [
        [0, 1, 1, 0],
        [0, 0, 1, 1],
        [1, -1, 1, 1],
    ]
)


def brute_force_average_precision(scores, targets):
    """AP by counting: image j ranks above image i when s_j > s_i, or s_j == s_i and j < i."""
    n_images, n_classes = scores.shape
    result = []
    for c in range(n_classes):
        s, positive = scores[:, c], targets[:, c] == 1

        def at_or_above(j, i, s=s):
            return s[j] > s[i] or (s[j] == s[i] and j <= i)

        precisions = []
        for i in range(n_images):
            if positive[i]:
                rank = sum(at_or_above(j, i) for j in range(n_images))
                positives_within = sum(positive[j] and at_or_above(j, i) for j in range(n_images))
                precisions.append(positives_within / rank)
        result.append(sum(precisions) / len(precisions) if precisions else 0.0)
    return np.array(result)


def test_average_precision_hand_case():
    aps = average_precision(HAND_SCORES, HAND_TARGETS)
    assert isinstance(aps, np.ndarray) and aps.shape == (3,)
    np.testing.assert_allclose(aps, HAND_APS)
    assert mean_average_precision(HAND_SCORES, HAND_TARGETS) == pytest.approx(100 * 94 / 135)


def test_ties_keep_image_order():
    scores = np.array([[0.5, 0.5], [0.5, 0.5], [0.5, 0.5], [0.1, 0.1]])
    # the three tied images rank in image order 0, 1, 2 (the reverse order would swap the two APs)
    # class 0: positives images 2 (rank 3) and 3 (rank 4) -> (1/3 + 2/4) / 2 = 5/12
    # class 1: positives images 0 (rank 1) and 3 (rank 4) -> (1/1 + 2/4) / 2 = 3/4
    targets = np.array([[0, 1], [0, 0], [1, 0], [1, 1]])
    np.testing.assert_allclose(average_precision(scores, targets), [5 / 12, 0.75])
    np.testing.assert_allclose(average_precision(scores, targets), brute_force_average_precision(scores, targets))


def test_class_without_positives_has_ap_zero_and_counts_in_the_mean():
    scores = np.array([[0.9, 0.2], [0.1, 0.8]])
    targets = np.array([[1, 0], [0, -1]])
    np.testing.assert_array_equal(average_precision(scores, targets), [1.0, 0.0])
    assert mean_average_precision(scores, targets) == 50.0


def test_zero_and_minus_one_are_both_negative_and_bool_targets_work():
    as_zero, as_minus_one = np.where(HAND_TARGETS == 1, 1, 0), np.where(HAND_TARGETS == 1, 1, -1)
    for targets in (as_zero, as_minus_one, as_zero.astype(bool), torch.from_numpy(as_minus_one)):
        np.testing.assert_allclose(average_precision(HAND_SCORES, targets), HAND_APS)
        assert evaluate(HAND_SCORES, targets, k=2) == evaluate(HAND_SCORES, HAND_TARGETS, k=2)


@pytest.mark.parametrize("seed", range(5))
def test_average_precision_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    scores = np.round(rng.normal(size=(50, 7)), 1)  # rounding makes ties
    targets = rng.integers(-1, 2, size=(50, 7))
    targets[:, 0] = rng.integers(-1, 1, size=50)  # a class without positives
    expected = brute_force_average_precision(scores, targets)
    np.testing.assert_allclose(average_precision(scores, targets), expected, rtol=1e-12)
    assert mean_average_precision(scores, targets) == pytest.approx(100 * expected.mean())


def test_torch_inputs_match_numpy():
    expected = average_precision(HAND_SCORES, HAND_TARGETS)
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        scores = torch.tensor(HAND_SCORES, dtype=dtype, requires_grad=dtype != torch.bfloat16)
        np.testing.assert_allclose(average_precision(scores, torch.tensor(HAND_TARGETS)), expected)


def test_threshold_metrics_hand_case():
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        metrics = threshold_metrics(THRESHOLD_SCORES, THRESHOLD_TARGETS)
    assert set(metrics) == set(THRESHOLD_EXPECTED)
    for key, expected in THRESHOLD_EXPECTED.items():
        np.testing.assert_allclose(metrics[key], expected, err_msg=key)
    assert metrics["CF1"] != pytest.approx(metrics["CF1_harmonic"])
    assert all(isinstance(metrics[key], float) for key in ("CP", "CR", "CF1", "CF1_harmonic", "OP", "OR", "OF1"))


def test_threshold_metrics_nothing_predicted_is_zero_without_warnings():
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        metrics = threshold_metrics(THRESHOLD_SCORES, THRESHOLD_TARGETS, threshold=10.0)
    assert all(metrics[key] == 0.0 for key in ("CP", "CR", "CF1", "CF1_harmonic", "OP", "OR", "OF1"))


def test_threshold_moves_the_predictions():
    metrics = threshold_metrics(THRESHOLD_SCORES, THRESHOLD_TARGETS, threshold=-0.75)
    # class 1 (scores -1, 0, 1.5, -0.5): predicted images 1, 2, 3; positives 0, 1 -> tp 1, fp 2: p 1/3, r 1/2
    assert metrics["per_class_precision"][1] == pytest.approx(100 / 3)
    assert metrics["per_class_recall"][1] == pytest.approx(50.0)


def test_top_k_hand_case():
    # k = 2: hits image 0 {2}, image 1 {2}, image 2 {0} -> TP 3; 7 positives
    top2 = top_k_metrics(TOP_K_SCORES, TOP_K_TARGETS, k=2)
    assert top2 == pytest.approx({"precision": 50.0, "recall": 300 / 7, "f1": 600 / 13})
    # k = 1: classes 0, 1, 0 -> only image 2 hits: P 1/3, R 1/7, F1 1/5
    top1 = top_k_metrics(TOP_K_SCORES, TOP_K_TARGETS, k=1)
    assert top1 == pytest.approx({"precision": 100 / 3, "recall": 100 / 7, "f1": 20.0})
    # k = C: every positive is found
    assert top_k_metrics(TOP_K_SCORES, TOP_K_TARGETS, k=4)["recall"] == 100.0


def test_ranking_scores():
    logits = torch.tensor([[[0.0, 1.0, -20.0], [2.0, 30.0, 20.0]]], requires_grad=True)  # 1 x 2 x 3
    scores = ranking_scores(logits)
    assert scores.dtype == torch.float32 and not scores.requires_grad
    torch.testing.assert_close(scores, torch.tensor([[2.0, 29.0, 40.0]]))
    # float32 sigmoids tie at 1.0 where P+ - P- still ranks
    assert torch.sigmoid(scores)[0, 1] == torch.sigmoid(scores)[0, 2] == 1.0
    np.testing.assert_array_equal(ranking_scores(logits.detach().double().numpy()), [[2.0, 29.0, 40.0]])


def test_evaluate_summary_is_json_serialisable():
    summary = evaluate(HAND_SCORES, HAND_TARGETS, classnames=["cat", "dog", "car"], k=2)
    assert json.loads(json.dumps(summary)) == summary
    assert summary["mAP"] == pytest.approx(mean_average_precision(HAND_SCORES, HAND_TARGETS))
    assert summary["per_class_AP"] == pytest.approx({"cat": 100 * 34 / 45, "dog": 100.0, "car": 100 / 3})
    thresholded = threshold_metrics(HAND_SCORES, HAND_TARGETS)
    for key in ("CP", "CR", "CF1", "CF1_harmonic", "OP", "OR", "OF1"):
        assert summary[key] == thresholded[key]
    assert summary["top_k"] == {"k": 2, **top_k_metrics(HAND_SCORES, HAND_TARGETS, k=2)}
    plain = evaluate(HAND_SCORES, HAND_TARGETS)
    assert plain["per_class_AP"] == pytest.approx([100 * ap for ap in HAND_APS]) and "top_k" not in plain


INPUT_ERRORS = [
    (lambda s, t: (s[0], t), ValueError, "scores must have shape N x C"),
    (lambda s, t: (s[:0], t[:0]), ValueError, "scores must have shape N x C"),
    (lambda s, t: (s, t[:, :2]), ValueError, "targets must have the shape N x C"),
    (lambda s, t: (s.astype(complex), t), TypeError, "scores must hold real numbers"),
    (lambda s, t: (s > 0, t), TypeError, "scores must hold real numbers"),
    (lambda s, t: (s.astype(str), t), TypeError, "scores must hold real numbers"),
    (lambda s, t: (np.where(s > 0.85, np.nan, s), t), ValueError, "scores hold NaN"),
    (lambda s, t: (np.where(s > 0.85, np.inf, s), t), ValueError, "scores hold NaN"),
    (lambda s, t: (s, np.where(t == 1, 2, t)), ValueError, "targets must hold only -1, 0 and 1"),
    (lambda s, t: (s, t * 0.5), ValueError, "targets must hold only -1, 0 and 1"),
]


@pytest.mark.parametrize("change, error, message", INPUT_ERRORS)
def test_input_errors(change, error, message):
    scores, targets = change(HAND_SCORES, HAND_TARGETS)
    for function in (average_precision, mean_average_precision, threshold_metrics, top_k_metrics, evaluate):
        with pytest.raises(error, match=message):
            function(scores, targets)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"classnames": ["cat", "dog"]}, ValueError, "classnames must have C = 3 names"),
        ({"classnames": "abc"}, TypeError, "a single string"),
        ({"classnames": ["cat", "cat", "dog"]}, ValueError, "distinct"),
        ({"classnames": [0, 1, 2]}, TypeError, "strings"),
        ({"k": 0}, ValueError, "1 <= k <= C = 3"),
        ({"k": 4}, ValueError, "1 <= k <= C = 3"),
        ({"k": 1.5}, TypeError, "k must be an int"),
    ],
)
def test_argument_errors(kwargs, error, message):
    with pytest.raises(error, match=message):
        evaluate(HAND_SCORES, HAND_TARGETS, **kwargs)


def test_threshold_and_logits_errors():
    with pytest.raises(ValueError, match="threshold must be a number, got NaN"):
        threshold_metrics(HAND_SCORES, HAND_TARGETS, threshold=float("nan"))
    with pytest.raises(TypeError, match="threshold must be a real number"):
        threshold_metrics(HAND_SCORES, HAND_TARGETS, threshold="0")
    with pytest.raises(ValueError, match="logits must have shape B x 2 x C"):
        ranking_scores(torch.zeros(2, 3, 4))
    with pytest.raises(TypeError, match=r"logits must be a torch\.Tensor or numpy array"):
        ranking_scores([[[0.0], [1.0]]])


def test_threshold_and_top_k_metrics_count_known_labels_only():
    scores = np.array([[2.0, 1.0, -1.0], [-1.0, 3.0, 0.5], [1.0, -2.0, 2.0]])
    labels = np.array([[1, 0, -1], [-1, 1, 0], [0, -1, 1]])  # 0: unknown
    known = labels != 0
    # the unknown cells are dropped: the same as the metrics of the known cells alone
    complete = np.where(known, labels, -1)
    masked = threshold_metrics(scores, labels, known=known)  # each class: its one known positive found
    assert masked["per_class_recall"].tolist() == [100.0, 100.0, 100.0]
    assert masked["per_class_precision"].tolist() == [100.0, 100.0, 100.0]  # no known negative is predicted
    assert threshold_metrics(scores, complete)["per_class_precision"][1] == 50.0  # unknown read as negative
    top = top_k_metrics(scores, labels, k=1, known=known)
    assert top == pytest.approx({"precision": 100.0, "recall": 100.0, "f1": 100.0})
    assert top_k_metrics(scores, labels, k=2, known=known)["precision"] == 100.0  # the second picks are unknown
    assert top_k_metrics(scores, labels, k=2)["precision"] == 50.0  # read as negatives, they would count wrong
    assert evaluate(scores, labels, k=1, known=known)["CP"] == 100.0


def test_chance_is_the_mean_share_of_known_positives():
    """A random ranking's AP is about the class's prevalence among its known labels."""
    labels = np.array([[1, -1], [-1, 0], [-1, 1], [-1, -1]])  # class 0: 1 of 4; class 1: 1 of 3 known
    scores = np.zeros((4, 2))
    assert evaluate(scores, labels, known=labels != 0)["chance_mAP"] == pytest.approx(100 * (1 / 4 + 1 / 3) / 2)
    rng = np.random.default_rng(0)
    many = np.where(rng.random((4000, 3)) < [0.1, 0.3, 0.6], 1, -1)
    random_ap = evaluate(rng.random((4000, 3)), many)
    assert random_ap["mAP"] == pytest.approx(random_ap["chance_mAP"], abs=2.0)
