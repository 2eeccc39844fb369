"""`dipro prepare`: schema errors, .csv/.csv.gz, atomic output, CLI, no leakage, and the unit rules."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from data_sharding import prepare as prepare_mod
from data_sharding.constants import DISEASES, EHR_VALUE_COLUMNS, REGIONS
from data_sharding.ehr import EventStats, HourlyAccumulator, parse_block
from data_sharding.dp_labels import ProgressionLabeler, study_labels
from data_sharding.imagenome import GoldLabels, parse_scene_graph, validate_box
from data_sharding.labels import in_hospital_mortality, los_bin
from data_sharding.prepare import PrepareOptions, prepare
from data_sharding.readers import check_jpeg, resolve_roots, stream_events
from data_sharding.splits import split_subjects
from data_sharding.demographics import race_group
from data_sharding.samples import ehr_window
from dipro import cli
from data_sharding.errors import DataError, UserError

try:
    from tests.prepare_raw import T0, RawTree, at
except ImportError:  # tests/ is not a package: pytest puts it on sys.path
    from prepare_raw import T0, RawTree, at

OPTS = dict(progress=False)


def small_tree(n: int = 12, hr_offset: float = 0.0, test_offset: float = 0.0) -> RawTree:
    t = RawTree()
    for i in range(n):
        s = 12000001 + i
        t.icu_patient(s, stay_hours=100 + 5 * i)
        hadm, stay = s * 10 + 1, s * 100 + 1
        for h in range(0, 100, 7):
            t.chartevent(s, hadm, stay, 220045, at(h + 0.3), str(70 + (i * 3 + h) % 40 + hr_offset),
                         70 + (i * 3 + h) % 40 + hr_offset, "bpm")
    return t


# ----------------------------------------------------------------------------- schema / files

def test_missing_column_names_file_and_column(tmp_path):
    small_tree().write(tmp_path / "raw", drop_columns={"icustays": ["last_careunit"]})
    with pytest.raises(DataError) as exc:
        prepare(resolve_roots(tmp_path / "raw"), tmp_path / "out", PrepareOptions(**OPTS))
    msg = str(exc.value)
    assert "icustays.csv.gz" in msg and "last_careunit" in msg and "first_careunit" in msg  # expected columns listed
    assert not (tmp_path / "out").exists()


def test_schema_drift_ethnicity_instead_of_race(tmp_path):
    small_tree().write(tmp_path / "raw", drop_columns={"admissions": ["race"]})
    with pytest.raises(DataError, match=r"admissions\.csv\.gz: missing required column\(s\) race"):
        prepare(resolve_roots(tmp_path / "raw"), tmp_path / "out", PrepareOptions(**OPTS))


def test_missing_file_and_root(tmp_path):
    root = small_tree().write(tmp_path / "raw")
    (root / "mimiciv/2.0/icu/chartevents.csv.gz").unlink()
    with pytest.raises(DataError, match="chartevents"):
        prepare(resolve_roots(root), tmp_path / "out", PrepareOptions(**OPTS))
    with pytest.raises(DataError, match="Chest ImaGenome"):
        resolve_roots(tmp_path / "raw", imagenome_root=tmp_path / "nowhere")


def test_plain_csv_and_separate_roots_give_the_same_output(tmp_path):
    small_tree().write(tmp_path / "gz")
    small_tree().write(tmp_path / "csv", gz=False)
    a = prepare(resolve_roots(tmp_path / "gz"), tmp_path / "a", PrepareOptions(**OPTS))
    roots = resolve_roots(cxr_root=tmp_path / "csv/mimic-cxr-jpg/2.0.0", mimiciv_root=tmp_path / "csv/mimiciv/2.0",
                          imagenome_root=tmp_path / "csv/chest-imagenome/1.0.0")
    b = prepare(roots, tmp_path / "b", PrepareOptions(**OPTS))
    assert a.counts == b.counts
    for name in ("cohort.parquet", "tasks/disease_progression.parquet", "ehr/part-00000.parquet"):
        assert pq.read_table(tmp_path / "a" / name).equals(pq.read_table(tmp_path / "b" / name))


def test_streaming_block_size_does_not_change_the_result(tmp_path):
    """Tiny blocks (many chunks, repeated reductions) and one big block agree."""
    root = small_tree().write(tmp_path / "raw")
    a = prepare(resolve_roots(root), tmp_path / "a", PrepareOptions(block_size=1 << 10, **OPTS))
    b = prepare(resolve_roots(root), tmp_path / "b", PrepareOptions(block_size=64 << 20, **OPTS))
    assert a.counts["ehr_events_used"] == b.counts["ehr_events_used"] > 0
    assert pq.read_table(tmp_path / "a/ehr/part-00000.parquet").equals(pq.read_table(tmp_path / "b/ehr/part-00000.parquet"))
    assert (tmp_path / "a/ehr_stats.json").read_text() == (tmp_path / "b/ehr_stats.json").read_text()


def test_event_stats_are_exact_and_independent_of_the_blocks(monkeypatch):
    """Mean / population std of the clamped in-stay events of the population; the same bits however the
    events are cut into blocks (chunks of 4 here, so several folds happen); first height: earliest, and
    of two at the same time the later row."""
    monkeypatch.setattr(EventStats, "CHUNK", 4)
    hr = [88.0, 95, 101, 900, 77, 64, 120, 99, 83, 71, 66]  # 900 -> 390
    times = [0.5 + i for i in range(len(hr))]
    rows = [(1, 220045, at(h), v) for h, v in zip(times, hr)]
    rows += [(1, 220045, at(-1), 50.0), (2, 220045, at(3), 500.0)]  # outside the stay; not in the population
    rows += [(1, 226730, at(2), 170.0), (1, 226730, at(1), 180.0), (1, 226730, at(1), 181.0), (2, 226730, at(4), 160.0)]
    df = pd.DataFrame({"stay_id": [r[0] for r in rows], "itemid": [r[1] for r in rows],
                       "charttime": [str(r[2]) for r in rows], "value": [str(r[3]) for r in rows],
                       "valuenum": [str(r[3]) for r in rows], "valueuom": ["" for _ in rows]})
    height = EHR_VALUE_COLUMNS.index("height")
    results = []
    for ends in ([len(df)], [3, 7, 11, len(df)], list(range(1, len(df) + 1))):  # block boundaries
        st = EventStats(np.array([1, 2]), pd.Series([pd.Timestamp(T0)] * 2), pd.Series([pd.Timestamp(at(20))] * 2),
                        np.array([True, False]), first_vars=(height,))
        for start, end in zip([0, *ends[:-1]], ends):
            st.add(parse_block(df.iloc[start:end], "chartevents", Counter()))
        mean, std = st.mean_std()
        results.append((mean.tobytes(), std.tobytes(), st.first_values(height).tolist()))
    assert results[0] == results[1] == results[2]
    x = np.array([min(v, 390.0) for v in hr])
    j = EHR_VALUE_COLUMNS.index("heart_rate")
    assert mean[j] == pytest.approx(x.sum() / len(x), rel=1e-12)
    assert std[j] == pytest.approx(np.sqrt(((x - x.sum() / len(x)) ** 2).sum() / len(x)), rel=1e-12)
    assert results[0][2] == [181.0, 160.0]


def test_stream_events_filters_each_block(tmp_path):
    root = small_tree().write(tmp_path / "raw")
    path = root / "mimiciv/2.0/icu/chartevents.csv.gz"
    blocks = list(stream_events(path, "chartevents", ["charttime", "value"], [220045], [1200000101],
                                block_size=1 << 10))
    assert len(blocks) > 1
    df = pd.concat([b for b, _ in blocks])
    assert set(df.stay_id) == {1200000101} and set(df.itemid) == {220045}


# ----------------------------------------------------------------------------- output handling

def test_output_is_atomic_on_failure(tmp_path, monkeypatch):
    root = small_tree().write(tmp_path / "raw")

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(prepare_mod, "write_demographics", boom)
    with pytest.raises(RuntimeError):
        prepare(resolve_roots(root), tmp_path / "out", PrepareOptions(**OPTS))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]  # no output, no temp dir left


def test_existing_output_needs_overwrite(tmp_path):
    root = small_tree().write(tmp_path / "raw")
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("x")
    with pytest.raises(UserError, match="--overwrite"):
        prepare(resolve_roots(root), out, PrepareOptions(**OPTS))
    prepare(resolve_roots(root), out, PrepareOptions(overwrite=True, **OPTS))
    assert not (out / "old.txt").exists() and (out / "report.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "raw"]


def test_cli_success_and_one_line_error(tmp_path, capsys):
    root = small_tree().write(tmp_path / "raw")
    assert cli.main(["prepare", "--raw", str(root), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "min_gap_8h" in out and "cohort: 12 subjects" in out
    rc = cli.main(["prepare", "--raw", str(tmp_path / "missing"), "--out", str(tmp_path / "o2")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "raw data directory not found" in err


# ----------------------------------------------------------------------------- no leakage

def _hr_events(tree: RawTree, stays: set[int]) -> np.ndarray:
    """The heart-rate values the tree charts inside the given stays (all in range, all in-stay)."""
    return np.array([float(ev["valuenum"]) for ev in tree.chart if ev["itemid"] == 220045 and ev["stay_id"] in stays])


def test_normalisation_uses_training_split_only(tmp_path):
    """Stats are the mean / population std of the train stays' measurements: changing val/test EHR leaves them."""
    base = small_tree(n=20)
    base.write(tmp_path / "raw1")
    r1 = prepare(resolve_roots(tmp_path / "raw1"), tmp_path / "p1", PrepareOptions(**OPTS))
    cohort = pq.read_table(tmp_path / "p1/cohort.parquet").to_pandas()
    held_out = set(cohort.loc[cohort.split != "train", "stay_id"])
    assert held_out and (cohort.groupby("subject_id").split.nunique() == 1).all()

    changed = small_tree(n=20)
    for ev in changed.chart:
        if ev["stay_id"] in held_out and ev["itemid"] == 220045:
            ev["valuenum"] = float(ev["valuenum"]) + 50
            ev["value"] = str(ev["valuenum"])
    changed.write(tmp_path / "raw2")
    prepare(resolve_roots(tmp_path / "raw2"), tmp_path / "p2", PrepareOptions(**OPTS))
    s1 = json.loads((tmp_path / "p1/ehr_stats.json").read_text())
    s2 = json.loads((tmp_path / "p2/ehr_stats.json").read_text())
    assert s1 == s2 and s1["split"] == "train" and s1["n_stays"] == int((cohort.split == "train").sum())

    # And they are exactly the mean/std of the training rows: z-scored train rows have mean 0, std 1.
    ehr = pq.read_table(tmp_path / "p1/ehr/part-00000.parquet").to_pandas()
    train = ehr[ehr.stay_id.isin(cohort.loc[cohort.split == "train", "stay_id"])]
    z = train["heart_rate"].to_numpy(np.float64)
    assert z.mean() == pytest.approx(0, abs=1e-5) and z.std() == pytest.approx(1, abs=1e-4)
    assert s1["statistic"] == "hourly_rows" and s1["n"]["heart_rate"] == len(train)
    test = ehr[ehr.stay_id.isin(held_out)]
    assert abs(test["heart_rate"].mean()) > 1e-3  # held-out rows are not re-centred on themselves
    assert r1.report["counts"]["subjects_per_split"]["train"] + r1.report["counts"]["subjects_per_split"]["val"] \
        + r1.report["counts"]["subjects_per_split"]["test"] == 20

    # --norm-stats all (the authors): mean and population std of every stay's heart-rate *measurements*
    # (not of the hourly grid), so the held-out change moves them.
    prepare(resolve_roots(tmp_path / "raw2"), tmp_path / "p3", PrepareOptions(norm_stats="all", **OPTS))
    s3 = json.loads((tmp_path / "p3/ehr_stats.json").read_text())
    hr = _hr_events(changed, set(cohort.stay_id))
    assert s3["split"] == "all" and s3["statistic"] == "events" and s3["n_stays"] == 20
    assert s3["n"]["heart_rate"] == len(hr)
    assert s3["mean"]["heart_rate"] == pytest.approx(hr.sum() / len(hr))
    assert s3["std"]["heart_rate"] == pytest.approx(np.sqrt(((hr - hr.sum() / len(hr)) ** 2).sum() / len(hr)))


