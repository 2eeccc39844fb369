"""Readers for the raw files exactly as PhysioNet distributes them.

* :func:`resolve_roots` finds the three dataset roots (one ``--raw`` dir or
  each root given on its own).
* :func:`find_table` accepts ``NAME.csv.gz`` and ``NAME.csv``.
* :func:`read_table` reads a small dimension table (patients, admissions,
  icustays, CXR metadata) after checking its header against
  :data:`data_sharding.constants.REQUIRED_COLUMNS`.
* :func:`stream_events` reads an event table (chartevents, labevents,
  outputevents) block by block with :func:`pyarrow.csv.open_csv`, keeping only
  the wanted itemids and cohort stays of each block, so memory is bounded by the
  block size plus the rows that survive the filter -- never every event.

Every schema problem raises :class:`data_sharding.errors.DataError` naming the file,
the missing column(s) and the columns expected (schema drift between MIMIC-IV
versions is the most common failure users hit).  So does every damaged file
(:func:`read_error`): a truncated or corrupt gzip stream, bytes that are not UTF-8,
a row that does not parse -- one line naming the file and, where it can be found,
the line.
"""
from __future__ import annotations

import csv
import gzip
import io
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, NoReturn

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from data_sharding import defaults, storage
from data_sharding.constants import CXR_ROOT, IMAGENOME_ROOT, MIMICIV_ROOT, REQUIRED_COLUMNS
from data_sharding.errors import DataError

#: Bytes per block of a streamed event table (pyarrow parses one block at a time).
DEFAULT_BLOCK_SIZE = defaults.BLOCK_SIZE

#: Where each table lives, relative to its dataset root, without the extension.
TABLE_PATHS: dict[str, tuple[str, str]] = {
    "mimic-cxr-2.0.0-metadata": ("cxr", "mimic-cxr-2.0.0-metadata"),
    "mimic-cxr-2.0.0-chexpert": ("cxr", "mimic-cxr-2.0.0-chexpert"),
    "patients": ("mimiciv", "hosp/patients"),
    "admissions": ("mimiciv", "hosp/admissions"),
    "labevents": ("mimiciv", "hosp/labevents"),
    "d_labitems": ("mimiciv", "hosp/d_labitems"),
    "icustays": ("mimiciv", "icu/icustays"),
    "chartevents": ("mimiciv", "icu/chartevents"),
    "outputevents": ("mimiciv", "icu/outputevents"),
    "d_items": ("mimiciv", "icu/d_items"),
}


@dataclass(frozen=True)
class RawRoots:
    """The three dataset roots (each the folder holding that dataset's files): local directories or
    bucket prefixes (:class:`data_sharding.storage.Location`)."""

    cxr: storage.Location
    mimiciv: storage.Location
    imagenome: storage.Location

    @property
    def gold_file(self) -> storage.Location:
        return self.imagenome / "gold_dataset" / "gold_object_comparison_with_coordinates.txt"

    def image_path(self, subject_id: int, study_id: int, dicom_id: str) -> storage.Location:
        """MIMIC-CXR-JPG path pattern ``files/p{first 2 digits}/p{subject}/s{study}/{dicom}.jpg``."""
        s = str(int(subject_id))
        return self.cxr / "files" / f"p{s[:2]}" / f"p{s}" / f"s{int(study_id)}" / f"{dicom_id}.jpg"


def resolve_roots(
    raw: str | Path | None = None,
    cxr_root: str | Path | None = None,
    mimiciv_root: str | Path | None = None,
    imagenome_root: str | Path | None = None,
) -> RawRoots:
    """Combine ``--raw DIR`` (the layout ``DIR/mimic-cxr-jpg/2.0.0`` ...) with per-dataset roots.

    A root given explicitly wins over the one derived from ``raw``.  Every root
    must exist; the error names the dataset and the path expected.
    """
    base = storage.resolve(raw) if raw is not None else None
    if base is not None and not base.is_dir():
        raise DataError(f"raw data directory not found: {base}")

    def pick(explicit, rel: str, flag: str, name: str) -> storage.Location:
        if explicit is not None:
            p = storage.resolve(explicit)
        elif base is not None:
            p = base / rel
        else:
            raise DataError(f"no {name} root: pass --raw DIR (expects DIR/{rel}) or {flag} DIR")
        if not p.is_dir():
            raise DataError(f"{name} root not found: {p} (expected the folder holding {name} as PhysioNet ships it)")
        return p

    return RawRoots(
        cxr=pick(cxr_root, CXR_ROOT, "--cxr-root", "MIMIC-CXR-JPG 2.0.0"),
        mimiciv=pick(mimiciv_root, MIMICIV_ROOT, "--mimiciv-root", "MIMIC-IV 2.0"),
        imagenome=pick(imagenome_root, IMAGENOME_ROOT, "--imagenome-root", "Chest ImaGenome 1.0.0"),
    )


