"""Hand-made raw trees in the real PhysioNet layout, for the `dipro prepare` tests.

:class:`RawTree` collects rows (patients, admissions, ICU stays, CXRs with
their scene graphs, chart/output events, gold rows) and :meth:`RawTree.write`
writes them exactly where and how MIMIC-CXR-JPG 2.0.0, MIMIC-IV 2.0 and Chest
ImaGenome 1.0.0 put them (gzipped CSVs with every real column, JPEGs at the real
path pattern, one ``{dicom}_SceneGraph.json`` per image, the gold TSV).
"""
from __future__ import annotations

import csv
import gzip
import io
import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
from PIL import Image

from data_sharding.constants import CXR_ROOT, IMAGENOME_ROOT, MIMICIV_ROOT, REGIONS, REQUIRED_COLUMNS

T0 = datetime(2150, 3, 1, 6, 0, 0)
IMG_W, IMG_H = 64, 80


def at(hours: float) -> datetime:
    return T0 + timedelta(hours=hours)


def fmt(t: datetime | None) -> str:
    return "" if t is None else t.strftime("%Y-%m-%d %H:%M:%S")


def default_boxes() -> dict[str, list[float]]:
    """A plausible full-image box for each region of a 64 x 80 image."""
    out = {}
    for i, r in enumerate(REGIONS):
        x = 2 + (i % 5) * 11
        y = 4 + (i // 5) * 30
        out[r] = [x, y, x + 20, y + 35]
    return out


@dataclass
class Cxr:
    subject_id: int
    study_id: int
    dicom_id: str
    time: datetime
    view: str = "AP"
    image: str = "ok"            # ok | truncated | missing
    scene_graph: str = "ok"      # ok | malformed | missing | no_relationships
    # (prior dicom, bbox name, comparison(s), finding(s)): one relationship each.  A comparison is
    # "worsened" | "improved" | "no change" (a tuple gives several names); a finding is a name
    # ("lung opacity" -> "anatomicalfinding|yes|lung opacity") or a full "category|yes/no|name".
    comparisons: list = field(default_factory=list)
    boxes: dict = field(default_factory=default_boxes)


class RawTree:
    def __init__(self) -> None:
        self.patients: list[dict] = []
        self.admissions: list[dict] = []
        self.stays: list[dict] = []
        self.cxrs: list[Cxr] = []
        self.chart: list[dict] = []
        self.output: list[dict] = []
        self.gold: list[dict] = []
        self._study = 50_000_000

    # ---------------------------------------------------------------- rows
    def patient(self, subject_id: int, age: int = 60, gender: str = "M", anchor_year: int = 2150, dod=None):
        self.patients.append({"subject_id": subject_id, "gender": gender, "anchor_age": age,
                              "anchor_year": anchor_year, "anchor_year_group": "2017 - 2019",
                              "dod": dod.strftime("%Y-%m-%d") if dod else ""})

    def admission(self, subject_id: int, hadm_id: int, admit: datetime, disch: datetime, deathtime=None,
                  race: str = "WHITE", language: str = "ENGLISH", marital: str = "MARRIED"):
        self.admissions.append({
            "subject_id": subject_id, "hadm_id": hadm_id, "admittime": fmt(admit), "dischtime": fmt(disch),
            "deathtime": fmt(deathtime), "admission_type": "EW EMER.", "admission_location": "EMERGENCY ROOM",
            "discharge_location": "HOME", "insurance": "Other", "language": language, "marital_status": marital,
            "race": race, "edregtime": "", "edouttime": "", "hospital_expire_flag": int(deathtime is not None)})

    def stay(self, subject_id: int, hadm_id: int, stay_id: int, intime: datetime, hours: float,
             first: str = "Medical Intensive Care Unit (MICU)", last: str | None = None):
        out = intime + timedelta(hours=hours)
        self.stays.append({"subject_id": subject_id, "hadm_id": hadm_id, "stay_id": stay_id,
                           "first_careunit": first, "last_careunit": last or first,
                           "intime": fmt(intime), "outtime": fmt(out), "los": round(hours / 24, 4)})

    def cxr(self, subject_id: int, time: datetime, dicom_id: str | None = None, study_id: int | None = None,
            **kw) -> Cxr:
        if study_id is None:
            self._study += 1
            study_id = self._study
        c = Cxr(subject_id, study_id, dicom_id or f"d{study_id:x}-{len(self.cxrs):04d}", time, **kw)
        self.cxrs.append(c)
        return c

    def chartevent(self, subject_id, hadm_id, stay_id, itemid, time, value, valuenum=None, uom=""):
        self.chart.append({"subject_id": subject_id, "hadm_id": hadm_id, "stay_id": stay_id, "charttime": fmt(time),
                           "storetime": fmt(time), "itemid": itemid, "value": value,
                           "valuenum": "" if valuenum is None else valuenum, "valueuom": uom, "warning": 0})

    def outputevent(self, subject_id, hadm_id, stay_id, itemid, time, value, uom="ml"):
        self.output.append({"subject_id": subject_id, "hadm_id": hadm_id, "stay_id": stay_id, "charttime": fmt(time),
                            "storetime": fmt(time), "itemid": itemid, "value": value, "valueuom": uom})

    def gold_row(self, subject_id, current, previous, bbox, finding, comparison):
        self.gold.append({"patient_id": subject_id, "current_image_id": current, "previous_image_id": previous,
                          "bbox": bbox, "label_name": finding, "comparison": comparison})

    # ---------------------------------------------------------------- a standard ICU patient
    def icu_patient(self, subject_id: int, cxr_hours=(2.0, 26.0, 50.0), stay_hours: float | None = None, age: int = 60,
                    died: bool = False, events: bool = True, stay_id: int | None = None, chain: bool = True,
                    weight: float | None = None, **cxr_kw) -> list[Cxr]:
        """A patient with one admission, one MICU stay of ``stay_hours`` from T0, AP CXRs at ``cxr_hours``.

        ``stay_hours`` defaults to 100-170 h by subject id, so the cohort's LOS spread keeps
        every such stay well inside the LOS IQR bounds.  ``chain``: each CXR's scene graph
        compares it with the previous one (left lung, lung opacity worsened).  ``weight``: a
        weight (kg) charted at 1.5 h.
        """
        if stay_hours is None:
            stay_hours = 100.0 + 7.0 * (subject_id % 11)
        hadm, stay = subject_id * 10 + 1, stay_id or subject_id * 100 + 1
        self.patient(subject_id, age=age)
        self.admission(subject_id, hadm, at(-5), at(stay_hours + 20), deathtime=at(stay_hours + 10) if died else None)
        self.stay(subject_id, hadm, stay, T0, stay_hours)
        cx = [self.cxr(subject_id, at(h), **cxr_kw) for h in cxr_hours]
        for prev, cur in zip(cx, cx[1:]):
            if chain:
                cur.comparisons.append((prev.dicom_id, "left lung", "worsened", "lung opacity"))
        if weight is not None:
            self.chartevent(subject_id, hadm, stay, 224639, at(1.5), str(weight), weight, "kg")
        if events:
            self.chartevent(subject_id, hadm, stay, 220045, at(0.5), "88", 88, "bpm")
            self.chartevent(subject_id, hadm, stay, 220045, at(3.2), "95", 95, "bpm")
            self.chartevent(subject_id, hadm, stay, 220739, at(1.0), "4 Spontaneously", None, "")
            self.outputevent(subject_id, hadm, stay, 226559, at(2.5), 150 + subject_id % 7)
        return cx

    # ---------------------------------------------------------------- writing
    def write(self, root: Path, gz: bool = True, drop_columns: dict[str, list[str]] | None = None) -> Path:
        """Write the tree under ``root`` in the real layout; ``drop_columns`` removes columns (schema drift)."""
        drop = drop_columns or {}
        cxr_root, iv_root, ig_root = root / CXR_ROOT, root / MIMICIV_ROOT, root / IMAGENOME_ROOT
        meta_rows, chex_rows = [], []
        for c in self.cxrs:
            meta_rows.append({
                "dicom_id": c.dicom_id, "subject_id": c.subject_id, "study_id": c.study_id,
                "PerformedProcedureStepDescription": "CHEST (PORTABLE AP)", "ViewPosition": c.view,
                "Rows": IMG_H, "Columns": IMG_W, "StudyDate": c.time.strftime("%Y%m%d"),
                "StudyTime": f"{int(c.time.strftime('%H%M%S'))}.000",
                "ProcedureCodeSequence_CodeMeaning": "CHEST (PORTABLE AP)",
                "ViewCodeSequence_CodeMeaning": "antero-posterior",
                "PatientOrientationCodeSequence_CodeMeaning": "Erect"})
            chex_rows.append({"subject_id": c.subject_id, "study_id": c.study_id, "Lung Opacity": "1.0"})
            self._write_image(cxr_root, c)
            self._write_scene_graph(ig_root, c)
        ext = ".csv.gz" if gz else ".csv"
        tables = {
            ("mimic-cxr-2.0.0-metadata", cxr_root / f"mimic-cxr-2.0.0-metadata{ext}"): meta_rows,
            ("mimic-cxr-2.0.0-chexpert", cxr_root / f"mimic-cxr-2.0.0-chexpert{ext}"): chex_rows,
            ("patients", iv_root / f"hosp/patients{ext}"): self.patients,
            ("admissions", iv_root / f"hosp/admissions{ext}"): self.admissions,
            ("labevents", iv_root / f"hosp/labevents{ext}"): [],
            ("d_labitems", iv_root / f"hosp/d_labitems{ext}"): [],
            ("icustays", iv_root / f"icu/icustays{ext}"): self.stays,
            ("chartevents", iv_root / f"icu/chartevents{ext}"): self.chart,
            ("outputevents", iv_root / f"icu/outputevents{ext}"): self.output,
            ("d_items", iv_root / f"icu/d_items{ext}"): [],
        }
        for (table, path), rows in tables.items():
            cols = [c for c in REQUIRED_COLUMNS[table] if c not in drop.get(table, [])]
            _write_csv(path, cols, rows)
        gold = ig_root / "gold_dataset" / "gold_object_comparison_with_coordinates.txt"
        cols = [c for c in REQUIRED_COLUMNS["gold_object_comparison"] if c not in drop.get("gold_object_comparison", [])]
        _write_csv(gold, cols, self.gold, delimiter="\t")
        (ig_root / "silver_dataset" / "scene_graph").mkdir(parents=True, exist_ok=True)
        return root

    def _write_image(self, cxr_root: Path, c: Cxr) -> None:
        s = str(c.subject_id)
        p = cxr_root / "files" / f"p{s[:2]}" / f"p{s}" / f"s{c.study_id}" / f"{c.dicom_id}.jpg"
        p.parent.mkdir(parents=True, exist_ok=True)
        if c.image == "missing":
            return
        rng = np.random.default_rng(c.study_id)
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (IMG_H, IMG_W), dtype=np.uint8), mode="L").save(buf, format="JPEG")
        data = buf.getvalue()
        p.write_bytes(data[: len(data) // 2] if c.image == "truncated" else data)

    def _write_scene_graph(self, ig_root: Path, c: Cxr) -> None:
        d = ig_root / "silver_dataset" / "scene_graph"
        d.mkdir(parents=True, exist_ok=True)
        p = d / f"{c.dicom_id}_SceneGraph.json"
        if c.scene_graph == "missing":
            return
        if c.scene_graph == "malformed":
            p.write_text('{"objects": [{"bbox_name": "left lung", ')
            return
        objects = []
        for region, b in c.boxes.items():
            objects.append({"object_id": f"{c.dicom_id}_{region}", "bbox_name": region,
                            "original_x1": b[0], "original_y1": b[1], "original_x2": b[2], "original_y2": b[3],
                            "x1": 0, "y1": 0, "x2": 10, "y2": 10, "width": 10, "height": 10})
        doc = {"image_id": c.dicom_id, "patient_id": c.subject_id, "objects": objects}
        if c.scene_graph != "no_relationships":
            doc["relationships"] = []
            for k, (prior, region, comp, finding) in enumerate(c.comparisons):
                comps = [comp] if isinstance(comp, str) else list(comp)
                finds = [finding] if isinstance(finding, str) else list(finding)
                doc["relationships"].append({
                    "relationship_id": f"{c.dicom_id}_{region}_{prior}_{region}_{k}",
                    "subject_id": f"{c.dicom_id}_{region}", "object_id": f"{prior}_{region}", "bbox_name": region,
                    "relationship_names": [f"comparison|yes|{x}" for x in comps],
                    "attributes": [f if "|" in f else f"anatomicalfinding|yes|{f}" for f in finds]})
        p.write_text(json.dumps(doc))


def _write_csv(path: Path, cols: list[str], rows: list[dict], delimiter: str = ",") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    w = csv.writer(buf, delimiter=delimiter, lineterminator="\n")
    w.writerow(cols)
    for r in rows:
        w.writerow([r.get(c, "") for c in cols])
    data = buf.getvalue().encode()
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(data, mtime=0))
    else:
        path.write_bytes(data)
