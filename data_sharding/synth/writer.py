"""Byte-deterministic file writers and the atomic output directory.

* gzip CSV: pandas CSV text, gzip with ``mtime=0`` and an empty embedded file
  name (the temp path must not leak into the bytes).
* JPEG: Pillow, fixed quality, no optimisation passes that depend on anything but pixels.
* JSON: fixed indentation, insertion-ordered keys, trailing newline.
* :func:`atomic_directory`: everything is written under a sibling temp directory
  that is renamed onto the target only when the whole generation succeeded
  (:func:`data_sharding.atomic.atomic_dir`).
"""
from __future__ import annotations

import contextlib
import gzip
import io
import json
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
from PIL import Image

from data_sharding import atomic
from data_sharding.errors import UserError

JPEG_QUALITY = 92


def csv_bytes(df: pd.DataFrame) -> bytes:
    """CSV as PhysioNet exports it: header, no index, unquoted fields, NULL = empty.

    pyarrow's writer (fast, shortest float repr: ``62`` not ``62.0``); a table with a
    field that needs quoting falls back to pandas' minimal quoting.
    """
    import pyarrow as pa
    import pyarrow.csv as pacsv

    buf = io.BytesIO()
    buf.write((",".join(df.columns) + "\n").encode("utf-8"))
    try:
        table = pa.Table.from_pandas(df, preserve_index=False)
        pacsv.write_csv(table, buf, pacsv.WriteOptions(include_header=False, quoting_style="none"))
    except pa.ArrowInvalid:
        return df.to_csv(index=False, lineterminator="\n").encode("utf-8")
    return buf.getvalue()


def write_csv_gz(path: Path, df: pd.DataFrame) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = csv_bytes(df)
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) as gz:
        gz.write(data)


def write_tsv(path: Path, df: pd.DataFrame) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(df.to_csv(index=False, sep="\t", lineterminator="\n").encode("utf-8"))


def write_json(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes((json.dumps(obj, indent=4, ensure_ascii=False) + "\n").encode("utf-8"))


def encode_jpeg(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _is_nonempty_dir(p: Path) -> bool:
    return p.is_dir() and any(p.iterdir())


@contextlib.contextmanager
def atomic_directory(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temp directory beside ``out``; on success it replaces ``out``.

    An existing non-empty ``out`` is refused unless ``overwrite``; the rest is
    :func:`data_sharding.atomic.atomic_dir` (the old tree is moved aside, the new one
    renamed in, the old one deleted; on any error the temp directory is removed and
    ``out`` is left untouched).
    """
    out = Path(out).resolve()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    if _is_nonempty_dir(out) and not overwrite:
        raise UserError(f"--out {out} exists and is not empty; pass --overwrite to replace it")
    with atomic.atomic_dir(out) as tmp:
        yield tmp
