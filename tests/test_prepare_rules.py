"""`dipro prepare` on a hand-made raw tree where each subject exercises one rule or edge case."""
from __future__ import annotations

import json
from datetime import timedelta

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from data_sharding.constants import (
    BOX_COLUMNS,
    DEMOGRAPHIC_COLUMNS,
    DISEASE_SLUGS,
    EHR_MASK_COLUMNS,
    EHR_VALUE_COLUMNS,
    EHR_VARIABLES,
    REGIONS,
)
from data_sharding.prepare import PrepareOptions, prepare
from data_sharding.readers import resolve_roots

try:
    from tests.prepare_raw import T0, RawTree, at
except ImportError:  # tests/ is not a package: pytest puts it on sys.path
    from prepare_raw import T0, RawTree, at

HR = EHR_VALUE_COLUMNS.index("heart_rate")
# Subject ids (two leading digits form the p.. folder, like real MIMIC ids).
GOOD, CHILD, TWO_STAYS, TRANSFER, SHORT, VIEWS, GAP8, GAP96 = 10000001, 10000002, 10000003, 10000004, 10000005, \
    10000006, 10000007, 10000008
ONE_CXR, MANY_CXR, BAD_JPEG, BAD_SG, NO_EVENTS, GOLD, NO_REL, DEAD = 10000009, 10000010, 10000011, 10000012, \
    10000013, 10000014, 10000015, 10000016
FILLERS = list(range(11000001, 11000013))


def build_tree() -> tuple[RawTree, dict]:
    t = RawTree()
    ids: dict = {}
    ids["good"] = t.icu_patient(GOOD)
    t.icu_patient(CHILD, age=17)
    # Two ICU stays in one admission -> both dropped.
    t.patient(TWO_STAYS)
    t.admission(TWO_STAYS, 300, at(-5), at(300))
    t.stay(TWO_STAYS, 300, 30001, T0, 60)
    t.stay(TWO_STAYS, 300, 30002, at(100), 60)
    for h in (2, 26, 102, 130):
        t.cxr(TWO_STAYS, at(h))
    # Careunit transfer.
    t.patient(TRANSFER)
    t.admission(TRANSFER, 400, at(-5), at(300))
    t.stay(TRANSFER, 400, 40001, T0, 100, first="Medical Intensive Care Unit (MICU)", last="Coronary Care Unit (CCU)")
    t.cxr(TRANSFER, at(2)), t.cxr(TRANSFER, at(30))
    # Exactly 48 h: not > 48 h.
    t.icu_patient(SHORT, cxr_hours=(2, 30), stay_hours=48.0)
    # Views: PA and LATERAL dropped; a study with two AP images keeps the last; a CXR before intime is outside.
    cx = t.icu_patient(VIEWS, cxr_hours=(4, 30))
    t.cxr(VIEWS, at(12), view="PA")
    t.cxr(VIEWS, at(12), view="LATERAL")
    t.cxr(VIEWS, at(-3))
    t.cxr(VIEWS, at(4) - timedelta(minutes=10), study_id=cx[0].study_id, dicom_id="early-image-of-study")
    ids["views_first"] = cx[0].dicom_id
    # Exactly 8 h after the previous kept CXR is kept; 7.5 h after is dropped.
    ids["gap8"] = t.icu_patient(GAP8, cxr_hours=(2, 10, 17.5, 30))
    # A gap of exactly 96 h between consecutive CXRs drops the stay.
    t.icu_patient(GAP96, cxr_hours=(2, 98), stay_hours=150)
    t.icu_patient(ONE_CXR, cxr_hours=(5,))
    t.icu_patient(MANY_CXR, cxr_hours=tuple(2 + 8 * i for i in range(15)), stay_hours=130)
    # Truncated and missing JPEG: those CXRs are skipped, the stay keeps its other CXRs.
    cx = t.icu_patient(BAD_JPEG, cxr_hours=(2, 14, 26, 40))
    cx[1].image, cx[2].image = "truncated", "missing"
    ids["bad_jpeg"] = cx
    # Malformed scene graph + an impossible box in another image.
    cx = t.icu_patient(BAD_SG, cxr_hours=(2, 14, 26))
    cx[1].scene_graph = "malformed"
    cx[0].boxes = dict(cx[0].boxes, **{"left lung": [30, 5, 10, 40], "mediastinum": [500, 500, 600, 600]})
    ids["bad_sg"] = cx
    # A stay with no events at all.
    t.icu_patient(NO_EVENTS, events=False)
    # Gold contradicts silver for the first pair.
    cx = t.icu_patient(GOLD)
    t.gold_row(GOLD, cx[1].dicom_id + ".dcm", cx[0].dicom_id + ".dcm", "left lung", "lung opacity", "improved")
    t.gold_row(GOLD, cx[1].dicom_id + ".dcm", cx[0].dicom_id + ".dcm", "right lung", "pulmonary edema/hazy opacity",
               "improved")
    ids["gold"] = cx
    # A scene graph without relationships: that pair is "not mentioned" everywhere.
    cx = t.icu_patient(NO_REL)
    cx[1].scene_graph = "no_relationships"
    ids["no_rel"] = cx
    t.icu_patient(DEAD, died=True)
    for s in FILLERS:
        t.icu_patient(s, cxr_hours=(1, 20, 44, 70))
    # EHR edge cases on GOOD's stay: NaN / unparseable value, F temperature, out-of-range clamp, outside the stay.
    hadm, stay = GOOD * 10 + 1, GOOD * 100 + 1
    t.chartevent(GOOD, hadm, stay, 220045, at(5.1), "nan", "NaN", "bpm")
    t.chartevent(GOOD, hadm, stay, 220045, at(5.2), "abc", None, "bpm")
    t.chartevent(GOOD, hadm, stay, 223761, at(6.5), "98.6", 98.6, "°F")
    t.chartevent(GOOD, hadm, stay, 220045, at(7.5), "900", 900, "bpm")
    t.chartevent(GOOD, hadm, stay, 220045, at(-2), "70", 70, "bpm")
    t.chartevent(GOOD, hadm, stay, 223900, at(8.2), "No Response-ETT", None, "")
    # Two values in one hour: the last one (by time) is kept.
    t.chartevent(GOOD, hadm, stay, 220210, at(9.7), "30", 30, "insp/min")
    t.chartevent(GOOD, hadm, stay, 220210, at(9.1), "20", 20, "insp/min")
    return t, ids


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    tree, ids = build_tree()
    tree.write(root)
    out = tmp_path_factory.mktemp("proc") / "processed"
    res = prepare(resolve_roots(root), out, PrepareOptions(progress=False, block_size=1 << 12))
    return res, out, ids


