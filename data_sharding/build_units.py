"""One unit of a shard build: walk its stays, decode every film once, write its shards or parts.

:func:`run_unit` takes one :class:`data_sharding.build_plan.BuildUnit` and walks its stays in
order.  For each stay it reads each film the stay's samples use once
(:func:`data_sharding.film_fingerprints.read_film`, its sha256 taken from those bytes), crops
all ten boxes once (:func:`data_sharding.crops.crop_regions`), and hands the crops to every
sample of every series that uses the film (:class:`data_sharding.samples.SampleBuilder`).
Samples stream into their shard's temp file (``{shard}.tmp``) or, for a shard that several
units share, into this unit's part (``{shard}.partNNNN.tmp``), which :func:`join_parts`
concatenates in order once every unit is done.  The bytes are those of a sample-by-sample
build: the same members in the same order (:class:`data_sharding.shard_format.TarStream`).

Memory per worker is bounded by one stay, never by the cohort or the shard size: the crops of
the stay's films (10 x C x C bytes each: 0.5 MB at C = 224; a stay has at most 14 CXRs in
cohort tables built by ``dipro prepare``), one decoded film (~6 MB for 2,300 x 2,560 pixels,
plus PIL's working copy while it resizes), one sample's members being written (T x 0.5 MB), the
EHR rows of the stays of the segments being written (one per series: at most 2 x
``max_samples_per_shard`` stays' hours), and the processed tables every worker holds
(``ProcessedView``: ``cxr.parquet``, demographics, task tables, as rows).

Anomalies are counted twice and named so: ``film_counts`` once per film read (this unit reads
each of its films once per build), and each segment's ``counts`` (the manifest's per-shard
``counts``) once per sample that uses the film.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from data_sharding import atomic, procstat
from data_sharding.build_plan import BuildUnit, Segment
from data_sharding.constants import BOX_COLUMNS, SPLITS
from data_sharding.film_fingerprints import FilmKey, film_digest, read_film
from data_sharding.manifest import ShardRecord, ShardSettings, shard_fingerprint
from data_sharding.shard_format import TarStream
from data_sharding.shard_writer import TMP_SUFFIX, UNCHANGED, tmp_path

_tick: Callable[[int], object] | None = None
_stop = None


class Cancelled(RuntimeError):
    """Another unit of the build failed: this one stops at its next stay (its temp files removed)."""


def set_progress(tick: Callable[[int], object] | None) -> None:
    """``tick(n)`` is called with the number of films each time films are read (a progress bar, a queue)."""
    global _tick
    _tick = tick


def _pool_initializer(queue, stop) -> None:
    """Process-pool initializer: report films read through ``queue``; stop when the ``stop`` event is set."""
    global _stop
    set_progress(queue.put)
    _stop = stop


def part_tmp(final: Path, part: int) -> Path:
    """The temp name of one unit's part of a shard that several units write."""
    return final.with_name(f"{final.name}.part{part:04d}{TMP_SUFFIX}")


@dataclass
class PartResult:
    """One unit's part of a shard written in parts."""

    path: str
    """The shard's path relative to the shard root."""
    part: int
    parts: int
    samples: int
    bytes: int
    counts: dict[str, int]
    digests: dict[str, str]
    """image path -> sha256 of the bytes decoded, for the films of this part's samples."""
    offsets: list[int] = field(default_factory=list)
    """Each sample's offset inside this part (the join adds the parts before it)."""


@dataclass
class UnitResult:
    """What one unit wrote and did."""

    index: int
    records: list[ShardRecord] = field(default_factory=list)
    """Shards this unit wrote whole (under their temp names)."""
    parts: list[PartResult] = field(default_factory=list)
    films: dict[str, tuple[FilmKey | None, str]] = field(default_factory=dict)
    """Every film read: image path -> (its key before the read, sha256 of the bytes read)."""
    films_read: int = 0
    film_counts: dict[str, int] = field(default_factory=dict)
    """Anomalies once per film read."""
    samples: int = 0
    bytes: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    peak_rss_mb: float = 0.0
    pid: int = 0


def shard_sink(out, plan, generation: str | None, part: int | None = None):
    """Where a shard (or one unit's ``part`` of it) is written: ``(final, writer context, location written)``.

    Locally the temp file beside the final path (renamed by the commit); on a bucket (a
    ``generation``) the generation-named object itself, or its part object, streamed.
    """
    from data_sharding import storage
    from data_sharding.shard_writer import object_path

    root = storage.resolve(out)
    if generation is None:
        final = root.local / plan.path
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = tmp_path(final) if part is None else part_tmp(final, part)
        return final, atomic.open_atomic(final, "wb", tmp=tmp, replace=False, unchanged=UNCHANGED,
                                         fsync=part is None), tmp
    final = root / object_path(plan, generation)
    target = final if part is None else final.parent / part_tmp(Path(final.name), part).name
    return final, target.open_output(unchanged=UNCHANGED), target


