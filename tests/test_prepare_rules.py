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
from data_sharding.errors import ConfigError
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
GAPCHAIN, MANY_GAP, LEFT1, TWO_COMP, DISAGREE, ALL_DROPPED, AT48, GOLD2 = 10000017, 10000018, 10000019, \
    10000020, 10000021, 10000022, 10000023, 10000024
FILLERS = list(range(11000001, 11000013))
LO, PE, ATL, CONS, EDEMA = (DISEASE_SLUGS.index(d) for d in ("lung_opacity", "pleural_effusion", "atelectasis",
                                                            "consolidation", "pulmonary_edema"))
R = {r: i for i, r in enumerate(REGIONS)}


def build_tree() -> tuple[RawTree, dict]:
    t = RawTree()
    ids: dict = {}
    ids["good"] = t.icu_patient(GOOD, stay_hours=120)
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
    # Exactly 8 h after the previous CXR is kept; 7.5 h after is dropped.
    ids["gap8"] = t.icu_patient(GAP8, cxr_hours=(2, 10, 17.5, 30))
    # Gaps are measured on the unfiltered sequence: 12 h is 10 h after the kept 2 h CXR but only
    # 5 h after the dropped 7 h one, so it goes too.
    ids["gapchain"] = t.icu_patient(GAPCHAIN, cxr_hours=(2, 7, 12, 30))
    # A gap of exactly 96 h between consecutive CXRs drops the stay.
    t.icu_patient(GAP96, cxr_hours=(2, 98), stay_hours=150)
    t.icu_patient(ONE_CXR, cxr_hours=(5,))
    t.icu_patient(MANY_CXR, cxr_hours=tuple(2 + 8 * i for i in range(15)), stay_hours=130)
    # 15 CXRs, one of them 3 h after another: counted before the gap rule, so the stay goes.
    t.icu_patient(MANY_GAP, cxr_hours=tuple(2 + 8 * i for i in range(14)) + (5,), stay_hours=130)
    # Two CXRs 3 h apart: the second goes, the stay stays in the cohort with one CXR, in no task.
    ids["left1"] = t.icu_patient(LEFT1, cxr_hours=(2, 5))
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
    t.icu_patient(NO_EVENTS, events=False, stay_hours=120)
    # Gold contradicts silver for the first pair (and labels edema, which silver does not name).
    cx = t.icu_patient(GOLD)
    t.gold_row(GOLD, cx[1].dicom_id + ".dcm", cx[0].dicom_id + ".dcm", "left lung", "lung opacity", "improved")
    t.gold_row(GOLD, cx[1].dicom_id + ".dcm", cx[0].dicom_id + ".dcm", "right lung", "pulmonary edema/hazy opacity",
               "improved")
    ids["gold"] = cx
    # Gold whose first row is about another disease (the authors' first-row rule gives it to every disease).
    cx = t.icu_patient(GOLD2, chain=False)
    cx[1].comparisons += [(cx[0].dicom_id, "left lung", "worsened", "lung opacity"),
                          (cx[0].dicom_id, "right costophrenic angle", "no change", "pleural effusion")]
    cx[2].comparisons.append((cx[1].dicom_id, "left lung", "worsened", "lung opacity"))
    t.gold_row(GOLD2, cx[1].dicom_id, cx[0].dicom_id, "right lung", "atelectasis", "improved")
    t.gold_row(GOLD2, cx[1].dicom_id, cx[0].dicom_id, "left lung", "lung opacity", "no change")
    ids["gold2"] = cx
    # A scene graph without relationships: the pair it closes has no label and is dropped.
    cx = t.icu_patient(NO_REL)
    cx[1].scene_graph = "no_relationships"
    ids["no_rel"] = cx
    # A relationship with two comparisons is dropped; the other relationship labels the pair.
    cx = t.icu_patient(TWO_COMP, chain=False)
    cx[1].comparisons += [(cx[0].dicom_id, "left lung", ("worsened", "improved"), "lung opacity"),
                          (cx[0].dicom_id, "right lung", "worsened", "pleural effusion")]
    cx[2].comparisons.append((cx[1].dicom_id, "left lung", "worsened", "lung opacity"))
    ids["two_comp"] = cx
    # Regions disagree on lung opacity (dropped) and agree on pleural effusion (kept); a bbox outside
    # the 10 regions still labels the pair; a finding marked "no" counts (the authors ignore yes/no).
    cx = t.icu_patient(DISAGREE, chain=False)
    p0 = cx[0].dicom_id
    cx[1].comparisons += [(p0, "left lung", "worsened", "lung opacity"), (p0, "right lung", "improved", "lung opacity"),
                          (p0, "left lung", "no change", "pleural effusion"),
                          (p0, "right costophrenic angle", "no change", "pleural effusion"),
                          (p0, "left mid lung zone", "worsened", "consolidation"),
                          (p0, "left lung", "improved", "anatomicalfinding|no|atelectasis")]
    cx[2].comparisons.append((cx[1].dicom_id, "left lung", "worsened", "lung opacity"))
    ids["disagree"] = cx
    # Every disease of the first pair is dropped (regions disagree): the pair is no sample.
    cx = t.icu_patient(ALL_DROPPED, chain=False)
    cx[1].comparisons += [(cx[0].dicom_id, "left lung", "worsened", "lung opacity"),
                          (cx[0].dicom_id, "right lung", "improved", "lung opacity"),
                          (cx[0].dicom_id, "mediastinum", "no change", "vascular congestion")]
    cx[2].comparisons.append((cx[1].dicom_id, "left lung", "worsened", "lung opacity"))
    ids["all_dropped"] = cx
    # A CXR at exactly 48 h is not "before 48 h": one early CXR, so no mortality/LOS sample.
    ids["at48"] = t.icu_patient(AT48, cxr_hours=(10, 48, 60))
    t.icu_patient(DEAD, died=True)
    for i, s in enumerate(FILLERS):
        t.icu_patient(s, cxr_hours=(1, 20, 44, 70), stay_hours=80 + 8 * i)
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
    return res, out, ids, root


