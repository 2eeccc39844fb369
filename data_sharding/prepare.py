"""``dipro prepare``: raw MIMIC-CXR-JPG + MIMIC-IV + Chest ImaGenome -> the processed layout.

Order of work (each step's counts go to ``report.json``):

1. check every required file and its columns up front (fail fast, naming file + column);
2. stay rules (LOS IQR included), then CXR rules (:mod:`data_sharding.cohort`), JPEG check
   and scene graphs in between (they read files, so only for CXRs still in play);
3. patient-level split (:mod:`data_sharding.splits`), labels (:mod:`data_sharding.labels`,
   :mod:`data_sharding.dp_labels`);
4. EHR streamed block by block for the cohort (:mod:`data_sharding.ehr`), normalisation
   statistics over the ``norm_stats`` population; demographics (:mod:`data_sharding.demographics`);
5. everything written into a temporary folder beside ``out`` and renamed into
   place (:func:`data_sharding.atomic.atomic_dir`), so ``out`` is either complete or
   absent, and a previous ``out`` stays as it was when a write fails (disk full: one
   line naming the file, no temp folder left).

The defaults follow the authors' definitions; each deviation is one option away
(:class:`PrepareOptions`, docs/FIDELITY.md).  Layout: docs/ARCHITECTURE.md section 1.
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

from data_sharding import acquisition as A
from data_sharding import atomic, publish
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
    LOS_BIN_EDGES,
    SPLITS,
)
from data_sharding.defaults import NORM_STATS  # re-exported: one source
from data_sharding.dp_labels import DP_LABEL_MODES, GOLD_MODES, REGION_NAME_MODES, ProgressionLabeler
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
from data_sharding.errors import ConfigError, DataError, UserError

EVENT_COLUMNS = {
    "chartevents": ["charttime", "value", "valuenum", "valueuom"],
    "labevents": ["charttime", "value", "valuenum", "valueuom"],
    "outputevents": ["charttime", "value", "valueuom"],
}


@dataclass
class PrepareOptions:
    split_seed: int = DEFAULT_SPLIT_SEED
    """``random_state`` of both ``train_test_split`` draws (the authors' value is 0)."""
    dp_labels: str = DP_LABEL_MODES[0]
    """Disease-progression label rule: ``authors`` | ``severity`` (:mod:`data_sharding.dp_labels`)."""
    gold_labels: str = GOLD_MODES[0]
    """Gold correction of a study label (``authors`` rule): ``per-disease`` | ``first-row`` (the authors' code)."""
    region_names: str = REGION_NAME_MODES[0]
    """Region-level finding names: ``mapped`` (edema counted) | ``authors`` (literal: no region edema label)."""
    norm_stats: str = NORM_STATS[0]
    """Population of the EHR and demographic statistics: ``train`` (cohort train stays) | ``all`` (authors)."""
    block_size: int = DEFAULT_BLOCK_SIZE
    """Bytes per streamed block of an event table."""
    full_jpeg_decode: bool = False
    """Decode every pixel of each kept JPEG (default: header, markers, end-of-image)."""
    overwrite: bool = False
    progress: bool = True
    ehr_rows_per_part: int = 250_000

    def __post_init__(self) -> None:
        for name, allowed in (("dp_labels", DP_LABEL_MODES), ("gold_labels", GOLD_MODES),
                              ("region_names", REGION_NAME_MODES), ("norm_stats", NORM_STATS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"prepare option {name}={getattr(self, name)!r}: expected one of {', '.join(allowed)}")
        if self.dp_labels == "severity" and self.gold_labels != "per-disease":
            raise ConfigError("prepare option gold_labels applies to dp_labels=authors only "
                              "(the severity rule labels a gold pair by its gold rows alone)")
        if self.block_size < 1:
            raise ConfigError(f"prepare option block_size={self.block_size}: expected >= 1 byte")

    def fidelity(self) -> dict:
        """The options that change definitions, as recorded in report.json."""
        return {"split_seed": self.split_seed, "dp_labels": self.dp_labels, "gold_labels": self.gold_labels,
                "region_names": self.region_names, "norm_stats": self.norm_stats}


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

def stream_ehr(paths: dict[str, Path], stays: pd.DataFrame, population: pd.DataFrame, report: C.RuleReport,
               opts: PrepareOptions) -> tuple[E.HourlyAccumulator, E.EventStats, pd.DataFrame]:
    """Stream every event table block by block: the hourly grid of the cohort ``stays``, the
    measurement statistics of the ``population`` stays (``--norm-stats all``; empty otherwise),
    and each of these stays' first height and weight.

    Returns the accumulators and the stays ``EventStats`` indexes (cohort, then population)."""
    acc = E.HourlyAccumulator(stays["stay_id"].to_numpy(), stays["intime"], stays["outtime"])
    union = pd.concat([stays, population], ignore_index=True).drop_duplicates("stay_id").reset_index(drop=True)
    stats = E.EventStats(union["stay_id"].to_numpy(), union["intime"], union["outtime"],
                         union["stay_id"].isin(population["stay_id"]).to_numpy(),
                         first_vars=(EHR_VALUE_COLUMNS.index("height"), EHR_VALUE_COLUMNS.index("weight")))
    cohort_ids = stays["stay_id"].to_numpy()
    hadm_to_stay = pd.Series(union["stay_id"].to_numpy(), index=union["hadm_id"].to_numpy())
    other_info: Counter = Counter()
    for source in ("chartevents", "labevents", "outputevents"):
        itemids = [v.itemid for v in EHR_VARIABLES if v.source == source]
        if not itemids:
            continue
        path = paths[source]
        key = "hadm_id" if source == "labevents" else "stay_id"  # one ICU stay per admission (cohort rule)
        keys = union[key].to_numpy()
        bar = tqdm(total=path.stat().size, desc=f"read {source}", unit="B", unit_scale=True,
                   disable=not opts.progress)
        done = 0
        kind = "outputevents" if source == "outputevents" else "chartevents"
        for block, pos in stream_events(path, source, EVENT_COLUMNS[source], itemids, keys, key, opts.block_size):
            if source == "labevents":
                block["stay_id"] = hadm_to_stay.reindex(block["hadm_id"].to_numpy()).to_numpy()
            mine = block["stay_id"].isin(cohort_ids).to_numpy()
            ev = E.parse_block(block[mine], kind, acc.info)
            acc.add_events(ev)
            if not mine.all():  # population-only rows: parsed apart (cleaning counts are the cohort's)
                ev = E.merge_in_order(ev, np.flatnonzero(mine),
                                      E.parse_block(block[~mine], kind, other_info), np.flatnonzero(~mine))
            stats.add(ev)
            bar.update(max(0, pos - done))
            done = max(done, pos)
        bar.close()
    for k, v in acc.counts.items():
        report.skip(k, v)
    return acc, stats, union


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
    from data_sharding import storage

    out = storage.resolve(out)
    if out.is_remote:
        token = publish.published_token(out)
        if token is not None and not opts.overwrite:
            raise UserError(f"output {out} already holds processed tables (pass --overwrite to replace them)")
    else:
        token = None
        if out.exists() and not out.is_dir():
            raise UserError(f"output path {out} exists and is not a directory")
        if out.exists() and any(out.local.iterdir()) and not opts.overwrite:
            raise UserError(f"output directory {out} exists and is not empty (pass --overwrite to replace it)")
    paths = check_inputs(roots)
    report = C.RuleReport()

    patients, admissions, icustays, metadata = _read_dimension_tables(paths)
    all_stays, stays = C.select_stays(patients, admissions, icustays, report)
    images = C.select_images(metadata, report)
    cxr = C.match_to_stays(images, stays, report)
    cxr = check_images(cxr, roots, report, opts)
    cxr, graphs = load_scene_graphs(cxr, roots, report, opts)
    stays, cxr = C.apply_cxr_rules(stays, cxr, report)
    if stays.empty:
        raise DataError("no ICU stay passes the cohort rules; see the counts above:\n" + report.summary())
    acquisition = A.read_acquisition(paths["mimic-cxr-2.0.0-metadata"], cxr["dicom_id"])

    gold_counts: Counter = Counter()
    gold = read_gold(roots.gold_file, gold_counts)
    for k, v in gold_counts.items():
        report.skip(k, v)

    # Outcomes and split.
    stays = stays.copy()
    stays["mortality"] = L.in_hospital_mortality(stays)
    stays["los_bin"] = L.los_bin(stays["los_days"].to_numpy())
    split = split_subjects(stays["subject_id"], gold.subjects, opts.split_seed)
    stays["split"] = stays["subject_id"].map(split)
    is_train = (stays["split"] == "train").to_numpy()
    if not is_train.any():
        raise DataError(f"the cohort has {stays['subject_id'].nunique()} subject(s): too few for a training split")

    # Labels.
    labeler = ProgressionLabeler(graphs, gold, opts.dp_labels, opts.gold_labels, opts.region_names)
    progression, n_pairs = L.progression_table(stays, cxr, labeler)
    dp_counts = dict(sorted(labeler.counts.items()))
    no_label = {k[len("pairs dropped: "):]: v for k, v in dp_counts.items() if k.startswith("pairs dropped: ")}
    report.rule("progression_pair_labelled", "pairs", len(progression), no_label,
                details={k: v for k, v in dp_counts.items() if not k.startswith("pairs dropped: ")} or None)
    mortality_los, too_few = L.mortality_los_table(stays, cxr, labeler)
    long_stays = int((mortality_los["los_days"] >= LOS_BIN_EDGES[-1]).sum()) if len(mortality_los) else 0
    report.rule("mortality_los_2_cxrs_before_48h", "stays", len(mortality_los),
                {"fewer than 2 CXRs before 48 h": too_few},
                details={f"LOS >= {LOS_BIN_EDGES[-1]:g} d, in the last LOS bin": long_stays} if long_stays else None)

    # EHR and demographics: statistics over the `norm_stats` population.
    population = stays[is_train] if opts.norm_stats == "train" else all_stays
    acc, stats, union = stream_ehr(paths, stays, population if opts.norm_stats == "all" else stays.iloc[:0],
                                   report, opts)
    values, masks, offsets = acc.grids()
    no_events = int((np.add.reduceat(masks.sum(axis=1), offsets[:-1]) == 0).sum()) if len(values) else 0
    values = E.impute(values, offsets)
    if opts.norm_stats == "train":  # this project: the training stays' hourly grid
        mean, std = E.grid_stats(values, offsets, is_train)
        n_stat = np.full(len(EHR_VALUE_COLUMNS), int(np.diff(offsets)[is_train].sum()))
    else:  # the authors: every measurement of every stay
        mean, std = stats.mean_std()
        n_stat = stats.counts()
    values = (values - mean) / std

    raw = D.raw_features(union, stats.first_values(EHR_VALUE_COLUMNS.index("height")),
                         stats.first_values(EHR_VALUE_COLUMNS.index("weight")))
    in_pop = union["stay_id"].isin(population["stay_id"]).to_numpy()  # union holds every population stay
    defaults = {c: float(E.NORMAL[EHR_VALUE_COLUMNS.index(c)]) for c in ("height", "weight")}
    demo_stats = D.fit(raw[in_pop], {"age": 65.0, **defaults})
    cohort_raw = raw.set_index("stay_id").loc[stays["stay_id"].to_numpy()].reset_index()
    demo, imputed = D.apply(cohort_raw, demo_stats)
    race_unlisted = int(sum(isinstance(r, str) and r.strip() != "" and D.race_group(r) is None for r in stays["race"]))
    demographics_report = {"population": opts.norm_stats, "n_stays": int(in_pop.sum()),
                           "q1": demo_stats["q1"], "q3": demo_stats["q3"],
                           "outliers_excluded_from_stats": demo_stats["outliers_excluded"],
                           "imputed_in_cohort": imputed, "mode": demo_stats["mode"],
                           "race_not_in_the_authors_table": race_unlisted}

    # Write everything into a temp dir beside `out`, then rename (data_sharding.atomic).
    existed = token is not None if out.is_remote else out.exists()
    unchanged = f"{out} is unchanged" if existed else f"{out} was not created"

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

    with publish.publish_dir(out, unchanged=unchanged, expect_token=token) as tmp:
        steps = tqdm(total=9, desc="write processed", unit="file", disable=not opts.progress)
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
        step(A.FILE, A.write_acquisition, acquisition, tmp / A.FILE)
        step("ehr_stats.json", _write_json, {
            "mean": dict(zip(EHR_VALUE_COLUMNS, map(float, mean))),
            "std": dict(zip(EHR_VALUE_COLUMNS, map(float, std))),
            "n_stays": int(population["stay_id"].nunique()), "split": opts.norm_stats,
            "statistic": "hourly_rows" if opts.norm_stats == "train" else "events",
            "n": dict(zip(EHR_VALUE_COLUMNS, map(int, n_stat))),
            "demographics": {k: demo_stats[k] for k in ("mean", "std", "q1", "q3", "mode")}},
            tmp / "ehr_stats.json", count=False)
        step("label_stats.json", _write_json, L.label_stats(progression, mortality_los), tmp / "label_stats.json")
        counts = {
            "subjects": int(stays["subject_id"].nunique()), "stays": len(stays), "cxrs": len(cxr),
            "progression_pairs": len(progression),
            "progression_pairs_gold": int((progression["label_source"] == "gold").sum()) if len(progression) else 0,
            "mortality_los_stays": len(mortality_los),
            "stays_per_split": {s: int((stays["split"] == s).sum()) for s in SPLITS},
            "subjects_per_split": {s: int(stays.loc[stays["split"] == s, "subject_id"].nunique()) for s in SPLITS},
            "ehr_rows": int(offsets[-1]), "ehr_parts": len(parts), "ehr_events_used": acc.n_events,
            "stays_without_ehr_events": no_events, "consecutive_pairs": n_pairs,
        }
        rep = report.to_dict()
        rep.update({"ehr_cleaning": dict(sorted(acc.info.items())), "counts": counts,
                    "normalisation": {"population": opts.norm_stats, "n_stays": int(population["stay_id"].nunique()),
                                      "statistic": "hourly rows" if opts.norm_stats == "train" else "events",
                                      "n": int(n_stat.sum())},
                    "demographics": demographics_report, "acquisition": A.acquisition_counts(acquisition),
                    "inputs": {"cxr": str(roots.cxr), "mimiciv": str(roots.mimiciv),
                               "imagenome": str(roots.imagenome)},
                    "options": opts.fidelity(), "split_seed": opts.split_seed})
        step("report.json", _write_json, rep, tmp / "report.json")
        steps.close()
    return PrepareResult(out=out, report=rep, seconds=time.perf_counter() - t0, counts=counts)


def format_summary(result: PrepareResult) -> str:
    """The per-rule counts of report.json plus the headline counts, as printed by the CLI."""
    rep = C.RuleReport(rules=result.report["rules"], skipped=Counter(result.report["skipped"]))
    c = result.counts
    norm, demo = result.report["normalisation"], result.report["demographics"]
    opts = ", ".join(f"{k}={v}" for k, v in result.report["options"].items())
    lines = [rep.summary(), "",
             f"options: {opts}",
             f"cohort: {c['subjects']} subjects, {c['stays']} stays, {c['cxrs']} CXRs "
             f"(stays per split: {c['stays_per_split']}; subjects per split: {c['subjects_per_split']})",
             f"disease_progression: {c['progression_pairs']} of {c['consecutive_pairs']} consecutive pairs "
             f"({c['progression_pairs_gold']} gold); mortality_los: {c['mortality_los_stays']} stays",
             f"EHR: {c['ehr_rows']} hourly rows in {c['ehr_parts']} part(s) from {c['ehr_events_used']} events; "
             f"{c['stays_without_ehr_events']} stay(s) without any event; statistics: {norm['statistic']} of the "
             f"{norm['population']} population ({norm['n_stays']} stays, {norm['n']} values)",
             "EHR cleaning: " + (", ".join(f"{k}: {v}" for k, v in result.report["ehr_cleaning"].items()) or "none"),
             "demographics: " + ", ".join(
                 f"{v} Q1-Q3 {demo['q1'][v]:.4g}-{demo['q3'][v]:.4g} ({demo['outliers_excluded_from_stats'][v]} "
                 f"outliers out of the statistics, kept)" for v in D.CONTINUOUS)
             + "; imputed: " + (", ".join(f"{k} {n}" for k, n in demo["imputed_in_cohort"].items() if n) or "none")
             + f"; race not in the authors' table: {demo['race_not_in_the_authors_table']}",
             "acquisition (" + A.FILE + "): " + "; ".join(
                 f + " " + ", ".join(f"{k} {n}" for k, n in list(result.report["acquisition"][f].items())[:4])
                 for f in A.FACTORS),
             f"wrote {result.out} in {result.seconds:.1f} s"]
    return "\n".join(lines)
