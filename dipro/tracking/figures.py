"""Evaluation figures (matplotlib Agg, returned as Figures; the tracker saves them as PNG).

* ROC and precision-recall curves: mortality (binary), length of stay (one
  curve per LOS bin, one-vs-rest), disease progression (one panel per disease,
  one curve per class worsened / improved / no change; label 3 "not mentioned"
  is masked, as in the metrics).
* Confusion matrices: mortality at threshold 0.5, LOS 4x4, progression 3x3 per disease.
* Region attention: the paper's figure of the model's average attention over the
  10 anatomical regions (``data_sharding.constants.REGIONS``) as a labelled bar
  chart; ``[N, K, 10]`` attention (one row per disease) becomes a K x 10 heat map.
* A sweep's comparison of arms: per metric, each arm's seed-mean with its 95 % bootstrap
  interval (pooled over seeds) and every seed's value as a dot.

Only aggregates are drawn, never an individual record's image.
"""
from __future__ import annotations

from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from data_sharding.constants import DISEASES, NOT_MENTIONED, NUM_LOS_BINS, REGIONS  # noqa: E402

PROGRESSION_CLASSES = ("worsened", "improved", "no change")
LOS_CLASSES = tuple(f"bin {i}" for i in range(NUM_LOS_BINS))


def _curves(y_bin: np.ndarray, score: np.ndarray) -> tuple[tuple, tuple, float, float] | None:
    """(fpr, tpr), (recall, precision), auroc, auprc for one binary problem; None if one class only."""
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

    if y_bin.size == 0 or y_bin.min() == y_bin.max():
        return None
    fpr, tpr, _ = roc_curve(y_bin, score)
    prec, rec, _ = precision_recall_curve(y_bin, score)
    return (fpr, tpr), (rec, prec), float(roc_auc_score(y_bin, score)), float(average_precision_score(y_bin, score))


def _binary_problems(task: str, y_true: np.ndarray, y_prob: np.ndarray) -> list[tuple[str, list[tuple[str, np.ndarray, np.ndarray]]]]:
    """Panels of (curve label, binary truth, score) for each task."""
    if task == "mortality":
        return [("mortality", [("died", (y_true == 1).astype(int), y_prob.reshape(-1))])]
    if task == "length_of_stay":
        return [("length of stay", [(LOS_CLASSES[c], (y_true == c).astype(int), y_prob[:, c])
                                    for c in range(y_prob.shape[1])])]
    panels = []
    for d, disease in enumerate(DISEASES):
        keep = y_true[:, d] != NOT_MENTIONED
        yt, yp = y_true[keep, d], y_prob[keep, d, :]
        panels.append((disease, [(PROGRESSION_CLASSES[c], (yt == c).astype(int), yp[:, c])
                                 for c in range(len(PROGRESSION_CLASSES))]))
    return panels


def _grid(n: int) -> tuple[Any, np.ndarray]:
    cols = min(n, 4)
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.3 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, axes.flat


def curve_figures(task: str, y_true: Any, y_prob: Any, title: str = "") -> tuple[Any, Any]:
    """(ROC figure, PR figure) for ``task``; an undefined curve is marked as such in its panel."""
    y_true, y_prob = np.asarray(y_true), np.asarray(y_prob, dtype=float)
    panels = _binary_problems(task, y_true, y_prob)
    roc_fig, roc_axes = _grid(len(panels))
    pr_fig, pr_axes = _grid(len(panels))
    for (name, problems), rax, pax in zip(panels, roc_axes, pr_axes):
        for label, yb, score in problems:
            res = _curves(yb, score)
            if res is None:
                rax.plot([], [], label=f"{label}: undefined (one class)")
                pax.plot([], [], label=f"{label}: undefined (one class)")
                continue
            (fpr, tpr), (rec, prec), auroc, auprc = res
            rax.plot(fpr, tpr, label=f"{label} AUROC {auroc:.3f}")
            pax.plot(rec, prec, label=f"{label} AP {auprc:.3f} (prev {yb.mean():.2f})")
        rax.plot([0, 1], [0, 1], ls=":", c="grey", lw=0.8)
        for ax, (xl, yl) in ((rax, ("false positive rate", "true positive rate")), (pax, ("recall", "precision"))):
            ax.set_title(name, fontsize=9)
            ax.set_xlabel(xl, fontsize=8)
            ax.set_ylabel(yl, fontsize=8)
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1.02)
            ax.legend(fontsize=6, loc="lower right" if ax is rax else "upper right")
    roc_fig.suptitle(f"ROC {title}".strip())
    pr_fig.suptitle(f"Precision-recall {title}".strip())
    roc_fig.tight_layout()
    pr_fig.tight_layout()
    return roc_fig, pr_fig