def nested(x) -> np.ndarray:
    """Parquet nested lists (object arrays of arrays) -> one dense ndarray."""
    if isinstance(x, (list, np.ndarray)) and len(x) and not np.isscalar(x[0]):
        return np.array([nested(e) for e in x])
    return np.asarray(x)


def _rule(report, name):
    return next(r for r in report["rules"] if r["rule"] == name)


def _read(out, name):
    return pq.read_table(out / name).to_pandas()


def _pairs(prog, subject):
    return prog[prog.subject_id == subject].sort_values("cxr1_hours")


def test_stay_rules_counts(prepared):
    res, out, _, _ = prepared
    rep = json.loads((out / "report.json").read_text())
    assert _rule(rep, "adult")["reasons"] == {"anchor_age < 18": 1}
    assert _rule(rep, "one_icu_stay_per_admission")["reasons"] == {"admission has several ICU stays": 2}
    assert _rule(rep, "same_careunit")["reasons"] == {"first_careunit != last_careunit": 1}
    assert _rule(rep, "stay_longer_than_48h")["reasons"] == {"stay <= 48 h": 1}
    iqr = _rule(rep, "los_iqr")
    assert iqr["dropped"] == 0 and set(iqr["details"]["bounds_days"]) == {"q1", "q3", "low", "high"}
    cohort = _read(out, "cohort.parquet")
    for s in (CHILD, TWO_STAYS, TRANSFER, SHORT):
        assert s not in set(cohort.subject_id)
    for r in rep["rules"]:
        assert r["dropped"] == sum(r["reasons"].values())


def test_cxr_rules(prepared):
    res, out, ids, _ = prepared
    rep = res.report
    assert _rule(rep, "ap_view")["reasons"] == {"view PA": 1, "view LATERAL": 1}
    assert _rule(rep, "last_image_of_study")["dropped"] == 1
    cxr = _read(out, "cxr.parquet")
    assert "early-image-of-study" not in set(cxr.dicom_id)
    assert ids["views_first"] in set(cxr.dicom_id)
    v = cxr[cxr.subject_id == VIEWS]
    assert len(v) == 2 and (v.hours >= 0).all()  # the CXR before intime is outside the stay
    assert _rule(rep, "inside_icu_stay")["reasons"]["outside [intime, outtime]"] >= 1
    # 8 h exactly kept, 7.5 h dropped; a gap counts from the previous CXR even when that one is dropped.
    assert cxr[cxr.subject_id == GAP8].sort_values("hours").hours.round(3).tolist() == [2.0, 10.0, 30.0]
    assert cxr[cxr.subject_id == GAPCHAIN].sort_values("hours").hours.round(3).tolist() == [2.0, 30.0]