# ----------------------------------------------------------------------------- unit rules

def test_los_bins_right_open_with_tails():
    assert los_bin([1.5, 2.0, 2.99, 3.0, 3.99, 4.0, 5.99, 6.0, 10.99, 11.0, 40.0]).tolist() == \
        [0, 0, 0, 1, 1, 2, 2, 3, 3, 3, 3]


def test_study_label_rule():
    r = np.full((10, 7), 3, np.int8)
    r[0, 0], r[1, 0] = 0, 1          # worsened + improved -> worsened
    r[2, 1], r[3, 1] = 1, 2          # improved + no change -> improved
    r[4, 2] = 2                      # no change
    assert study_labels(r).tolist() == [0, 1, 2, 3, 3, 3, 3]


def test_mortality_by_deathtime_or_dod_within_admission():
    t = pd.Timestamp
    stays = pd.DataFrame({
        "admittime": [t("2150-01-01 10:00")] * 4, "dischtime": [t("2150-01-10 12:00")] * 4,
        "deathtime": [t("2150-01-10 11:00"), pd.NaT, pd.NaT, pd.NaT],
        "dod": [pd.NaT, t("2150-01-10"), t("2150-02-01"), pd.NaT]})
    assert in_hospital_mortality(stays).tolist() == [1, 1, 0, 0]


