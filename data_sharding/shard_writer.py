"""``dipro shard``: deterministic WebDataset shards from a processed directory.

1. :func:`plan_shards` groups task rows into shards: one series per (task
   table, split), rows sorted by (stay_id, row), cut greedily so that each
   shard holds at most ``max_samples_per_shard`` samples and at most
   ``max_shard_bytes`` bytes (sample sizes are known before any image is
   decoded: see :func:`data_sharding.samples.estimate_sample_bytes`).  The plan
   depends only on the task tables and the settings, so a change to one stay's
   EHR or images touches only the shards holding that stay's samples.
2. :func:`data_sharding.build_run.build_planned` builds the planned shards around films
   (each film read and cropped once for every series, pair and shard that uses it), in
   balanced units on N worker processes (:mod:`data_sharding.build_plan`,
   :mod:`data_sharding.build_units`), every shard under a temp name: ustar members with fixed
   mtime/uid/gid/names, members in a fixed order (:mod:`data_sharding.shard_format`) -> the
   same inputs give the same bytes whatever the worker count.
3. :func:`commit_shards` first writes the new manifest and stats files under temp
   names, then renames the temp shards into place, then the manifest (the commit
   point), and removes shards no longer planned.  A write that fails (disk full, a
   file-size limit) before the renames leaves the previous shards and manifest exactly
   as they were, without temp files, and is reported in one line
   (:class:`data_sharding.atomic.StorageError`).

Writers hold :func:`data_sharding.lock.output_lock` on the shard directory, so two
jobs never write one directory at once.  After the commit the sha256 of every film read is
saved beside the manifest (:mod:`data_sharding.film_fingerprints`), so a regeneration need
not read the films again.

On a bucket (``--out s3://...`` / ``gs://...``) there is no rename: shards are streamed
straight to objects named for this build's generation (``{task}/{split}-{NNNNNN}-{generation}.tar``,
:func:`object_path`; parts of shards that several workers write as ``....tar.partNNNN.tmp``
objects, joined into the shard object), which no committed manifest refers to, and the build
is published by one conditional write of the manifest
(:func:`data_sharding.manifest.commit_manifest`, which also carries the stats files).
Readers that planned from the previous manifest keep reading the previous generation;
superseded objects are removed by ``dipro shards gc``, never by a commit.  A build that fails
or loses the commit deletes the objects it wrote.
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from data_sharding import atomic
from data_sharding.constants import SPLITS
from data_sharding.errors import DataError, UserError
from data_sharding.manifest import (
    STATS_FILES,
    Manifest,
    ShardRecord,
    ShardSettings,
    commit_manifest,
    manifest_path,
    read_manifest,
    stage_manifest,
)

UNCHANGED = "the previous shards and manifest are unchanged"

TMP_SUFFIX = ".tmp"
SHARD_NAME = re.compile(rf"^({'|'.join(SPLITS)})-\d{{6}}\.tar$")
"""File names of shards (``{split}-{NNNNNN}.tar``): the only files commits delete and verify accounts for."""
OBJECT_NAME = re.compile(rf"^({'|'.join(SPLITS)})-\d{{6}}-\d{{8}}T\d{{6}}-[0-9a-f]{{6}}\.tar(\.part\d{{4}}\.tmp)?$")
"""Shard (and part) object names on a bucket (``{split}-{NNNNNN}-{generation}.tar``): what gc may delete."""


def object_path(plan: "ShardPlan", generation: str | None) -> str:
    """Where a planned shard is written: its plain path locally, a generation-named object on a bucket."""
    return plan.path if generation is None else f"{plan.task}/{plan.split}-{plan.index:06d}-{generation}.tar"


@dataclass(frozen=True)
class ShardPlan:
    """Which task rows (indices into ``tasks/{task}.parquet``) go into one shard."""

    task: str
    split: str
    index: int
    rows: tuple[int, ...]
    est_bytes: int

    @property
    def path(self) -> str:
        """Path relative to the shard root: ``{task}/{split}-{NNNNNN}.tar``."""
        return f"{self.task}/{self.split}-{self.index:06d}.tar"


def plan_shards(view, task_dirs: Iterable[str], settings: dict[str, ShardSettings]) -> list[ShardPlan]:
    """Deterministic shard plan for ``task_dirs`` (``view``: a ProcessedView)."""
    from data_sharding.samples import estimate_sample_bytes

    plans: list[ShardPlan] = []
    for task in task_dirs:
        s = settings[task]
        capacity = (s.max_shard_bytes // 10240) * 10240 - 1024  # see shard_format.tar_size
        rows = view.task_rows(task)
        by_split: dict[str, list[int]] = {}
        for i, row in enumerate(rows):
            by_split.setdefault(row["split"], []).append(i)
        for split in SPLITS:
            ordered = sorted(by_split.get(split, []), key=lambda i: (int(rows[i]["stay_id"]), i))
            current: list[int] = []
            used = n = 0
            for i in ordered:
                size = estimate_sample_bytes(task, rows[i], i, s.crop_size)
                if size > capacity:
                    raise DataError(
                        f"{view.task_path(task)} row {i}: one sample takes up to {size} bytes, more than "
                        f"--max-shard-bytes {s.max_shard_bytes} allows; raise it or lower --crop-size")
                if current and (len(current) >= s.max_samples_per_shard or used + size > capacity):
                    plans.append(ShardPlan(task, split, n, tuple(current), used))
                    n += 1
                    current, used = [], 0
                current.append(i)
                used += size
            if current:
                plans.append(ShardPlan(task, split, n, tuple(current), used))
    return plans


def tmp_path(final: Path) -> Path:
    return final.with_name(final.name + TMP_SUFFIX)


def remove_tmp_files(out, task_dirs: Iterable[str], generation: str | None = None) -> None:
    """Delete what an unfinished build left: local temp shards (never referenced by a manifest), or on
    a bucket the objects of ``generation`` (one listing; unreferenced until its manifest commits)."""
    from data_sharding import storage

    out = storage.resolve(out)
    if not out.is_remote:
        for task in task_dirs:
            for p in (out.local / task).glob(f"*{TMP_SUFFIX}"):
                p.unlink()
        return
    if generation is None:
        return
    for task in task_dirs:
        for info in (out / task).list():
            if f"-{generation}.tar" in info.path:  # shards and parts of this build
                (out / task / info.path).delete()


def stats_payload(processed) -> dict[str, bytes]:
    """The statistics files a shard set carries (copied from the processed dir), name -> bytes."""
    from data_sharding import storage

    root = storage.resolve(processed)
    return {name: (root / name).read_bytes() for name in STATS_FILES}


def commit_shards(out, manifest: Manifest, built: Iterable[str], managed: Iterable[str],
                  processed) -> list[str]:
    """Stage the manifest and changed stats JSONs, rename built temp shards into place, then the
    manifest; drop shards it no longer lists (a local shard directory).

    ``managed`` are the task dirs this run planned: their shard files missing
    from ``manifest`` are removed (after the manifest is replaced).  A failure while
    staging removes the staged files and the built temp shards: the directory is as before.
    Returns the removed paths.
    """
    from data_sharding import storage

    out = storage.resolve(out).local
    built, managed = list(built), list(managed)
    staged: list[tuple[Path, Path]] = []
    try:
        for name, data in stats_payload(processed).items():
            dst = out / name
            if not dst.exists() or dst.read_bytes() != data:
                tmp = tmp_path(dst)
                with atomic.open_atomic(dst, "wb", tmp=tmp, replace=False, unchanged=UNCHANGED) as f:
                    f.write(data)
                staged.append((tmp, dst))
        staged.append((stage_manifest(out, manifest, UNCHANGED), manifest_path(out).local))
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        for rel in built:
            tmp_path(out / rel).unlink(missing_ok=True)
        raise
    for rel in built:
        os.replace(tmp_path(out / rel), out / rel)
    for tmp, final in staged:  # the manifest last: it is the commit point
        os.replace(tmp, final)
    listed = set(manifest.by_path())
    removed = []
    for task in managed:
        for p in sorted((out / task).glob("*.tar")):
            rel = f"{task}/{p.name}"
            if SHARD_NAME.match(p.name) and rel not in listed:
                p.unlink()
                removed.append(rel)
    return removed


def commit_objects(out, manifest: Manifest, previous: Manifest | None, processed, lock,
                   generation: str, managed: Iterable[str]) -> list[str]:
    """Publish a bucket shard set: one conditional write of the manifest (stats files inside).

    Returns the shards of ``previous`` the new manifest no longer lists (superseded: left for
    ``dipro shards gc``).  When the commit is lost to another writer, this build's objects are deleted.
    """
    from data_sharding.manifest import ConcurrentCommit

    stats = {name: json.loads(data) for name, data in stats_payload(processed).items()}
    if previous is not None and previous.records == manifest.records and previous.stats == stats:
        return []  # nothing changed: the committed manifest stays (no write)
    try:
        lock.check()
        commit_manifest(out, manifest, previous.token if previous is not None else None, stats)
    except (ConcurrentCommit, UserError):
        remove_tmp_files(out, managed, generation)
        raise
    listed = set(manifest.by_path())
    return sorted(r.path for r in (previous.records if previous is not None else []) if r.path not in listed)


def check_stats_files(processed) -> None:
    from data_sharding import storage

    root = storage.resolve(processed)
    for name in STATS_FILES:
        if not (root / name).exists():
            raise DataError(f"processed input missing: {root / name} (run `dipro prepare` first)")


def selected_task_dirs(view, task: str) -> tuple[str, ...]:
    """Task dirs to build: the requested ones; for ``all`` those whose task table exists."""
    from data_sharding.samples import resolve_task_dirs

    task_dirs = resolve_task_dirs(task)
    if task == "all":
        task_dirs = tuple(t for t in task_dirs if view.has_task(t))
        if not task_dirs:
            raise DataError(f"{view.root / 'tasks'}: no task tables (expected disease_progression.parquet "
                            "and/or mortality_los.parquet)")
    for t in task_dirs:
        if not view.has_task(t):
            raise DataError(f"processed input missing: {view.task_path(t)}")
    return task_dirs


def previous_manifest(out) -> Manifest | None:
    """The shard set's current manifest (with its version token), or None when there is none yet."""
    from data_sharding import storage

    try:
        return read_manifest(out)
    except DataError:
        if not manifest_path(out).exists():
            return None
        raise