def test_stay_cxr_rules_in_the_authors_order(prepared):
    res, out, ids, _ = prepared
    cohort = _read(out, "cohort.parquet")
    cxr = _read(out, "cxr.parquet")
    rep = res.report
    assert _rule(rep, "at_least_2_cxrs")["reasons"] == {"1 CXR": 1}
    # MANY_GAP has 14 CXRs once the 3-h one goes, but 15 are counted before the gap rule.
    assert _rule(rep, "at_most_14_cxrs")["reasons"] == {"more than 14 CXRs": 2}
    assert _rule(rep, "max_gap_96h")["reasons"] == {"gap >= 96 h between CXRs": 1}
    for s in (GAP96, ONE_CXR, MANY_CXR, MANY_GAP):
        assert s not in set(cohort.subject_id)
    # No re-check of >= 2 CXRs after the gap rule: LEFT1 stays, with one CXR, in no task.
    assert _rule(rep, "max_gap_96h")["details"] == {"stays left with 1 CXR (kept, in no task)": 1}
    assert LEFT1 in set(cohort.subject_id)
    assert cxr[cxr.subject_id == LEFT1].dicom_id.tolist() == [ids["left1"][0].dicom_id]
    for task in ("disease_progression", "mortality_los"):
        assert LEFT1 not in set(_read(out, f"tasks/{task}.parquet").subject_id)


def test_truncated_and_missing_jpeg_skipped_and_counted(prepared):
    res, out, ids, _ = prepared
    assert _rule(res.report, "readable_jpeg")["reasons"] == {"truncated JPEG": 1, "missing JPEG": 1}
    assert res.report["skipped"]["CXR with truncated JPEG"] == 1
    cxr = _read(out, "cxr.parquet")
    kept = set(cxr[cxr.subject_id == BAD_JPEG].dicom_id)
    assert kept == {ids["bad_jpeg"][0].dicom_id, ids["bad_jpeg"][3].dicom_id}
    assert (cxr.width == 64).all() and (cxr.height == 80).all()


def test_scene_graph_and_boxes(prepared):
    res, out, ids, _ = prepared
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


def test_progression_silver_labels_and_pairs_without_label(prepared):
    res, out, ids, _ = prepared
    prog = _read(out, "tasks/disease_progression.parquet")
    good = _pairs(prog, GOOD)
    assert len(good) == 2 and (good.label_source == "silver").all()
    first = good.iloc[0]
    assert first.cxr1_dicom_id == ids["good"][0].dicom_id and first.cxr2_dicom_id == ids["good"][1].dicom_id
    region = nested(first.region_labels)
    assert region.shape == (10, 7)
    assert region[R["left lung"], LO] == 0 and (np.delete(region.ravel(), R["left lung"] * 7 + LO) == 3).all()
    assert first["lung_opacity"] == 0 and all(first[d] == 3 for d in DISEASE_SLUGS if d != "lung_opacity")
    # The pair closed by a graph without relationships, and pairs whose current graph compares with an
    # image that is not the previous kept CXR, get no label: dropped, and counted.
    assert _pairs(prog, NO_REL).cxr1_dicom_id.tolist() == [ids["no_rel"][1].dicom_id]
    assert _pairs(prog, GAPCHAIN).empty
    assert _pairs(prog, GAP8).cxr1_dicom_id.tolist() == [ids["gap8"][0].dicom_id]
    rule = _rule(res.report, "progression_pair_labelled")
    assert rule["reasons"] == {"current scene graph compares with another image": 4,
                               "current scene graph has no comparison": 1,
                               "no agreed label among the 7 diseases": 1}
    assert rule["kept"] == len(prog) and res.counts["consecutive_pairs"] == len(prog) + 6


