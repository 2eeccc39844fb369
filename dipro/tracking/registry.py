"""Model registry: register a run's best checkpoint, list versions, promote aliases on evidence.

* :func:`register_checkpoint` logs the checkpoint as the pyfunc of
  :mod:`dipro.tracking.pyfunc` in the training run and registers a new version
  of ``dipro-{task}``.  Version tags: ``test.<metric>`` (the run's test
  metrics), ``data.fingerprint``, ``config`` (JSON), ``monitor`` and
  ``val.<monitor>`` (the checkpoint's validation value), ``run_id``.
* :func:`promote` moves an alias (champion | challenger | staging) to a version
  only if it beats the alias's current holder on the task's validation monitor, by
  evidence: both versions trained on the *same* data fingerprint, both evaluated on
  the same validation samples, and the lower bound of the 95 % paired bootstrap
  interval of the difference above ``min_delta`` (:mod:`dipro.tracking.evidence`);
  the difference, its interval and the sample count become version tags
  (``promotion.<alias>.delta``, ``.delta_low``, ``.delta_high``, ``.samples``).
  ``force=True`` skips the gate and records who (``getpass.getuser()``), why and
  what the gate said in version tags.
"""
from __future__ import annotations

import contextlib
import getpass
import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from data_sharding.errors import DataError, UserError
from dipro.defaults import ALIASES, PROMOTE_MIN_DELTA  # re-exported: one source
from dipro.tracking.uri import check_reachable, resolve_tracking_uri

CHECKPOINT_FILES = {"weights": "model.pt", "config": "config.yaml", "label_stats": "label_stats.json"}
MODEL_ARTIFACT = "model"
# keys under which checkpoint meta.json may hold the checkpoint's validation monitor value
_META_MONITOR_KEYS = ("monitor_value", "best_value", "best_metric", "val_metric")


def model_name(task: str) -> str:
    return f"dipro-{task}"


def _client(uri: str | None):
    from mlflow import MlflowClient

    uri = resolve_tracking_uri(explicit=uri)
    check_reachable(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri), uri


@contextlib.contextmanager
def _tracking_uri(uri: str) -> Iterator[None]:
    """Point the fluent mlflow API (start_run, log_model, register_model) at ``uri`` for a block.

    The previous *unresolved* setting is restored (MLflow's own helper), so a process that relied
    on ``$MLFLOW_TRACKING_URI`` keeps following it; the registry follows the tracking URI.
    """
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    with _use_tracking_uri(uri):
        yield


