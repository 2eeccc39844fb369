"""``dipro prepare``: raw MIMIC-CXR-JPG + MIMIC-IV + Chest ImaGenome -> the processed layout.

Order of work (each step's counts go to ``report.json``):

1. check every required file and its columns up front (fail fast, naming file + column);
2. stay rules, then CXR rules (:mod:`data_sharding.cohort`), JPEG check and
   scene graphs in between (they read files, so only for CXRs still in play);
3. patient-level split (:mod:`data_sharding.splits`), labels (:mod:`data_sharding.labels`);
4. EHR streamed block by block for the final cohort (:mod:`data_sharding.ehr`),
   train-only statistics; demographics (:mod:`data_sharding.demographics`);
5. everything written into a temporary folder beside ``out`` and renamed into
   place (:func:`data_sharding.atomic.atomic_dir`), so ``out`` is either complete or
   absent, and a previous ``out`` stays as it was when a write fails (disk full: one
   line naming the file, no temp folder left).

Layout: docs/ARCHITECTURE.md section 1.
"""
from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from data_sharding import atomic
from data_sharding import cohort as C
from data_sharding import demographics as D
from data_sharding import ehr as E
from data_sharding import labels as L
from data_sharding.constants import (
    BOX_COLUMNS,
    DEMOGRAPHIC_COLUMNS,
    DISEASE_SLUGS,
    EHR_VALUE_COLUMNS,
    EHR_VARIABLES,
    SPLITS,
)
from data_sharding.imagenome import SceneGraphSource, parse_scene_graph, read_gold
from data_sharding.readers import (
    DEFAULT_BLOCK_SIZE,
    RawRoots,
    check_columns,
    check_jpeg,
    find_table,
    read_table,
    stream_events,
)
from data_sharding.splits import DEFAULT_SPLIT_SEED, split_subjects
from data_sharding.errors import DataError, UserError

EVENT_COLUMNS = {
    "chartevents": ["charttime", "value", "valuenum", "valueuom"],
    "labevents": ["charttime", "value", "valuenum", "valueuom"],
    "outputevents": ["charttime", "value", "valueuom"],
}


@dataclass
class PrepareOptions:
    split_seed: int = DEFAULT_SPLIT_SEED
    block_size: int = DEFAULT_BLOCK_SIZE
    """Bytes per streamed block of an event table."""
    full_jpeg_decode: bool = False
    """Decode every pixel of each kept JPEG (default: header, markers, end-of-image)."""
    overwrite: bool = False
    progress: bool = True
    ehr_rows_per_part: int = 250_000


@dataclass
class PrepareResult:
    out: Path
    report: dict
    seconds: float
    counts: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- inputs

def check_inputs(roots: RawRoots) -> dict[str, Path]:
    """Find every table (required ones must exist) and check its columns before any work."""
    paths: dict[str, Path] = {}
    used_sources = {v.source for v in EHR_VARIABLES}
    for table in ("mimic-cxr-2.0.0-metadata", "patients", "admissions", "icustays", *sorted(used_sources)):
        paths[table] = find_table(roots, table)
        check_columns(paths[table], table)
    for table in ("mimic-cxr-2.0.0-chexpert", "chartevents", "labevents", "outputevents", "d_items", "d_labitems"):
        if table not in paths:
            p = find_table(roots, table, required=False)
            if p is not None:
                check_columns(p, table)
                paths[table] = p
    if roots.gold_file.is_file():
        check_columns(roots.gold_file, "gold_object_comparison", delimiter="\t")
    return paths