def test_progression_rules_two_comparisons_disagreement_and_all_dropped(prepared):
    res, out, ids, _ = prepared
    prog = _read(out, "tasks/disease_progression.parquet")
    # A relationship naming two comparisons is dropped; the other one still labels the pair.
    tc = _pairs(prog, TWO_COMP).iloc[0]
    assert tc.cxr2_dicom_id == ids["two_comp"][1].dicom_id
    assert (tc["lung_opacity"], tc["pleural_effusion"]) == (3, 0)
    r = nested(tc.region_labels)
    assert r[R["left lung"], LO] == 3 and r[R["right lung"], PE] == 0
    # Regions disagree on lung opacity (dropped), agree on pleural effusion (kept); a bbox outside the
    # 10 regions labels the pair (consolidation) but no region; "|no|" atelectasis counts.
    dg = _pairs(prog, DISAGREE).iloc[0]
    assert dg.cxr2_dicom_id == ids["disagree"][1].dicom_id
    assert [int(dg[d]) for d in DISEASE_SLUGS] == [1, 3, 0, 3, 3, 2, 3]
    r = nested(dg.region_labels)
    assert r[R["left lung"], LO] == 0 and r[R["right lung"], LO] == 1  # region level: no agreement rule
    assert r[R["left lung"], PE] == 2 and r[R["right costophrenic angle"], PE] == 2
    assert r[R["left lung"], ATL] == 1 and (r[:, CONS] == 3).all()
    # Every disease of ALL_DROPPED's first pair was dropped: only its second pair is a sample.
    assert _pairs(prog, ALL_DROPPED).cxr1_dicom_id.tolist() == [ids["all_dropped"][1].dicom_id]
    details = _rule(res.report, "progression_pair_labelled")["details"]
    assert details["relationships with several comparisons (dropped)"] == 1
    assert details["disease labels dropped: regions disagree"] == 2


def test_gold_labels_per_disease(prepared):
    res, out, ids, _ = prepared
    prog = _read(out, "tasks/disease_progression.parquet")
    gold = _pairs(prog, GOLD)
    g0 = gold.iloc[0]
    assert g0.label_source == "gold" and gold.iloc[1].label_source == "silver"
    # Silver says lung opacity worsened (0), gold improved (1): gold wins.  Edema is not among the
    # pair's silver diseases, so gold cannot add it at the pair level; at the region level gold
    # rows overwrite per (bbox, label), and the edema name is mapped.
    assert g0["lung_opacity"] == 1 and g0["pulmonary_edema"] == 3
    r = nested(g0.region_labels)
    assert r[R["left lung"], LO] == 1 and r[R["right lung"], EDEMA] == 1
    assert (np.delete(r.ravel(), [R["left lung"] * 7 + LO, R["right lung"] * 7 + EDEMA]) == 3).all()
    # GOLD2: gold's first row is atelectasis improved; per disease, lung opacity takes its own gold
    # row (no change) and pleural effusion, which gold does not mention, keeps silver (no change).
    g2 = _pairs(prog, GOLD2).iloc[0]
    assert (g2["lung_opacity"], g2["pleural_effusion"], g2["atelectasis"]) == (2, 2, 3)
    r = nested(g2.region_labels)
    assert r[R["left lung"], LO] == 2 and r[R["right lung"], ATL] == 1 and r[R["right costophrenic angle"], PE] == 2
    details = _rule(res.report, "progression_pair_labelled")["details"]
    assert details["gold pairs"] == 2 and details["silver labels changed by gold"] == 2
    assert details["silver labels kept: no gold row for that disease"] == 1


def test_gold_subjects_in_test_and_split_is_the_authors(prepared):
    from data_sharding.splits import split_subjects

    _, out, _, _ = prepared
    cohort = _read(out, "cohort.parquet")
    assert set(cohort.set_index("subject_id").loc[[GOLD, GOLD2], "split"]) == {"test"}
    assert (cohort.groupby("subject_id").split.nunique() == 1).all()
    assert set(cohort.split) == {"train", "val", "test"}
    expected = split_subjects(cohort.subject_id, [GOLD, GOLD2, 99999999], seed=0)
    assert dict(zip(cohort.subject_id, cohort.split)) == expected
    for task in ("disease_progression", "mortality_los"):
        t = _read(out, f"tasks/{task}.parquet")
        merged = t.merge(cohort[["stay_id", "split"]], on="stay_id", suffixes=("", "_c"))
        assert (merged.split == merged.split_c).all()