def nested(x) -> np.ndarray:
    """Parquet nested lists (object arrays of arrays) -> one dense ndarray."""
    if isinstance(x, (list, np.ndarray)) and len(x) and not np.isscalar(x[0]):
        return np.array([nested(e) for e in x])
    return np.asarray(x)


def _rule(report, name):
    return next(r for r in report["rules"] if r["rule"] == name)


def _read(out, name):
    return pq.read_table(out / name).to_pandas()


def test_stay_rules_counts(prepared):
    res, out, _ = prepared
    rep = json.loads((out / "report.json").read_text())
    assert _rule(rep, "adult")["reasons"] == {"anchor_age < 18": 1}
    assert _rule(rep, "one_icu_stay_per_admission")["reasons"] == {"admission has several ICU stays": 2}
    assert _rule(rep, "same_careunit")["reasons"] == {"first_careunit != last_careunit": 1}
    assert _rule(rep, "stay_longer_than_48h")["reasons"] == {"stay <= 48 h": 1}
    cohort = _read(out, "cohort.parquet")
    for s in (CHILD, TWO_STAYS, TRANSFER, SHORT):
        assert s not in set(cohort.subject_id)
    for r in rep["rules"]:
        assert r["dropped"] == sum(r["reasons"].values())


def test_cxr_rules(prepared):
    res, out, ids = prepared
    rep = res.report
    assert _rule(rep, "ap_view")["reasons"] == {"view PA": 1, "view LATERAL": 1}
    assert _rule(rep, "last_image_of_study")["dropped"] == 1
    cxr = _read(out, "cxr.parquet")
    assert "early-image-of-study" not in set(cxr.dicom_id)
    assert ids["views_first"] in set(cxr.dicom_id)
    v = cxr[cxr.subject_id == VIEWS]
    assert len(v) == 2 and (v.hours >= 0).all()  # the CXR before intime is outside the stay
    assert _rule(rep, "inside_icu_stay")["reasons"]["outside [intime, outtime]"] >= 1
    # 8 h exactly kept, 7.5 h dropped.
    g = cxr[cxr.subject_id == GAP8].sort_values("hours")
    assert g.hours.round(3).tolist() == [2.0, 10.0, 30.0]
    assert _rule(rep, "min_gap_8h")["dropped"] >= 1