def _read_dimension_tables(paths: dict[str, Path]) -> tuple[pd.DataFrame, ...]:
    patients = read_table(paths["patients"], "patients",
                          ["subject_id", "gender", "anchor_age", "anchor_year", "dod"], int_columns=["subject_id"])
    admissions = read_table(paths["admissions"], "admissions",
                            ["subject_id", "hadm_id", "admittime", "dischtime", "deathtime", "language",
                             "marital_status", "race"], int_columns=["subject_id", "hadm_id"])
    icustays = read_table(paths["icustays"], "icustays",
                          ["subject_id", "hadm_id", "stay_id", "first_careunit", "last_careunit", "intime", "outtime"],
                          int_columns=["subject_id", "hadm_id", "stay_id"])
    metadata = read_table(paths["mimic-cxr-2.0.0-metadata"], "mimic-cxr-2.0.0-metadata",
                          ["dicom_id", "subject_id", "study_id", "ViewPosition", "StudyDate", "StudyTime"],
                          int_columns=["subject_id", "study_id"])
    return patients, admissions, icustays, metadata


# ----------------------------------------------------------------------------- CXR file rules

def check_images(cxr: pd.DataFrame, roots: RawRoots, report: C.RuleReport, opts: PrepareOptions) -> pd.DataFrame:
    """Rule ``readable_jpeg``: keep CXRs whose JPEG exists and decodes; record width/height."""
    paths, widths, heights, keep = [], [], [], []
    reasons: Counter = Counter()
    it = tqdm(cxr.itertuples(index=False), total=len(cxr), desc="check JPEGs", unit="img", disable=not opts.progress)
    for r in it:
        p = roots.image_path(r.subject_id, r.study_id, r.dicom_id)
        res = check_jpeg(p, full_decode=opts.full_jpeg_decode)
        ok = isinstance(res, tuple)
        if not ok:
            reasons[res] += 1
        keep.append(ok)
        paths.append(str(p))
        widths.append(res[0] if ok else 0)
        heights.append(res[1] if ok else 0)
    out = cxr.assign(image_path=paths, width=widths, height=heights)[np.asarray(keep, dtype=bool)]
    report.rule("readable_jpeg", "images", len(out), reasons)
    for k, v in reasons.items():
        report.skip(f"CXR with {k}", v)
    return out.reset_index(drop=True)


def load_scene_graphs(cxr: pd.DataFrame, roots: RawRoots, report: C.RuleReport, opts: PrepareOptions):
    """Rule ``scene_graph``: keep CXRs with a well-formed scene graph; return (cxr, {dicom: SceneGraph})."""
    source = SceneGraphSource(roots.imagenome)
    graphs = {}
    keep = []
    reasons: Counter = Counter()
    counts: Counter = Counter()
    try:
        it = tqdm(cxr.itertuples(index=False), total=len(cxr), desc="scene graphs", unit="img",
                  disable=not opts.progress)
        for r in it:
            try:
                doc = source.load(r.dicom_id)
                if doc is None:
                    reasons["no scene graph in Chest ImaGenome"] += 1
                    keep.append(False)
                    continue
                graphs[r.dicom_id] = parse_scene_graph(doc, r.dicom_id, int(r.width), int(r.height), counts)
                keep.append(True)
            except ValueError:
                reasons["malformed scene graph"] += 1
                keep.append(False)
    finally:
        source.close()
    out = cxr[np.asarray(keep, dtype=bool)].reset_index(drop=True)
    report.rule("scene_graph", "images", len(out), reasons)
    report.skip("malformed scene graph", reasons["malformed scene graph"])
    for k, v in counts.items():
        report.skip(k, v)
    return out, graphs


# ----------------------------------------------------------------------------- EHR