def test_mortality_los_task(prepared):
    res, out, ids, _ = prepared
    ml = _read(out, "tasks/mortality_los.parquet").set_index("subject_id")
    cohort = _read(out, "cohort.parquet").set_index("subject_id")
    assert ml.loc[DEAD, "mortality"] == 1 and ml.loc[GOOD, "mortality"] == 0
    assert cohort.loc[GOOD, "los_days"] == pytest.approx(5.0) and cohort.loc[GOOD, "los_bin"] == 2
    assert list(ml.loc[GOOD, "cxr_hours"]) == pytest.approx([2.0, 26.0])  # the 50 h CXR is after the first 48 h
    assert nested(ml.loc[GOOD, "region_labels"]).shape == (1, 10, 7)
    assert len(ml.loc[FILLERS[0], "dicom_ids"]) == 3
    # A CXR at exactly 48 h is not before 48 h: AT48 has one early CXR and is not a sample.
    assert AT48 in cohort.index and AT48 not in ml.index
    assert _rule(res.report, "mortality_los_2_cxrs_before_48h")["reasons"] == {"fewer than 2 CXRs before 48 h": 2}
    # Pairs without a label are still mortality/LOS pairs, with region labels all "not mentioned".
    assert (nested(ml.loc[GAPCHAIN, "region_labels"]) == 3).all()


def test_ehr_cleaning_and_layout(prepared):
    res, out, _, _ = prepared
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
    res, out, _, _ = prepared
    demo = _read(out, "demographics.parquet")
    assert list(demo.columns) == ["subject_id", "stay_id", *DEMOGRAPHIC_COLUMNS]
    assert all(str(demo[c].dtype) == "float32" for c in DEMOGRAPHIC_COLUMNS)
    assert (demo.gender_m == 1).all() and (demo.race_white == 1).all() and (demo.marital_married == 1).all()
    # No weight or height is charted: every stay gets the mean (z = 0), as the authors impute.
    assert (demo.weight == 0).all() and (demo.height == 0).all()
    d = res.report["demographics"]
    cohort = _read(out, "cohort.parquet")
    assert d["population"] == "train" and d["n_stays"] == int((cohort.split == "train").sum())
    assert d["imputed_in_cohort"]["weight"] == len(cohort)


def test_label_stats_are_train_counts(prepared):
    _, out, _, _ = prepared
    ls = json.loads((out / "label_stats.json").read_text())
    prog = _read(out, "tasks/disease_progression.parquet")
    train = prog[prog.split == "train"]
    lo = DISEASE_SLUGS.index("lung_opacity")
    assert ls["disease_progression"]["task"][lo][0] == int((train.lung_opacity == 0).sum())
    assert sum(ls["disease_progression"]["task"][lo]) == len(train)
    assert sum(ls["disease_progression"]["region"][0]) == len(train) * 10
    ml = _read(out, "tasks/mortality_los.parquet")
    assert sum(ls["mortality_los"]["mortality"]) == int((ml.split == "train").sum())


# ----------------------------------------------------------------------------- the authors' options

def test_authors_gold_first_row_and_region_names(prepared, tmp_path):
    """``gold_labels=first-row`` and ``region_names=authors`` reproduce the authors' code."""
    _, _, ids, root = prepared
    res = prepare(resolve_roots(root), tmp_path / "p", PrepareOptions(
        progress=False, gold_labels="first-row", region_names="authors"))
    prog = _read(tmp_path / "p", "tasks/disease_progression.parquet")
    # The first gold row of GOLD2's pair (atelectasis improved) labels every silver disease of it.
    g2 = _pairs(prog, GOLD2).iloc[0]
    assert (g2["lung_opacity"], g2["pleural_effusion"], g2["atelectasis"]) == (1, 1, 3)
    # Literal region names: ImaGenome's edema name never matches, so GOLD's gold edema row is lost.
    r = nested(_pairs(prog, GOLD).iloc[0].region_labels)
    assert (r[:, EDEMA] == 3).all() and r[R["left lung"], LO] == 1
    assert res.report["options"]["gold_labels"] == "first-row"


