"""Evaluation metrics exactly as the paper defines them (scikit-learn underneath).

``compute_metrics(task, y_true, y_prob) -> dict[str, float]`` (NaN = undefined):

* disease_progression — y_true [N,7] in {0,1,2,3}, y_prob [N,7,3].  Per disease, on the
  samples whose label is not 3: macro precision / recall / F1 of the arg-max class over
  the three classes, macro AUPRC (per class, the area under the precision-recall curve,
  ``auc(recall, precision)`` as in the authors' evaluation), and one-vs-rest macro AUROC.
  Keys ``"{disease_slug}/{metric}"``; the unprefixed keys are the mean over the diseases
  that are defined.  A disease whose evaluated set lacks one of the three classes (or
  is empty) is undefined: all of its metrics are NaN and it is left out of the mean.
* mortality — y_true [N] in {0,1}, y_prob [N]: ``auprc`` (average precision), ``auroc``;
  NaN when y_true has a single class.
* length_of_stay — y_true [N] in 0..3, y_prob [N,4]: ``kappa`` (Cohen's), ``accuracy``,
  ``f1_macro`` of the arg-max class, ``auroc`` (one-vs-rest macro; NaN unless all four
  classes occur).

``aggregate_seeds`` gives mean ± sample std (ddof=1, as the authors' aggregation) over
runs; ``format_table`` prints rows the way the paper's tables read.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
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

from data_sharding.constants import DISEASE_SLUGS, NOT_MENTIONED, NUM_DISEASES, NUM_LOS_BINS, NUM_PROGRESSION_CLASSES

PROGRESSION_METRICS = ("precision_macro", "recall_macro", "f1_macro", "auprc_macro", "auroc")
MORTALITY_METRICS = ("auprc", "auroc")
LOS_METRICS = ("kappa", "accuracy", "f1_macro", "auroc")
TASK_METRICS: dict[str, tuple[str, ...]] = {
    "disease_progression": PROGRESSION_METRICS,
    "mortality": MORTALITY_METRICS,
    "length_of_stay": LOS_METRICS,
}
# Column headers as the paper's tables print them.
METRIC_TITLES = {
    "precision_macro": "Precision",
    "recall_macro": "Recall",
    "f1_macro": "F1",
    "auprc_macro": "AUPRC",
    "auprc": "AUPRC",
    "auroc": "AUROC",
    "kappa": "Kappa",
    "accuracy": "ACC",
}
NAN = float("nan")


def _as_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x)


def _multiclass(y: np.ndarray, prob: np.ndarray, n_classes: int) -> dict[str, float]:
    """The shared multi-class metrics of one label set (precision/recall/F1/AUPRC/AUROC/kappa/acc)."""
    labels = list(range(n_classes))
    pred = prob.argmax(axis=1)
    auprc = []
    for c in labels:
        precision, recall, _ = precision_recall_curve((y == c).astype(int), prob[:, c])
        auprc.append(auc(recall, precision))
    return {
        "precision_macro": float(precision_score(y, pred, labels=labels, average="macro", zero_division=0)),
        "recall_macro": float(recall_score(y, pred, labels=labels, average="macro", zero_division=0)),
        "f1_macro": float(f1_score(y, pred, labels=labels, average="macro", zero_division=0)),
        "auprc_macro": float(np.mean(auprc)),
        "auroc": float(roc_auc_score(y, prob, multi_class="ovr", average="macro", labels=labels)),
    }


def progression_metrics(y_true: Any, y_prob: Any) -> dict[str, float]:
    """Per-disease and mean progression metrics (see the module docstring)."""
    y, prob = _as_numpy(y_true).astype(np.int64), _as_numpy(y_prob).astype(np.float64)
    if y.ndim != 2 or y.shape[1] != NUM_DISEASES or prob.shape != (*y.shape, NUM_PROGRESSION_CLASSES):
        raise ValueError(f"progression metrics: expected y_true [N,{NUM_DISEASES}] and y_prob [N,{NUM_DISEASES},3], "
                         f"got {y.shape} and {prob.shape}")
    out: dict[str, float] = {}
    per_metric: dict[str, list[float]] = {m: [] for m in PROGRESSION_METRICS}
    for k, slug in enumerate(DISEASE_SLUGS):
        keep = y[:, k] != NOT_MENTIONED
        yk, pk = y[keep, k], prob[keep, k]
        defined = set(np.unique(yk).tolist()) == set(range(NUM_PROGRESSION_CLASSES))
        values = _multiclass(yk, pk, NUM_PROGRESSION_CLASSES) if defined else dict.fromkeys(PROGRESSION_METRICS, NAN)
        for m in PROGRESSION_METRICS:
            out[f"{slug}/{m}"] = values[m]
            if defined:
                per_metric[m].append(values[m])
    for m in PROGRESSION_METRICS:
        out[m] = float(np.mean(per_metric[m])) if per_metric[m] else NAN
    out["num_defined_diseases"] = float(len(per_metric[PROGRESSION_METRICS[0]]))
    return out


def mortality_metrics(y_true: Any, y_prob: Any) -> dict[str, float]:
    y, prob = _as_numpy(y_true).astype(np.int64).reshape(-1), _as_numpy(y_prob).astype(np.float64).reshape(-1)
    if y.shape != prob.shape:
        raise ValueError(f"mortality metrics: y_true {y.shape} and y_prob {prob.shape} differ")
    if len(np.unique(y)) < 2:
        return {"auprc": NAN, "auroc": NAN}
    return {"auprc": float(average_precision_score(y, prob)), "auroc": float(roc_auc_score(y, prob))}


def los_metrics(y_true: Any, y_prob: Any) -> dict[str, float]:
    y, prob = _as_numpy(y_true).astype(np.int64).reshape(-1), _as_numpy(y_prob).astype(np.float64)
    if prob.shape != (len(y), NUM_LOS_BINS):
        raise ValueError(f"length_of_stay metrics: expected y_prob [N,{NUM_LOS_BINS}], got {prob.shape}")
    if len(y) == 0:
        return dict.fromkeys(LOS_METRICS, NAN)
    pred = prob.argmax(axis=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # kappa of a constant prediction is NaN, said below
        kappa = float(cohen_kappa_score(y, pred))
    all_present = set(np.unique(y).tolist()) == set(range(NUM_LOS_BINS))
    return {
        "kappa": kappa,
        "accuracy": float(accuracy_score(y, pred)),
        "f1_macro": float(f1_score(y, pred, average="macro", zero_division=0)),
        "auroc": float(roc_auc_score(y, prob, multi_class="ovr", average="macro")) if all_present else NAN,
    }


def compute_metrics(task: str, y_true: Any, y_prob: Any) -> dict[str, float]:
    """The paper's metrics for ``task`` (keys in the module docstring; NaN = undefined)."""
    if task == "disease_progression":
        return progression_metrics(y_true, y_prob)
    if task == "mortality":
        return mortality_metrics(y_true, y_prob)
    if task == "length_of_stay":
        return los_metrics(y_true, y_prob)
    raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASK_METRICS)}")