def previous_records(out, keep_tasks: Iterable[str], previous: Manifest | None = None) -> list[ShardRecord]:
    """Manifest rows of task dirs this run does not rebuild (kept, locally when their files still exist;
    a bucket's committed objects are never deleted by a commit)."""
    from data_sharding import storage

    out = storage.resolve(out)
    previous = previous if previous is not None else previous_manifest(out)
    if previous is None:
        return []
    keep = set(keep_tasks)
    return [r for r in previous.records if r.task in keep and (out.is_remote or (out / r.path).exists())]


def write_shards(
    processed: str | Path,
    out: str | Path,
    task: str = "all",
    settings: ShardSettings | None = None,
    workers: int | None = None,
    progress: bool = True,
    lock_timeout: float = 0.0,
) -> Manifest:
    """Build every shard of ``task`` (all | disease_progression | mortality_los) from scratch; the manifest.

    See :func:`build_shards` (which also returns what the build did).
    """
    return build_shards(processed, out, task, settings, workers, progress, lock_timeout).manifest


def build_shards(
    processed: str | Path,
    out: str | Path,
    task: str = "all",
    settings: ShardSettings | None = None,
    workers: int | None = None,
    progress: bool = True,
    lock_timeout: float = 0.0,
):
    """Build every shard of ``task`` from scratch; a :class:`data_sharding.build_run.BuildReport`.

    Shards are built in parallel over ``workers`` processes (default: all CPU
    cores; 1 = in this process), all under temp names; only when every one
    succeeded are they renamed into place and the manifest replaced.  Shard
    series of other task dirs already in ``out`` are kept.  ``out`` is locked for
    the whole run (:func:`data_sharding.lock.output_lock`; ``lock_timeout`` seconds
    of waiting for another writer, 0 = refuse at once).
    """
    from data_sharding import publish, storage
    from data_sharding.lock import output_lock

    # the committed processed tables (a bucket's published generation): every worker reads the same ones
    processed, out = publish.published_root(processed), storage.resolve(out)
    with output_lock(out, "shard directory", lock_timeout) as lock:
        return _build_shards(processed, out, task, settings or ShardSettings(), workers, progress, lock)


