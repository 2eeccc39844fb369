"""A directory published in one step, on a local disk or in a bucket (``dipro prepare --out``).

    with publish_dir(out, expect_token=published_token(out)) as tmp:   # a local temp directory
        write files into tmp ...
    root = published_root(out)                                          # where readers find them

Locally this is :func:`data_sharding.atomic.atomic_dir` (a temp directory renamed onto ``out``).
On a bucket there is no rename: the files are uploaded under a new generation prefix
(``OUT/{generation}/...``) that nothing refers to yet, and the directory is published by one
conditional write of ``OUT/_published.json`` naming that generation (and every file's size and
sha256).  Readers resolve :func:`published_root` once and read only that generation, so a reader
never mixes files of two writes; superseded generations are left for ``dipro shards gc``.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from data_sharding import atomic, storage
from data_sharding.errors import UserError

POINTER = "_published.json"
"""The commit record of a directory published on a bucket."""


def published_root(out):
    """Where the committed contents of ``out`` are: ``out`` itself locally (or for a bucket prefix written
    without :func:`publish_dir`), else the generation that ``out/_published.json`` names."""
    out = storage.resolve(out)
    if not out.is_remote:
        return out
    try:
        pointer = json.loads((out / POINTER).read_text())
    except storage.NotFound:
        return out
    except ValueError:
        raise UserError(f"{out / POINTER}: not valid JSON; the directory's commit record is damaged") from None
    return out / pointer["generation"]


def published_token(out) -> str | None:
    """The version token of ``out``'s commit record (None: nothing published there yet)."""
    try:
        return (storage.resolve(out) / POINTER).stat().token
    except storage.NotFound:
        return None


@contextlib.contextmanager
def publish_dir(out, *, unchanged: str = "", expect_token: str | None = None) -> Iterator[Path]:
    """Yield a local temp directory; when the block succeeds it becomes ``out`` (see the module docstring).

    On a bucket, ``expect_token`` is the commit record's version the caller saw before it started
    (:func:`published_token`; None: nothing there): a directory committed by someone else in between
    makes this one fail with one line, and the uploaded generation is removed again.
    """
    out = storage.resolve(out)
    if not out.is_remote:
        with atomic.atomic_dir(out.local, unchanged=unchanged) as tmp:
            yield tmp
        return
    generation = storage.new_generation()
    target = out / generation
    tmp = Path(tempfile.mkdtemp(prefix=".dipro-publish-"))
    try:
        yield tmp
        files = {}
        for p in sorted(tmp.rglob("*")):
            if p.is_file():
                rel = p.relative_to(tmp).as_posix()
                files[rel] = {"bytes": p.stat().st_size, "sha256": storage.sha256_file(p)}
        target.upload_dir(tmp)
        record = json.dumps({"generation": generation, "files": files}, indent=1, sort_keys=True).encode()
        try:
            if expect_token is None:
                (out / POINTER).put(record, if_absent=True)
            else:
                (out / POINTER).put(record, if_match=expect_token)
        except storage.PreconditionFailed:
            keep = unchanged or "the published contents are the other writer's"
            raise UserError(f"{out} was published by another writer while this one ran; {keep}. "
                            "Run again") from None
    except BaseException:
        with contextlib.suppress(Exception):
            target.remove_tree()
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

