"""Read the samples of a shard segment from its tar, accounting for every one of them.

A WebDataset tar holds each sample's members consecutively under one key
(``{key}.{member}``; the first dot ends the key).  :func:`read_segment` yields
the raw members of samples ``[start, stop)`` of one shard.

Every shard is opened through the storage layer (:mod:`data_sharding.storage`): a local file,
or on a bucket one sequential stream of 8 MiB ranged reads with the next range in flight
(transient failures retried and counted there), or the node's local copy when
``data.cache_dir`` is set (:mod:`dipro.data.shard_cache`).

Headers are parsed by :class:`data_sharding.shard_format.TarReader` (the ustar headers of this
project's shards directly, any other through ``tarfile``).  The samples before ``start`` are
skipped, not parsed (ranks and loader workers start mid-shard).  The manifest records each
sample's byte offset (``offsets``, see :class:`data_sharding.manifest.ShardRecord`): the reader
seeks straight to the segment's first sample and, on a bucket, no range reaches past its last one,
so a segment costs its own bytes and nothing else.  For a manifest written before offsets were
recorded, the tar is walked header by header to the first sample (:func:`_first_offset`): a local
file or cached copy seeks over the member bytes; on a bucket the walk uses small ranged reads of
:data:`SKIP_PROBE_BYTES` (about one request per skipped sample, no sample payload fetched) when
the shard's samples average :data:`SKIP_STREAM_BELOW_BYTES` or more; below that the stream's own
8 MiB ranges read through them, because one request per sample would cost more time than the bytes
(a request's latency is worth ~2 MB of one stream's bandwidth on S3/GCS).

A shard that is truncated, has a damaged header or holds fewer samples than the manifest
says does not stop the stream: the samples it cannot deliver come out as one
:class:`Skipped` record carrying their count, the shard and the key where reading broke,
so they are counted like any other corrupt sample.  A shard that cannot be *fetched*
(missing object, refused credentials, storage still unavailable after the layer's
retries) is not corrupt data: its one-line :class:`data_sharding.storage.StorageAccessError`
naming the URI propagates and stops the stream.
"""
from __future__ import annotations

import tarfile
from dataclasses import dataclass
from typing import IO, Any, Iterator

from data_sharding import shard_format, storage
from dipro.data.plan import Segment, ShardInfo

SKIP_PROBE_BYTES = 64 << 10
"""Range size of the header walk to a segment's first sample on a bucket (tar headers of a
sample's small members and of the next sample's crops fit in one)."""
STREAM_READAHEAD = 2
"""Ranges a bucket stream keeps in flight ahead of the one being read (8 MiB each)."""
SKIP_STREAM_BELOW_BYTES = 2 << 20
"""Mean sample size (manifest bytes / samples) below which a bucket shard's skipped samples are
read through by the stream instead of probed one request each."""


@dataclass(frozen=True)
class Skipped:
    """``count`` samples that could not be used (reported, never silently dropped)."""

    shard: str
    key: str
    reason: str
    count: int = 1

    def describe(self) -> str:
        return f"shard {self.shard} key {self.key}: {self.reason}"


def split_member_name(name: str) -> tuple[str, str]:
    """``"dir/s12_3.crops.npy"`` -> ``("s12_3", "crops.npy")`` (WebDataset: the first dot ends the key)."""
    key, suffix = shard_format.split_member_name(name)
    return key, suffix.lower()


def open_shard(shard: ShardInfo, cache=None, stop: int | None = None) -> IO[bytes]:
    """A seekable binary reader of ``shard``: through ``cache`` (a :class:`dipro.data.shard_cache.ShardCache`)
    when the shard is on a bucket and a cache is configured and takes it, else straight from the storage
    layer (on a bucket: :data:`STREAM_READAHEAD` ranges in flight ahead of the one being read, none past
    byte ``stop`` when given)."""
    loc = storage.resolve(shard.path)
    if not loc.is_remote:
        return loc.open_input()
    if cache is not None and cache.cacheable(shard.bytes, shard.token):
        return cache.open(shard)
    return loc.open_input(readahead=STREAM_READAHEAD, stop=stop)


def _probe_remote(shard: ShardInfo, cache) -> bool:
    """Whether skipping into ``shard`` walks its headers with small ranged reads of its own."""
    if cache is not None and cache.cacheable(shard.bytes, shard.token):
        return False  # the local copy seeks for free
    if not storage.is_remote(shard.path):
        return False
    return shard.samples > 0 and shard.bytes / shard.samples >= SKIP_STREAM_BELOW_BYTES


