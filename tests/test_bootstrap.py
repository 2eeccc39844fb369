"""dipro.bootstrap: the vectorised metrics equal scikit-learn's on every resample, the intervals cover
the true value at the nominal rate, and paired differences behave (a model against itself is 0)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from dipro.bootstrap import (RESAMPLES, bootstrap_paired, bootstrap_pooled, bootstrap_run, format_intervals,
                             resample_counts, strata, weighted_metrics)
from dipro.metrics import compute_metrics


def _data(task: str, n: int, rng: np.random.Generator):
    if task == "mortality":
        return rng.integers(0, 2, n), np.round(rng.random(n), 2)  # rounded: ties across the classes
    if task == "length_of_stay":
        return rng.integers(0, 4, n), rng.dirichlet(np.ones(4), n)
    y = rng.integers(0, 4, (n, 7))
    y[:, 5] = np.where(y[:, 5] == 1, 3, y[:, 5])  # one disease never "improved": undefined everywhere
    palette = rng.dirichlet(np.ones(3), 6)  # few distinct probability rows: ties inside every class's ranking
    return y, palette[rng.integers(0, 6, (n, 7))]


@pytest.mark.parametrize("task", ["mortality", "length_of_stay", "disease_progression"])
def test_vectorised_metrics_equal_compute_metrics_on_each_resample(task):
    rng = np.random.default_rng(7)
    y, p = _data(task, 50, rng)
    counts = resample_counts(strata(task, y), 25, rng)
    got = weighted_metrics(task, y, p, counts)
    checked = 0
    for b in range(len(counts)):
        idx = np.repeat(np.arange(len(y)), counts[b])
        for k, v in compute_metrics(task, y[idx], p[idx]).items():
            assert math.isnan(v) == math.isnan(got[k][b]), (k, b)
            if not math.isnan(v):
                assert got[k][b] == pytest.approx(v, abs=1e-12), (k, b)
                checked += 1
    assert checked >= 25 * 2


def test_resamples_are_stratified_and_seeded():
    rng = np.random.default_rng(0)
    y = np.array([0] * 40 + [1] * 7)
    c1 = resample_counts(strata("mortality", y), 100, np.random.default_rng(3))
    assert (c1.sum(axis=1) == 47).all() and (c1[:, y == 1].sum(axis=1) == 7).all()  # class counts kept
    assert (c1 == resample_counts(strata("mortality", y), 100, np.random.default_rng(3))).all()
    prog, _ = _data("disease_progression", 30, rng)
    groups = strata("disease_progression", prog)
    counts = resample_counts(groups, 50, rng)
    for g in np.unique(groups):  # each pair's stratum keeps its size
        assert (counts[:, groups == g].sum(axis=1) == (groups == g).sum()).all()
    score = rng.random(47)
    assert bootstrap_run("mortality", y, score, seed=5) == bootstrap_run("mortality", y, score, seed=5)
    assert bootstrap_run("mortality", y, score, seed=5) != bootstrap_run("mortality", y, score, seed=6)


def test_intervals_cover_the_true_auroc_and_accuracy_at_the_nominal_rate():
    """Binormal scores (positives N(1, 1), negatives N(0, 1)): the true AUROC is Phi(1/sqrt 2) = 0.7602.
    A LOS classifier right with probability 0.6 has true accuracy 0.6. 200 simulated test sets each."""
    rng = np.random.default_rng(2024)
    true_auroc = 0.5 * (1 + math.erf(0.5))  # Phi(1 / sqrt(2))
    reps, n = 200, 120
    hits_auroc = hits_acc = 0
    for r in range(reps):
        y = (rng.random(n) < 1 / 3).astype(int)
        score = rng.normal(y.astype(float), 1.0)
        ci = bootstrap_run("mortality", y, 1 / (1 + np.exp(-score)), seed=r)["auroc"]
        hits_auroc += ci.low <= true_auroc <= ci.high
        los = rng.integers(0, 4, n)
        right = rng.random(n) < 0.6
        pred = np.where(right, los, (los + rng.integers(1, 4, n)) % 4)
        prob = np.full((n, 4), 0.1)
        prob[np.arange(n), pred] = 0.7
        acc = bootstrap_run("length_of_stay", los, prob, seed=r, metrics=["accuracy"])["accuracy"]
        hits_acc += acc.low <= 0.6 <= acc.high
        assert ci.resamples == RESAMPLES and ci.samples == n
    # 95 % nominal; 200 replications have a binomial sd of 1.5 points: within 3 sd
    assert 0.90 <= hits_auroc / reps <= 0.99, hits_auroc / reps
    assert 0.90 <= hits_acc / reps <= 0.99, hits_acc / reps


def test_a_model_paired_with_itself_differs_by_exactly_zero():
    rng = np.random.default_rng(1)
    for task in ("mortality", "length_of_stay", "disease_progression"):
        y, p = _data(task, 40, rng)
        d = bootstrap_paired(task, y, [p], [p])
        for name, iv in d.items():
            if math.isfinite(iv.value):
                assert (iv.value, iv.low, iv.high) == (0.0, 0.0, 0.0), (task, name)
        assert not d["auroc"].excludes(0.0)


def test_paired_difference_finds_a_better_model_and_pooling_averages_seeds():
    rng = np.random.default_rng(3)
    n = 150
    y = (rng.random(n) < 0.4).astype(int)
    good = [1 / (1 + np.exp(-rng.normal(2.0 * y, 1.0))) for _ in range(2)]
    weak = [1 / (1 + np.exp(-rng.normal(0.3 * y, 1.0))) for _ in range(2)]
    d = bootstrap_paired("mortality", y, good, weak)["auroc"]
    single = [compute_metrics("mortality", y, p)["auroc"] for p in good + weak]
    assert d.value == pytest.approx((single[0] + single[1]) / 2 - (single[2] + single[3]) / 2)
    assert d.excludes(0.1) and d.low <= d.value <= d.high
    pooled = bootstrap_pooled("mortality", y, good)["auroc"]
    assert pooled.value == pytest.approx((single[0] + single[1]) / 2) and pooled.low < pooled.value < pooled.high
    table = format_intervals({"good": bootstrap_pooled("mortality", y, good), "good - weak":
                              bootstrap_paired("mortality", y, good, weak)}, "mortality")
    assert "good - weak" in table and "[" in table and "1000 stratified bootstrap resamples of 150" in table
    with pytest.raises(ValueError, match="not the same samples"):
        bootstrap_paired("mortality", y, [good[0][:-1]], [weak[0]])
