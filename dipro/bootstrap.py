"""Bootstrap confidence intervals of the paper's metrics: one run, a metric pooled over seeds, and
the paired difference of two arms on the same samples.

    ci = bootstrap_run(task, y_true, y_prob)                  # {metric: Interval}, 95 %, 1000 resamples
    ci = bootstrap_pooled(task, y_true, [p_seed23, p_seed29])  # the metric's mean over seeds
    d = bootstrap_paired(task, y_true, [p_arm...], [p_base...])  # mean(arm) - mean(base), same resamples

What is resampled: the evaluated samples (test stays, progression pairs), with replacement,
**stratified by label** (each resample keeps every class's count, so a metric defined on the
data stays defined on every resample), from a seeded ``numpy`` generator (the same seed gives the
same intervals). The interval is the percentile interval (2.5 % and 97.5 % quantiles of the
resampled values; Efron & Tibshirani 1993, ch. 13) around the metric of the full set.

*Pooled over seeds*: every resample draws one set of samples and scores every seed's model on it;
the value is the mean over seeds, so the interval covers the test-sample uncertainty of the
seed-averaged metric the paper's tables report (the ``± std`` column is the seed spread).
*Paired*: arm and baseline are scored on the same resample and subtracted, so the sample-to-sample
difficulty they share cancels (MedFuse / DrFuse report such intervals); a model against itself is
exactly 0 with a zero-width interval.

Vectorised: the resamples are a ``[B, N]`` matrix of sample counts, and every metric of
:func:`dipro.metrics.compute_metrics` is computed for all of them at once from per-resample
weighted sums (:func:`weighted_metrics`), giving the same numbers as ``compute_metrics`` on each
resampled set (tests/test_bootstrap.py checks this against scikit-learn):

* AUROC = P(score_pos > score_neg) + 0.5 P(tie) (Mann-Whitney), over groups of equal scores;
* average precision (mortality AUPRC) = sum over thresholds of delta recall x precision;
* progression AUPRC = trapezoid area under (recall, precision) from (0, 1), as ``auc(recall, precision)``;
* precision / recall / F1 / accuracy / Cohen's kappa from the weighted confusion matrix.

Strata: mortality by the 0/1 label, length of stay by its bin; a progression pair by its rarest
labelled (disease, class) in the evaluated set, so rare classes keep their count (a disease can
still lose a class in a resample when its rare class sits in pairs stratified by an even rarer
one: it is then undefined there and left out of that resample's mean, as ``compute_metrics`` does).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from data_sharding.constants import DISEASE_SLUGS, NOT_MENTIONED, NUM_DISEASES, NUM_LOS_BINS, NUM_PROGRESSION_CLASSES
from dipro.metrics import LOS_METRICS, MORTALITY_METRICS, PROGRESSION_METRICS, TASK_METRICS, compute_metrics

RESAMPLES = 1000
"""Bootstrap resamples per interval (the issue's floor; 2000 halves the Monte-Carlo error of the bounds)."""
CONFIDENCE = 0.95
SEED = 0
"""Seed of the resampling generator: the same data and seed give the same interval."""
CHUNK = 250
"""Resamples computed together (bounds memory at CHUNK x samples x 8 bytes per working array)."""


@dataclass(frozen=True)
class Interval:
    """A metric (or a difference) on the full set and its bootstrap percentile interval."""

    value: float
    low: float
    high: float
    resamples: int
    """Resamples on which the metric was defined (the interval is over these)."""
    samples: int
    """Evaluated samples (the same in every resample)."""

    def excludes(self, threshold: float) -> bool:
        """True when the whole interval lies above ``threshold`` (lower bound > threshold)."""
        return math.isfinite(self.low) and self.low > threshold

    def as_dict(self) -> dict[str, float | int]:
        return {"value": self.value, "low": self.low, "high": self.high, "resamples": self.resamples,
                "samples": self.samples}

    def format(self, digits: int = 3) -> str:
        if not math.isfinite(self.value):
            return "undefined"
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            return f"{self.value:.{digits}f}"
        return f"{self.value:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


# ----------------------------------------------------------------------------- strata and resamples

def strata(task: str, y_true: np.ndarray) -> np.ndarray:
    """The stratum of each sample (see the module docstring): int64 [N]."""
    y = np.asarray(y_true)
    if task == "mortality":
        return y.reshape(-1).astype(np.int64)
    if task == "length_of_stay":
        return y.reshape(-1).astype(np.int64)
    if task != "disease_progression":
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASK_METRICS)}")
    y = y.astype(np.int64)
    if len(y) == 0:
        return np.zeros(0, np.int64)
    n_pairs = NUM_DISEASES * NUM_PROGRESSION_CLASSES
    labelled = y != NOT_MENTIONED
    pair_ids = np.arange(NUM_DISEASES)[None, :] * NUM_PROGRESSION_CLASSES + np.where(labelled, y, 0)
    counts = np.bincount(pair_ids[labelled], minlength=n_pairs)
    rarity = np.where(labelled, counts[pair_ids] * n_pairs + pair_ids, np.iinfo(np.int64).max)
    rarest = pair_ids[np.arange(len(y)), rarity.argmin(axis=1)]
    return np.where(labelled.any(axis=1), rarest, -1).astype(np.int64)


