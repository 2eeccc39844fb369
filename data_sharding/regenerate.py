"""``dipro shards regenerate``: rebuild only the shards whose inputs, settings or bytes changed.

Runs as Ray tasks on whatever cluster it is given (``RAY_ADDRESS``, which
``ray job submit`` sets, or ``--ray-address``; otherwise a local Ray):

1. plan: the same deterministic :func:`plan_shards` as ``dipro shard``;
2. film fingerprints: every film the plan uses is stat'ed (never opened) and looked up in
   ``S/film_fingerprints.parquet`` by (path, size, mtime_ns)
   (:mod:`data_sharding.film_fingerprints`); only films missing from it or whose key changed
   are read and hashed (Ray tasks, balanced by bytes); a missing or corrupt cache is rebuilt
   (reported), ``--rehash`` ignores it;
3. inspect (one task per planned shard): recompute the input fingerprint from the processed dir
   and those film digests, and verify the existing file (presence, size, sha256, every sample)
   -> a reason to rebuild, or none.  With no film to hash and at most
   :data:`INSPECT_INLINE_BYTES` of shards to verify (or a bucket, where verifying is a metadata
   check) this runs in the driver and Ray is started only if something must be rebuilt;
4. build: the shards to rebuild, around films as ``dipro shard`` builds them
   (:func:`data_sharding.build_run.build_planned`: each film read once, balanced units), the
   units and the joins of shards written in parts as Ray tasks, under temp names;
5. commit (driver, only after every build succeeded): rename the temp files,
   replace the manifest atomically, remove shards no longer planned; then save the film
   fingerprints.

A regeneration with nothing changed opens no film and rewrites nothing.  Shards with no
reason to rebuild are never opened for writing: same bytes, same mtime.  The driver holds the
shard directory's lock (``data_sharding.lock``) from planning to commit, so a second
regeneration or ``dipro shard`` on the same directory refuses (or waits) instead of
interleaving its manifest with this one.  A crash before step 5 leaves the previous shards and
manifest exactly as they were (temp files are ignored by readers and removed by the next run).
A crash inside step 5's renames leaves shards whose sha256 no longer matches the old manifest;
the next ``regenerate`` finds and rebuilds them.

On a bucket (:mod:`data_sharding.storage`) films are stat'ed by one listing, an existing shard
object is checked by its metadata (size and the ETag / generation the manifest recorded when it
was written), reading no shard body; rebuilt shards are new generation-named objects; the commit
is one conditional write of the manifest (see :mod:`data_sharding.shard_writer`).  Objects it
supersedes stay until ``dipro shards gc``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from data_sharding.manifest import Manifest, ShardRecord, ShardSettings, shard_fingerprint
from data_sharding.shard_writer import (
    ShardPlan,
    check_stats_files,
    commit_objects,
    commit_shards,
    plan_shards,
    previous_manifest,
    previous_records,
    remove_tmp_files,
    save_film_fingerprints,
    selected_task_dirs,
)


INSPECT_INLINE_BYTES = 256 << 20
"""Shard bytes up to which a regeneration with no film to hash inspects in its own process (no Ray start)."""


@dataclass
class RegenReport:
    """What a regeneration did."""

    rebuilt: dict[str, str] = field(default_factory=dict)
    """path -> reason (new, settings changed, inputs changed, or the verification problem)."""
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    """Shards no longer in the plan (deleted; on a bucket: superseded, left for ``dipro shards gc``)."""
    manifest: Manifest = field(default_factory=Manifest)
    removed_word: str = "removed"
    films: int = 0
    """Films the planned shards use (each stat'ed, none opened unless counted below)."""
    films_hashed: int = 0
    """Films read to compute their sha256 (not in the fingerprint cache, or their size/mtime changed)."""
    films_read: int = 0
    """Films read and decoded to rebuild shards (each once)."""
    cache_status: str = ""
    """The film fingerprint cache: loaded, or missing / corrupt / ignored and rebuilt."""
    cache_saved: str = ""
    build: Any = None
    """The rebuild's :class:`data_sharding.build_run.BuildReport` (None when nothing was rebuilt)."""

    def table(self) -> str:
        lines = [f"{len(self.rebuilt)} rebuilt, {len(self.unchanged)} unchanged, {len(self.removed)} "
                 f"{self.removed_word}",
                 f"films: {self.films} used, {self.films_hashed} hashed, {self.films_read} read to rebuild; "
                 f"fingerprint cache {self.cache_status}" + (f"; {self.cache_saved}" if self.cache_saved else "")]
        lines += [f"  rebuilt  {path}: {reason}" for path, reason in sorted(self.rebuilt.items())]
        lines += [f"  {self.removed_word}  {path}" for path in self.removed]
        return "\n".join(lines)


def inspect_shard(processed: str, plan: ShardPlan, settings: ShardSettings, out: str,
                  old: ShardRecord | None, digests: dict[str, str] | None = None) -> str | None:
    """Why ``plan``'s shard must be rebuilt (None = it is up to date and valid).

    ``digests`` (image path -> sha256) are the films' fingerprints; without them every film is hashed.
    """
    from data_sharding.film_fingerprints import film_digest, read_film
    from data_sharding.samples import open_processed
    from data_sharding.verify import verify_shard

    if old is None:
        return "new"
    if old.settings != settings.to_json():
        return "settings changed"

    def digest(path: str) -> str:
        if digests is not None:
            return digests[path]
        return film_digest(read_film(path)[0])

    view = open_processed(processed)
    if old.fingerprint != shard_fingerprint(view, plan.task, plan.rows, settings, digest):
        return "inputs changed"
    if old.etag:  # a bucket object: its metadata decides, its body is not read
        from data_sharding import storage

        try:
            info = (storage.resolve(out) / old.path).stat()
        except storage.NotFound:
            return "failed verification: missing (object not found)"
        if info.size != old.bytes or info.token != old.etag:
            return (f"failed verification: changed ({info.size} bytes, version {info.token}; the manifest "
                    f"recorded {old.bytes} bytes, version {old.etag})")
        return None
    problems, _ = verify_shard(out, old)
    if problems:
        return f"failed verification: {problems[0].kind} ({problems[0].detail})"
    return None


def resolve_settings(previous: Manifest | None, task_dirs: tuple[str, ...],
                     overrides: dict[str, Any]) -> dict[str, ShardSettings]:
    """Per task dir: the settings its shards were built with (manifest), updated by ``overrides``."""
    old: dict[str, set[str]] = {}
    for r in previous.records if previous is not None else []:
        old.setdefault(r.task, set()).add(r.settings)
    result = {}
    for task in task_dirs:
        seen = old.get(task, set())
        base = ShardSettings.from_json(next(iter(seen))) if len(seen) == 1 else ShardSettings()
        result[task] = replace(base, **{k: v for k, v in overrides.items() if v is not None})
    return result


def _gather(refs: list, bar=None, weights: list[int] | None = None) -> list:
    """ray.get with a progress bar (each finished task adds its weight); on the first failure cancel the
    rest and raise the task's own error."""
    import ray

    weight = dict(zip(refs, weights or [1] * len(refs)))
    results: dict[Any, Any] = {}
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        try:
            results[done[0]] = ray.get(done[0])
        except ray.exceptions.RayTaskError as exc:
            for ref in pending:
                ray.cancel(ref)
            cause = getattr(exc, "cause", None)
            raise (cause if isinstance(cause, BaseException) else exc) from None
        if bar is not None:
            bar.update(weight[done[0]])
    return [results[r] for r in refs]


def _tasks(fn, jobs: list[tuple], desc: str, progress: bool, weights: list[int] | None = None,
           unit: str = "shard") -> list:
    """``fn(*job)`` for every job as Ray tasks of one CPU each, with a progress bar."""
    import ray
    from tqdm import tqdm

    task = ray.remote(num_cpus=1)(fn)
    with tqdm(total=sum(weights) if weights else len(jobs), unit=unit, desc=desc, disable=not progress) as bar:
        return _gather([task.remote(*job) for job in jobs], bar, weights)


class RayRunner:
    """The shard builder's runner (:func:`data_sharding.build_run.build_planned`) on Ray tasks."""

    def __init__(self, workers: int) -> None:
        self.workers = workers

    def __enter__(self) -> "RayRunner":
        return self

    def __exit__(self, *exc) -> None:
        return None

    def map(self, fn, jobs: list[tuple], bar=None, weights: list[int] | None = None) -> list:
        import ray

        task = ray.remote(num_cpus=1)(fn)
        return _gather([task.remote(*job) for job in jobs], bar, weights)


def _balanced(paths: list[str], sizes: dict[str, int], n: int) -> list[list[str]]:
    """``paths`` in at most ``n`` batches of about equal bytes (largest first onto the lightest batch)."""
    batches: list[list[str]] = [[] for _ in range(max(1, min(n, len(paths))))]
    load = [0] * len(batches)
    for p in sorted(paths, key=lambda p: -sizes.get(p, 0)):
        k = load.index(min(load))
        batches[k].append(p)
        load[k] += sizes.get(p, 0)
    return [b for b in batches if b]


def _init_ray(ray_address: str | None, num_cpus: int | None) -> bool:
    """Connect to the given / ``RAY_ADDRESS`` cluster or start a local one; True when this call started Ray."""
    from data_sharding.ray_init import init_ray

    return init_ray(ray_address, num_cpus=num_cpus or os.cpu_count() or 1, logging_level="warning")


def regenerate(
    processed: str | Path,
    out: str | Path,
    task: str = "all",
    overrides: dict[str, Any] | None = None,
    ray_address: str | None = None,
    num_cpus: int | None = None,
    progress: bool = True,
    lock_timeout: float = 0.0,
    rehash: bool = False,
) -> RegenReport:
    """Bring ``out`` up to date with ``processed``, rebuilding only what changed (see module docstring).

    ``overrides`` changes settings (``crop_size``, ``max_samples_per_shard``,
    ``max_shard_bytes``; None values ignored); otherwise each task dir keeps the
    settings of its existing shards.  Uses the running Ray if there is one,
    else connects to ``ray_address`` / ``RAY_ADDRESS``, else starts a local
    Ray with ``num_cpus`` (and shuts down what it started).  ``out`` is locked for the
    whole run, as by ``dipro shard`` (``lock_timeout`` seconds of waiting, 0 = refuse).  ``rehash``
    re-reads every film instead of trusting the film fingerprint cache.
    """
    from data_sharding import publish, storage
    from data_sharding.lock import output_lock

    # the committed processed tables (a bucket's published generation): every task reads the same ones
    processed, out = publish.published_root(processed), storage.resolve(out)
    with output_lock(out, "shard directory", lock_timeout) as lock:
        return _regenerate(processed, out, task, overrides, ray_address, num_cpus, progress, rehash, lock)


def _regenerate(processed, out, task: str, overrides: dict[str, Any] | None, ray_address: str | None,
                num_cpus: int | None, progress: bool, rehash: bool, lock) -> RegenReport:
    import ray

    from data_sharding import storage
    from data_sharding.build_plan import plan_films
    from data_sharding.build_run import build_planned
    from data_sharding.film_fingerprints import MISSING, hash_films, load_cache, stat_films
    from data_sharding.samples import TASK_DIRS, open_processed

    view = open_processed(processed)
    check_stats_files(processed)
    task_dirs = selected_task_dirs(view, task)
    previous = previous_manifest(out)
    settings = resolve_settings(previous, task_dirs, overrides or {})
    plans = plan_shards(view, task_dirs, settings)
    old = previous.by_logical() if previous is not None else {}
    generation = storage.new_generation() if out.is_remote else None
    remove_tmp_files(out, task_dirs)

    # film fingerprints: stat every film, hash only what the cache does not vouch for
    films_of = {p.path: plan_films(view, p) for p in plans}
    films = list(dict.fromkeys(f for fs in films_of.values() for f in fs))
    cache = load_cache(out, rehash)
    keys = stat_films(films)
    digests: dict[str, str] = {}
    for f in films:
        cached = cache.digest(f, keys[f])
        if cached is not None:
            digests[f] = cached
        elif keys[f] is None:
            digests[f] = MISSING  # absent: nothing to read
    to_hash = [f for f in films if f not in digests]

    # Ray only for work worth spreading: films to hash, shards to rebuild, or many shard bytes to verify
    # (a no-op regeneration of a small or bucket shard set is decided in this process, without a cluster).
    verify_bytes = 0 if out.is_remote else sum(old[p.path].bytes for p in plans if p.path in old)
    started, cpus = False, 1
    try:
        if to_hash or verify_bytes > INSPECT_INLINE_BYTES:
            started = _init_ray(ray_address, num_cpus)
            cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        if to_hash:
            sizes = {f: keys[f].size for f in to_hash}
            batches = _balanced(to_hash, sizes, cpus)
            for batch in _tasks(hash_films, [(b,) for b in batches], "hash films", progress,
                                [len(b) for b in batches], unit="film"):
                for f, key, digest in batch:
                    keys[f], digests[f] = key, digest
        jobs = [(processed.uri, p, settings[p.task], out.uri, old.get(p.path),
                 {f: digests[f] for f in films_of[p.path]}) for p in plans]
        if ray.is_initialized():
            reasons = _tasks(inspect_shard, jobs, "inspect", progress)
        else:
            reasons = [inspect_shard(*job) for job in jobs]
        todo = [(p, r) for p, r in zip(plans, reasons) if r is not None]
        build = None
        if todo:
            if not ray.is_initialized():
                started = _init_ray(ray_address, num_cpus)
            cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
            try:
                build = build_planned(processed, out, [p for p, _ in todo], settings, cpus, RayRunner, progress,
                                      desc="rebuild", generation=generation)
            except BaseException:
                remove_tmp_files(out, task_dirs, generation)
                raise
    finally:
        if started:
            ray.shutdown()

    built: list[ShardRecord] = build.records if build is not None else []
    rebuilt = {p.path: r for p, r in todo}
    records = [old[p.path] for p in plans if p.path not in rebuilt] + built
    kept = previous_records(out, [t for t in TASK_DIRS if t not in task_dirs], previous)
    manifest = Manifest(kept + records)
    if out.is_remote:
        removed = commit_objects(out, manifest, previous, processed, lock, generation, task_dirs)
    else:
        removed = commit_shards(out, manifest, [r.path for r in built], task_dirs, processed)
    if build is not None:
        build.manifest = manifest

    entries = {f: (keys[f], digests[f]) for f in films if keys[f] is not None and digests[f] != MISSING}
    if build is not None:
        entries.update({f: e for f, e in build.films.items() if e[0] is not None})
    replace_all = set(task_dirs) == set(TASK_DIRS)
    unchanged = cache.status == "loaded" and (
        entries == cache.entries if replace_all else all(cache.entries.get(f) == e for f, e in entries.items()))
    saved = "" if unchanged else save_film_fingerprints(out, entries, replace_all, base=cache.entries)
    return RegenReport(rebuilt=rebuilt, unchanged=sorted(p.path for p in plans if p.path not in rebuilt),
                       removed=removed, manifest=manifest, films=len(films), films_hashed=len(to_hash),
                       films_read=build.films_read if build is not None else 0, cache_status=cache.status,
                       cache_saved=saved, build=build,
                       removed_word="superseded (dipro shards gc removes them)" if out.is_remote else "removed")