def aggregate_seeds(runs: Sequence[Mapping[str, float]]) -> dict[str, tuple[float, float]]:
    """{metric: (mean, std)} over runs (seeds), ignoring NaN; std is the sample std (ddof=1), NaN for one run."""
    keys: list[str] = []
    for r in runs:
        keys += [k for k in r if k not in keys]
    out: dict[str, tuple[float, float]] = {}
    for k in keys:
        vals = np.array([float(r[k]) for r in runs if k in r and r[k] is not None and not math.isnan(float(r[k]))])
        mean = float(vals.mean()) if len(vals) else NAN
        std = float(vals.std(ddof=1)) if len(vals) > 1 else NAN
        out[k] = (mean, std)
    return out


def _cell(value: float | tuple[float, float], digits: int) -> str:
    if isinstance(value, tuple):
        mean, std = value
        if math.isnan(mean):
            return "undefined"
        return f"{mean:.{digits}f} ± {std:.{digits}f}" if not math.isnan(std) else f"{mean:.{digits}f}"
    return "undefined" if math.isnan(value) else f"{value:.{digits}f}"


def format_table(
    rows: Mapping[str, Mapping[str, float | tuple[float, float]]],
    task: str,
    metrics: Sequence[str] | None = None,
    digits: int = 3,
) -> str:
    """A plain-text table like the paper's: one row per method/run, ``mean ± std`` cells.

    ``rows`` maps a row name (e.g. "DiPro (ours)") to plain metrics or to
    :func:`aggregate_seeds` output.  Columns default to the task's headline metrics.
    """
    cols = list(metrics or TASK_METRICS[task])
    header = ["Method"] + [METRIC_TITLES.get(c, c) for c in cols]
    body = [[name] + [_cell(vals.get(c, NAN), digits) for c in cols] for name, vals in rows.items()]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in body]
    return "\n".join(lines)