# ----------------------------------------------------------------------------- register
def checkpoint_monitor_value(checkpoint_dir: str | Path, monitor: str) -> float | None:
    """The checkpoint's validation monitor value from its ``meta.json`` (None if absent)."""
    meta_path = Path(checkpoint_dir) / "meta.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError:
        raise DataError(f"checkpoint metadata {meta_path} is not valid JSON") from None
    for key in (f"val/{monitor}", monitor, *_META_MONITOR_KEYS):
        value = meta.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def _stage_code(dest: Path) -> list[str]:
    """Copies of the ``dipro`` and ``data_sharding`` packages (sources only) for ``code_paths``."""
    import data_sharding
    import dipro

    out = []
    for pkg in (dipro, data_sharding):
        src = Path(pkg.__file__).parent
        target = dest / src.name
        shutil.copytree(src, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.tmp"))
        out.append(str(target))
    return out


def _pip_requirements() -> list[str]:
    import importlib.metadata as md

    reqs = []
    for name in ("torch", "torchvision", "mlflow", "numpy", "pandas", "pyyaml", "pyarrow"):
        try:
            reqs.append(f"{name}=={md.version(name)}")
        except md.PackageNotFoundError:
            continue
    return reqs


def register_checkpoint(cfg: Any, checkpoint_dir: str | Path, run_id: str, test_metrics: dict[str, float],
                        data_fingerprint: str | None, *, val_metric: float | None = None,
                        await_registration_for: int = 300, extra_tags: dict[str, str] | None = None) -> int:
    """Log ``checkpoint_dir`` as a pyfunc model in run ``run_id``; register it as ``dipro-{task}``.

    Returns the new version number.  ``val_metric`` overrides the validation monitor value read
    from the checkpoint's ``meta.json`` (else the best ``val/<monitor>`` the run logged).
    ``checkpoint_dir`` may be on a bucket (``s3://.../RUN/best``): its inference files are downloaded
    for MLflow to log (through the tracking server: in proxy mode it alone writes the artifact store).
    """
    from dipro.train.checkpoint import META_FILE, checkpoint_location, local_checkpoint

    where = checkpoint_location(checkpoint_dir)
    with local_checkpoint(where, names=(*CHECKPOINT_FILES.values(), META_FILE)) as local:
        return _register_local(cfg, local, where.uri, run_id, test_metrics, data_fingerprint, val_metric,
                               await_registration_for, extra_tags)


def _register_local(cfg: Any, ckpt: Path, shown: str, run_id: str, test_metrics: dict[str, float],
                    data_fingerprint: str | None, val_metric: float | None, await_registration_for: int,
                    extra_tags: dict[str, str] | None = None) -> int:
    """:func:`register_checkpoint` of a local checkpoint directory ``ckpt`` (``shown``: where it really is)."""
    import mlflow

    from dipro.config import to_dict
    from dipro.tracking import model_code, pyfunc

    missing = [f for f in CHECKPOINT_FILES.values() if not (ckpt / f).is_file()]
    if missing:
        raise DataError(f"checkpoint {shown} lacks {', '.join(missing)}; expected {', '.join(CHECKPOINT_FILES.values())}")
    client, uri = _client(getattr(cfg.tracking, "uri", None))
    monitor = cfg.monitor
    if val_metric is None:
        val_metric = checkpoint_monitor_value(ckpt, monitor)
    if val_metric is None:
        history = client.get_metric_history(run_id, f"val/{monitor}")
        finite = [m.value for m in history if math.isfinite(m.value)]
        val_metric = max(finite) if finite else float("nan")

    # Build the example and its output with the checkpoint itself: this also proves it loads.
    model, ckpt_cfg = pyfunc.load_network(ckpt / "config.yaml", ckpt / "label_stats.json", ckpt / "model.pt")
    if ckpt_cfg.task != cfg.task:
        raise DataError(f"checkpoint {shown} is for task {ckpt_cfg.task!r}, the run's config says {cfg.task!r}")
    example = pyfunc.synthetic_input_example(ckpt_cfg.model.crop_size)
    samples = pyfunc.dataframe_to_samples(example, ckpt_cfg.task, ckpt_cfg.model.crop_size)
    output = pyfunc.probabilities_frame(ckpt_cfg.task, pyfunc.predict_samples(model, ckpt_cfg, samples),
                                        [s["sample_key"] for s in samples])
    signature = pyfunc.model_signature(ckpt_cfg.task, example, output)

    name = model_name(cfg.task)
    tags = {
        "task": cfg.task,
        "run_id": run_id,
        "data.fingerprint": data_fingerprint or "unknown",
        "monitor": f"val/{monitor}",
        f"val.{monitor}": repr(float(val_metric)),
        "config": json.dumps(to_dict(ckpt_cfg), sort_keys=True),
        "checkpoint": shown,
    }
    tags.update({f"test.{k}": repr(float(v)) for k, v in test_metrics.items()})
    tags.update(extra_tags or {})

    status_before = client.get_run(run_id).info.status
    with tempfile.TemporaryDirectory(prefix="dipro-register-") as tmp, _tracking_uri(uri):
        code_paths = _stage_code(Path(tmp))
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name=MODEL_ARTIFACT,
                python_model=str(Path(model_code.__file__)),
                artifacts={k: str(ckpt / f) for k, f in CHECKPOINT_FILES.items()},
                code_paths=code_paths,
                signature=signature,
                input_example=example,
                pip_requirements=_pip_requirements(),
            )
        # start_run/end_run changed the run's status: registering must neither end a running
        # run nor reopen a finished one
        client.update_run(run_id, status=status_before)
        mv = mlflow.register_model(info.model_uri, name, await_registration_for=await_registration_for, tags=tags)
    client.set_registered_model_tag(name, "task", cfg.task)
    client.set_registered_model_tag(name, "monitor", f"val/{monitor}")
    return int(mv.version)