def test_stay_cxr_rules(prepared):
    res, out, _ = prepared
    cohort = _read(out, "cohort.parquet")
    rep = res.report
    assert GAP96 not in set(cohort.subject_id)
    assert _rule(rep, "max_gap_96h")["dropped"] == 1
    assert ONE_CXR not in set(cohort.subject_id) and MANY_CXR not in set(cohort.subject_id)
    assert _rule(rep, "cxr_count_2_to_14")["reasons"] == {"fewer than 2 CXRs": 1, "more than 14 CXRs": 1}


def test_truncated_and_missing_jpeg_skipped_and_counted(prepared):
    res, out, ids = prepared
    assert _rule(res.report, "readable_jpeg")["reasons"] == {"truncated JPEG": 1, "missing JPEG": 1}
    assert res.report["skipped"]["CXR with truncated JPEG"] == 1
    cxr = _read(out, "cxr.parquet")
    kept = set(cxr[cxr.subject_id == BAD_JPEG].dicom_id)
    assert kept == {ids["bad_jpeg"][0].dicom_id, ids["bad_jpeg"][3].dicom_id}
    assert (cxr.width == 64).all() and (cxr.height == 80).all()


def test_scene_graph_and_boxes(prepared):
    res, out, ids = prepared
    assert _rule(res.report, "scene_graph")["reasons"] == {"malformed scene graph": 1}
    assert res.report["skipped"]["impossible box"] == 2
    cxr = _read(out, "cxr.parquet").set_index("dicom_id")
    row = cxr.loc[ids["bad_sg"][0].dicom_id]
    assert row["box_left_lung"] is None and row["box_mediastinum"] is None
    assert list(row["box_right_lung"]) == [13.0, 4.0, 33.0, 39.0]
    assert ids["bad_sg"][1].dicom_id not in cxr.index
    for c in BOX_COLUMNS:
        assert c in cxr.columns
    assert cxr.image_path.map(lambda p: p.startswith("/")).all()


def test_progression_labels_silver_gold_and_no_relationships(prepared):
    res, out, ids = prepared
    prog = _read(out, "tasks/disease_progression.parquet")
    good = prog[prog.subject_id == GOOD].sort_values("cxr1_hours")
    assert len(good) == 2 and (good.label_source == "silver").all()
    first = good.iloc[0]
    assert first.cxr1_dicom_id == ids["good"][0].dicom_id and first.cxr2_dicom_id == ids["good"][1].dicom_id
    region = nested(first.region_labels)
    assert region.shape == (10, 7)
    assert region[REGIONS.index("left lung"), 4] == 0 and (np.delete(region.ravel(), 4) == 3).all()
    assert first["lung_opacity"] == 0 and all(first[d] == 3 for d in DISEASE_SLUGS if d != "lung_opacity")
    # Gold overrides silver for that pair (whole pair), with the ImaGenome edema name mapped.
    gold = prog[prog.subject_id == GOLD].sort_values("cxr1_hours")
    g0 = gold.iloc[0]
    assert g0.label_source == "gold" and gold.iloc[1].label_source == "silver"
    r = nested(g0.region_labels)
    # silver says left lung opacity worsened (0); gold says improved (1): gold wins.
    assert r[REGIONS.index("left lung"), 4] == 1 and r[REGIONS.index("right lung"), 3] == 1
    assert g0["pulmonary_edema"] == 1 and g0["lung_opacity"] == 1
    assert (np.delete(r.ravel(), [REGIONS.index("left lung") * 7 + 4, REGIONS.index("right lung") * 7 + 3]) == 3).all()
    # Scene graph without relationships -> not mentioned everywhere for the pair it closes.
    nr = prog[prog.subject_id == NO_REL].sort_values("cxr1_hours").iloc[0]
    assert (nested(nr.region_labels) == 3).all()


def test_gold_subject_in_test_and_splits_disjoint(prepared):
    _, out, _ = prepared
    cohort = _read(out, "cohort.parquet")
    assert cohort.set_index("subject_id").loc[GOLD, "split"] == "test"
    assert (cohort.groupby("subject_id").split.nunique() == 1).all()
    assert set(cohort.split) == {"train", "val", "test"}
    for task in ("disease_progression", "mortality_los"):
        t = _read(out, f"tasks/{task}.parquet")
        merged = t.merge(cohort[["stay_id", "split"]], on="stay_id", suffixes=("", "_c"))
        assert (merged.split == merged.split_c).all()


