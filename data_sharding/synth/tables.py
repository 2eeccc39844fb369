"""MIMIC-IV core tables (patients, admissions, icustays) and MIMIC-CXR-JPG metadata / CheXpert.

Columns and their order are ``constants.REQUIRED_COLUMNS``; value formats follow
the real files: timestamps ``YYYY-MM-DD HH:MM:SS``, ``patients.dod`` a date,
``StudyDate`` an int ``YYYYMMDD``, ``StudyTime`` a float ``HHMMSS.fff`` (leading
zeros lost, as in the real CSV), CheXpert values 1.0 / 0.0 / -1.0 / blank.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from data_sharding.constants import CHEXPERT_FINDINGS, REQUIRED_COLUMNS
from data_sharding.synth.anatomy import DISEASE_LOCI
from data_sharding.synth.cohort import Cohort, Film


def stamp(seconds: int | None) -> str:
    """int seconds -> 'YYYY-MM-DD HH:MM:SS' ('' for None)."""
    if seconds is None:
        return ""
    return str(np.datetime64(int(seconds), "s")).replace("T", " ")


def date(seconds: int | None) -> str:
    return "" if seconds is None else stamp(seconds)[:10]


def patients(c: Cohort) -> pd.DataFrame:
    rows = [{
        "subject_id": s.subject_id, "gender": s.gender, "anchor_age": s.anchor_age,
        "anchor_year": s.anchor_year, "anchor_year_group": s.anchor_year_group, "dod": date(s.dod),
    } for s in c.subjects]
    return pd.DataFrame(rows)[list(REQUIRED_COLUMNS["patients"])]


def admissions(c: Cohort) -> pd.DataFrame:
    rows = []
    for a in c.admissions:
        s = c.subjects[a.subject_index]
        rows.append({
            "subject_id": s.subject_id, "hadm_id": a.hadm_id, "admittime": stamp(a.admittime),
            "dischtime": stamp(a.dischtime), "deathtime": stamp(a.deathtime),
            "admission_type": a.admission_type, "admission_location": a.admission_location,
            "discharge_location": a.discharge_location, "insurance": s.insurance, "language": s.language,
            "marital_status": s.marital_status, "race": s.race, "edregtime": stamp(a.edregtime),
            "edouttime": stamp(a.edouttime), "hospital_expire_flag": a.hospital_expire_flag,
        })
    df = pd.DataFrame(rows).sort_values(["subject_id", "admittime"], kind="stable")
    return df[list(REQUIRED_COLUMNS["admissions"])].reset_index(drop=True)


def icustays(c: Cohort) -> pd.DataFrame:
    rows = [{
        "subject_id": c.subjects[st.subject_index].subject_id,
        "hadm_id": c.admissions[st.admission_index].hadm_id,
        "stay_id": st.stay_id, "first_careunit": st.first_careunit, "last_careunit": st.last_careunit,
        "intime": stamp(st.intime), "outtime": stamp(st.outtime), "los": st.los_days,
    } for st in c.stays]
    df = pd.DataFrame(rows).sort_values(["subject_id", "intime"], kind="stable")
    return df[list(REQUIRED_COLUMNS["icustays"])].reset_index(drop=True)


def study_date_time(film: Film) -> tuple[int, str]:
    """(StudyDate int YYYYMMDD, StudyTime as the real CSV writes the float HHMMSS.fff)."""
    s = stamp(film.time)
    d = int(s[:10].replace("-", ""))
    hhmmss = int(s[11:13]) * 10000 + int(s[14:16]) * 100 + int(s[17:19])
    t = f"{hhmmss}.{film.millis:03d}".rstrip("0")
    return d, (t + "0" if t.endswith(".") else t)


_VIEW_CODE = {"AP": "antero-posterior", "PA": "postero-anterior", "LATERAL": "lateral"}


def _orientation(f: Film, settings: dict[int, str] | None) -> str:
    """PatientOrientationCodeSequence_CodeMeaning: the planted setting when there is one
    (:mod:`.acquisition`), else erect for PA/lateral and recumbent or blank for AP films."""
    if settings is not None:
        return settings[f.index]
    return "Erect" if f.view != "AP" else ("Recumbent" if f.index % 3 else "")


def cxr_metadata(c: Cohort, settings: dict[int, str] | None = None) -> pd.DataFrame:
    pa_studies = {f.study_id for f in c.films if f.view == "PA"}
    rows = []
    for f in c.films:
        d, t = study_date_time(f)
        procedure = "CHEST (PA AND LAT)" if f.study_id in pa_studies else "CHEST (PORTABLE AP)"
        rows.append({
            "dicom_id": f.dicom_id, "subject_id": c.subjects[f.subject_index].subject_id, "study_id": f.study_id,
            "PerformedProcedureStepDescription": procedure, "ViewPosition": f.view,
            "Rows": f.height, "Columns": f.width, "StudyDate": d, "StudyTime": t,
            "ProcedureCodeSequence_CodeMeaning": procedure, "ViewCodeSequence_CodeMeaning": _VIEW_CODE[f.view],
            "PatientOrientationCodeSequence_CodeMeaning": _orientation(f, settings),
            "_t": f.time * 1000 + f.millis,
        })
    df = pd.DataFrame(rows).sort_values(["subject_id", "study_id", "_t"], kind="stable")
    return df[list(REQUIRED_COLUMNS["mimic-cxr-2.0.0-metadata"])].reset_index(drop=True)


# CheXpert finding -> diseases whose maximum locus severity decides it
_CHEXPERT_FROM = {
    "Atelectasis": ("atelectasis",),
    "Cardiomegaly": ("enlarged cardiac silhouette",),
    "Consolidation": ("consolidation",),
    "Edema": ("pulmonary edema",),
    "Enlarged Cardiomediastinum": ("enlarged cardiac silhouette",),
    "Lung Opacity": ("lung opacity", "consolidation", "pneumonia"),
    "Pleural Effusion": ("pleural effusion",),
    "Pneumonia": ("pneumonia",),
}


def chexpert(c: Cohort) -> pd.DataFrame:
    """One row per study: labels from the study's (kept) film severities, like a report labeller."""
    rng = np.random.default_rng(np.random.SeedSequence([c.seed, 6]))
    by_study: dict[int, Film] = {}
    for f in c.films:
        if f.kind in ("kept", "pa"):
            by_study[f.study_id] = f
    rows = []
    for study_id, f in sorted(by_study.items(), key=lambda kv: (c.films[kv[1].index].subject_index, kv[0])):
        sev = c.film_severity(f)
        row: dict[str, object] = {"subject_id": c.subjects[f.subject_index].subject_id, "study_id": study_id}
        any_pos = False
        for finding in CHEXPERT_FINDINGS:
            diseases = _CHEXPERT_FROM.get(finding)
            val = np.nan
            if diseases:
                x = max(float(sev[list(DISEASE_LOCI[d])].max()) for d in diseases)
                if finding == "Enlarged Cardiomediastinum":
                    x -= 0.2
                if x >= 0.5:
                    val, any_pos = 1.0, True
                elif x >= 0.3:
                    val = -1.0
                elif x == 0.0 and rng.random() < 0.4:
                    val = 0.0
            elif finding == "Support Devices" and f.stay_index is not None and c.stays[f.stay_index].ventilated:
                val = 1.0
            row[finding] = val
        if not any_pos:
            row["No Finding"] = 1.0
        rows.append(row)
    df = pd.DataFrame(rows)
    df = df.sort_values(["subject_id", "study_id"], kind="stable")
    return df[list(REQUIRED_COLUMNS["mimic-cxr-2.0.0-chexpert"])].reset_index(drop=True)