def test_split_is_patient_level_seeded_and_forces_gold_to_test():
    subjects = list(range(1000, 1100))
    a = split_subjects(subjects + subjects[:10], gold_subjects=[1005, 1050, 4242], seed=7)
    assert a == split_subjects(subjects[::-1], gold_subjects=[1050, 1005], seed=7)
    assert a != split_subjects(subjects, gold_subjects=[1005, 1050], seed=8)
    assert a[1005] == a[1050] == "test" and 4242 not in a
    c = Counter(a.values())
    # test_size (0.2 * 100 - 2) / 100 of the 98 others -> ceil(17.64) = 18 (+ 2 gold); val ceil(80 / 8) = 10.
    assert (c["train"], c["val"], c["test"]) == (70, 10, 20)


def test_split_reproduces_the_authors_train_test_split():
    """The authors' two sklearn draws, derived by hand: ``train_test_split(x, test_size=f, random_state=0)``
    permutes the indices with ``RandomState(0)``, takes the first ``ceil(f * n)`` as test, the rest
    (in permuted order) as train."""
    subjects = [20000000 + 17 * i for i in range(30)]
    gold = [subjects[4], subjects[11]]
    left = [s for s in subjects if s not in gold]
    n_test = int(np.ceil((30 * 0.2 - 2) / 30 * 28))  # 4
    perm = np.random.RandomState(0).permutation(28)
    test = [left[i] for i in perm[:n_test]]
    train_val = [left[i] for i in perm[n_test:]]
    perm2 = np.random.RandomState(0).permutation(len(train_val))
    n_val = int(np.ceil(len(train_val) / 8))  # 3
    val = [train_val[i] for i in perm2[:n_val]]
    expected = {s: "train" for s in train_val}
    expected.update({s: "val" for s in val})
    expected.update({s: "test" for s in test + gold})
    assert split_subjects(subjects[::-1], gold, seed=0) == expected
    # Gold subjects alone reach 20 %: test is the gold subjects.
    g = split_subjects(subjects[:10], subjects[:3], seed=0)
    assert [s for s in subjects[:10] if g[s] == "test"] == subjects[:3]
    with pytest.raises(DataError, match="too few"):
        split_subjects([1, 2], [], seed=0)