def test_mortality_los_task(prepared):
    _, out, ids = prepared
    ml = _read(out, "tasks/mortality_los.parquet").set_index("subject_id")
    cohort = _read(out, "cohort.parquet").set_index("subject_id")
    assert ml.loc[DEAD, "mortality"] == 1 and ml.loc[GOOD, "mortality"] == 0
    assert cohort.loc[GOOD, "los_days"] == pytest.approx(5.0) and cohort.loc[GOOD, "los_bin"] == 2
    assert list(ml.loc[GOOD, "cxr_hours"]) == pytest.approx([2.0, 26.0])  # the 50 h CXR is after the first 48 h
    assert nested(ml.loc[GOOD, "region_labels"]).shape == (1, 10, 7)
    assert len(ml.loc[FILLERS[0], "dicom_ids"]) == 3


def test_ehr_cleaning_and_layout(prepared):
    res, out, _ = prepared
    ehr = pd.concat([pq.read_table(p).to_pandas() for p in sorted((out / "ehr").glob("part-*.parquet"))])
    assert list(ehr.columns) == ["stay_id", "hour", *EHR_VALUE_COLUMNS, *EHR_MASK_COLUMNS]
    assert (ehr.sort_values(["stay_id", "hour"]).index == ehr.index).all() or ehr.stay_id.is_monotonic_increasing
    stats = json.loads((out / "ehr_stats.json").read_text())
    cohort = _read(out, "cohort.parquet")
    for sid, g in ehr.groupby("stay_id"):
        assert g.hour.tolist() == list(range(len(g)))
    good = ehr[ehr.stay_id == GOOD * 100 + 1].set_index("hour")
    assert len(good) == 121  # 120 h stay -> hours 0..120

    def raw(col, hour):
        return good.loc[hour, col] * stats["std"][col] + stats["mean"][col]

    assert good.loc[0, "mask_heart_rate"] == 1 and raw("heart_rate", 0) == pytest.approx(88, abs=1e-3)
    assert good.loc[5, "mask_heart_rate"] == 0  # the NaN and "abc" events were skipped
    assert raw("heart_rate", 5) == pytest.approx(95, abs=1e-3)  # forward filled
    assert raw("heart_rate", 7) == pytest.approx(390, abs=1e-3)  # 900 clamped to the high bound
    assert raw("temperature", 6) == pytest.approx(37.0, abs=1e-3)  # 98.6 F -> 37 C
    assert raw("glascow_coma_scale_eye_opening", 1) == pytest.approx(4, abs=1e-3)
    assert raw("glascow_coma_scale_verbal_response", 8) == pytest.approx(1, abs=1e-3)
    assert raw("respiratory_rate", 9) == pytest.approx(30, abs=1e-3)  # last value in the hour
    assert raw("ph", 3) == pytest.approx(7.4, abs=1e-3)  # never measured -> normal value
    sk = res.report["skipped"]
    assert sk["event with NaN/unparseable value"] == 2 and sk["event outside the ICU stay"] == 1
    # A stay with no events: every hour present, nothing observed, normal values.
    ne = ehr[ehr.stay_id == NO_EVENTS * 100 + 1]
    assert len(ne) == 121 and (ne[list(EHR_MASK_COLUMNS)] == 0).all().all()
    for j, v in enumerate(EHR_VARIABLES):
        col = EHR_VALUE_COLUMNS[j]
        assert ne[col].iloc[0] * stats["std"][col] + stats["mean"][col] == pytest.approx(v.normal, rel=1e-4, abs=1e-4)
    assert res.counts["stays_without_ehr_events"] == 1
    assert set(ehr.stay_id) == set(cohort.stay_id)


def test_demographics(prepared):
    _, out, _ = prepared
    demo = _read(out, "demographics.parquet")
    assert list(demo.columns) == ["subject_id", "stay_id", *DEMOGRAPHIC_COLUMNS]
    assert all(str(demo[c].dtype) == "float32" for c in DEMOGRAPHIC_COLUMNS)
    assert (demo.gender_m == 1).all() and (demo.race_white == 1).all() and (demo.marital_married == 1).all()


def test_label_stats_are_train_counts(prepared):
    _, out, _ = prepared
    ls = json.loads((out / "label_stats.json").read_text())
    prog = _read(out, "tasks/disease_progression.parquet")
    train = prog[prog.split == "train"]
    lo = DISEASE_SLUGS.index("lung_opacity")
    assert ls["disease_progression"]["task"][lo][0] == int((train.lung_opacity == 0).sum())
    assert sum(ls["disease_progression"]["task"][lo]) == len(train)
    assert sum(ls["disease_progression"]["region"][0]) == len(train) * 10
    ml = _read(out, "tasks/mortality_los.parquet")
    assert sum(ls["mortality_los"]["mortality"]) == int((ml.split == "train").sum())