def find_table(roots: RawRoots, table: str, required: bool = True) -> storage.Location | None:
    """Path of ``table`` as ``.csv.gz`` (PhysioNet's form) or ``.csv``; DataError when required and absent."""
    root_key, rel = TABLE_PATHS[table]
    root: storage.Location = getattr(roots, root_key)
    for ext in (".csv.gz", ".csv"):
        p = root / f"{rel}{ext}"
        if p.is_file():
            return p
    if required:
        raise DataError(f"required file not found: {root / rel}.csv.gz (or .csv) -- the {table} table")
    return None


def _open_text(path) -> io.TextIOBase:
    return io.TextIOWrapper(_open_binary(path), encoding="utf-8", newline="")


def _open_binary(path):
    """The file's (decompressed) bytes, local or in a bucket (:mod:`data_sharding.storage`)."""
    raw = storage.resolve(path).open_input()
    return gzip.GzipFile(fileobj=raw, mode="rb") if storage.resolve(path).name.endswith(".gz") else raw


def _input_stream(path):
    """A pyarrow input stream over the file's raw bytes (an OS file locally, ranged reads on a bucket)."""
    loc = storage.resolve(path)
    return pa.OSFile(loc.uri, "rb") if not loc.is_remote else pa.PythonFile(loc.open_input(), mode="r")


def find_line(path: Path, predicate: Callable[[bytes], bool]) -> int | None:
    """1-based number of the first (decompressed) line for which ``predicate`` holds, else None.

    Only called on the error path, to point at the damaged line; a read or
    decompression failure during the scan ends it (None).
    """
    try:
        with _open_binary(path) as fh:
            for number, line in enumerate(fh, 1):
                if predicate(line):
                    return number
    except (OSError, EOFError, zlib.error):
        return None
    return None


def _not_utf8(line: bytes) -> bool:
    try:
        line.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


class _RowRecorder:
    """pyarrow ``invalid_row_handler`` that remembers the first bad row and lets pyarrow raise."""

    def __init__(self) -> None:
        self.row = None

    def __call__(self, row) -> str:
        if self.row is None:
            self.row = row
        return "error"


def read_error(path: Path, exc: BaseException, bad_row=None) -> DataError:
    """One line for a file that cannot be read: decompression, encoding or parse failure.

    ``bad_row`` is the :class:`pyarrow.csv.InvalidRow` seen by the parser, if any
    (its line number, else its text, locates the line).
    """
    text = _short(exc)
    if isinstance(exc, UnicodeDecodeError) or "invalid UTF8" in text:
        line = find_line(path, _not_utf8)
        where = f" line {line}" if line else ""
        return DataError(f"{path}{where}: not UTF-8 text ({text}); MIMIC files are UTF-8 -- "
                         "re-download or re-export the file")
    if isinstance(exc, (pa.ArrowInvalid, csv.Error)):
        line = None
        if bad_row is not None:
            line = bad_row.number
            if line is None and bad_row.text:
                want = bad_row.text.encode("utf-8", "replace")
                line = find_line(path, lambda raw: raw.rstrip(b"\r\n") == want)
        where = f" line {line}" if line else ""
        return DataError(f"{path}{where}: cannot parse ({text})")
    if isinstance(exc, OSError) and exc.errno is not None:
        return DataError(f"{path}: cannot read ({exc.strerror or text})")
    if isinstance(exc, (OSError, EOFError, zlib.error)):
        return DataError(f"{path}: cannot decompress ({text}); the file is truncated or corrupt -- download it "
                         "again and compare it with PhysioNet's SHA256SUMS.txt")
    raise exc


def _raise_read_error(path: Path, exc: BaseException, bad_row=None) -> NoReturn:
    raise read_error(path, exc, bad_row) from None


def read_header(path: Path, delimiter: str = ",") -> list[str]:
    """Column names of a CSV / TSV (gzipped or not)."""
    try:
        with _open_text(path) as fh:
            row = next(csv.reader(fh, delimiter=delimiter), None)
    except (OSError, EOFError, zlib.error, UnicodeDecodeError, csv.Error) as exc:
        _raise_read_error(path, exc)
    if not row:
        raise DataError(f"{path}: empty file, expected a header line")
    return [c.strip() for c in row]


def check_columns(path: Path, table: str, header: Iterable[str] | None = None, delimiter: str = ",") -> list[str]:
    """Check that ``path`` has every required column of ``table``; return its header."""
    cols = list(header) if header is not None else read_header(path, delimiter)
    expected = REQUIRED_COLUMNS[table]
    missing = [c for c in expected if c not in cols]
    if missing:
        raise DataError(
            f"{path}: missing required column(s) {', '.join(missing)} "
            f"(expected the {table} columns: {', '.join(expected)})"
        )
    return cols


