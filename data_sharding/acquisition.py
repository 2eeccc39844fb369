"""``processed/acquisition.parquet``: how each cohort CXR was taken, from the MIMIC-CXR-JPG metadata.

One row per CXR of ``cxr.parquet`` (the films the model sees):

* ``procedure``: ``PerformedProcedureStepDescription``, else ``ProcedureCodeSequence_CodeMeaning``
  (e.g. ``CHEST (PORTABLE AP)``);
* ``orientation``: ``PatientOrientationCodeSequence_CodeMeaning`` (``Erect`` / ``Recumbent``);
* ``detector``: ``ROWSxCOLUMNS`` of the stored image (detector / plate size);

a blank or missing value is ``"unknown"``.  The metadata file is read again here, for these
columns only, so the cohort rules and every other table are exactly what they were without it.
``dipro harmonize`` reads the table to know each film's acquisition setting.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from data_sharding.readers import read_table

TABLE = "mimic-cxr-2.0.0-metadata"
FILE = "acquisition.parquet"
UNKNOWN = "unknown"
FACTORS = ("procedure", "orientation", "detector")
"""The acquisition factors (columns besides ``dicom_id``)."""
TOP_VALUES_IN_REPORT = 20
"""report.json lists the most frequent values of a factor; the rest are summed as ``(other)``."""
_SOURCE = ("dicom_id", "PerformedProcedureStepDescription", "ProcedureCodeSequence_CodeMeaning",
           "PatientOrientationCodeSequence_CodeMeaning", "Rows", "Columns")
SCHEMA = pa.schema([("dicom_id", pa.string())] + [(f, pa.string()) for f in FACTORS])


def _text(s: pd.Series) -> pd.Series:
    t = s.astype("string").str.strip()
    return t.where(t.notna() & (t != ""))


def _shape(rows: pd.Series, cols: pd.Series) -> pd.Series:
    r = pd.to_numeric(rows, errors="coerce")
    c = pd.to_numeric(cols, errors="coerce")
    ok = r.notna() & c.notna() & (r > 0) & (c > 0)
    text = r.where(ok, 0).astype("int64").astype(str) + "x" + c.where(ok, 0).astype("int64").astype(str)
    return text.where(ok)


def acquisition_table(metadata: pd.DataFrame, dicom_ids: pd.Series) -> pd.DataFrame:
    """The acquisition rows of ``dicom_ids`` (in that order) from metadata rows with the ``_SOURCE`` columns."""
    md = metadata.drop_duplicates("dicom_id", keep="last").set_index("dicom_id")
    md = md.reindex(pd.Index(dicom_ids.astype(str), name="dicom_id"))
    procedure = _text(md["PerformedProcedureStepDescription"]).fillna(_text(md["ProcedureCodeSequence_CodeMeaning"]))
    out = pd.DataFrame({
        "dicom_id": md.index.to_numpy(),
        "procedure": procedure.to_numpy(),
        "orientation": _text(md["PatientOrientationCodeSequence_CodeMeaning"]).to_numpy(),
        "detector": _shape(md["Rows"], md["Columns"]).to_numpy(),
    })
    for f in FACTORS:
        out[f] = out[f].astype(object).where(out[f].notna(), UNKNOWN).astype(str)
    return out


def read_acquisition(metadata_path: Path, dicom_ids: pd.Series) -> pd.DataFrame:
    """Read the metadata's acquisition columns and build the table for ``dicom_ids``."""
    return acquisition_table(read_table(metadata_path, TABLE, _SOURCE), dicom_ids)


def acquisition_counts(table: pd.DataFrame) -> dict:
    """report.json's ``acquisition``: images, and per factor the count of each value (most frequent first)."""
    out: dict = {"images": len(table)}
    for f in FACTORS:
        vc = table[f].value_counts(sort=True)
        top = {str(k): int(v) for k, v in vc.iloc[:TOP_VALUES_IN_REPORT].items()}
        rest = int(vc.iloc[TOP_VALUES_IN_REPORT:].sum())
        if rest:
            top["(other)"] = rest
        out[f] = top
    return out


def write_acquisition(table: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pandas(table[[f.name for f in SCHEMA]], schema=SCHEMA, preserve_index=False), path)


def load_acquisition(processed: str | Path) -> pd.DataFrame:
    """``processed/acquisition.parquet`` as a DataFrame (a one-line error when it is missing)."""
    from data_sharding.errors import UserError

    path = Path(processed) / FILE
    if not path.is_file():
        raise UserError(f"{path} does not exist: run `dipro prepare` again (it writes {FILE} since the "
                        "acquisition metadata was added)")
    return pq.read_table(path).to_pandas()
