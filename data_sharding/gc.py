"""``dipro shards gc``: remove what no commit refers to any more, once it is old enough.

Commits on a bucket never delete (a training job that planned from the previous manifest is
still reading the objects it names), so superseded objects stay until this runs:

* a shard set (``S/manifest.parquet``): every shard object under ``S/{task}/`` with a generation
  name (``{split}-{NNNNNN}-{generation}.tar``) that the current manifest does not name;
* a directory published with :func:`data_sharding.publish.publish_dir` (``OUT/_published.json``,
  e.g. ``dipro prepare --out``): every generation prefix except the one the record names;
* a local shard directory: temp files an interrupted build left (``*.tar.tmp``); its commits
  already delete replaced shards.

Only objects whose last modification is at least ``min_age_s`` old are removed (default 7 days:
longer than any job that could still read a superseded generation), and the shard directory's
lock is held while it runs, so it never races a writer.  ``dry_run`` lists without deleting.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

from data_sharding.defaults import GC_MIN_AGE_S as DEFAULT_MIN_AGE_S
from data_sharding.errors import DataError

_GENERATION = re.compile(r"^\d{8}T\d{6}-[0-9a-f]{6}$")


@dataclass
class GcReport:
    removed: list[str] = field(default_factory=list)
    """Paths (relative to the location) removed, or that would be with ``dry_run``."""
    kept_young: int = 0
    """Unreferenced objects kept because they are younger than the minimum age."""
    bytes: int = 0
    dry_run: bool = False

    def table(self) -> str:
        verb = "would remove" if self.dry_run else "removed"
        lines = [f"{verb} {len(self.removed)} object(s), {self.bytes / 2**20:.1f} MiB; kept {self.kept_young} "
                 "unreferenced object(s) younger than the minimum age"]
        lines += [f"  {verb}  {p}" for p in self.removed]
        return "\n".join(lines)


def collect(location, min_age_s: float = DEFAULT_MIN_AGE_S, dry_run: bool = False,
            lock_timeout: float = 0.0) -> GcReport:
    """Remove the unreferenced objects of a shard set or published directory (see the module docstring)."""
    from data_sharding import publish, storage
    from data_sharding.lock import output_lock
    from data_sharding.manifest import manifest_path

    root = storage.resolve(location)
    report = GcReport(dry_run=dry_run)
    cutoff_ns = (time.time() - min_age_s) * 1e9
    if manifest_path(root).exists():
        find = _shard_garbage
    elif root.is_remote and (root / publish.POINTER).exists():
        find = _generation_garbage
    else:
        raise DataError(f"{root}: no shard manifest and no published directory here: nothing to collect")
    with output_lock(root, "shard directory", lock_timeout):
        candidates = find(root)
        for info in candidates:
            if info.mtime_ns > cutoff_ns:
                report.kept_young += 1
                continue
            report.removed.append(info.path)
            report.bytes += info.size
            if not dry_run:
                (root / info.path).delete()
    return report


def _shard_garbage(root) -> list:
    from data_sharding.manifest import read_manifest
    from data_sharding.samples import TASK_DIRS
    from data_sharding.shard_writer import OBJECT_NAME, TMP_SUFFIX

    listed = set(read_manifest(root).by_path())
    out = []
    for task in TASK_DIRS:
        for info in (root / task).list():
            rel = f"{task}/{info.path}"
            if "/" in info.path or rel in listed:
                continue
            if (root.is_remote and OBJECT_NAME.match(info.path)) or (not root.is_remote and
                                                                       info.path.endswith(TMP_SUFFIX)):
                out.append(_rel(info, rel))
    return out


def _generation_garbage(root) -> list:
    import json

    from data_sharding import publish

    current = json.loads((root / publish.POINTER).read_text())["generation"]
    out = []
    for info in root.list():
        head = info.path.split("/", 1)[0]
        if "/" in info.path and _GENERATION.match(head) and head != current:
            out.append(info)
    return out


def _rel(info, rel: str):
    from dataclasses import replace

    return replace(info, path=rel)