def _read_options(block_size: int = DEFAULT_BLOCK_SIZE) -> pacsv.ReadOptions:
    return pacsv.ReadOptions(block_size=block_size)


def read_table(
    path: Path,
    table: str,
    columns: Iterable[str],
    int_columns: Iterable[str] = (),
    float_columns: Iterable[str] = (),
    delimiter: str = ",",
) -> pd.DataFrame:
    """Read the given columns of a small table; every other column arrives as text.

    Integer/float columns that hold text fail with a DataError naming the file
    and the column; a damaged file with one naming the file and line (:func:`read_error`).
    """
    check_columns(path, table, delimiter=delimiter)
    columns = list(columns)
    types: dict[str, pa.DataType] = {c: pa.string() for c in columns}
    types.update({c: pa.int64() for c in int_columns})
    types.update({c: pa.float64() for c in float_columns})
    bad = _RowRecorder()
    try:
        loc = storage.resolve(path)
        source = _input_stream(loc)
        if loc.name.endswith(".gz"):
            source = pa.CompressedInputStream(source, "gzip")
        tbl = pacsv.read_csv(
            source,
            read_options=_read_options(),
            parse_options=pacsv.ParseOptions(delimiter=delimiter, invalid_row_handler=bad),
            convert_options=pacsv.ConvertOptions(include_columns=columns, column_types=types,
                                                 strings_can_be_null=True),
        )
    except (pa.ArrowInvalid, OSError, EOFError, zlib.error) as exc:
        _raise_read_error(path, exc, bad.row)
    return tbl.to_pandas()


def stream_events(
    path: Path,
    table: str,
    columns: list[str],
    itemids: Iterable[int],
    keys: Iterable[int],
    key_column: str = "stay_id",
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> Iterator[tuple[pd.DataFrame, int]]:
    """Yield ``(rows of one block whose itemid and key are wanted, bytes read so far)``.

    ``itemid`` and ``key_column`` are parsed as int64; every other column is
    text (values are parsed, and bad ones counted, by the caller).
    """
    check_columns(path, table)
    wanted_items = pa.array(sorted({int(i) for i in itemids}), type=pa.int64())
    wanted_keys = pa.array(sorted({int(k) for k in keys}), type=pa.int64())
    types: dict[str, pa.DataType] = {c: pa.string() for c in columns}
    types.update({"itemid": pa.int64(), key_column: pa.int64()})
    include = list(dict.fromkeys([key_column, "itemid", *columns]))
    raw = _input_stream(path)
    stream = pa.CompressedInputStream(raw, "gzip") if storage.resolve(path).name.endswith(".gz") else raw
    bad = _RowRecorder()
    try:
        reader = pacsv.open_csv(
            stream,
            read_options=_read_options(block_size),
            parse_options=pacsv.ParseOptions(invalid_row_handler=bad),
            convert_options=pacsv.ConvertOptions(include_columns=include, column_types=types,
                                                 strings_can_be_null=True),
        )
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                break
            keep = pc.and_(pc.is_in(batch.column("itemid"), value_set=wanted_items),
                           pc.is_in(batch.column(key_column), value_set=wanted_keys))
            kept = batch.filter(pc.fill_null(keep, False))
            yield kept.to_pandas(), raw.tell()
    except (pa.ArrowInvalid, OSError, EOFError, zlib.error) as exc:
        _raise_read_error(path, exc, bad.row)
    finally:
        stream.close()


def _short(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0][:300]


def check_jpeg(path: Path, full_decode: bool = False) -> tuple[int, int] | str:
    """``(width, height)`` of a readable JPEG, else the reason it is unusable.

    Cheap by default: the header is decoded (size, mode), PIL's ``verify()``
    walks the markers, and the file must end with the JPEG end-of-image marker
    (a truncated transfer loses it).  ``full_decode`` decodes every pixel too.
    """
    from PIL import Image, UnidentifiedImageError

    loc = storage.resolve(path)
    try:
        fh = loc.open_input()
    except storage.NotFound:
        return "missing JPEG"
    problem = None
    try:
        with fh:
            with Image.open(fh) as im:
                if im.format != "JPEG":
                    return "not a JPEG"
                size = im.size
                try:
                    im.verify()
                except (OSError, SyntaxError, ValueError):
                    problem = "unreadable JPEG"
            fh.seek(max(0, fh.seek(0, io.SEEK_END) - 64))
            tail = fh.read().rstrip(b"\x00\r\n ")
            if not tail.endswith(b"\xff\xd9"):
                return "truncated JPEG"
            if problem is None and full_decode:
                fh.seek(0)
                with Image.open(fh) as im:
                    im.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return "unreadable JPEG"
    if problem is not None:
        return problem
    if size[0] <= 0 or size[1] <= 0:
        return "unreadable JPEG"
    return size