def test_race_groups_follow_the_authors_table():
    assert race_group("WHITE - RUSSIAN") == "WHITE"
    assert race_group("BLACK/CAPE VERDEAN") == "BLACK/AFRICAN AMERICAN"
    assert race_group("HISPANIC/LATINO - PUERTO RICAN") == "HISPANIC/LATINO"
    assert race_group("ASIAN - CHINESE") == "ASIAN"
    assert race_group("UNABLE TO OBTAIN") == "UNKNOWN/UNABLE TO OBTAIN/PATIENT DECLINED TO ANSWER"
    assert race_group("AMERICAN INDIAN/ALASKA NATIVE") == "OTHER"
    assert race_group("SOUTH AMERICAN") == "OTHER"  # the authors' table, not "HISPANIC/LATINO"
    assert race_group("PORTUGUESE") is None and race_group(None) is None  # not in the table: imputed with the mode


def test_progression_ehr_window_is_t1_minus_1_to_t2_plus_1():
    """Hours h with h - 1 <= t2 and h + 1 >= t1 (the authors' row selection)."""
    row = {"cxr1_hours": 5.0, "cxr2_hours": 10.0}
    assert ehr_window("disease_progression", row) == (4, 11)
    assert ehr_window("disease_progression", {"cxr1_hours": 5.3, "cxr2_hours": 9.6}) == (5, 10)
    assert ehr_window("disease_progression", {"cxr1_hours": 0.4, "cxr2_hours": 12.0}) == (0, 13)
    assert ehr_window("mortality_los", row) == (0, 48)