def test_severity_rule_keeps_every_pair(prepared, tmp_path):
    _, out, ids, root = prepared
    res = prepare(resolve_roots(root), tmp_path / "p", PrepareOptions(progress=False, dp_labels="severity"))
    prog = _read(tmp_path / "p", "tasks/disease_progression.parquet")
    assert res.counts["progression_pairs"] == res.counts["consecutive_pairs"]
    nr = _pairs(prog, NO_REL).iloc[0]
    assert nr.cxr2_dicom_id == ids["no_rel"][1].dicom_id and (nested(nr.region_labels) == 3).all()
    dg = _pairs(prog, DISAGREE).iloc[0]
    assert dg["lung_opacity"] == 0 and dg["atelectasis"] == 3  # most severe region wins; "|no|" is no finding
    g0 = _pairs(prog, GOLD).iloc[0]  # gold alone labels a gold pair
    assert (g0["lung_opacity"], g0["pulmonary_edema"]) == (1, 1)
    # Same cohort and split: only the labels differ.
    assert _read(out, "cohort.parquet").equals(_read(tmp_path / "p", "cohort.parquet"))
    with pytest.raises(ConfigError, match="gold_labels"):
        PrepareOptions(dp_labels="severity", gold_labels="first-row")


# ----------------------------------------------------------------------------- LOS IQR, demographics

def test_los_iqr_bounds_just_inside_and_outside(tmp_path):
    """Nine stays: Q1 = 3 d, Q3 = 5 d, so Q3 + 1.5 IQR = 8 d: 7.99 d is kept, 8.01 d is dropped."""
    t = RawTree()
    days = [2.5, 2.8, 3.0, 3.5, 4.0, 4.5, 5.0, 7.99, 8.01]
    for i, d in enumerate(days):
        t.icu_patient(12100001 + i, cxr_hours=(2, 26), stay_hours=d * 24)
    t.write(tmp_path / "raw")
    res = prepare(resolve_roots(tmp_path / "raw"), tmp_path / "p", PrepareOptions(progress=False))
    rule = _rule(res.report, "los_iqr")
    assert rule["details"]["bounds_days"] == {"q1": 3.0, "q3": 5.0, "low": 0.0, "high": 8.0}
    assert rule["reasons"] == {"LOS >= Q3 + 1.5 IQR": 1} and rule["kept"] == 8
    cohort = _read(tmp_path / "p", "cohort.parquet")
    assert 12100008 in set(cohort.subject_id) and 12100009 not in set(cohort.subject_id)


def test_demographic_outlier_kept_but_out_of_the_statistics(tmp_path):
    """``norm_stats=all``: statistics over every stay passing rules 1-4 (a < 48 h stay included).

    Weights 60, 64, ..., 92 (9 stays) and 200: Q1 = 69, Q3 = 87.. by pandas' linear rule; 200 is
    outside, so mean and std come from the nine others, and 200 is still normalised with them.
    """
    t = RawTree()
    weights = [60, 64, 68, 72, 76, 80, 84, 88, 92, 200]
    for i, w in enumerate(weights):
        t.icu_patient(12200001 + i, cxr_hours=(2, 26), weight=w, stay_hours=40 if i == 0 else None)
    t.write(tmp_path / "raw")
    res = prepare(resolve_roots(tmp_path / "raw"), tmp_path / "p", PrepareOptions(progress=False, norm_stats="all"))
    # Q1 at position 9 * 0.25 = 2.25 -> 68 + 0.25 * 4 = 69; Q3 at 6.75 -> 84 + 0.75 * 4 = 87;
    # bounds 69 - 27 = 42 .. 87 + 27 = 114: only 200 is out.
    clear = np.array(weights[:-1], dtype=np.float64)
    mean, std = clear.sum() / 9, np.sqrt(((clear - clear.sum() / 9) ** 2).sum() / 8)  # ddof 1, as pandas
    d = res.report["demographics"]
    assert d["population"] == "all" and d["n_stays"] == 10
    assert d["q1"]["weight"] == pytest.approx(69.0) and d["q3"]["weight"] == pytest.approx(87.0)
    assert d["outliers_excluded_from_stats"]["weight"] == 1
    demo = _read(tmp_path / "p", "demographics.parquet").set_index("subject_id")
    assert 12200001 not in demo.index  # the 40 h stay is in the statistics, not in the cohort
    assert demo.loc[12200010, "weight"] == pytest.approx((200 - mean) / std, rel=1e-5)
    assert demo.loc[12200002, "weight"] == pytest.approx((64 - mean) / std, rel=1e-5)
    stats = json.loads((tmp_path / "p/ehr_stats.json").read_text())
    assert stats["split"] == "all" and stats["demographics"]["mean"]["weight"] == pytest.approx(mean)
