"""Region features of a trained DiPro over one split, per CXR and region, through the model's own hook.

``collect_features(model, cfg, shard_dir, split)`` reads every sample of the split's shards (corrupt
ones skipped and counted, as ``dipro predict`` does), selects the CXRs as the evaluation loader
does, and runs ``DiPro.region_features`` (region encoder + STD, no MMF) in eval mode.  A CXR that
appears in several samples (overlapping progression pairs) has one feature per region: the same
crop gives the same feature, so the first is kept.  Also kept: the CXR pairs the model forms
(consecutive CXRs of a sample), whose STD features ``f_s``/``f_d`` can be recomputed from any
version of the region features (:func:`std_of_pairs`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_sharding.constants import TASK_TO_SHARD_DIR


@dataclass
class RegionFeatures:
    """Rows = (CXR, region) with a real crop; ``pairs`` = (row of CXR t, row of CXR t+1) per region."""

    F: np.ndarray  # float64 [N, d]
    dicom: np.ndarray  # str [N]
    region: np.ndarray  # int [N]
    stay: np.ndarray  # int [N]
    hours: np.ndarray  # float [N]
    pairs: np.ndarray  # int [M, 2]: consecutive CXRs of a sample, same region
    skipped: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def d(self) -> int:
        return int(self.F.shape[1])


def _samples(shard_dir: str | Path, task: str, split: str, crop_size: int | None, notes: list[str]):
    """(decoded sample, its dicom ids) of every readable sample of the split; corrupt ones noted."""
    from dipro.data.decode import CorruptSample, decode_sample
    from dipro.data.plan import Segment, read_manifest
    from dipro.data.reader import Skipped, read_segment

    shard_set = read_manifest(shard_dir, task, split)
    for shard in shard_set.shards:
        for raw in read_segment(Segment(shard, 0, shard.samples)):
            if isinstance(raw, Skipped):
                notes.append(raw.describe())
                continue
            if "__error__" in raw:
                notes.append(f"shard {raw['__shard__']} key {raw['__key__']}: {raw['__error__']}")
                continue
            try:
                sample = decode_sample(raw, shard_set.task_dir, crop_size)
                dicoms = [str(x) for x in json.loads(raw["meta.json"])["dicom_ids"]]
            except CorruptSample as exc:
                notes.append(f"shard {exc.shard} key {exc.key}: {exc.reason}")
                continue
            yield sample, dicoms


def collect_features(model: Any, cfg: Any, shard_dir: str | Path, split: str, *, batch_size: int = 16,
                     device: str = "cpu", progress: bool = False) -> RegionFeatures:
    """Region features of every real crop of the split (see module doc)."""
    from tqdm import tqdm

    from dipro.data import collate, move_to_device
    from dipro.data.decode import select_cxrs

    task_dir = TASK_TO_SHARD_DIR[cfg.task]
    notes: list[str] = []
    index: dict[tuple[str, int], int] = {}
    feats: list[np.ndarray] = []
    meta: list[tuple[str, int, int, float]] = []
    pairs: set[tuple[int, int]] = set()
    model.eval()

    def run(chunk: list[tuple[dict, list[str]]]) -> None:
        samples = [select_cxrs(s, cfg.data.max_cxrs, cfg.model.last_cxr_only) for s, _ in chunk]
        with torch.no_grad():
            out = model.region_features(move_to_device(collate(samples, task_dir), device))
        f = out["F"].float().cpu().numpy()
        present = (out["region_mask"] & out["cxr_mask"][..., None]).cpu().numpy()
        hours = out["cxr_hours"].cpu().numpy()
        for i, ((_, dicoms), s) in enumerate(zip(chunk, samples)):
            n = int(out["cxr_mask"][i].sum())
            dicoms = dicoms[-len(s["cxr_hours"]):]  # the CXRs select_cxrs kept (the last ones)
            if cfg.model.last_cxr_only:
                dicoms = dicoms[-2:]  # DiPro._select_cxrs: the last two
            rows = np.full((n, f.shape[2]), -1)
            for t in range(n):
                for r in np.flatnonzero(present[i, t]):
                    key = (dicoms[t], int(r))
                    if key not in index:
                        index[key] = len(feats)
                        feats.append(f[i, t, r].astype(np.float64))
                        meta.append((dicoms[t], int(r), int(s["stay_id"]), float(hours[i, t])))
                    rows[t, r] = index[key]
            for t in range(n - 1):
                for r in range(f.shape[2]):
                    if rows[t, r] >= 0 and rows[t + 1, r] >= 0:
                        pairs.add((int(rows[t, r]), int(rows[t + 1, r])))

    chunk: list[tuple[dict, list[str]]] = []
    bar = tqdm(desc=f"features {split}", unit="sample", disable=not progress)
    for item in _samples(shard_dir, cfg.task, split, cfg.model.crop_size, notes):
        chunk.append(item)
        if len(chunk) == batch_size:
            run(chunk)
            bar.update(len(chunk))
            chunk = []
    if chunk:
        run(chunk)
        bar.update(len(chunk))
    bar.close()
    d = cfg.model.d_model
    return RegionFeatures(
        F=np.asarray(feats, dtype=np.float64).reshape(-1, d),
        dicom=np.asarray([m[0] for m in meta], dtype=object), region=np.asarray([m[1] for m in meta], dtype=np.int64),
        stay=np.asarray([m[2] for m in meta], dtype=np.int64), hours=np.asarray([m[3] for m in meta], dtype=np.float64),
        pairs=np.asarray(sorted(pairs), dtype=np.int64).reshape(-1, 2), skipped=len(notes), notes=notes[:20])


def std_of_pairs(model: Any, f: np.ndarray, pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """STD's (S, D) of the CXR pairs ``pairs`` [M, 2] from region features ``f`` [N, d]: f_s / f_d of
    ``[F_t || F_t+1]`` in eval mode (each (pair, region) is its own row there, so rows can be recomputed
    from any edited version of F without running the encoder again)."""
    x = torch.as_tensor(np.concatenate([f[pairs[:, 0]], f[pairs[:, 1]]], axis=1), dtype=torch.float32)
    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        x = x.to(device)
        return (model.std.f_s(x).double().cpu().numpy(), model.std.f_d(x).double().cpu().numpy())
