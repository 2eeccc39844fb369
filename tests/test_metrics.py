"""dipro.metrics against values worked out by hand on tiny cases, including undefined (missing-class) cases."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from data_sharding.constants import DISEASE_SLUGS
from dipro.metrics import PROGRESSION_METRICS, aggregate_seeds, compute_metrics, format_table


def _confident(pred: list[int], n_classes: int, hi: float = 0.8) -> np.ndarray:
    """Probabilities with ``hi`` on the predicted class and the rest shared evenly (ties are intended)."""
    p = np.full((len(pred), n_classes), (1 - hi) / (n_classes - 1))
    p[np.arange(len(pred)), pred] = hi
    return p


# Six evaluated samples, two per progression class, and a seventh labelled 3 (not mentioned) that
# every disease must leave out.
Y3 = [0, 0, 1, 1, 2, 2]
# Predictions [0, 1, 1, 1, 2, 0] give, worked out by hand (class c: tp / fp / fn):
#   class 0: 1/1/1 -> P 1/2, R 1/2, F1 1/2;  class 1: 2/1/0 -> P 2/3, R 1, F1 4/5;  class 2: 1/0/1 -> P 1, R 1/2, F1 2/3.
#   One-vs-rest AUROC with scores 0.8 (predicted) / 0.1 (otherwise), a tie counting 1/2:
#   class 0: (3.5 + 1.5)/8, class 1: (3.5 + 3.5)/8, class 2: (4 + 2)/8  -> macro 3/4.
#   AUPRC = trapezoid area under the precision-recall points (R, P) from R = 0 (P = 1) to R = 1 (P = 1/3):
#   class 0: (0,1) (1/2,1/2) (1,1/3) -> 3/8 + 5/24 = 7/12;  class 1: (0,1) (1,2/3) -> 5/6;
#   class 2: (0,1) (1/2,1) (1,1/3) -> 1/2 + 1/3 = 5/6  -> macro (7/12 + 5/6 + 5/6)/3 = 3/4.
CONFUSED = {"precision_macro": (1 / 2 + 2 / 3 + 1) / 3, "recall_macro": (1 / 2 + 1 + 1 / 2) / 3,
            "f1_macro": (1 / 2 + 4 / 5 + 2 / 3) / 3, "auprc_macro": 3 / 4, "auroc": 3 / 4}
PERFECT = dict.fromkeys(PROGRESSION_METRICS, 1.0)


def _progression_case():
    """Diseases 0 and 3 predicted perfectly, 1 as in CONFUSED, 2 never "improved" (1), 4-6 never labelled."""
    y = np.full((7, 7), 3)
    p = np.empty((7, 7, 3))
    p[:, :] = _confident([2, 2, 2, 2, 2, 2, 2], 3)[:, None]  # the not-mentioned row is confidently class 2
    for k in (0, 3):
        y[:6, k], p[:6, k] = Y3, _confident(Y3, 3)
    y[:6, 1], p[:6, 1] = Y3, _confident([0, 1, 1, 1, 2, 0], 3)
    y[:6, 2], p[:6, 2] = [0, 0, 2, 2, 2, 0], _confident(Y3, 3)
    return y, p


def test_progression_per_disease_and_mean_against_hand_computed_values():
    y, p = _progression_case()
    m = compute_metrics("disease_progression", y, p)
    for k, expected in ((0, PERFECT), (1, CONFUSED), (3, PERFECT)):
        for name in PROGRESSION_METRICS:
            assert m[f"{DISEASE_SLUGS[k]}/{name}"] == pytest.approx(expected[name], abs=1e-12), (k, name)
    for name in PROGRESSION_METRICS:
        assert m[name] == pytest.approx((2 * PERFECT[name] + CONFUSED[name]) / 3, abs=1e-12), name
    assert m["num_defined_diseases"] == 3


def test_progression_disease_with_a_missing_class_is_undefined_not_zero():
    y, p = _progression_case()
    m = compute_metrics("disease_progression", y, p)
    for k in (2, 4, 5, 6):  # 2 lacks a class; 4-6 have nothing labelled
        for name in PROGRESSION_METRICS:
            assert math.isnan(m[f"{DISEASE_SLUGS[k]}/{name}"]), (k, name)
    all_missing = compute_metrics("disease_progression", np.full_like(y, 3), p)
    assert all(math.isnan(all_missing[name]) for name in PROGRESSION_METRICS)
    assert all_missing["num_defined_diseases"] == 0


def test_mortality_against_hand_computed_values_and_single_class_is_undefined():
    y = np.array([0, 0, 1, 1])
    p = np.array([0.1, 0.4, 0.35, 0.8])
    m = compute_metrics("mortality", y, p)
    # Ranked 0.8 (+), 0.4 (-), 0.35 (+), 0.1 (-): average precision = 1/2 * 1 + 1/2 * 2/3;
    # AUROC = the share of (positive, negative) pairs ranked right = 3/4.
    assert m["auprc"] == pytest.approx(1 / 2 + 1 / 3, abs=1e-12)
    assert m["auroc"] == pytest.approx(3 / 4, abs=1e-12)
    # torch tensors are accepted too
    assert compute_metrics("mortality", torch.tensor(y), torch.tensor(p))["auroc"] == pytest.approx(3 / 4)
    single = compute_metrics("mortality", np.zeros(10), np.linspace(0, 1, 10))
    assert math.isnan(single["auprc"]) and math.isnan(single["auroc"])


def test_length_of_stay_against_hand_computed_values():
    y = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    p = _confident([0, 1, 1, 1, 2, 3, 3, 0], 4, hi=0.7)
    m = compute_metrics("length_of_stay", y, p)
    # 5 of 8 right; every row sum is 2, the column sums 2, 3, 1, 2: chance agreement (4 + 6 + 2 + 4)/64 = 1/4,
    # kappa = (5/8 - 1/4)/(1 - 1/4) = 1/2.  F1 per class: 1/2, 4/5, 2/3, 1/2.
    # One-vs-rest AUROC (scores 0.7 / 0.1, ties 1/2): (5.5 + 2.5)/12, (5.5 + 5.5)/12, (6 + 3)/12, (5.5 + 2.5)/12.
    assert m["accuracy"] == pytest.approx(5 / 8, abs=1e-12)
    assert m["kappa"] == pytest.approx(1 / 2, abs=1e-12)
    assert m["f1_macro"] == pytest.approx((1 / 2 + 4 / 5 + 2 / 3 + 1 / 2) / 4, abs=1e-12)
    assert m["auroc"] == pytest.approx((8 + 11 + 9 + 8) / 48, abs=1e-12)
    missing = compute_metrics("length_of_stay", np.where(y == 3, 2, y), p)
    assert math.isnan(missing["auroc"]) and missing["accuracy"] == pytest.approx(4 / 8)


def test_bad_shapes_and_tasks_are_rejected():
    with pytest.raises(ValueError, match="progression"):
        compute_metrics("disease_progression", np.zeros((3, 7)), np.zeros((3, 7)))
    with pytest.raises(ValueError, match="length_of_stay"):
        compute_metrics("length_of_stay", np.zeros(3), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="unknown task"):
        compute_metrics("sepsis", [0], [0.5])


def test_aggregate_seeds_mean_and_sample_std_ignoring_nan():
    runs = [{"auroc": 0.8, "auprc": 0.5}, {"auroc": 0.9, "auprc": float("nan")}, {"auroc": 0.7, "auprc": 0.7}]
    agg = aggregate_seeds(runs)
    assert agg["auroc"][0] == pytest.approx(0.8)
    assert agg["auroc"][1] == pytest.approx(np.std([0.8, 0.9, 0.7], ddof=1))
    assert agg["auprc"] == pytest.approx((0.6, np.std([0.5, 0.7], ddof=1)))
    one = aggregate_seeds([{"auroc": 0.8}])
    assert one["auroc"][0] == 0.8 and math.isnan(one["auroc"][1])


def test_format_table_reads_like_the_paper():
    rows = {
        "DiPro (ours)": {"auprc": (0.742, 0.003), "auroc": (0.897, 0.002)},
        "CXR only": {"auprc": 0.5, "auroc": float("nan")},
    }
    table = format_table(rows, "mortality")
    lines = table.splitlines()
    assert lines[0].split() == ["Method", "AUPRC", "AUROC"]
    assert "0.742 ± 0.003" in lines[2] and "0.897 ± 0.002" in lines[2]
    assert "0.500" in lines[3] and "undefined" in lines[3]
    prog = format_table({"x": {m: (0.5, 0.01) for m in PROGRESSION_METRICS}}, "disease_progression")
    assert prog.splitlines()[0].split() == ["Method", "Precision", "Recall", "F1", "AUPRC", "AUROC"]