class _SegmentWriter:
    """An open shard or part: its temp file (or bucket object), its stream and its sample builder."""

    def __init__(self, view, segment: Segment, settings: ShardSettings, out, crops,
                 generation: str | None = None) -> None:
        from data_sharding.samples import SampleBuilder

        self.segment, self.settings = segment, settings
        self.final, sink, self.target = shard_sink(out, segment.plan, generation,
                                                   None if segment.parts == 1 else segment.part)
        self.digests: dict[str, str] = {}
        self.builder = SampleBuilder(view, segment.plan.task, settings.crop_size,
                                     crops=lambda stay, dicom, where: crops(stay, dicom, where, self))
        self.builder.prefetch(list(segment.rows))
        self._stack = contextlib.ExitStack()
        self.stream = TarStream(self._stack.enter_context(sink))
        self.left = len(segment.rows)

    def add(self, index: int) -> None:
        sample = self.builder.build(index)
        try:
            self.stream.add_sample(sample.key, sample.arrays, sample.labels, sample.meta)
        except BaseException as exc:
            err = atomic.storage_error(exc, self.final, UNCHANGED)
            if err is not None and err is not exc:
                raise err from exc
            raise
        self.left -= 1

    def finish(self) -> None:
        if self.segment.parts == 1:
            self.stream.finish()
        self._stack.close()  # flush, fsync; the temp file stays for the commit (or the join)

    def abandon(self, exc: BaseException) -> None:
        """Close and remove the temp file after a failure (the caller raises ``exc``)."""
        with contextlib.suppress(BaseException):
            self._stack.__exit__(type(exc), exc, exc.__traceback__)


def run_unit(processed: str, unit: BuildUnit, settings: dict[str, ShardSettings], out: str,
             generation: str | None = None) -> UnitResult:
    """Build ``unit`` (module docstring); ``settings`` per task dir; temp files under ``out`` (on a bucket
    the ``generation``'s objects)."""
    from data_sharding.crops import crop_regions
    from data_sharding.samples import open_processed

    t0, c0 = time.perf_counter(), time.process_time()
    view = open_processed(processed)
    result = UnitResult(unit.index, pid=os.getpid())
    film_counts: Counter = Counter()
    # the walk: (split, stay) -> [(segment number, task row)], segments in plan order, rows in shard order
    walk: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for k, seg in enumerate(unit.segments):
        table = view.task_rows(seg.plan.task)
        for i in seg.rows:
            walk.setdefault((SPLITS.index(seg.plan.split), int(table[i]["stay_id"])), []).append((k, i))

    stay_crops: dict[tuple, object] = {}

    def crops(stay: int, dicom: str, where: str, writer: _SegmentWriter):
        s = writer.settings
        key = (stay, dicom, s.crop_size, s.resample)
        cxr = view.cxr_row(stay, dicom, where)
        path = str(cxr["image_path"])
        if key not in stay_crops:
            data, film_key = read_film(path)
            result.films[path] = (film_key, film_digest(data))
            result.films_read += 1
            cropped = crop_regions(data, [cxr[c] for c in BOX_COLUMNS], s.crop_size,
                                   recorded_size=(cxr["width"], cxr["height"]), resample=s.resample)
            film_counts.update(cropped.counts)
            stay_crops[key] = cropped
            if _tick is not None:
                _tick(1)
        writer.digests[path] = result.films[path][1]
        return stay_crops[key]

    writers: dict[int, _SegmentWriter] = {}
    try:
        for item in sorted(walk):
            if _stop is not None and _stop.is_set():
                raise Cancelled(f"unit {unit.index} stopped: another unit of the build failed")
            stay_crops.clear()  # a stay's films are used by that stay's samples only
            for k, index in walk[item]:
                writer = writers.get(k)
                if writer is None:
                    seg = unit.segments[k]
                    writer = writers[k] = _SegmentWriter(view, seg, settings[seg.plan.task], out, crops, generation)
                writer.add(index)
                if writer.left == 0:
                    writer.finish()
                    del writers[k]
                    _record(view, writer, result)
    except BaseException as exc:
        for writer in writers.values():
            writer.abandon(exc)
        raise
    result.film_counts = dict(sorted(film_counts.items()))
    result.seconds = time.perf_counter() - t0
    result.cpu_seconds = time.process_time() - c0
    result.peak_rss_mb = procstat.peak_rss_mb()
    return result