def _first_offset(f: IO[bytes], start: int) -> tuple[int | None, int]:
    """(offset of the first header of sample ``start`` in the tar ``f``, or None when it has fewer
    samples; samples passed).  Only headers are read: the reader seeks over member data."""
    tar = shard_format.TarReader(f)
    ordinal, key = -1, None
    while True:
        member = tar.next()
        if member is None:
            return None, ordinal + 1
        if not member.isfile:
            continue
        k, _ = split_member_name(member.name)
        if k != key:
            ordinal, key = ordinal + 1, k
            if ordinal == start:
                return member.offset, start


@dataclass
class OpenedSegment:
    """A segment's shard opened and positioned at its first sample (``file``), or why it could not be
    (``failure``, with ``passed`` samples seen): what :func:`open_segment` prepares."""

    segment: Segment
    file: IO[bytes] | None
    failure: str | None = None
    passed: int = 0

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def open_segment(segment: Segment, cache=None) -> OpenedSegment:
    """Open ``segment``'s shard, walk to its first sample and fetch the first range: the part of
    reading that waits on storage (``read_stage`` does it for the next segment while this one is
    read).  A fetch failure raises (:class:`data_sharding.storage.StorageAccessError`); a damaged or
    short tar comes back as ``failure``."""
    span = segment.shard.span(segment.start, segment.stop)
    f = open_shard(segment.shard, cache, stop=span[1] if span else None)
    try:
        if span is not None:
            f.seek(span[0])  # the manifest says where the segment begins: nothing before it is read
        elif segment.start > 0:
            if _probe_remote(segment.shard, cache):
                with storage.resolve(segment.shard.path).open_input(chunk_bytes=SKIP_PROBE_BYTES, readahead=0) as probe:
                    found, passed = _first_offset(probe, segment.start)
            else:  # the same reader: what it fetched on the way is not fetched again
                found, passed = _first_offset(f, segment.start)
            if found is None:
                f.close()
                return OpenedSegment(segment, None, f"shard ends after {passed} samples; the manifest says at least "
                                                    f"{segment.stop}", passed)
            f.seek(found)
        if hasattr(f, "peek"):
            f.peek(1)  # the first range is on its way (remote) or in the buffer (local)
    except storage.StorageAccessError:
        f.close()
        raise
    except (tarfile.TarError, OSError, EOFError) as exc:
        f.close()
        return OpenedSegment(segment, None, f"unreadable shard ({type(exc).__name__}: {exc})")
    return OpenedSegment(segment, f)


def read_segment(segment: Segment, cache=None, opened: OpenedSegment | None = None
                 ) -> Iterator[dict[str, Any] | Skipped]:
    """Yield ``{"__key__", "__shard__", member: bytes, ...}`` for each sample of ``segment``, else :class:`Skipped`.

    ``opened``: the segment already opened by :func:`open_segment` (else it is opened here).
    """
    shard = segment.shard.rel
    accounted = segment.start  # samples before this ordinal are yielded or not ours
    cur: dict[str, Any] | None = None
    opened = opened if opened is not None else open_segment(segment, cache)
    failure = opened.failure
    ordinal = opened.passed - 1 if failure else segment.start - 1
    try:
        if opened.file is not None:
            with opened.file as f:
                tar = shard_format.TarReader(f)
                while True:
                    member = tar.next()
                    if member is None:
                        break
                    if not member.isfile:
                        continue
                    key, suffix = split_member_name(member.name)
                    if cur is None or key != cur["__key__"]:
                        if cur is not None and ordinal >= segment.start:
                            yield cur
                            accounted = ordinal + 1
                        ordinal += 1
                        cur = {"__key__": key, "__shard__": shard}
                        if ordinal >= segment.stop:
                            cur = None
                            break
                    if ordinal < segment.start:
                        continue
                    if suffix in cur:
                        cur["__error__"] = f"duplicate member {member.name}"
                        continue
                    cur[suffix] = tar.read(member)
                if cur is not None and ordinal >= segment.start:
                    yield cur
                    accounted = ordinal + 1
    except storage.StorageAccessError:
        raise  # the object could not be fetched: one line naming its URI, not corrupt samples
    except (tarfile.TarError, OSError, EOFError) as exc:
        failure = f"unreadable shard ({type(exc).__name__}: {exc})"
    finally:
        opened.close()
    if accounted < segment.stop:
        key = cur["__key__"] if cur is not None else "?"
        reason = failure or f"shard ends after {ordinal + 1} samples; the manifest says at least {segment.stop}"
        yield Skipped(shard, key, f"{reason}; {segment.stop - accounted} sample(s) lost", segment.stop - accounted)