def register_imported(cfg: Any, checkpoint_dir: str | Path, val_metrics: dict[str, float],
                      source_tags: dict[str, str], run_name: str) -> int:
    """Register a checkpoint directory that no training run produced (``dipro import-authors``) as a new
    version of ``dipro-{task}``.

    An MLflow run ``run_name`` (provenance tags of ``cfg``, its shards' data fingerprint, ``source_tags``)
    holds ``val_metrics`` as ``val/<metric>`` and the model; the version carries the usual tags, its
    ``val.<monitor>`` from ``val_metrics`` and ``source_tags``, so :func:`promote` weighs it against
    trained versions on the same evidence (validation monitor on the same data fingerprint)."""
    from dipro.tracking.tracker import Tracker

    tracker = Tracker.create_in_driver(cfg, run_name, extra_tags=source_tags)
    try:
        tracker.log_metrics({f"val/{k}": v for k, v in val_metrics.items() if math.isfinite(v)}, step=0)
        tracker.flush()
        version = register_checkpoint(cfg, checkpoint_dir, tracker.run_id, {}, tracker.data_fingerprint,
                                      val_metric=val_metrics.get(cfg.monitor, float("nan")),
                                      extra_tags=source_tags)
    except BaseException:
        tracker.finish("FAILED")
        raise
    tracker.finish("FINISHED")
    return version


# ----------------------------------------------------------------------------- list
@dataclass
class VersionRow:
    version: int
    aliases: list[str]
    created: str
    run_id: str
    monitor: str
    val: float
    test: dict[str, float]
    fingerprint: str
    tags: dict[str, str]


def _float(value: str | None) -> float:
    try:
        return float(value) if value is not None else float("nan")
    except ValueError:
        return float("nan")


def _row(mv: Any, aliases: list[str]) -> VersionRow:
    tags = dict(mv.tags or {})
    monitor = tags.get("monitor", "val/?")
    short = monitor.split("/", 1)[-1]
    return VersionRow(
        version=int(mv.version), aliases=sorted(aliases),
        created=time.strftime("%Y-%m-%d %H:%M", time.localtime((mv.creation_timestamp or 0) / 1000)),
        run_id=mv.run_id or tags.get("run_id", ""), monitor=monitor, val=_float(tags.get(f"val.{short}")),
        test={k[5:]: _float(v) for k, v in tags.items() if k.startswith("test.")},
        fingerprint=tags.get("data.fingerprint", "unknown"), tags=tags,
    )


def list_versions(task: str, uri: str | None = None) -> list[VersionRow]:
    """Every version of ``dipro-{task}`` (newest first) with aliases, monitor value and test metrics."""
    from mlflow.exceptions import MlflowException

    client, uri = _client(uri)
    name = model_name(task)
    try:
        rm = client.get_registered_model(name)
    except MlflowException:
        raise UserError(f"no registered model {name!r} at {uri} (train with tracking.register=true first)") from None
    by_version: dict[str, list[str]] = {}
    for alias, version in (rm.aliases or {}).items():
        by_version.setdefault(str(version), []).append(alias)
    versions = client.search_model_versions(f"name = '{name}'")
    rows = [_row(mv, by_version.get(str(mv.version), [])) for mv in versions]
    return sorted(rows, key=lambda r: -r.version)


def format_versions(rows: list[VersionRow], task: str) -> str:
    """A fixed-width table: version, aliases, validation monitor, key test metrics, data, run."""
    from dipro.config import TASK_MONITOR

    monitor = TASK_MONITOR.get(task, "?")
    test_keys = [monitor] + [k for k in ("auroc", "auprc", "kappa") if k != monitor]
    head = ["version", "aliases", f"val.{monitor}"] + [f"test.{k}" for k in test_keys] + ["data", "run", "created"]
    lines = [head]
    for r in rows:
        lines.append([str(r.version), ",".join(r.aliases) or "-", _fmt(r.val)]
                     + [_fmt(r.test.get(k, float("nan"))) for k in test_keys]
                     + [r.fingerprint[:12], r.run_id[:12], r.created])
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in lines)


def _fmt(x: float) -> str:
    return "nan" if not math.isfinite(x) else f"{x:.4f}"


# ----------------------------------------------------------------------------- promote
@dataclass
class Promotion:
    task: str
    version: int
    alias: str
    previous: int | None
    forced: bool
    message: str


