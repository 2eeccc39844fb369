"""``dipro import-authors``: the authors' released checkpoints as checkpoint directories of this project.

    results = import_authors("DiPro_model/mortality/seed_23.ckpt", "mortality", "shards", "imports/m23")
    results = import_authors("DiPro_model", "mortality", "shards", "imports/mortality")   # every seed_N.ckpt

One output directory per file holds what a training run's ``best/`` holds (``model.pt``,
``config.yaml``, ``label_stats.json``, ``meta.json``; :func:`dipro.train.checkpoint.write_model_files`),
so ``dipro evaluate --checkpoint``, ``dipro predict --model``, ``model.init_from`` (fine-tuning) and
the registry take it as they take a trained one.

Steps, each a one-line error naming the file, key or setting when it fails, and nothing written
until every file has passed all of them:

1. read the file without running anything from it (:mod:`dipro.authors.safe_load`);
2. read task, sizes and crop size from its tensor shapes and check them against ``--task`` and
   the config (the task's ``configs/<task>.yaml`` plus ``key=value`` overrides;
   :func:`dipro.authors.mapping.check_against_config`);
3. check the shards: ``label_stats.json`` (the class weights the file lacks), ``ehr_stats.json``
   (the 38 EHR features), and crops of the file's size (224 px in the release);
4. map every key (:func:`dipro.authors.mapping.to_project_state_dict`) and load the result
   strictly into the model the config builds;
5. with ``register``: evaluate on the val split (the task's monitor), write, and register a
   version of ``dipro-<task>`` tagged with the source (:func:`dipro.tracking.registry.register_imported`).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_sharding import atomic
from data_sharding.errors import ConfigError, DataError
from dipro import defaults
from dipro.authors.mapping import AuthorsShape, MappingReport, check_against_config, describe, to_project_state_dict
from dipro.authors.safe_load import AuthorsFile, read_authors_file

_SEED_NAME = re.compile(r"seed_?(\d+)")


@dataclass
class ImportResult:
    """One imported file."""

    source: AuthorsFile
    out: Path
    cfg: Any
    shape: AuthorsShape
    mapping: MappingReport
    notes: list[str] = field(default_factory=list)
    val_metrics: dict[str, float] | None = None
    version: int | None = None


def find_sources(ckpt: Path, task: str, out: Path) -> list[tuple[Path, Path]]:
    """(file, output directory) pairs: a file -> ``out``; a directory in the release's layout
    (``<task>/seed_N.ckpt``, or the task folder itself) -> ``out/seed_N`` for each file."""
    if ckpt.is_file():
        return [(ckpt, out)]
    if not ckpt.is_dir():
        raise DataError(f"{ckpt}: no such file or directory (expected an authors' .ckpt file or the release's "
                        "folder with <task>/seed_N.ckpt)")
    files = sorted((ckpt / task).glob("*.ckpt")) or sorted(ckpt.glob("*.ckpt"))
    if not files:
        raise DataError(f"{ckpt}: no {task}/*.ckpt (nor *.ckpt) in it; the release's layout is "
                        f"<task>/seed_<23|29|66>.ckpt")
    return [(f, out / f.stem) for f in files]


def seed_of(path: Path) -> int | None:
    m = _SEED_NAME.fullmatch(path.stem)
    return int(m.group(1)) if m else None


def _config(task: str, shards: Path, config: Path | None, overrides: list[str], seed: int | None):
    from dipro.config import load_config, replace

    base = Path(config) if config is not None else defaults.CONFIG_DIR / f"{task}.yaml"
    cfg = load_config(base, [f"task={task}", f"data.shards={shards}", *([f"seed={seed}"] if seed is not None else []),
                             *overrides])
    if cfg.task != task:
        raise ConfigError(f"--task {task} but the overrides say task={cfg.task}")
    # the weights come from the authors' file: nothing else is read when the model is rebuilt
    return replace(cfg, ["model.backbone_weights=null", "model.init_from=null"])


def _shard_crops(shards: Path, task: str) -> tuple[set[int], set[str]]:
    """Crop sizes and resampling modes of the task's shards (from the manifest's settings)."""
    from data_sharding.constants import TASK_TO_SHARD_DIR
    from data_sharding.manifest import read_manifest

    task_dir = TASK_TO_SHARD_DIR[task]
    sizes, modes = set(), set()
    records = [r for r in read_manifest(shards).records if r.task in (task_dir, task)]
    if not records:
        raise DataError(f"{shards}/manifest.parquet lists no {task_dir} shards; cut them with dipro shard")
    for r in records:
        try:
            settings = json.loads(r.settings) if r.settings else {}
        except (TypeError, ValueError):
            settings = {}
        if isinstance(settings, dict):
            if settings.get("crop_size") is not None:
                sizes.add(int(settings["crop_size"]))
            modes.add(str(settings.get("resample", "bilinear")))
    return sizes, modes


def check_shards(cfg, shape: AuthorsShape, where: str) -> tuple[dict, list[str]]:
    """label_stats.json, ehr_stats.json and crop size of ``cfg.data.shards`` fit the file; returns
    (label stats, notes)."""
    from dipro.train.preflight import check_ehr_features, check_label_stats

    shards = Path(cfg.data.shards)
    sizes, modes = _shard_crops(shards, cfg.task)
    if sizes and sizes != {shape.crop_size}:
        raise DataError(
            f"{shards} holds {'/'.join(map(str, sorted(sizes)))}-px crops but {where} was trained on "
            f"{shape.crop_size}-px crops (learnable_pad.pad_value); cut shards for it with `dipro shard "
            f"--crop-size {shape.crop_size} --crop-resample nearest` (the authors' crops)")
    label_stats = check_label_stats(cfg)
    check_ehr_features(cfg)
    notes = []
    if modes - {"nearest"}:
        notes.append(f"the shards' crops are resampled {'/'.join(sorted(modes))}; the authors' are nearest "
                     "(`dipro shard --crop-resample nearest` feeds the model what it was trained on)")
    return label_stats, notes


def prepare_one(path: Path, out: Path, task: str, shards: Path, config: Path | None,
                overrides: list[str]) -> tuple[ImportResult, Any, dict, dict]:
    """Steps 1-4 for one file: (result, model, state dict, label stats); nothing written."""
    import torch

    from dipro.model import build_model
    from dipro.model.losses import ClassWeights

    source = read_authors_file(path)
    shape = describe(source.state_dict, str(path))
    if shape.task != task:
        raise DataError(f"{path} holds a {shape.task} model (its task tokens and outputs), not {task}: "
                        f"import it with --task {shape.task}")
    cfg = _config(task, shards, config, overrides, seed_of(path))
    check_against_config(shape, cfg.model, str(path))
    if cfg.model.crop_size != shape.crop_size:
        raise ConfigError(f"{path} was trained on {shape.crop_size}-px crops (learnable_pad.pad_value) but the "
                          f"config says model.crop_size={cfg.model.crop_size}; set model.crop_size={shape.crop_size}")
    label_stats, notes = check_shards(cfg, shape, str(path))
    if cfg.model.pair_reversal != "interleave":
        notes.append(f"model.pair_reversal={cfg.model.pair_reversal}: fine-tuning this import would use another "
                     "reversed PAE pair than the authors' training (interleave); predictions are the same")
    with torch.device("meta"):  # shapes only: every tensor comes from the file (or the label stats) below
        model = build_model(cfg, None, load_pretrained=False)
    target = {**model.state_dict(), **{f"class_weights.{k}": v for k, v in
                                       ClassWeights(task, label_stats).state_dict().items()}}
    state, mapping = to_project_state_dict(source.state_dict, target, str(path))
    model.load_state_dict(state, strict=True, assign=True)
    model.eval()
    if shape.pos_weight is not None:
        ours = float(ClassWeights(task, label_stats).mortality_pos_weight)
        notes.append(f"mortality pos_weight {shape.pos_weight:.4g} from the file (the authors' training split; "
                     f"{cfg.data.shards}/label_stats.json gives {ours:.4g})")
    result = ImportResult(source=source, out=out, cfg=cfg, shape=shape, mapping=mapping, notes=notes)
    return result, model, state, label_stats


def _meta(r: ImportResult) -> dict[str, Any]:
    src = r.source
    meta: dict[str, Any] = {
        "kind": "import",
        "source": defaults.AUTHORS_SOURCE,
        "source_file": src.path.name,
        "source_sha256": src.sha256,
        "source_bytes": src.size,
        "source_kind": src.kind,
        "source_info": src.info,
        "mapping": {"renamed": r.mapping.renamed, "transformed": r.mapping.transformed,
                    "unused": r.mapping.unused, "from_label_stats": r.mapping.from_label_stats},
        "monitor": r.cfg.monitor,
    }
    if r.val_metrics is not None:
        meta["monitor_value"] = r.val_metrics.get(r.cfg.monitor)
        meta["val_metrics"] = r.val_metrics
    return meta


def source_tags(r: ImportResult) -> dict[str, str]:
    """Registry/run tags naming where an imported version came from."""
    tags = {"source": defaults.AUTHORS_SOURCE, "source.file": r.source.path.name,
            "source.sha256": r.source.sha256, "source.kind": r.source.kind}
    for key in ("pytorch-lightning_version", "epoch", "global_step"):
        if key in r.source.info:
            tags[f"source.{key}"] = str(r.source.info[key])
    return tags


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise DataError(f"{out} exists and is not empty; choose another --out or pass --overwrite")


def import_authors(ckpt: str | Path, task: str, shards: str | Path, out: str | Path, overrides: list[str] = (),
                   *, config: str | Path | None = None, register: bool = False, tracking_uri: str | None = None,
                   overwrite: bool = False, progress: bool = False) -> list[ImportResult]:
    """Import one file or the release's folder (module docstring); returns one result per file."""
    import torch

    from dipro.train.checkpoint import write_model_files

    sources = find_sources(Path(ckpt), task, Path(out))
    for _, target in sources:
        _check_out(target, overwrite)
    overrides = list(overrides) + ([f"tracking.uri={tracking_uri}"] if tracking_uri else [])
    prepared = []
    with torch.no_grad():
        for path, target in sources:
            prepared.append(prepare_one(path, target, task, Path(shards), Path(config) if config else None,
                                        overrides))
        if register:  # the server first: an unreachable one is one line before anything is written
            from dipro.tracking.uri import check_reachable, resolve_tracking_uri
            from dipro.train.evaluate import evaluate_model

            check_reachable(resolve_tracking_uri(prepared[0][0].cfg))
            for result, model, _, _ in prepared:
                ev = evaluate_model(model, result.cfg, "val", progress=progress)
                result.val_metrics = {k: float(v) for k, v in ev.metrics.items()}
    for result, _, state, label_stats in prepared:
        with atomic.atomic_dir(result.out, unchanged=f"{result.out} is unchanged") as tmp:
            write_model_files(tmp, state, result.cfg, label_stats, _meta(result))
    if register:
        from dipro.tracking.registry import register_imported

        for result, *_ in prepared:
            name = f"import-authors-{task}-{result.source.path.stem}"
            result.version = register_imported(result.cfg, result.out, result.val_metrics or {},
                                               source_tags(result), name)
    return [r for r, *_ in prepared]


