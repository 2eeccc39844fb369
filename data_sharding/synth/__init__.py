"""Synthetic MIMIC-CXR-JPG 2.0.0 + MIMIC-IV 2.0 + Chest ImaGenome 1.0.0 in their real layout.

``generate(out_dir, patients=120, seed=0, image_size=256)`` writes::

    DIR/mimic-cxr-jpg/2.0.0/mimic-cxr-2.0.0-metadata.csv.gz, mimic-cxr-2.0.0-chexpert.csv.gz
    DIR/mimic-cxr-jpg/2.0.0/files/p{first 2 digits}/p{subject_id}/s{study_id}/{dicom_id}.jpg
    DIR/mimiciv/2.0/hosp/{patients,admissions,labevents,d_labitems}.csv.gz
    DIR/mimiciv/2.0/icu/{icustays,chartevents,outputevents,d_items}.csv.gz
    DIR/chest-imagenome/1.0.0/silver_dataset/scene_graph/{dicom_id}_SceneGraph.json
    DIR/chest-imagenome/1.0.0/gold_dataset/gold_object_comparison_with_coordinates.txt
    DIR/SYNTH.json   (generator settings and counts; not part of the real datasets)

Same (patients, seed, image_size, acquisition_shift, anatomy_types) -> byte-identical files.

``acquisition_shift=S > 0`` plants a technical factor (:mod:`.acquisition`): each AP film is
taken erect or recumbent (recumbent more often for sicker stays), written to
``PatientOrientationCodeSequence_CodeMeaning`` and applied to the pixels as a gamma plus noise.
``S = 0`` (the default) writes exactly the files the generator wrote before the factor existed.
``anatomy_types=N > 0`` gives every subject one of N discrete anatomy types, drawn on its frontal
films as a grating of the type's orientation (:mod:`.anatomy_types`): biology that clusters, for
``dipro harmonize``'s cluster consistency; 0 (the default) draws nothing.

Planted signal
--------------
*Images -> disease progression.*  Films are chest-like (two dark lung fields with
ribs, mediastinum, heart, bright sub-diaphragmatic tissue).  The 10 ImaGenome
region boxes are computed from the anatomy, which differs per patient (size,
position, heart size) and is jittered per film (positioning, +-1-2 %), plus
annotation noise on the boxes.  Each disease draws its own pattern at its own
*loci*, scaled by a latent severity in [0, 1] per film:

=============================  =========================================  ===========================================
disease                        pattern                                    loci -> regions whose box shows it
=============================  =========================================  ===========================================
lung opacity                   uniform haze (+42 gray at severity 1)      upper / lower zone -> lung, lower lung zone
consolidation                  dense blob, radius and density grow        upper / lower zone -> lung, lower lung zone
pneumonia                      patchy texture, covered area grows         upper / lower zone -> lung, lower lung zone
atelectasis                    horizontal plate-like bands                lower zone -> lung, lower lung zone
pulmonary edema                perihilar haze widening from the hilum     hilum -> hilar structures, lung
pleural effusion               fluid filling the base, lateral meniscus   base -> costophrenic angle, lower zone, lung
enlarged cardiac silhouette    heart and mediastinal band widen           heart -> cardiac silhouette, mediastinum
=============================  =========================================  ===========================================

(left/right per side; the heart is central.)  For each consecutive pair of kept AP
films on a stay's timeline, each active disease gets one state: worsened (its
loci's severity rises 0.18-0.35), improved (falls) or no change; stays ending in
death worsen more often (50/15/35 % instead of 35/30/35 %).  A region's label for a
disease is the state when one of its loci of that disease moved, "no change" when
the state is no change, and otherwise not mentioned (3); 10 % of labels are
dropped to not mentioned, and inactive diseases are not mentioned.  So region
pixels change exactly as labelled, and the labels a region carries for one
disease in one pair always agree (the study-level label is that shared state).
Scene-graph relationships carry these labels; one silver label of a gold subject
is deliberately wrong and the gold file has the true one.

*EHR -> mortality and length of stay* (details in :mod:`.ehr`).  33 % of subjects
die in hospital (``admissions.deathtime`` and ``patients.dod``; 20 % of deaths
only via ``dod``).  A per-stay drift strength moves vitals/labs over the first
48 h (heart rate up, MAP/SBP/DBP and SpO2 down, creatinine, BUN, anion gap,
lactate up, bicarbonate and pH down, urine output down, GCS down); it is large
for 90 % of deaths and small for 90 % of survivors (sudden deaths and sick
survivors are the noise).  LOS is drawn inside one of the 4 bins (edges
[2, 3, 4, 6, 11) days, cycled so each bin is populated; 6 % stay >= 11 days) and
a respiratory latent ``resp = (bin - 1.5) / 1.5 + N(0, 0.3)`` raises FiO2, PEEP,
respiratory rate, PaCO2, WBC, temperature and lowers albumin, decides
ventilation (FiO2/PEEP charted, verbal GCS "No Response-ETT"), and raises the
initial lung-opacity severity.

Irregularities (see :mod:`.cohort`): 2-10 AP films per stay, films before
``intime`` / after ``outtime``, extra earlier AP images in a study (the cohort
keeps the last), lateral images, outpatient PA+LATERAL studies, stays < 48 h,
children, subjects with two admissions, an admission with two ICU stays, care-unit
changes, films < 8 h apart, a >= 96 h gap, a missing region object in ~1 % of
scene graphs, dirty chartevents (see :mod:`.ehr`).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from data_sharding import defaults
from data_sharding.constants import CXR_ROOT, IMAGENOME_ROOT, MIMICIV_ROOT

DEFAULT_PATIENTS = defaults.SYNTH_PATIENTS
DEFAULT_SEED = defaults.SYNTH_SEED
DEFAULT_IMAGE_SIZE = defaults.SYNTH_IMAGE_SIZE
MIN_IMAGE_SIZE = 64


@dataclass
class SynthSummary:
    """What :func:`generate` wrote."""

    out_dir: str
    patients: int
    seed: int
    image_size: int
    counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    acquisition_shift: float = 0.0
    anatomy_types: int = 0


def image_relpath(subject_id: int, study_id: int, dicom_id: str) -> str:
    """MIMIC-CXR-JPG path of an image, relative to ``mimic-cxr-jpg/2.0.0``."""
    return f"files/p{str(subject_id)[:2]}/p{subject_id}/s{study_id}/{dicom_id}.jpg"


def generate(
    out_dir: str | Path,
    patients: int = DEFAULT_PATIENTS,
    seed: int = DEFAULT_SEED,
    image_size: int = DEFAULT_IMAGE_SIZE,
    overwrite: bool = False,
    progress: bool = True,
    acquisition_shift: float = 0.0,
    anatomy_types: int = 0,
) -> SynthSummary:
    """Write a synthetic raw cohort of ``patients`` subjects under ``out_dir`` (atomically).

    ``acquisition_shift`` > 0 plants the erect/recumbent factor (:mod:`.acquisition`);
    ``anatomy_types`` > 0 gives every subject one of that many anatomy types (:mod:`.anatomy_types`)."""
    from data_sharding.errors import UserError
    from data_sharding.synth import acquisition as acq
    from data_sharding.synth import anatomy_types as atypes

    if patients < 1:
        raise UserError(f"--patients must be >= 1, got {patients}")
    if image_size < MIN_IMAGE_SIZE:
        raise UserError(f"--image-size must be >= {MIN_IMAGE_SIZE} pixels, got {image_size}")
    if seed < 0:
        raise UserError(f"--seed must be >= 0, got {seed}")
    if not 0.0 <= acquisition_shift <= acq.MAX_SHIFT:
        raise UserError(f"--acquisition-shift must be in [0, {acq.MAX_SHIFT:g}], got {acquisition_shift}")
    if not (anatomy_types == 0 or 2 <= anatomy_types <= atypes.MAX_TYPES):
        raise UserError(f"--anatomy-types must be 0 (none) or in [2, {atypes.MAX_TYPES}], got {anatomy_types}")

    import pandas as pd
    from tqdm import tqdm

    from data_sharding.synth import ehr, imagenome, tables
    from data_sharding.synth.cohort import build_cohort
    from data_sharding.synth.images import StayPatterns, render_frontal, render_lateral
    from data_sharding.synth.writer import atomic_directory, encode_jpeg, write_csv_gz, write_json, write_tsv

    start = time.perf_counter()
    cohort = build_cohort(patients, seed, image_size)
    plan = imagenome.plan_annotations(cohort)
    settings = acq.draw_settings(cohort, seed) if acquisition_shift > 0 else None
    types = atypes.draw_types(cohort, anatomy_types, seed) if anatomy_types > 0 else None
    counts: dict[str, int] = {}
    with atomic_directory(Path(out_dir), overwrite) as tmp:
        cxr = tmp / CXR_ROOT
        hosp, icu = tmp / MIMICIV_ROOT / "hosp", tmp / MIMICIV_ROOT / "icu"
        sg_dir = tmp / IMAGENOME_ROOT / "silver_dataset" / "scene_graph"
        sg_dir.mkdir(parents=True)
        boxes: dict[int, dict[str, tuple[int, int, int, int]]] = {}
        n_rel = 0
        for film in tqdm(cohort.films, desc="synth images", unit="img", disable=not progress):
            rng = np.random.default_rng(np.random.SeedSequence([seed, 1, film.index]))
            subj = cohort.subjects[film.subject_index]
            anatomy = subj.anatomy.jittered(rng)
            if film.view == "LATERAL":
                pixels = render_lateral(anatomy, film.width, film.height, rng)
            else:
                patterns = cohort.stays[film.stay_index].patterns if film.stay_index is not None else StayPatterns.sample(rng)
                planted = (types[film.subject_index], anatomy_types) if types is not None else None
                pixels, boxes[film.index] = render_frontal(anatomy, cohort.film_severity(film), patterns, film.width,
                                                           film.height, rng, anatomy_type=planted)
                if settings is not None:
                    pixels = acq.apply_setting(pixels, settings[film.index], acquisition_shift, seed, film.index)
                graph = imagenome.scene_graph(cohort, film, boxes[film.index], plan)
                n_rel += len(graph["relationships"])
                write_json(sg_dir / f"{film.dicom_id}_SceneGraph.json", graph)
            path = cxr / image_relpath(subj.subject_id, film.study_id, film.dicom_id)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(encode_jpeg(pixels))

        steps = tqdm(total=10, desc="synth tables", unit="file", disable=not progress)
        write_csv_gz(cxr / "mimic-cxr-2.0.0-metadata.csv.gz", tables.cxr_metadata(cohort, settings)); steps.update()
        write_csv_gz(cxr / "mimic-cxr-2.0.0-chexpert.csv.gz", tables.chexpert(cohort)); steps.update()
        write_csv_gz(hosp / "patients.csv.gz", tables.patients(cohort)); steps.update()
        write_csv_gz(hosp / "admissions.csv.gz", tables.admissions(cohort)); steps.update()
        write_csv_gz(icu / "icustays.csv.gz", tables.icustays(cohort)); steps.update()
        chart = ehr.chartevents(cohort)
        write_csv_gz(icu / "chartevents.csv.gz", chart); steps.update()
        output = ehr.outputevents(cohort)
        write_csv_gz(icu / "outputevents.csv.gz", output); steps.update()
        labs = ehr.labevents(cohort, chart)
        write_csv_gz(hosp / "labevents.csv.gz", labs); steps.update()
        write_csv_gz(icu / "d_items.csv.gz", ehr.d_items())
        write_csv_gz(hosp / "d_labitems.csv.gz", ehr.d_labitems()); steps.update()
        gold = pd.DataFrame(imagenome.gold_rows(cohort, boxes), columns=list(imagenome.GOLD_COLUMNS))
        write_tsv(tmp / IMAGENOME_ROOT / "gold_dataset" / "gold_object_comparison_with_coordinates.txt", gold); steps.update()
        steps.close()

        counts = {
            "subjects": len(cohort.subjects),
            "admissions": len(cohort.admissions),
            "icu_stays": len(cohort.stays),
            "stays_with_death": sum(st.dies for st in cohort.stays),
            "stays_under_48h": sum(st.los_days * 24 < 48 for st in cohort.stays),
            "children": sum(s.anchor_age < 18 for s in cohort.subjects),
            "images": len(cohort.films),
            "images_ap": sum(f.view == "AP" for f in cohort.films),
            "images_pa": sum(f.view == "PA" for f in cohort.films),
            "images_lateral": sum(f.view == "LATERAL" for f in cohort.films),
            "studies": len({f.study_id for f in cohort.films}),
            "scene_graphs": len(boxes),
            "relationships": n_rel,
            "gold_rows": len(gold),
            "gold_subjects": len(cohort.gold_subjects),
            "chartevents_rows": len(chart),
            "outputevents_rows": len(output),
            "labevents_rows": len(labs),
        }
        if settings is not None:
            counts["images_recumbent"] = sum(settings[f.index] == acq.RECUMBENT for f in cohort.films)
        extra = {}
        if types is not None:
            for t in range(anatomy_types):
                counts[f"subjects_anatomy_type_{t}"] = sum(v == t for v in types.values())
            extra["anatomy_type_of_subject"] = {str(s.subject_id): types[i] for i, s in enumerate(cohort.subjects)}
        summary = SynthSummary(str(Path(out_dir).resolve()), patients, seed, image_size, counts,
                               acquisition_shift=float(acquisition_shift), anatomy_types=int(anatomy_types))
        # a planted factor is recorded only when planted: a default cohort's SYNTH.json keeps its bytes
        hidden = (("out_dir", "seconds") + (() if settings is not None else ("acquisition_shift",))
                  + (() if types is not None else ("anatomy_types",)))
        write_json(tmp / "SYNTH.json", {**{k: v for k, v in asdict(summary).items() if k not in hidden}, **extra})
    summary.seconds = time.perf_counter() - start
    return summary


__all__ = ["SynthSummary", "generate", "image_relpath", "DEFAULT_PATIENTS", "DEFAULT_SEED", "DEFAULT_IMAGE_SIZE"]