def _build_shards(processed, out, task: str, settings: ShardSettings, workers: int | None, progress: bool, lock):
    from data_sharding import storage
    from data_sharding.build_run import InlineRunner, ProcessRunner, build_planned
    from data_sharding.defaults import BUILD_WORKERS_MAX
    from data_sharding.samples import TASK_DIRS, open_processed

    view = open_processed(processed)
    check_stats_files(processed)
    task_dirs = selected_task_dirs(view, task)
    plans = plan_shards(view, task_dirs, {t: settings for t in task_dirs})
    generation = storage.new_generation() if out.is_remote else None
    remove_tmp_files(out, task_dirs)
    previous = previous_manifest(out)
    kept = previous_records(out, [t for t in TASK_DIRS if t not in task_dirs], previous)

    workers = max(1, workers or min(os.cpu_count() or 1, BUILD_WORKERS_MAX))
    try:
        report = build_planned(processed, out, plans, {t: settings for t in task_dirs}, workers,
                               lambda n: InlineRunner() if n <= 1 else ProcessRunner(n), progress,
                               generation=generation)
    except BaseException:
        remove_tmp_files(out, task_dirs, generation)  # running workers have finished: the pool was joined
        raise
    report.manifest = Manifest(kept + report.records)
    if out.is_remote:
        commit_objects(out, report.manifest, previous, processed, lock, generation, task_dirs)
    else:
        commit_shards(out, report.manifest, [r.path for r in report.records], task_dirs, processed)
    report.cache_status = save_film_fingerprints(out, report.films, replace_all=set(task_dirs) == set(TASK_DIRS))
    return report


