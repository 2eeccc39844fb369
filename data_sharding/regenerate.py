"""``dipro shards regenerate``: rebuild only the shards whose inputs, settings or bytes changed.

Runs as Ray tasks on whatever cluster it is given (``RAY_ADDRESS``, which
``ray job submit`` sets, or ``--ray-address``; otherwise a local Ray):

1. plan: the same deterministic :func:`plan_shards` as ``dipro shard``;
2. inspect (one task per planned shard): recompute the input fingerprint from
   the processed dir and verify the existing file (presence, size, sha256,
   every sample) -> a reason to rebuild, or none;
3. build (one task per shard to rebuild): write ``{path}.tmp``;
4. commit (driver, only after every build succeeded): rename the temp files,
   replace the manifest atomically, remove shards no longer planned.

Shards with no reason to rebuild are never opened for writing: same bytes,
same mtime.  The driver holds the shard directory's lock (``data_sharding.lock``)
from planning to commit, so a second regeneration or ``dipro shard`` on the same
directory refuses (or waits) instead of interleaving its manifest with this one.  A crash before step 4 leaves the previous shards and manifest
exactly as they were (temp files are ignored by readers and removed by the
next run).  A crash inside step 4's renames leaves shards whose sha256 no
longer matches the old manifest; the next ``regenerate`` finds and rebuilds them.

On a bucket (:mod:`data_sharding.storage`) step 2 checks an existing object by its metadata
(size and the ETag / generation the manifest recorded when it was written), reading no
shard body; step 3 writes new generation-named objects; step 4 is one conditional write of
the manifest (see :mod:`data_sharding.shard_writer`).  Objects it supersedes stay until
``dipro shards gc``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from data_sharding.manifest import Manifest, ShardRecord, ShardSettings, shard_fingerprint
from data_sharding.shard_writer import (
    ShardPlan,
    build_shard,
    check_stats_files,
    commit_objects,
    commit_shards,
    plan_shards,
    previous_manifest,
    previous_records,
    remove_tmp_files,
    selected_task_dirs,
)


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

    def table(self) -> str:
        lines = [f"{len(self.rebuilt)} rebuilt, {len(self.unchanged)} unchanged, {len(self.removed)} "
                 f"{self.removed_word}"]
        lines += [f"  rebuilt  {path}: {reason}" for path, reason in sorted(self.rebuilt.items())]
        lines += [f"  {self.removed_word}  {path}" for path in self.removed]
        return "\n".join(lines)


def inspect_shard(processed: str, plan: ShardPlan, settings: ShardSettings, out: str,
                  old: ShardRecord | None) -> str | None:
    """Why ``plan``'s shard must be rebuilt (None = it is up to date and valid)."""
    from data_sharding.manifest import sha256_file
    from data_sharding.samples import open_processed
    from data_sharding.verify import verify_shard

    if old is None:
        return "new"
    if old.settings != settings.to_json():
        return "settings changed"

    def digest(path: str) -> str:
        try:
            return sha256_file(path)
        except OSError:
            return "missing"

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


def _gather(refs: list, desc: str, progress: bool) -> list:
    """ray.get with a progress bar; on the first failure cancel the rest and raise the task's own error."""
    import ray
    from tqdm import tqdm

    results: dict[Any, Any] = {}
    pending = list(refs)
    with tqdm(total=len(refs), unit="shard", desc=desc, disable=not progress) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            try:
                results[done[0]] = ray.get(done[0])
            except ray.exceptions.RayTaskError as exc:
                for ref in pending:
                    ray.cancel(ref)
                cause = getattr(exc, "cause", None)
                raise (cause if isinstance(cause, BaseException) else exc) from None
            bar.update(1)
    return [results[r] for r in refs]


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
) -> RegenReport:
    """Bring ``out`` up to date with ``processed``, rebuilding only what changed (see module docstring).

    ``overrides`` changes settings (``crop_size``, ``max_samples_per_shard``,
    ``max_shard_bytes``; None values ignored); otherwise each task dir keeps the
    settings of its existing shards.  Uses the running Ray if there is one,
    else connects to ``ray_address`` / ``RAY_ADDRESS``, else starts a local
    Ray with ``num_cpus`` (and shuts down what it started).  ``out`` is locked for the
    whole run, as by ``dipro shard`` (``lock_timeout`` seconds of waiting, 0 = refuse).
    """
    from data_sharding import storage
    from data_sharding.lock import output_lock

    from data_sharding import publish

    # the committed processed tables (a bucket's published generation): every task reads the same ones
    processed, out = publish.published_root(processed), storage.resolve(out)
    with output_lock(out, "shard directory", lock_timeout) as lock:
        return _regenerate(processed, out, task, overrides, ray_address, num_cpus, progress, lock)


def _regenerate(processed, out, task: str, overrides: dict[str, Any] | None, ray_address: str | None,
                num_cpus: int | None, progress: bool, lock) -> RegenReport:
    import ray

    from data_sharding import storage
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

    started = _init_ray(ray_address, num_cpus)
    try:
        inspect_task = ray.remote(num_cpus=1)(inspect_shard)
        build_task = ray.remote(num_cpus=1)(build_shard)
        reasons = _gather([inspect_task.remote(processed.uri, p, settings[p.task], out.uri, old.get(p.path))
                           for p in plans], "inspect", progress)
        todo = [(p, r) for p, r in zip(plans, reasons) if r is not None]
        try:
            built: list[ShardRecord] = _gather(
                [build_task.remote(processed.uri, p, settings[p.task], out.uri, generation) for p, _ in todo],
                "rebuild", progress)
        except BaseException:
            remove_tmp_files(out, task_dirs, generation)
            raise
    finally:
        if started:
            ray.shutdown()

    rebuilt = {p.path: r for p, r in todo}
    records = [old[p.path] for p in plans if p.path not in rebuilt] + built
    kept = previous_records(out, [t for t in TASK_DIRS if t not in task_dirs], previous)
    manifest = Manifest(kept + records)
    if out.is_remote:
        removed = commit_objects(out, manifest, previous, processed, lock, generation, task_dirs)
    else:
        removed = commit_shards(out, manifest, [r.path for r in built], task_dirs, processed)
    return RegenReport(rebuilt=rebuilt, unchanged=sorted(p.path for p in plans if p.path not in rebuilt),
                       removed=removed, manifest=manifest,
                       removed_word="superseded (dipro shards gc removes them)" if out.is_remote else "removed")