def stream_ehr(paths: dict[str, Path], stays: pd.DataFrame, report: C.RuleReport, opts: PrepareOptions):
    """Stream every event table block by block into the hourly accumulator of the cohort stays."""
    acc = E.HourlyAccumulator(stays["stay_id"].to_numpy(), stays["intime"], stays["outtime"])
    hadm_to_stay = pd.Series(stays["stay_id"].to_numpy(), index=stays["hadm_id"].to_numpy())
    for source in ("chartevents", "labevents", "outputevents"):
        itemids = [v.itemid for v in EHR_VARIABLES if v.source == source]
        if not itemids:
            continue
        path = paths[source]
        key = "hadm_id" if source == "labevents" else "stay_id"  # one ICU stay per admission (cohort rule)
        keys = stays[key].to_numpy()
        bar = tqdm(total=path.stat().st_size, desc=f"read {source}", unit="B", unit_scale=True,
                   disable=not opts.progress)
        done = 0
        for block, pos in stream_events(path, source, EVENT_COLUMNS[source], itemids, keys, key, opts.block_size):
            if source == "labevents":
                block["stay_id"] = hadm_to_stay.reindex(block["hadm_id"].to_numpy()).to_numpy()
            acc.add(block, "outputevents" if source == "outputevents" else "chartevents")
            bar.update(max(0, pos - done))
            done = max(done, pos)
        bar.close()
    for k, v in acc.counts.items():
        report.skip(k, v)
    return acc


# ----------------------------------------------------------------------------- writing