def _counts_json(counts: Counter | dict) -> str:
    return json.dumps(dict(sorted(counts.items())), separators=(",", ":"))


def _record(view, writer: _SegmentWriter, result: UnitResult) -> None:
    seg, stream = writer.segment, writer.stream
    result.samples += len(seg.rows)
    result.bytes += stream.size
    if seg.parts > 1:
        result.parts.append(PartResult(seg.plan.path, seg.part, seg.parts, len(seg.rows), stream.size,
                                       dict(writer.builder.counts), dict(writer.digests), list(stream.offsets)))
        return
    plan, settings = seg.plan, writer.settings
    if stream.size > settings.max_shard_bytes:
        raise RuntimeError(f"{plan.path}: {stream.size} bytes exceed the planned bound {settings.max_shard_bytes}")
    fingerprint = shard_fingerprint(view, plan.task, plan.rows, settings, writer.digests.__getitem__,
                                    ehr=writer.builder.ehr)
    path, etag = _written(writer.final, plan)
    result.records.append(ShardRecord(task=plan.task, split=plan.split, path=path, samples=len(plan.rows),
                                      bytes=stream.size, sha256=stream.sha.hexdigest(), fingerprint=fingerprint,
                                      settings=settings.to_json(), counts=_counts_json(writer.builder.counts),
                                      etag=etag, offsets=(*stream.offsets, stream.samples_end)))


def _written(final, plan) -> tuple[str, str]:
    """The manifest path and ETag of a finished shard: the plan's path locally; a bucket object's own name and ETag."""
    if isinstance(final, Path):
        return plan.path, ""
    return f"{plan.task}/{final.name}", final.stat().token


def join_parts(processed: str, plan, settings: ShardSettings, out: str, parts: list[PartResult],
               generation: str | None = None) -> ShardRecord:
    """Concatenate a shard's parts in order into ``{shard}.tmp`` (a bucket: its generation's object), end
    the archive; the shard's manifest row.  Locally part 0's file becomes ``{shard}.tmp`` and the later
    parts are appended to it (part 0 is read to hash it, not written again); the joined file is fsynced
    (the parts, scratch files, are not)."""
    from data_sharding import storage
    from data_sharding.samples import open_processed

    parts = sorted(parts, key=lambda p: p.part)
    if [p.part for p in parts] != list(range(parts[0].parts)):
        raise RuntimeError(f"{plan.path}: parts {[p.part for p in parts]} of {parts[0].parts} to join")
    sources = [shard_sink(out, plan, generation, p.part)[2] for p in parts]
    offsets: list[int] = []
    base = 0
    for p in parts:  # each part's offsets, shifted by the bytes of the parts before it
        offsets += [base + o for o in p.offsets]
        base += p.bytes
    if generation is None:  # locally part 0 becomes the shard: the other parts are appended to it
        final = storage.resolve(out).local / plan.path
        os.replace(sources[0], tmp_path(final))
        sink, first, rest = atomic.open_atomic(final, "r+b", tmp=tmp_path(final), replace=False,
                                               unchanged=UNCHANGED), tmp_path(final), sources[1:]
    else:  # an object cannot be appended to: every part is copied into the shard's object
        final, sink, _ = shard_sink(out, plan, generation)
        first, rest = None, sources
    with sink as f:
        stream = TarStream(f)
        if first is not None:
            while chunk := f.read(8 << 20):  # hashed, not written again
                stream.written(chunk)
        for src_loc in rest:
            with (open(src_loc, "rb") if isinstance(src_loc, Path) else src_loc.open_input()) as src:
                while chunk := src.read(8 << 20):
                    stream.write(chunk)
        stream.finish()
    for src_loc in rest:
        src_loc.unlink() if isinstance(src_loc, Path) else src_loc.delete()
    if stream.size > settings.max_shard_bytes:
        raise RuntimeError(f"{plan.path}: {stream.size} bytes exceed the planned bound {settings.max_shard_bytes}")
    digests: dict[str, str] = {}
    counts: Counter = Counter()
    for p in parts:
        digests.update(p.digests)
        counts.update(p.counts)
    view = open_processed(processed)
    fingerprint = shard_fingerprint(view, plan.task, plan.rows, settings, digests.__getitem__)
    path, etag = _written(final, plan)
    return ShardRecord(task=plan.task, split=plan.split, path=path, samples=len(plan.rows), bytes=stream.size,
                       sha256=stream.sha.hexdigest(), fingerprint=fingerprint, settings=settings.to_json(),
                       counts=_counts_json(counts), etag=etag, offsets=(*offsets, stream.samples_end))