def save_film_fingerprints(out, films: dict, replace_all: bool, base: dict | None = None) -> str:
    """Record the (key, sha256) of films beside the committed manifest; a line for the report.

    ``replace_all`` (every task dir was planned): the cache holds exactly ``films``; otherwise
    entries of films this run did not see (other task dirs') are kept from ``base`` (default:
    the cache on disk).  A cache that cannot be written is reported, not fatal: the shards are
    committed, and the next regeneration re-hashes the films it cannot find in it.
    """
    from data_sharding.film_fingerprints import CACHE_NAME, load_cache, save_cache

    entries = {} if replace_all else dict(base if base is not None else load_cache(out).entries)
    entries.update({path: entry for path, entry in films.items() if entry[0] is not None})
    try:
        save_cache(out, entries)
    except UserError as exc:  # a full disk (StorageError) or an unavailable bucket: reported, not fatal
        return f"{CACHE_NAME} not saved ({getattr(exc, 'reason', '') or exc})"
    return f"{CACHE_NAME}: {len(entries)} films"


def total_counts(records: Iterable[ShardRecord]) -> Counter:
    """Sum of the per-shard anomaly counts (missing regions, unreadable images ...)."""
    total: Counter = Counter()
    for r in records:
        total.update(json.loads(r.counts or "{}"))
    return total
