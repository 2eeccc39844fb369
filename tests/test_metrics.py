"""dipro.metrics against scikit-learn computed directly, including undefined (missing-class) cases."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import (
    accuracy_score,
    auc,
    average_precision_score,
    cohen_kappa_score,
    f1_score,
    precision_recall_curve,
    precision_score,
    recall_score,
    roc_auc_score,
)

from data_sharding.constants import DISEASE_SLUGS
from dipro.metrics import PROGRESSION_METRICS, aggregate_seeds, compute_metrics, format_table


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _sklearn_disease(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    pred = p.argmax(1)
    pr = []
    for c in range(3):
        precision, recall, _ = precision_recall_curve(y == c, p[:, c])
        pr.append(auc(recall, precision))
    return {
        "precision_macro": precision_score(y, pred, average="macro", zero_division=0),
        "recall_macro": recall_score(y, pred, average="macro", zero_division=0),
        "f1_macro": f1_score(y, pred, average="macro", zero_division=0),
        "auprc_macro": float(np.mean(pr)),
        "auroc": roc_auc_score(y, p, multi_class="ovr"),
    }


def _progression_data(seed: int = 0, n: int = 120):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, size=(n, 7))
    logits = rng.normal(size=(n, 7, 3))
    logits[np.arange(n)[:, None], np.arange(7)[None], np.minimum(y, 2)] += 1.0  # some signal
    return y, _softmax(logits)


def test_progression_matches_sklearn_per_disease_and_mean():
    y, p = _progression_data()
    m = compute_metrics("disease_progression", y, p)
    per = []
    for k, slug in enumerate(DISEASE_SLUGS):
        keep = y[:, k] != 3
        ref = _sklearn_disease(y[keep, k], p[keep, k])
        per.append(ref)
        for name in PROGRESSION_METRICS:
            assert m[f"{slug}/{name}"] == pytest.approx(ref[name], abs=1e-12), (slug, name)
    for name in PROGRESSION_METRICS:
        assert m[name] == pytest.approx(np.mean([r[name] for r in per]), abs=1e-12)
    assert m["num_defined_diseases"] == 7


def test_progression_disease_with_a_missing_class_is_undefined_not_zero():
    y, p = _progression_data(seed=1)
    y[:, 2] = np.where(y[:, 2] == 1, 0, y[:, 2])  # disease 2: no "improved" left
    y[:, 5] = 3  # disease 5: nothing labelled
    m = compute_metrics("disease_progression", y, p)
    for k in (2, 5):
        for name in PROGRESSION_METRICS:
            assert math.isnan(m[f"{DISEASE_SLUGS[k]}/{name}"])
    defined = [k for k in range(7) if k not in (2, 5)]
    for name in PROGRESSION_METRICS:
        expected = np.mean([_sklearn_disease(y[y[:, k] != 3, k], p[y[:, k] != 3, k])[name] for k in defined])
        assert m[name] == pytest.approx(expected, abs=1e-12)
    assert m["num_defined_diseases"] == 5
    all_missing = compute_metrics("disease_progression", np.full_like(y, 3), p)
    assert all(math.isnan(all_missing[name]) for name in PROGRESSION_METRICS)


def test_mortality_matches_sklearn_and_single_class_is_undefined():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 200)
    p = np.clip(0.3 * y + rng.uniform(size=200) * 0.7, 0, 1)
    m = compute_metrics("mortality", y, p)
    assert m["auprc"] == pytest.approx(average_precision_score(y, p))
    assert m["auroc"] == pytest.approx(roc_auc_score(y, p))
    # torch tensors are accepted too
    assert compute_metrics("mortality", torch.tensor(y), torch.tensor(p))["auroc"] == pytest.approx(m["auroc"])
    single = compute_metrics("mortality", np.zeros(10), rng.uniform(size=10))
    assert math.isnan(single["auprc"]) and math.isnan(single["auroc"])


def test_length_of_stay_matches_sklearn():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 4, 300)
    logits = rng.normal(size=(300, 4))
    logits[np.arange(300), y] += 1.0
    p = _softmax(logits)
    m = compute_metrics("length_of_stay", y, p)
    pred = p.argmax(1)
    assert m["kappa"] == pytest.approx(cohen_kappa_score(y, pred))
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["f1_macro"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert m["auroc"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr"))
    missing = compute_metrics("length_of_stay", np.where(y == 3, 2, y), p)
    assert math.isnan(missing["auroc"]) and not math.isnan(missing["accuracy"])


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
