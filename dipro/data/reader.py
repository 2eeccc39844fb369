"""Read the samples of a shard segment from its tar, accounting for every one of them.

A WebDataset tar holds each sample's members consecutively under one key
(``{key}.{member}``; the first dot ends the key).  :func:`read_segment` yields
the raw members of samples ``[start, stop)`` of one shard.  The tar is opened
seekable, so the samples before ``start`` are skipped without reading their
bytes (ranks and loader workers start mid-shard).  A shard that is truncated,
has a damaged header or holds fewer samples than the manifest says does not
stop the stream: the samples it cannot deliver come out as one
:class:`Skipped` record carrying their count, the shard and the key where
reading broke, so they are counted like any other corrupt sample.
"""
from __future__ import annotations

import tarfile
from dataclasses import dataclass
from typing import Any, Iterator

from data_sharding import shard_format
from dipro.data.plan import Segment


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


def read_segment(segment: Segment) -> Iterator[dict[str, Any] | Skipped]:
    """Yield ``{"__key__", "__shard__", member: bytes, ...}`` for each sample of ``segment``, else :class:`Skipped`."""
    shard = segment.shard.rel
    accounted = segment.start  # samples before this ordinal are yielded or not ours
    ordinal = -1
    cur: dict[str, Any] | None = None
    failure = None
    try:
        with tarfile.open(segment.shard.path, mode="r:") as tar:
            while True:
                member = tar.next()
                if member is None:
                    break
                if not member.isfile():
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
                handle = tar.extractfile(member)
                cur[suffix] = handle.read() if handle is not None else b""
            if cur is not None and ordinal >= segment.start:
                yield cur
                accounted = ordinal + 1
    except (tarfile.TarError, OSError, EOFError) as exc:
        failure = f"unreadable shard ({type(exc).__name__}: {exc})"
    if accounted < segment.stop:
        key = cur["__key__"] if cur is not None else "?"
        reason = failure or f"shard ends after {ordinal + 1} samples; the manifest says at least {segment.stop}"
        yield Skipped(shard, key, f"{reason}; {segment.stop - accounted} sample(s) lost", segment.stop - accounted)
