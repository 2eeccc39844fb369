"""``dipro harmonize``: fit the acquisition rotation on a trained model's region features and report it.

    result = run_harmonize(model, cfg, shard_dir, processed, split="val", factor="orientation", k=1, out="harmonize")

1. region features of the split (:mod:`.features`), each CXR's setting from
   ``processed/acquisition.parquet`` (rows of unknown setting are left out of everything);
2. contrasts: proxy-twin pairs (:func:`.pairs.setting_pairs`), else stay-centred contrasts; their
   count is printed and below ``min_pairs`` film pairs (or stays, for the fallback) the command stops;
3. the rotation (:func:`.rotation.fit_rotation`), saved as ``rotation.pt`` + ``rotation.json``;
4. the table, entangled vs rotated-biological vs ComBat: probe AUROC of the setting from the
   region features F and of "the setting changed within the pair" from STD's dynamic feature D;
   ARI / NMI / Dice / same-cluster rate of the proxy twins' k-means clusters (inside each region);
   the task metric (the model's monitor) with the technical coordinates projected out of F inside
   the model, next to the model's own.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from data_sharding.errors import UserError

REPRESENTATIONS = ("entangled", "rotated-biological", "combat")
COLUMNS = ("probe_auroc_F", "ari", "nmi", "dice", "same_cluster", "probe_auroc_D_change", "task_metric")


@dataclass
class HarmonizeResult:
    rows: dict[str, dict[str, float]]
    """representation -> column -> value (NaN = not defined)."""
    counts: dict[str, Any]
    rotation_files: tuple[Path, Path]
    table: str
    monitor: str
    out: Path
    figure: Path | None = None
    details: dict[str, Any] = field(default_factory=dict)


def _settings(feats, processed: str | Path, factor: str) -> np.ndarray:
    from data_sharding.acquisition import FACTORS, UNKNOWN, load_acquisition

    if factor not in FACTORS:
        raise UserError(f"--factor {factor!r}: expected one of {', '.join(FACTORS)}")
    acq = load_acquisition(processed).set_index("dicom_id")[factor]
    s = acq.reindex(list(feats.dicom)).fillna(UNKNOWN).to_numpy(dtype=object)
    missing = int(np.sum(~np.isin(np.asarray(feats.dicom, dtype=object), acq.index.to_numpy(dtype=object))))
    if missing and missing == len(s):
        raise UserError(f"none of the split's CXRs is in {Path(processed) / 'acquisition.parquet'}: "
                        "were the shards cut from this processed directory?")
    return s


def format_table(rows: dict[str, dict[str, float]], monitor: str, title: str = "") -> str:
    heads = ("representation", "probe AUROC (F)", "ARI", "NMI", "Dice", "same cluster", "probe AUROC (D, change)",
             f"task {monitor}")
    lines = ([title] if title else []) + ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for name, r in rows.items():
        vals = ["—" if r.get(c) is None or (isinstance(r.get(c), float) and math.isnan(r[c])) else f"{r[c]:.3f}"
                for c in COLUMNS]
        lines.append("| " + " | ".join([name, *vals]) + " |")
    return "\n".join(lines)


def run_harmonize(model: Any, cfg: Any, shard_dir: str | Path, processed: str | Path, *, split: str = "val",
                  factor: str = "orientation", k: int = 1, clusters: int = 8, seed: int = 0,
                  max_pair_hours: float = 48.0, min_pairs: int = 20, out: str | Path = "harmonize",
                  batch_size: int = 16, device: str = "cpu", progress: bool = True, say=print,
                  source: str = "", features: Any = None, own: Any = None) -> HarmonizeResult:
    """Fit, save and report the rotation for ``model`` on ``split`` (see module doc).

    ``features`` (a :class:`~dipro.harmonize.features.RegionFeatures` of this model and split) and
    ``own`` (its :func:`~dipro.train.evaluate.evaluate_model` result on the split, same batch size)
    skip the two passes over the split that do not depend on the rotation: what several fits of one
    model (other ``k``, ``clusters``, ``factor``) can share (``benchmarks/harmonize.py``)."""
    from dipro.harmonize import consistency as M
    from dipro.harmonize.combat import combat
    from dipro.harmonize.features import collect_features, std_of_pairs
    from dipro.harmonize.pairs import setting_pairs, stay_centred_contrasts
    from dipro.harmonize.rotation import AcquisitionRemoval, fit_rotation, save_rotation
    from dipro.train.evaluate import evaluate_model

    if k < 1:
        raise UserError(f"--k must be >= 1, got {k}")
    if clusters < 2:
        raise UserError(f"--clusters must be >= 2, got {clusters}")
    if min_pairs < 1:
        raise UserError(f"--min-pairs must be >= 1, got {min_pairs}")
    feats = features if features is not None else collect_features(model, cfg, shard_dir, split, batch_size=batch_size,
                                                                   device=device, progress=progress)
    if feats.skipped:
        say(f"skipped {feats.skipped} corrupt sample(s); first: " + "; ".join(feats.notes[:3]))
    setting = _settings(feats, processed, factor)
    from data_sharding.acquisition import UNKNOWN

    counts_by = {str(c): int(n) for c, n in zip(*np.unique(setting, return_counts=True))}
    classes = sorted(c for c in counts_by if c != UNKNOWN and counts_by[c] >= 2)
    films = {str(c): len({d for d, s in zip(feats.dicom, setting) if s == c}) for c in counts_by}
    say(f"{split}: {len(set(feats.dicom))} CXRs, {len(feats.F)} region features ({feats.d}-d); "
        f"{factor}: " + ", ".join(f"{c} {films[c]}" for c in sorted(films)) + " CXRs")
    if len(classes) < 2:
        raise UserError(f"the {split} CXRs hold {len(classes)} known {factor} value(s) ({', '.join(classes) or 'none'}): "
                        f"nothing to separate; pick another --factor or --split")

    pairs = setting_pairs(feats.dicom, feats.stay, feats.hours, feats.region, setting, classes, max_pair_hours)
    n_pairs = len(pairs.film_pairs)
    known = np.isin(setting, classes)
    mean = feats.F[known].mean(axis=0)
    if n_pairs >= min_pairs:
        pairing = "pairs"
        say(f"contrasts: {n_pairs} film pairs of one stay in two {factor} settings <= {max_pair_hours:g} h apart "
            f"({len(pairs.rows)} region pairs)")
        contrasts = feats.F[pairs.rows[:, 0]] - feats.F[pairs.rows[:, 1]]
        # one classifier per (setting pair, region): the acquisition moves each region's features its own way
        labels = np.asarray([f"{lab}@{r}" for lab, r in zip(pairs.labels, feats.region[pairs.rows[:, 0]])], dtype=object)
        rot = fit_rotation(contrasts, labels, k, mean=mean, symmetric=True, seed=seed,
                           meta={"pairing": pairing, "film_pairs": n_pairs})
    else:
        contrasts, labels, n_stays = stay_centred_contrasts(feats.F, feats.stay, feats.region, setting, classes)
        say(f"contrasts: only {n_pairs} film pairs <= {max_pair_hours:g} h apart (--min-pairs {min_pairs}); "
            f"stay-centred contrasts of {n_stays} stays with films in >= 2 settings instead")
        if n_stays < min_pairs:
            raise UserError(f"too few contrasts to fit the {factor} rotation on {split}: {n_pairs} film pairs "
                            f"<= {max_pair_hours:g} h apart and {n_stays} stays with films in two settings, "
                            f"fewer than --min-pairs {min_pairs}; use a larger split, --max-pair-hours or --min-pairs")
        pairing = "stay-centred"
        rot = fit_rotation(contrasts, labels, k, mean=mean, symmetric=False, seed=seed,
                           meta={"pairing": pairing, "film_pairs": n_pairs, "stays": n_stays})
    rot.meta.update({"factor": factor, "classes": classes, "split": split, "model": source,
                     "max_pair_hours": max_pair_hours, "seed": seed})
    out = Path(out)
    files = save_rotation(out, rot)

    # ---- the table
    x = {"entangled": feats.F[known], "rotated-biological": rot.biological(feats.F[known]),
         "combat": combat(feats.F[known], setting[known])}
    kept = np.flatnonzero(known)
    pos = np.full(len(feats.F), -1)
    pos[kept] = np.arange(len(kept))
    s_known, g_known = setting[known], feats.stay[known]
    full = {"entangled": feats.F, "rotated-biological": rot.remove(feats.F), "combat": feats.F.copy()}
    full["combat"][kept] = x["combat"]
    d_pairs = feats.pairs[known[feats.pairs[:, 0]] & known[feats.pairs[:, 1]]]
    changed = (setting[d_pairs[:, 0]] != setting[d_pairs[:, 1]]).astype(int)
    rows: dict[str, dict[str, float]] = {}
    clustered_regions = 0
    for name in REPRESENTATIONS:
        r: dict[str, float] = {"probe_auroc_F": M.probe_auroc(x[name], s_known, g_known, seed)}
        if len(pairs.rows):
            # k-means inside each region: pooled, the region identity a pair shares would decide clusters
            c = M.cluster_consistency(x[name], pos[pairs.rows[:, 0]], pos[pairs.rows[:, 1]], clusters, seed,
                                      groups=feats.region[pairs.rows[:, 0]])
            r.update(ari=c["ari"], nmi=c["nmi"], dice=c["dice"], same_cluster=c["same_cluster"])
            if name == REPRESENTATIONS[0]:  # which regions are clustered depends on the twins, not the features
                clustered_regions = c["groups_used"]
                if c["groups_skipped"]:
                    say(f"cluster consistency: {c['groups_skipped']} region(s) with fewer than {clusters} distinct "
                        f"films among the twins left out, {c['groups_used']} clustered")
        if len(d_pairs) and 0 < changed.sum() < len(changed):
            _, dyn = std_of_pairs(model, full[name], d_pairs)
            r["probe_auroc_D_change"] = M.probe_auroc(dyn, changed, feats.stay[d_pairs[:, 0]], seed)
        rows[name] = r
    monitor = cfg.monitor
    if own is None:
        own = evaluate_model(model, cfg, split, shard_dir=shard_dir, device=device, batch_size=batch_size)
    model.feature_edit = AcquisitionRemoval(rot, device)
    try:
        projected = evaluate_model(model, cfg, split, shard_dir=shard_dir, device=device, batch_size=batch_size)
    finally:
        model.feature_edit = None
    rows["entangled"]["task_metric"] = float(own.metrics.get(monitor, math.nan))
    rows["rotated-biological"]["task_metric"] = float(projected.metrics.get(monitor, math.nan))
    rows["combat"]["task_metric"] = math.nan  # ComBat needs each film's setting at prediction time

    counts = {"split": split, "cxrs": len(set(feats.dicom)), "region_features": int(len(feats.F)),
              "settings": films, "film_pairs": n_pairs, "region_pairs": int(len(pairs.rows)), "pairing": pairing,
              "regions_clustered": clustered_regions, "std_pairs": int(len(d_pairs)),
              "std_pairs_changed": int(changed.sum()), "skipped": feats.skipped, "task_samples": own.num_samples}
    title = (f"{cfg.task} / {split} / factor {factor} ({', '.join(classes)}), k={k}, K={clusters}, "
             f"{n_pairs} film pairs ({pairing})")
    table = format_table(rows, monitor, title)
    details = {"title": title, "factor": factor, "k": k, "clusters": clusters, "seed": seed, "monitor": monitor,
               "counts": counts, "rows": rows, "model": source,
               "task_metrics": {"own": own.metrics, "projected": projected.metrics}}
    from data_sharding.atomic import write_text

    write_text(out / "harmonize.json", json.dumps(_finite(details), indent=1, default=_nan_none, allow_nan=False))
    write_text(out / "harmonize.txt", table + "\n")
    figure = projection_figure(feats.F[known], rot, s_known, out / "projection.png", seed)
    return HarmonizeResult(rows=rows, counts=counts, rotation_files=files, table=table, monitor=monitor, out=out,
                           figure=figure, details=details)


def _finite(o):
    """NaN (an undefined value) -> None, so the JSON is strict."""
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    if isinstance(o, float) and math.isnan(o):
        return None
    return o


def _nan_none(o):
    if isinstance(o, (np.floating, np.integer)):
        return None if isinstance(o, np.floating) and math.isnan(o) else o.item()
    raise TypeError(type(o).__name__)


def projection_figure(f: np.ndarray, rot: Any, setting: np.ndarray, path: Path, seed: int = 0) -> Path:
    """Two panels, coloured by setting: a PCA of the entangled features and of the rotated-biological ones."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.decomposition import PCA

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    for ax, (name, x) in zip(axes, (("entangled F", f), ("rotated-biological", rot.biological(f)))):
        xy = PCA(n_components=2, random_state=seed).fit_transform(x)
        for c in sorted(set(setting)):
            m = setting == c
            ax.scatter(xy[m, 0], xy[m, 1], s=5, alpha=0.5, label=f"{c} ({int(m.sum())})")
        ax.set_title(f"{name}: PCA, coloured by setting")
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
        ax.legend(markerscale=3, fontsize=8)
    fig.tight_layout()
    from data_sharding.atomic import save_atomic

    save_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path