def _gate(task: str, candidate: VersionRow, holder: VersionRow, alias: str, uri: str, *, min_delta: float,
          shards: str | None, device: str, progress: bool = False) -> tuple[str | None, Any]:
    """``(None, evidence)`` if ``candidate`` may take ``alias`` from ``holder``, else ``(why not, evidence or None)``.

    The evidence is a paired bootstrap of the monitor on the same validation samples
    (:mod:`dipro.tracking.evidence`): the candidate must beat the holder with the lower bound of the
    95 % interval of the difference above ``min_delta``.
    """
    from dipro.tracking.evidence import compare_versions

    if candidate.fingerprint == "unknown" or candidate.fingerprint != holder.fingerprint:
        return (f"version {candidate.version} was validated on data {candidate.fingerprint[:12]} but {alias} "
                f"version {holder.version} on data {holder.fingerprint[:12]}: their validation metrics are not "
                "comparable (re-train on the same shards, or --force with --reason)"), None
    if candidate.monitor != holder.monitor:
        return (f"version {candidate.version} monitors {candidate.monitor}, {alias} version {holder.version} "
                f"monitors {holder.monitor}"), None
    evidence = compare_versions(task, candidate, holder, uri, shards=shards, device=device, progress=progress)
    if not evidence.beats(min_delta):
        return (f"version {candidate.version} does not beat {alias} version {holder.version} on the same "
                f"validation samples: {evidence.describe()}; the lower bound is not above --min-delta "
                f"{min_delta:g}"), evidence
    return None, evidence


def promote(task: str, version: int, alias: str, *, force: bool = False, reason: str | None = None,
            uri: str | None = None, min_delta: float = PROMOTE_MIN_DELTA, shards: str | None = None,
            device: str = "cpu", progress: bool = False) -> Promotion:
    """Move ``alias`` of ``dipro-{task}`` to ``version`` if the evidence allows it (see module doc).

    Raises :class:`UserError` with the reason when the promotion is refused.
    """
    if alias not in ALIASES:
        raise UserError(f"alias must be one of {', '.join(ALIASES)}, got {alias!r}")
    if force and not (reason and reason.strip()):
        raise UserError("--force needs --reason TEXT (recorded in the version's tags with your user name)")
    rows = {r.version: r for r in list_versions(task, uri)}
    client, uri = _client(uri)
    name = model_name(task)
    if int(version) not in rows:
        raise UserError(f"{name} has no version {version} at {uri}; versions: "
                        f"{', '.join(str(v) for v in sorted(rows)) or 'none'}")
    cand = rows[int(version)]
    holder = next((r for r in rows.values() if alias in r.aliases), None)
    if holder is not None and holder.version == cand.version:
        return Promotion(task, cand.version, alias, holder.version, False,
                         f"{name} version {cand.version} already holds @{alias}")
    refusal, evidence = None, None
    if holder is not None:
        try:
            refusal, evidence = _gate(task, cand, holder, alias, uri, min_delta=min_delta, shards=shards,
                                      device=device, progress=progress)
        except UserError as exc:  # the comparison itself was impossible (shards gone, other samples)
            if not force:
                raise UserError(f"not promoted: {exc}") from None
            refusal = f"not evaluated: {exc}"
    if refusal is not None and not force:
        raise UserError(f"not promoted: {refusal}")
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    prefix = f"promotion.{alias}"
    record = {f"{prefix}.by": getpass.getuser(), f"{prefix}.at": now,
              f"{prefix}.replaced_version": str(holder.version) if holder else "none"}
    if evidence is not None:
        record.update(evidence.tags(prefix, min_delta))
    if force:
        record.update({f"{prefix}.forced": "true", f"{prefix}.reason": reason.strip(),
                       f"{prefix}.gate": refusal or "passed"})
    else:
        record[f"{prefix}.evidence"] = (
            f"{evidence.describe()} over version {holder.version} on data {cand.fingerprint[:12]}, lower bound "
            f"above --min-delta {min_delta:g}" if holder else "first holder of the alias")
    for k, v in record.items():
        client.set_model_version_tag(name, str(cand.version), k, v)
    client.set_registered_model_alias(name, alias, str(cand.version))
    what = "forced: " + (refusal or "gate passed") if force else record[f"{prefix}.evidence"]
    return Promotion(task, cand.version, alias, holder.version if holder else None, force,
                     f"{name} @{alias} -> version {cand.version} ({what})")