def test_check_jpeg(tmp_path):
    from PIL import Image

    p = tmp_path / "a.jpg"
    noise = np.random.default_rng(0).integers(0, 255, (20, 30), dtype=np.uint8)
    Image.fromarray(noise, mode="L").save(p, format="JPEG")
    assert check_jpeg(p) == (30, 20)
    data = p.read_bytes()
    (tmp_path / "t.jpg").write_bytes(data[: len(data) * 3 // 4])  # cut inside the scan data
    assert check_jpeg(tmp_path / "t.jpg") == "truncated JPEG"
    (tmp_path / "g.jpg").write_bytes(b"not an image")
    assert check_jpeg(tmp_path / "g.jpg") == "unreadable JPEG"
    assert check_jpeg(tmp_path / "none.jpg") == "missing JPEG"


def test_scene_graph_parsing_edge_cases():
    counts = Counter()
    assert validate_box((10, 10, 5, 20), 100, 100) is None
    assert validate_box((float("nan"), 0, 5, 5), 100, 100) is None
    assert validate_box((-5, 0, 50, 500), 100, 100) == (0.0, 0.0, 50.0, 100.0)  # clipped to the image
    doc = {"objects": [{"bbox_name": "left lung", "original_x1": 1, "original_y1": 2, "original_x2": 30,
                        "original_y2": 40}],
           "relationships": [
               {"subject_id": "cur_left lung", "object_id": "pri_left lung", "bbox_name": "left lung",
                "relationship_names": ["comparison|yes|improved"],
                "attributes": [["anatomicalfinding|yes|pulmonary edema/hazy opacity", "disease|yes|pneumonia",
                                "anatomicalfinding|no|atelectasis"]]},
               {"subject_id": "cur_left lung", "object_id": "pri_left lung", "bbox_name": "left lung",
                "relationship_names": ["comparison|yes|worsened"], "attributes": ["disease|yes|pneumonia"]},
               {"subject_id": "garbage", "object_id": "x", "relationship_names": ["comparison|yes|worsened"]},
           ]}
    sg = parse_scene_graph(doc, "cur", 100, 100, counts)
    assert sg.first_prior == "pri" and [r.comparisons for r in sg.relations] == [(1,), (0,)]
    assert sg.relations[0].findings[2] == ("anatomicalfinding", "no", "atelectasis")
    assert counts["relationship malformed"] == 1
    with pytest.raises(ValueError):
        parse_scene_graph({"relationships": []}, "cur", 100, 100, counts)

    ll = REGIONS.index("left lung")
    authors = ProgressionLabeler({"cur": sg}, GoldLabels(), "authors")
    lab = authors.pair("pri", "cur")
    # Edema (ImaGenome's name) improved; pneumonia improved in one relationship, worsened in the
    # other -> dropped; "anatomicalfinding|no|atelectasis" counts as atelectasis (yes/no not read).
    assert lab.study.tolist() == [1, 3, 3, 1, 3, 3, 3] and lab.keep
    assert lab.region[ll].tolist() == [1, 3, 3, 1, 3, 3, 0]  # region level: the later relationship wins
    assert authors.pair("other", "cur").keep is False  # the graph pairs "cur" with "pri" only
    severity = ProgressionLabeler({"cur": sg}, GoldLabels(), "severity")
    lab = severity.pair("pri", "cur")
    assert lab.region[ll].tolist() == [3, 3, 3, 1, 3, 3, 0] and lab.study.tolist() == [3, 3, 3, 1, 3, 3, 0]
    assert severity.counts["conflicting region labels (most severe kept)"] == 1
    assert severity.pair("other", "cur").keep is True  # every pair is a sample under the severity rule


def test_repeated_comparison_name_counts_twice_as_in_the_authors_list():
    doc = {"objects": [], "relationships": [
        {"subject_id": "cur_left lung", "object_id": "pri_left lung", "bbox_name": "left lung",
         "relationship_names": ["comparison|yes|worsened", "comparison|yes|worsened"],
         "attributes": ["anatomicalfinding|yes|lung opacity"]}]}
    sg = parse_scene_graph(doc, "cur", 100, 100, Counter())
    lab = ProgressionLabeler({"cur": sg}, GoldLabels(), "authors").pair("pri", "cur")
    assert not lab.keep and (lab.region == 3).all()  # len(compare) == 2: not exactly one comparison
    lab = ProgressionLabeler({"cur": sg}, GoldLabels(), "severity").pair("pri", "cur")
    assert lab.study[DISEASES.index("lung opacity")] == 0


def test_gcs_text_and_units_are_parsed():
    acc = HourlyAccumulator(np.array([1]), pd.Series([pd.Timestamp(T0)]), pd.Series([pd.Timestamp(at(10))]))
    df = pd.DataFrame({
        "stay_id": [1] * 5, "itemid": [223901, 223901, 223761, 226730, 224639],
        "charttime": [str(at(0.5)), str(at(1.5)), str(at(2.5)), str(at(3.5)), str(at(4.5))],
        "value": ["Obeys Commands", "Bogus text", "37.5", "70", "200"],
        "valuenum": [None, None, "37.5", "70", "200"], "valueuom": ["", "", "°C", "Inch", "lbs"]})
    acc.add(df, "chartevents")
    values, masks, _ = acc.grids()
    cols = {c: EHR_VALUE_COLUMNS.index(c) for c in ("glascow_coma_scale_motor_response", "temperature", "height",
                                                      "weight")}
    assert values[0, cols["glascow_coma_scale_motor_response"]] == 6
    assert masks[1, cols["glascow_coma_scale_motor_response"]] == 0 and acc.counts["event with NaN/unparseable value"] == 1
    assert values[2, cols["temperature"]] == pytest.approx(37.5)
    assert values[3, cols["height"]] == pytest.approx(177.8)
    assert values[4, cols["weight"]] == pytest.approx(90.718, abs=1e-3)