def confusion_figure(task: str, y_true: Any, y_prob: Any, title: str = "") -> Any:
    """Confusion matrices (rows = truth, columns = prediction) with counts."""
    from sklearn.metrics import confusion_matrix

    y_true, y_prob = np.asarray(y_true), np.asarray(y_prob, dtype=float)
    if task == "mortality":
        mats = [("mortality", confusion_matrix(y_true.astype(int), (y_prob.reshape(-1) >= 0.5).astype(int),
                                               labels=[0, 1]), ("survived", "died"))]
    elif task == "length_of_stay":
        mats = [("length of stay", confusion_matrix(y_true, y_prob.argmax(1), labels=list(range(NUM_LOS_BINS))),
                 LOS_CLASSES)]
    else:
        mats = []
        for d, disease in enumerate(DISEASES):
            keep = y_true[:, d] != NOT_MENTIONED
            cm = (confusion_matrix(y_true[keep, d], y_prob[keep, d].argmax(-1), labels=[0, 1, 2]) if keep.any()
                  else np.zeros((3, 3), dtype=int))  # never mentioned: an empty matrix, not an error
            mats.append((disease, cm, PROGRESSION_CLASSES))
    fig, axes = _grid(len(mats))
    for (name, cm, labels), ax in zip(mats, axes):
        ax.imshow(cm, cmap="Blues")
        for (i, j), v in np.ndenumerate(cm):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=8,
                    color="white" if v > cm.max() / 2 else "black")
        ax.set_xticks(range(len(labels)), labels, fontsize=7, rotation=30)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.set_xlabel("predicted", fontsize=8)
        ax.set_ylabel("true", fontsize=8)
        ax.set_title(name, fontsize=9)
    fig.suptitle(f"Confusion {title}".strip())
    fig.tight_layout()
    return fig


def region_attention_figure(attention: Any, title: str = "") -> Any:
    """Average attention per region: bar chart for ``[N, 10]``, heat map for ``[N, K, 10]``."""
    att = np.asarray(attention, dtype=float)
    if att.shape[-1] != len(REGIONS):
        raise ValueError(f"region attention has shape {att.shape}, expected [..., {len(REGIONS)}] (one per region)")
    mean = att.reshape(-1, len(REGIONS)).mean(0) if att.ndim <= 2 else att.mean(0)
    if mean.ndim == 1:
        fig, ax = plt.subplots(figsize=(6.5, 3.8))
        order = np.arange(len(REGIONS))[::-1]
        ax.barh([REGIONS[i] for i in order], mean[order], color="tab:blue")
        for y, i in enumerate(order):
            ax.text(mean[i], y, f" {mean[i]:.3f}", va="center", fontsize=7)
        ax.set_xlabel("mean attention weight")
        ax.set_xlim(0, max(mean.max() * 1.25, 1e-6))
    else:
        rows = DISEASES if mean.shape[0] == len(DISEASES) else [f"head {i}" for i in range(mean.shape[0])]
        fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 2.4))
        im = ax.imshow(mean, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(REGIONS)), REGIONS, rotation=40, ha="right", fontsize=7)
        ax.set_yticks(range(len(rows)), rows, fontsize=7)
        fig.colorbar(im, ax=ax, label="mean attention weight")
    ax.set_title(f"Region attention {title} (n={att.shape[0]})".strip(), fontsize=10)
    fig.tight_layout()
    return fig


def evaluation_figures(task: str, y_true: Any, y_prob: Any, region_attention: Any = None,
                       title: str = "") -> dict[str, Any]:
    """All evaluation figures by artifact stem: roc, pr, confusion, region_attention."""
    roc, pr = curve_figures(task, y_true, y_prob, title)
    out = {"roc": roc, "pr": pr, "confusion": confusion_figure(task, y_true, y_prob, title)}
    if region_attention is not None and np.asarray(region_attention).size:
        out["region_attention"] = region_attention_figure(region_attention, title)
    return out


def comparison_figure(arms: list[tuple[str, dict[str, Any], dict[str, list[float]]]], metrics: list[str],
                      titles: dict[str, str] | None = None, title: str = "") -> Any:
    """``arms``: (label, {metric: Interval (value, low, high)}, {metric: per-seed values}); one panel per metric,
    arms on the y axis, the interval as a horizontal error bar around the seed-mean."""
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 0.5 * len(arms) + 1.6), squeeze=False,
                             sharey=True)
    ys = np.arange(len(arms))[::-1]
    for ax, metric in zip(axes[0], metrics):
        for y, (label, intervals, seeds) in zip(ys, arms):
            iv = intervals.get(metric)
            if iv is not None and np.isfinite(iv.value):
                low = iv.value - iv.low if np.isfinite(iv.low) else 0.0
                high = iv.high - iv.value if np.isfinite(iv.high) else 0.0
                ax.errorbar([iv.value], [y], xerr=[[low], [high]], fmt="o", color="tab:blue", capsize=4)
            values = [v for v in seeds.get(metric, []) if np.isfinite(v)]
            ax.scatter(values, [y] * len(values), marker="x", color="tab:gray", zorder=3)
        ax.set_title((titles or {}).get(metric, metric))
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(ys, [label for label, _, _ in arms])
    fig.suptitle(title or "test metrics: seed mean and 95 % bootstrap interval (x: single seeds)")
    fig.tight_layout()
    return fig