def _write(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def _labels_type() -> pa.DataType:
    return pa.list_(pa.list_(pa.int8()))


def write_cohort(stays: pd.DataFrame, path: Path) -> None:
    schema = pa.schema([("subject_id", pa.int64()), ("hadm_id", pa.int64()), ("stay_id", pa.int64()),
                        ("intime", pa.timestamp("us")), ("outtime", pa.timestamp("us")), ("los_days", pa.float64()),
                        ("mortality", pa.int8()), ("los_bin", pa.int8()), ("split", pa.string())])
    df = stays[[f.name for f in schema]]
    _write(pa.Table.from_pandas(df, schema=schema, preserve_index=False), path)


def write_cxr(cxr: pd.DataFrame, graphs: dict, path: Path) -> None:
    fields = [("subject_id", pa.int64()), ("stay_id", pa.int64()), ("study_id", pa.int64()),
              ("dicom_id", pa.string()), ("hours", pa.float64()), ("image_path", pa.string()),
              ("width", pa.int32()), ("height", pa.int32())]
    fields += [(c, pa.list_(pa.float64())) for c in BOX_COLUMNS]
    schema = pa.schema(fields)
    data = {n: cxr[n].tolist() for n, _ in fields[:8]}
    for j, c in enumerate(BOX_COLUMNS):
        data[c] = [list(graphs[d].boxes[j]) if j in graphs[d].boxes else None for d in cxr["dicom_id"]]
    _write(pa.Table.from_pydict(data, schema=schema), path)


def write_progression(df: pd.DataFrame, path: Path) -> None:
    fields = [("subject_id", pa.int64()), ("stay_id", pa.int64()), ("split", pa.string()),
              ("cxr1_dicom_id", pa.string()), ("cxr2_dicom_id", pa.string()),
              ("cxr1_hours", pa.float64()), ("cxr2_hours", pa.float64())]
    fields += [(c, pa.int8()) for c in DISEASE_SLUGS]
    fields += [("region_labels", _labels_type()), ("label_source", pa.string())]
    schema = pa.schema(fields)
    data = {n: (df[n].tolist() if len(df) else []) for n, _ in fields}
    data["region_labels"] = [np.asarray(a).tolist() for a in data["region_labels"]]
    _write(pa.Table.from_pydict(data, schema=schema), path)


def write_mortality_los(df: pd.DataFrame, path: Path) -> None:
    schema = pa.schema([("subject_id", pa.int64()), ("stay_id", pa.int64()), ("split", pa.string()),
                        ("dicom_ids", pa.list_(pa.string())), ("cxr_hours", pa.list_(pa.float64())),
                        ("mortality", pa.int8()), ("los_days", pa.float64()), ("los_bin", pa.int8()),
                        ("region_labels", pa.list_(_labels_type()))])
    data = {f.name: (df[f.name].tolist() if len(df) else []) for f in schema}
    data["region_labels"] = [np.asarray(a).tolist() for a in data["region_labels"]]
    _write(pa.Table.from_pydict(data, schema=schema), path)


def write_demographics(df: pd.DataFrame, path: Path) -> None:
    schema = pa.schema([("subject_id", pa.int64()), ("stay_id", pa.int64())]
                       + [(c, pa.float32()) for c in DEMOGRAPHIC_COLUMNS])
    _write(pa.Table.from_pandas(df[[f.name for f in schema]], schema=schema, preserve_index=False), path)


def _write_json(obj, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


# ----------------------------------------------------------------------------- orchestration

def prepare(roots: RawRoots, out: str | Path, opts: PrepareOptions | None = None) -> PrepareResult:
    """Run the whole preparation; write ``out`` atomically; return the report."""
    opts = opts or PrepareOptions()
    t0 = time.perf_counter()
    out = Path(out).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise UserError(f"output path {out} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not opts.overwrite:
        raise UserError(f"output directory {out} exists and is not empty (pass --overwrite to replace it)")
    paths = check_inputs(roots)
    report = C.RuleReport()

    patients, admissions, icustays, metadata = _read_dimension_tables(paths)
    stays = C.select_stays(patients, admissions, icustays, report)
    images = C.select_images(metadata, report)
    cxr = C.match_to_stays(images, stays, report)
    cxr = check_images(cxr, roots, report, opts)
    cxr, graphs = load_scene_graphs(cxr, roots, report, opts)
    cxr = C.apply_min_gap(cxr, report)
    stays, cxr = C.apply_stay_cxr_rules(stays, cxr, report)
    if stays.empty:
        raise DataError("no ICU stay passes the cohort rules; see the counts above:\n" + report.summary())

    gold_counts: Counter = Counter()
    gold = read_gold(roots.gold_file, gold_counts)
    for k, v in gold_counts.items():
        report.skip(k, v)

    # Outcomes and split.
    stays = stays.copy()
    stays["los_days"] = (stays["outtime"] - stays["intime"]) / pd.Timedelta(days=1)
    stays["mortality"] = L.in_hospital_mortality(stays)
    stays["los_bin"] = L.los_bin(stays["los_days"].to_numpy())
    split = split_subjects(stays["subject_id"], gold.subjects & set(stays["subject_id"].tolist()), opts.split_seed)
    stays["split"] = stays["subject_id"].map(split)
    is_train = (stays["split"] == "train").to_numpy()
    if not is_train.any():
        raise DataError(f"the cohort has {stays['subject_id'].nunique()} subject(s): too few for a training split")

    # Labels.
    pairs = L.pair_labels(cxr, graphs, gold)
    progression = L.progression_table(stays, cxr, pairs)
    mortality_los, too_few = L.mortality_los_table(stays, cxr, pairs)
    report.rule("mortality_los_2_cxrs_in_48h", "stays", len(mortality_los),
                {"fewer than 2 CXRs in the first 48 h": too_few})

    # EHR.
    acc = stream_ehr(paths, stays, report, opts)
    values, masks, offsets = acc.grids()
    height = E.first_observed(values, masks, offsets, EHR_VALUE_COLUMNS.index("height"))
    weight = E.first_observed(values, masks, offsets, EHR_VALUE_COLUMNS.index("weight"))
    no_events = int((np.add.reduceat(masks.sum(axis=1), offsets[:-1]) == 0).sum()) if len(values) else 0
    values = E.impute(values, offsets)
    mean, std = E.train_stats(values, offsets, is_train)
    values = (values - mean) / std  # z-score with training-split statistics only

    demo_raw = D.raw_features(stays, np.where(np.isnan(height), E.NORMAL[EHR_VALUE_COLUMNS.index("height")], height),
                              np.where(np.isnan(weight), E.NORMAL[EHR_VALUE_COLUMNS.index("weight")], weight))
    demo, demo_stats = D.normalise(demo_raw, is_train)

    # Write everything into a temp dir beside `out`, then rename (data_sharding.atomic).
    unchanged = f"{out} is unchanged" if out.exists() else f"{out} was not created"

    def step(name: str, write, *args, count: bool = True) -> None:
        """One output file: a failed write names it (``out/name``) and what stays unchanged."""
        try:
            write(*args)
        except BaseException as exc:
            err = atomic.storage_error(exc, out / name, unchanged)
            if err is not None and err is not exc:
                raise err from exc
            raise
        if count:
            steps.update()

    with atomic.atomic_dir(out, unchanged=unchanged) as tmp:
        steps = tqdm(total=8, desc="write processed", unit="file", disable=not opts.progress)
        step("cohort.parquet", write_cohort, stays, tmp / "cohort.parquet")
        step("cxr.parquet", write_cxr, cxr, graphs, tmp / "cxr.parquet")
        step("tasks/disease_progression.parquet", write_progression, progression,
             tmp / "tasks" / "disease_progression.parquet")
        step("tasks/mortality_los.parquet", write_mortality_los, mortality_los,
             tmp / "tasks" / "mortality_los.parquet")
        parts: list[Path] = []
        step("ehr/", lambda: parts.extend(E.write_parts(
            tmp / "ehr", stays["stay_id"].to_numpy(), values, masks, offsets, opts.ehr_rows_per_part)))
        step("demographics.parquet", write_demographics, demo, tmp / "demographics.parquet")
        step("ehr_stats.json", _write_json, {"mean": dict(zip(EHR_VALUE_COLUMNS, map(float, mean))),
                                             "std": dict(zip(EHR_VALUE_COLUMNS, map(float, std))),
                                             "n_stays": int(is_train.sum()), "split": "train",
                                             "demographics": demo_stats}, tmp / "ehr_stats.json", count=False)
        step("label_stats.json", _write_json, L.label_stats(progression, mortality_los), tmp / "label_stats.json")
        counts = {
            "subjects": int(stays["subject_id"].nunique()), "stays": len(stays), "cxrs": len(cxr),
            "progression_pairs": len(progression),
            "progression_pairs_gold": int((progression["label_source"] == "gold").sum()) if len(progression) else 0,
            "mortality_los_stays": len(mortality_los),
            "stays_per_split": {s: int((stays["split"] == s).sum()) for s in SPLITS},
            "subjects_per_split": {s: int(stays.loc[stays["split"] == s, "subject_id"].nunique()) for s in SPLITS},
            "ehr_rows": int(offsets[-1]), "ehr_parts": len(parts), "ehr_events_used": acc.n_events,
            "stays_without_ehr_events": no_events,
        }
        rep = report.to_dict()
        rep.update({"ehr_cleaning": dict(sorted(acc.info.items())), "counts": counts,
                    "inputs": {"cxr": str(roots.cxr), "mimiciv": str(roots.mimiciv),
                               "imagenome": str(roots.imagenome)},
                    "split_seed": opts.split_seed})
        step("report.json", _write_json, rep, tmp / "report.json")
        steps.close()
    return PrepareResult(out=out, report=rep, seconds=time.perf_counter() - t0, counts=counts)


def format_summary(result: PrepareResult) -> str:
    """The per-rule counts of report.json plus the headline counts, as printed by the CLI."""
    rep = C.RuleReport(rules=result.report["rules"], skipped=Counter(result.report["skipped"]))
    c = result.counts
    lines = [rep.summary(), "",
             f"cohort: {c['subjects']} subjects, {c['stays']} stays, {c['cxrs']} CXRs "
             f"(stays per split: {c['stays_per_split']})",
             f"disease_progression: {c['progression_pairs']} pairs ({c['progression_pairs_gold']} gold); "
             f"mortality_los: {c['mortality_los_stays']} stays",
             f"EHR: {c['ehr_rows']} hourly rows in {c['ehr_parts']} part(s) from {c['ehr_events_used']} events; "
             f"{c['stays_without_ehr_events']} stay(s) without any event",
             "EHR cleaning: " + (", ".join(f"{k}: {v}" for k, v in result.report["ehr_cleaning"].items()) or "none"),
             f"wrote {result.out} in {result.seconds:.1f} s"]
    return "\n".join(lines)
