"""End to end: `dipro synth` raw tree -> `dipro prepare`; every rule checked against the written tables."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from data_sharding.constants import (
    DISEASE_SLUGS,
    EHR_MASK_COLUMNS,
    EHR_VALUE_COLUMNS,
    MAX_CXR_GAP_HOURS,
    MAX_CXRS,
    MIN_AGE,
    MIN_CXR_GAP_HOURS,
    MIN_CXRS,
    MIN_STAY_HOURS,
)
from data_sharding.prepare import PrepareOptions, prepare
from data_sharding.readers import resolve_roots

from data_sharding import synth  # noqa: E402

RULES = ("linked_records", "adult", "one_icu_stay_per_admission", "same_careunit", "stay_longer_than_48h", "los_iqr",
         "ap_view", "valid_study_datetime", "last_image_of_study", "inside_icu_stay", "readable_jpeg", "scene_graph",
         "at_least_2_cxrs", "at_most_14_cxrs", "min_gap_8h", "max_gap_96h", "progression_pair_labelled",
         "mortality_los_2_cxrs_before_48h")


@pytest.fixture(scope="module")
def synth_prepared(tmp_path_factory):
    raw = tmp_path_factory.mktemp("synth") / "raw"
    synth.generate(raw, patients=24, seed=3, image_size=64)
    out = tmp_path_factory.mktemp("proc") / "processed"
    res = prepare(resolve_roots(raw), out, PrepareOptions(progress=False, block_size=1 << 16))
    return raw, out, res


def _read(p):
    return pq.read_table(p).to_pandas()


def test_report_has_every_rule_with_consistent_counts(synth_prepared):
    _, out, res = synth_prepared
    rep = json.loads((out / "report.json").read_text())
    assert [r["rule"] for r in rep["rules"]] == list(RULES)
    for r in rep["rules"]:
        assert r["dropped"] == sum(r["reasons"].values())
    by = {r["rule"]: r for r in rep["rules"]}
    # The synthetic cohort plants every irregularity: each rule must drop something.
    for name in ("adult", "one_icu_stay_per_admission", "same_careunit", "stay_longer_than_48h", "ap_view",
                 "inside_icu_stay", "min_gap_8h", "max_gap_96h"):
        assert by[name]["dropped"] > 0, name
    assert res.counts["stays"] > 0 and res.counts["progression_pairs"] > 0


def test_cohort_invariants(synth_prepared):
    raw, out, _ = synth_prepared
    cohort = _read(out / "cohort.parquet")
    cxr = _read(out / "cxr.parquet")
    patients = pd.read_csv(raw / "mimiciv/2.0/hosp/patients.csv.gz")
    icu = pd.read_csv(raw / "mimiciv/2.0/icu/icustays.csv.gz")
    assert (cohort.subject_id.map(patients.set_index("subject_id").anchor_age) >= MIN_AGE).all()
    assert (cohort.los_days * 24 > MIN_STAY_HOURS).all()
    b = json.loads((out / "report.json").read_text())["rules"][5]["details"]["bounds_days"]
    assert ((cohort.los_days > b["low"]) & (cohort.los_days < b["high"])).all()
    st = icu.set_index("stay_id").loc[cohort.stay_id]
    assert (st.first_careunit == st.last_careunit).all()
    assert not cohort.hadm_id.duplicated().any()
    per_stay = cxr.groupby("stay_id")
    # The authors do not re-check >= 2 CXRs after the gap rule: a stay may be left with one.
    assert per_stay.size().between(1, MAX_CXRS).all()
    left_with_one = int((per_stay.size() < MIN_CXRS).sum())
    assert json.loads((out / "report.json").read_text())["rules"][15]["details"] == {
        "stays left with 1 CXR (kept, in no task)": left_with_one}
    for sid, g in per_stay:
        h = np.sort(g.hours.to_numpy())
        gaps = np.diff(h)
        assert (gaps >= MIN_CXR_GAP_HOURS - 1e-6).all() and (gaps < MAX_CXR_GAP_HOURS).all()
        los_h = cohort.set_index("stay_id").loc[sid, "los_days"] * 24
        assert h[0] >= 0 and h[-1] <= los_h + 1e-6
    meta = pd.read_csv(raw / "mimic-cxr-jpg/2.0.0/mimic-cxr-2.0.0-metadata.csv.gz")
    assert (cxr.dicom_id.map(meta.set_index("dicom_id").ViewPosition) == "AP").all()
    assert not cxr.study_id.duplicated().any()


def test_splits_and_gold(synth_prepared):
    raw, out, _ = synth_prepared
    cohort = _read(out / "cohort.parquet")
    assert (cohort.groupby("subject_id").split.nunique() == 1).all()
    gold = pd.read_csv(raw / "chest-imagenome/1.0.0/gold_dataset/gold_object_comparison_with_coordinates.txt",
                       sep="\t")
    gold_in = cohort[cohort.subject_id.isin(gold.patient_id)]
    assert len(gold_in) > 0, "the synthetic cohort (24 patients, seed 3) should keep a gold-set patient"
    assert (gold_in.split == "test").all()
    prog = _read(out / "tasks/disease_progression.parquet")
    in_gold = prog.subject_id.isin(gold.patient_id)
    assert (prog[in_gold].label_source == "gold").any()
    assert (prog[~in_gold].label_source == "silver").all()


def test_labels_and_edema_mapping(synth_prepared):
    _, out, _ = synth_prepared
    prog = _read(out / "tasks/disease_progression.parquet")
    for d in DISEASE_SLUGS:
        assert prog[d].between(0, 3).all()
    # ImaGenome writes edema as "pulmonary edema/hazy opacity": it must reach the edema column.
    assert (prog["pulmonary_edema"] != 3).any()
    ml = _read(out / "tasks/mortality_los.parquet")
    assert ml.cxr_hours.map(lambda h: len(h) >= 2 and max(h) < 48).all()
    # Every progression sample has a label (the authors drop pairs without one).
    assert ((prog[list(DISEASE_SLUGS)] != 3).any(axis=1)).all()
    assert ml.los_bin.between(0, 3).all() and ml.mortality.isin([0, 1]).all()


def test_ehr_grid(synth_prepared):
    _, out, res = synth_prepared
    cohort = _read(out / "cohort.parquet").set_index("stay_id")
    ehr = pd.concat([_read(p) for p in sorted((out / "ehr").glob("part-*.parquet"))])
    assert ehr[list(EHR_VALUE_COLUMNS)].notna().all().all()
    assert ehr[list(EHR_MASK_COLUMNS)].isin([0, 1]).all().all()
    n = ehr.groupby("stay_id").size()
    assert (n == np.floor(cohort.loc[n.index, "los_days"] * 24).astype(int) + 1).all()
    assert res.report["ehr_cleaning"].get("temperature converted F->C", 0) > 0


def test_prepare_is_deterministic(synth_prepared, tmp_path):
    raw, out, _ = synth_prepared
    prepare(resolve_roots(raw), tmp_path / "again", PrepareOptions(progress=False))
    for name in ("cohort.parquet", "cxr.parquet", "tasks/disease_progression.parquet",
                 "tasks/mortality_los.parquet", "demographics.parquet"):
        assert pq.read_table(out / name).equals(pq.read_table(tmp_path / "again" / name)), name
    assert json.loads((out / "ehr_stats.json").read_text()) == json.loads((tmp_path / "again/ehr_stats.json").read_text())


def test_prepare_and_shard_with_every_path_in_a_bucket(synth_prepared, s3_bucket, tmp_path):
    """Raw files in a bucket -> processed tables committed in the bucket -> shards in the bucket -> verify: the
    same tables (image paths aside) and the same shard bytes as the local run; the commit record names the
    generation; a second prepare without --overwrite is refused, with it a new generation is published."""
    from data_sharding import publish, storage
    from data_sharding.errors import UserError
    from data_sharding.manifest import ShardSettings, read_manifest
    from data_sharding.shard_writer import write_shards

    raw, out, _ = synth_prepared
    storage.resolve(f"{s3_bucket}/raw").upload_dir(raw)
    processed = f"{s3_bucket}/processed"
    prepare(resolve_roots(f"{s3_bucket}/raw"), processed, PrepareOptions(progress=False, block_size=1 << 16))
    root = publish.published_root(processed)
    assert root.uri.startswith(f"{processed}/") and (storage.resolve(processed) / publish.POINTER).exists()
    local_dir = tmp_path / "copy"
    root.download_dir(local_dir)
    for name in ("cohort.parquet", "tasks/disease_progression.parquet", "tasks/mortality_los.parquet",
                 "demographics.parquet", "cxr.parquet"):
        a, b = pq.read_table(out / name), pq.read_table(local_dir / name)
        if name == "cxr.parquet":
            paths = b.column("image_path").to_pylist()
            assert all(p.startswith(f"{s3_bucket}/raw/") for p in paths)
            a, b = a.drop(["image_path"]), b.drop(["image_path"])
        assert a.equals(b), name
    for name in ("ehr_stats.json", "label_stats.json"):
        assert json.loads((out / name).read_text()) == json.loads((local_dir / name).read_text())
    with pytest.raises(UserError, match="already holds processed tables"):
        prepare(resolve_roots(f"{s3_bucket}/raw"), processed, PrepareOptions(progress=False))

    settings = ShardSettings(crop_size=16)
    write_shards(out, tmp_path / "local-shards", settings=settings, workers=1, progress=False)
    write_shards(processed, f"{s3_bucket}/shards", settings=settings, workers=1, progress=False)
    local = {(r.task, r.split, r.logical): (r.sha256, r.fingerprint) for r in read_manifest(tmp_path / "local-shards").records}
    remote = {(r.task, r.split, r.logical): (r.sha256, r.fingerprint) for r in read_manifest(f"{s3_bucket}/shards").records}
    assert remote == local and len(local) >= 4
    from data_sharding.verify import verify_shards

    assert verify_shards(f"{s3_bucket}/shards") == []