def format_report(r: ImportResult) -> str:
    """What was imported and how every key was used (printed by the command)."""
    src, s, m = r.source, r.shape, r.mapping
    info = src.info
    counters = ", ".join(f"{k} {info[k]}" for k in ("epoch", "global_step") if k in info)
    lines = [
        f"imported {src.path} ({src.kind}{' Lightning ' + str(info['pytorch-lightning_version']) if 'pytorch-lightning_version' in info else ''}"
        f"{', ' + counters if counters else ''}; sha256 {src.sha256[:16]}...) -> {r.out}",
        f"  task {s.task}, d_model {s.d_model}, {s.region_layers} region-aware layer(s) (model.num_layers "
        f"{r.cfg.model.num_layers}), {s.group_k} groups, {s.crop_size}-px crops, seed {r.cfg.seed}",
        f"  keys: {m.renamed} renamed, {len(m.transformed)} transformed ({', '.join(m.transformed)}), "
        f"{len(m.unused)} unused:",
    ]
    lines += [f"    {k}: {why}" for k, why in m.unused.items()]
    if m.from_label_stats:
        lines.append(f"  from {r.cfg.data.shards}/label_stats.json: {', '.join(m.from_label_stats)}")
    if "monitor" in info and "best_model_score" in info:
        lines.append(f"  the authors' own {info['monitor']}: {info['best_model_score']:.4f} (their split)")
    lines += [f"  note: {n}" for n in r.notes]
    if r.val_metrics is not None:
        v = r.val_metrics.get(r.cfg.monitor, math.nan)
        lines.append(f"  val {r.cfg.monitor} {v:.4f}" + (f"; registered as dipro-{s.task} version {r.version} "
                                                         f"(source: {defaults.AUTHORS_SOURCE})"
                                                         if r.version is not None else ""))
    return "\n".join(lines)