def resample_counts(groups: np.ndarray, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """``[n_resamples, N]`` int32: how often each sample is drawn; within each stratum of ``groups``
    as many draws (with replacement) as the stratum has samples."""
    n = len(groups)
    counts = np.zeros(n_resamples * n, dtype=np.int64)
    offsets = (np.arange(n_resamples, dtype=np.int64) * n)[:, None]
    for g in np.unique(groups):
        members = np.flatnonzero(groups == g)
        draws = members[rng.integers(0, len(members), size=(n_resamples, len(members)))]
        counts += np.bincount((draws + offsets).ravel(), minlength=n_resamples * n)
    return counts.reshape(n_resamples, n).astype(np.int32)


# ----------------------------------------------------------------------------- weighted metrics

def _safe_div(num: np.ndarray, den: np.ndarray, empty: float = 0.0) -> np.ndarray:
    out = np.full(np.broadcast(num, den).shape, empty, dtype=np.float64)
    np.divide(num, den, out=out, where=den != 0)
    return out


def _ranking(pos: np.ndarray, score: np.ndarray, w: np.ndarray) -> dict[str, np.ndarray]:
    """AUROC, average precision and trapezoid AUPRC of binary labels ``pos`` [N] ranked by ``score`` [N],
    for every row of weights ``w`` [B, N]. NaN where a resample lacks positives or negatives."""
    b = w.shape[0]
    if pos.size == 0:
        nan = np.full(b, np.nan)
        return {"auroc": nan, "ap": nan, "auprc": nan}
    order = np.argsort(-score, kind="stable")
    s = score[order]
    starts = np.flatnonzero(np.concatenate([[True], s[1:] != s[:-1]]))  # one group per distinct score
    wo = w[:, order].astype(np.float64)
    p = pos[order].astype(np.float64)
    gp = np.add.reduceat(wo * p, starts, axis=1)  # positive weight per group, highest score first
    gn = np.add.reduceat(wo * (1.0 - p), starts, axis=1)
    tp, fp = np.cumsum(gp, axis=1), np.cumsum(gn, axis=1)
    n_pos, n_neg = tp[:, -1], fp[:, -1]
    defined = (n_pos > 0) & (n_neg > 0)
    # Mann-Whitney: each positive beats the negatives of lower groups and ties with its own group's.
    beats = (gp * ((n_neg[:, None] - fp) + 0.5 * gn)).sum(axis=1)
    auroc = np.where(defined, _safe_div(beats, n_pos * n_neg, np.nan), np.nan)
    precision = _safe_div(tp, tp + fp, 1.0)  # no sample above the threshold yet: the curve's (0, 1) start
    recall = _safe_div(tp, n_pos[:, None], 0.0)
    ap = np.where(defined, (_safe_div(gp, n_pos[:, None]) * precision).sum(axis=1), np.nan)
    r_prev = np.concatenate([np.zeros((b, 1)), recall[:, :-1]], axis=1)
    p_prev = np.concatenate([np.ones((b, 1)), precision[:, :-1]], axis=1)
    auprc = np.where(defined, ((recall - r_prev) * (precision + p_prev) / 2).sum(axis=1), np.nan)
    return {"auroc": auroc, "ap": ap, "auprc": auprc}


def _confusion(y: np.ndarray, pred: np.ndarray, w: np.ndarray, k: int) -> np.ndarray:
    """Weighted confusion matrices [B, k, k] (rows: true class, columns: predicted)."""
    cell = y.astype(np.int64) * k + pred.astype(np.int64)
    onehot = np.zeros((len(y), k * k))
    onehot[np.arange(len(y)), cell] = 1.0
    return (w.astype(np.float64) @ onehot).reshape(w.shape[0], k, k)


def _class_scores(conf: np.ndarray, present: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Macro precision / recall / F1 (zero_division=0) over the classes ``present`` [B, k] (all if None)."""
    tp = np.diagonal(conf, axis1=1, axis2=2)
    predicted, actual = conf.sum(axis=1), conf.sum(axis=2)
    prec, rec = _safe_div(tp, predicted), _safe_div(tp, actual)
    f1 = _safe_div(2 * tp, predicted + actual)
    if present is None:
        return {"precision_macro": prec.mean(axis=1), "recall_macro": rec.mean(axis=1), "f1_macro": f1.mean(axis=1)}
    n = present.sum(axis=1)
    return {name: _safe_div((v * present).sum(axis=1), n, np.nan)
            for name, v in (("precision_macro", prec), ("recall_macro", rec), ("f1_macro", f1))}


def _multiclass(y: np.ndarray, prob: np.ndarray, w: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """The progression metrics of one disease (labels 0..k-1 only) for every resample."""
    scores = _class_scores(_confusion(y, prob.argmax(axis=1), w, k))
    curves = [_ranking(y == c, prob[:, c], w) for c in range(k)]
    scores["auprc_macro"] = np.mean([c["auprc"] for c in curves], axis=0)
    scores["auroc"] = np.mean([c["auroc"] for c in curves], axis=0)
    return scores


def weighted_metrics(task: str, y_true, y_prob, weights: np.ndarray) -> dict[str, np.ndarray]:
    """:func:`dipro.metrics.compute_metrics` of ``task`` on every resample at once.

    ``weights`` [B, N]: how often each sample occurs in each resample. Returns {metric: [B]} with
    the keys of ``compute_metrics`` (NaN = undefined on that resample).
    """
    y, prob = np.asarray(y_true), np.asarray(y_prob, dtype=np.float64)
    w = np.asarray(weights)
    if task == "mortality":
        y = y.reshape(-1).astype(np.int64)
        r = _ranking(y == 1, prob.reshape(-1), w)
        return {"auprc": r["ap"], "auroc": r["auroc"]}
    if task == "length_of_stay":
        y = y.reshape(-1).astype(np.int64)
        conf = _confusion(y, prob.argmax(axis=1), w, NUM_LOS_BINS)
        total = conf.sum(axis=(1, 2))
        actual, predicted = conf.sum(axis=2), conf.sum(axis=1)
        po = _safe_div(np.trace(conf, axis1=1, axis2=2), total, np.nan)
        pe = _safe_div((actual * predicted).sum(axis=1), total ** 2, np.nan)
        kappa = np.where(np.isclose(pe, 1.0), np.nan, _safe_div(po - pe, 1.0 - pe, np.nan))
        f1 = _class_scores(conf, present=(actual > 0) | (predicted > 0))["f1_macro"]  # labels in y or pred
        all_present = (actual > 0).all(axis=1)
        auroc = np.mean([_ranking(y == c, prob[:, c], w)["auroc"] for c in range(NUM_LOS_BINS)], axis=0)
        return {"kappa": kappa, "accuracy": po, "f1_macro": f1, "auroc": np.where(all_present, auroc, np.nan)}
    if task != "disease_progression":
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASK_METRICS)}")
    y = y.astype(np.int64)
    out: dict[str, np.ndarray] = {}
    per_metric: dict[str, list[np.ndarray]] = {m: [] for m in PROGRESSION_METRICS}
    for k, slug in enumerate(DISEASE_SLUGS):
        keep = y[:, k] != NOT_MENTIONED
        wk = w[:, keep]
        yk, pk = y[keep, k], prob[keep, k]
        present = np.stack([(wk * (yk == c)).sum(axis=1) > 0 for c in range(NUM_PROGRESSION_CLASSES)], axis=1)
        defined = present.all(axis=1)
        values = _multiclass(yk, pk, wk, NUM_PROGRESSION_CLASSES) if keep.any() else {}
        for m in PROGRESSION_METRICS:
            v = np.where(defined, values[m], np.nan) if keep.any() else np.full(w.shape[0], np.nan)
            out[f"{slug}/{m}"] = v
            per_metric[m].append(v)
    for m in PROGRESSION_METRICS:
        stacked = np.stack(per_metric[m])
        n = np.isfinite(stacked).sum(axis=0)
        out[m] = _safe_div(np.nansum(stacked, axis=0), n, np.nan)
    out["num_defined_diseases"] = np.isfinite(np.stack(per_metric[PROGRESSION_METRICS[0]])).sum(axis=0).astype(float)
    return out


# ----------------------------------------------------------------------------- intervals

def _as_probs(y_probs) -> list[np.ndarray]:
    if isinstance(y_probs, np.ndarray) and y_probs.dtype != object:
        return [y_probs]
    return [np.asarray(p) for p in y_probs]


def _resampled(task: str, y_true: np.ndarray, probs: Sequence[np.ndarray], n_resamples: int, seed: int):
    """Yield ``[per-model {metric: [chunk]}]`` over chunks of resamples (the same draws for every model)."""
    rng = np.random.default_rng(seed)
    groups = strata(task, y_true)
    done = 0
    while done < n_resamples:
        b = min(CHUNK, n_resamples - done)
        w = resample_counts(groups, b, rng)
        yield [weighted_metrics(task, y_true, p, w) for p in probs]
        done += b


def _interval(value: float, draws: np.ndarray, confidence: float, samples: int) -> Interval:
    finite = draws[np.isfinite(draws)]
    if not math.isfinite(value) or finite.size == 0:
        return Interval(value, math.nan, math.nan, int(finite.size), samples)
    alpha = (1.0 - confidence) / 2
    low, high = np.quantile(finite, [alpha, 1.0 - alpha])
    return Interval(float(value), float(low), float(high), int(finite.size), samples)


def _metric_keys(task: str) -> tuple[str, ...]:
    return {"mortality": MORTALITY_METRICS, "length_of_stay": LOS_METRICS}.get(task, PROGRESSION_METRICS)


def _mean_over(values: Sequence[np.ndarray | float]) -> np.ndarray:
    """Mean over models (seeds), NaN when any is undefined (a seed without the metric has no mean)."""
    return np.mean(np.stack([np.asarray(v, dtype=np.float64) for v in values]), axis=0)


def bootstrap_compare(task: str, y_true, arm_probs, base_probs=None, *, n_resamples: int = RESAMPLES,
                      seed: int = SEED, confidence: float = CONFIDENCE, metrics: Sequence[str] | None = None,
                      ) -> dict[str, Interval]:
    """Intervals of the mean over ``arm_probs`` (one array per seed) or, with ``base_probs``, of
    ``mean(arm) - mean(base)`` on the same resamples (paired). Keys: ``metrics`` (default: the task's
    headline metrics, per-disease ones included for progression)."""
    if n_resamples < 1:
        raise ValueError("n_resamples must be >= 1")
    y = np.asarray(y_true)
    arm, base = _as_probs(arm_probs), _as_probs(base_probs) if base_probs is not None else []
    for p in arm + base:
        if len(p) != len(y):
            raise ValueError(f"bootstrap: {len(p)} predictions for {len(y)} labels: not the same samples")
    keys = list(metrics) if metrics is not None else list(_metric_keys(task)) + (
        [f"{s}/{m}" for s in DISEASE_SLUGS for m in PROGRESSION_METRICS] if task == "disease_progression" else [])
    full = [compute_metrics(task, y, p) for p in arm + base]

    def combine(per_model: list[Mapping[str, np.ndarray | float]], k: str) -> np.ndarray:
        a = _mean_over([m[k] for m in per_model[:len(arm)]])
        return a - _mean_over([m[k] for m in per_model[len(arm):]]) if base else a

    draws: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    for chunk in _resampled(task, y, arm + base, n_resamples, seed):
        for k in keys:
            draws[k].append(combine(chunk, k))
    return {k: _interval(float(combine(full, k)), np.concatenate(draws[k]), confidence, len(y)) for k in keys}


def bootstrap_run(task: str, y_true, y_prob, **kwargs) -> dict[str, Interval]:
    """Intervals of one run's metrics."""
    return bootstrap_compare(task, y_true, [np.asarray(y_prob)], **kwargs)


def bootstrap_pooled(task: str, y_true, y_probs: Sequence, **kwargs) -> dict[str, Interval]:
    """Intervals of the metrics' mean over seeds (every seed scored on the same resamples)."""
    return bootstrap_compare(task, y_true, list(y_probs), **kwargs)


def bootstrap_paired(task: str, y_true, arm_probs: Sequence, base_probs: Sequence, **kwargs) -> dict[str, Interval]:
    """Intervals of ``mean over arm seeds - mean over baseline seeds`` on the same resamples."""
    return bootstrap_compare(task, y_true, list(arm_probs), list(base_probs), **kwargs)


def align(keys_a: Sequence[str], keys_b: Sequence[str], what: str) -> None:
    """Refuse to pair predictions of different samples (the paired bootstrap needs the same ones)."""
    if list(keys_a) != list(keys_b):
        only_a, only_b = sorted(set(keys_a) - set(keys_b)), sorted(set(keys_b) - set(keys_a))
        from data_sharding.errors import DataError

        raise DataError(f"{what}: not the same samples ({len(keys_a)} vs {len(keys_b)}; {len(only_a)} only in the "
                        f"first, {len(only_b)} only in the second): a paired comparison needs the same evaluated "
                        "samples (the same shards)")


def format_intervals(rows: Mapping[str, Mapping[str, Interval]], task: str, metrics: Sequence[str] | None = None,
                     digits: int = 3, title: str = "", seed: int = SEED) -> str:
    """A table of ``value [low, high]`` cells, one row per run / arm / comparison."""
    from dipro.metrics import METRIC_TITLES

    cols = list(metrics or TASK_METRICS[task])
    first = next(iter(rows.values()), {})
    conf = next(iter(first.values()), None)
    header = [title or "95 % bootstrap CI"] + [METRIC_TITLES.get(c, c) for c in cols]
    body = [[name] + [cells[c].format(digits) if c in cells else "-" for c in cols] for name, cells in rows.items()]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in body]
    if conf is not None:
        lines.append(f"({conf.resamples} stratified bootstrap resamples of {conf.samples} samples, seed {seed}; "
                     "percentile intervals)")
    return "\n".join(lines)
