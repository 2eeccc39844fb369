"""Chest ImaGenome 1.0.0: silver scene graphs per frontal image and the gold comparison file.

Scene graph (``silver_dataset/scene_graph/{dicom_id}_SceneGraph.json``): the real
top-level keys; ``objects`` has one entry per region with the full-image box
(``original_x1..y2``) and the 224-pixel box (``x1..y2``, ``width``, ``height``;
aspect-preserving resize, centred padding); ``relationships`` compares the film
with the previous kept AP film of its stay timeline: one relationship per
(region, comparison), ``relationship_names`` ``["comparison|yes|<state>"]`` and
``attributes`` listing the findings with that state ("anatomicalfinding|yes|lung
opacity", "disease|yes|pneumonia", edema as ImaGenome's
"pulmonary edema/hazy opacity").  Some relationships carry only findings outside
the 7 diseases (tubes, vascular congestion) and must be ignored by readers.

Gold (``gold_dataset/gold_object_comparison_with_coordinates.txt``, tab-separated):
every mentioned (pair, region, disease) label of the gold subjects, with the true
label.  Exactly one silver label of a gold subject is corrupted (the gold row
contradicts it), and ~1 % of frontal films lack one region object.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data_sharding.constants import DISEASES, NOT_MENTIONED, REGIONS
from data_sharding.synth.anatomy import REGION_LOCI
from data_sharding.synth.cohort import Cohort, Film
from data_sharding.synth.progression import flip_label
from data_sharding.synth.tables import stamp

LABEL_TO_COMPARISON = {0: "worsened", 1: "improved", 2: "no change"}
PREDICATE = {"worsened": "Worsened", "improved": "Improved", "no change": "No status change"}
FINDING_NAME = {
    "atelectasis": ("anatomicalfinding", "atelectasis"),
    "enlarged cardiac silhouette": ("anatomicalfinding", "enlarged cardiac silhouette"),
    "consolidation": ("anatomicalfinding", "consolidation"),
    "pulmonary edema": ("anatomicalfinding", "pulmonary edema/hazy opacity"),
    "lung opacity": ("anatomicalfinding", "lung opacity"),
    "pleural effusion": ("anatomicalfinding", "pleural effusion"),
    "pneumonia": ("disease", "pneumonia"),
}
GOLD_COLUMNS = (
    "patient_id", "study_id", "current_image_id", "previous_image_id", "relationship_id",
    "subject_id", "object_id", "bbox", "label_name", "attribute", "comparison", "sentence",
    "bbox_coord_original_x1", "bbox_coord_original_y1", "bbox_coord_original_x2", "bbox_coord_original_y2",
    "bbox_coord_224_x1", "bbox_coord_224_y1", "bbox_coord_224_x2", "bbox_coord_224_y2",
)
Box = tuple[int, int, int, int]


@dataclass
class AnnotationPlan:
    """Deliberate annotation defects, decided before any file is written."""

    contradictions: dict[tuple[int, int, int], int]  # (film index, region, disease) -> wrong silver label
    missing_region: dict[int, str]  # film index -> region whose object is left out


def plan_annotations(c: Cohort) -> AnnotationPlan:
    rng = np.random.default_rng(np.random.SeedSequence([c.seed, 5]))
    contradictions: dict[tuple[int, int, int], int] = {}
    for subj in c.gold_subjects:
        for st in (s for s in c.stays if s.subject_index == subj):
            labels = st.progression.region_labels
            cand = np.argwhere(labels != NOT_MENTIONED)
            if len(cand):
                t, r, d = (int(x) for x in cand[rng.integers(len(cand))])
                film = st.timeline[t + 1]
                contradictions[(film, r, d)] = flip_label(int(labels[t, r, d]))
                break
        if contradictions:
            break
    frontal = [f.index for f in c.films if f.view in ("AP", "PA")]
    n_missing = max(1, round(0.01 * len(frontal)))
    missing = {int(i): REGIONS[int(rng.integers(len(REGIONS)))] for i in rng.choice(frontal, n_missing, replace=False)}
    return AnnotationPlan(contradictions, missing)


def box_224(box: Box, width: int, height: int) -> Box:
    s = 224.0 / max(width, height)
    px, py = (224.0 - width * s) / 2, (224.0 - height * s) / 2
    x1, y1, x2, y2 = box
    return (int(round(x1 * s + px)), int(round(y1 * s + py)), int(round(x2 * s + px)), int(round(y2 * s + py)))


def _object(dicom: str, name: str, box: Box, width: int, height: int) -> dict:
    b = box_224(box, width, height)
    return {
        "object_id": f"{dicom}_{name}",
        "x1": b[0], "y1": b[1], "x2": b[2], "y2": b[3], "width": b[2] - b[0], "height": b[3] - b[1],
        "bbox_name": name, "synsets": [], "name": name[0].upper() + name[1:],
        "original_x1": box[0], "original_y1": box[1], "original_x2": box[2], "original_y2": box[3],
        "original_width": box[2] - box[0], "original_height": box[3] - box[1],
    }


def _sentence(state: str, findings: list[str], region: str) -> str:
    verb = {"worsened": "Worsening", "improved": "Improvement", "no change": "No change"}[state]
    return f"{verb} of {', '.join(findings)} in the {region}."


def silver_labels(c: Cohort, film: Film, plan: AnnotationPlan) -> np.ndarray | None:
    """[10, 7] labels the silver graph of ``film`` states against its previous film (None = no prior)."""
    if film.kind != "kept" or not film.position:
        return None
    labels = c.stays[film.stay_index].progression.region_labels[film.position - 1].copy()
    for (fi, r, d), wrong in plan.contradictions.items():
        if fi == film.index:
            labels[r, d] = wrong
    return labels


def scene_graph(c: Cohort, film: Film, boxes: dict[str, Box], plan: AnnotationPlan) -> dict:
    subj = c.subjects[film.subject_index]
    dicom = film.dicom_id
    missing = plan.missing_region.get(film.index)
    objects = [_object(dicom, r, boxes[r], film.width, film.height) for r in REGIONS if r != missing]
    sev = c.film_severity(film)
    attributes = []
    for ri, r in enumerate(REGIONS):
        if r == missing:
            continue
        present = [FINDING_NAME[d] for di, d in enumerate(DISEASES) if REGION_LOCI[ri][di] and sev[list(REGION_LOCI[ri][di])].max() >= 0.3]
        if present:
            attributes.append({
                "bbox_name": r, "synsets": [], "name": r[0].upper() + r[1:],
                "attributes": [[f"{cat}|yes|{name}" for cat, name in present]],
                "phrases": [f"{', '.join(n for _, n in present).capitalize()} in the {r}."],
                "object_id": f"{dicom}_{r}",
            })
    relationships = []
    labels = silver_labels(c, film, plan)
    if labels is not None:
        st = c.stays[film.stay_index]
        prev = c.films[st.timeline[film.position - 1]].dicom_id
        for ri, r in enumerate(REGIONS):
            if r == missing:
                continue
            for code, state in LABEL_TO_COMPARISON.items():
                ds = [d for di, d in enumerate(DISEASES) if labels[ri, di] == code]
                if not ds:
                    continue
                names = [FINDING_NAME[d] for d in ds]
                relationships.append(_relationship(dicom, prev, r, state, [f"{cat}|yes|{n}" for cat, n in names], [n for _, n in names], len(relationships)))
        if (film.index * 7919) % 10 == 0:  # distractor: a finding outside the 7 diseases
            extra = "tubesandlines|yes|endotracheal tube" if st.ventilated else "anatomicalfinding|yes|vascular congestion"
            relationships.append(_relationship(dicom, prev, "mediastinum", "no change", [extra], [extra.split("|")[-1]], len(relationships)))
    return {
        "image_id": dicom,
        "viewpoint": film.view,
        "patient_id": subj.subject_id,
        "study_id": film.study_id,
        "gender": subj.gender,
        "age_decile": f"{subj.anchor_age // 10 * 10}-{subj.anchor_age // 10 * 10 + 10}",
        "reason_for_exam": "___ year old with respiratory failure, assess for interval change.",
        "StudyOrder": (film.position or 0) + 1,
        "StudyDateTime": stamp(film.time),
        "objects": objects,
        "attributes": attributes,
        "relationships": relationships,
    }


def _relationship(cur: str, prev: str, region: str, state: str, attrs: list[str], names: list[str], k: int) -> dict:
    return {
        "relationship_id": f"{cur}_{prev}_{k}",
        "predicate": f"['{PREDICATE[state]}']",
        "synsets": [],
        "relationship_names": [f"comparison|yes|{state}"],
        "relationship_contexts": [1.0],
        "phrase": _sentence(state, names, region),
        "attributes": attrs,
        "bbox_name": region,
        "subject_id": f"{cur}_{region}",
        "object_id": f"{prev}_{region}",
    }


def gold_rows(c: Cohort, boxes: dict[int, dict[str, Box]]) -> list[dict]:
    """True labels of every mentioned (pair, region, disease) of the gold subjects."""
    rows: list[dict] = []
    for subj_index in c.gold_subjects:
        subj = c.subjects[subj_index]
        for st in (s for s in c.stays if s.subject_index == subj_index):
            for pos in range(1, len(st.timeline)):
                cur, prev = c.films[st.timeline[pos]], c.films[st.timeline[pos - 1]]
                labels = st.progression.region_labels[pos - 1]
                for ri, r in enumerate(REGIONS):
                    for di, d in enumerate(DISEASES):
                        if labels[ri, di] == NOT_MENTIONED:
                            continue
                        state = LABEL_TO_COMPARISON[int(labels[ri, di])]
                        cat, name = FINDING_NAME[d]
                        b = boxes[cur.index][r]
                        b224 = box_224(b, cur.width, cur.height)
                        rows.append({
                            "patient_id": subj.subject_id, "study_id": cur.study_id,
                            "current_image_id": cur.dicom_id, "previous_image_id": prev.dicom_id,
                            "relationship_id": f"{cur.dicom_id}_{prev.dicom_id}_{r}",
                            "subject_id": f"{cur.dicom_id}_{r}", "object_id": f"{prev.dicom_id}_{r}",
                            "bbox": r, "label_name": name, "attribute": f"{cat}|yes|{name}", "comparison": state,
                            "sentence": _sentence(state, [name], r),
                            "bbox_coord_original_x1": b[0], "bbox_coord_original_y1": b[1],
                            "bbox_coord_original_x2": b[2], "bbox_coord_original_y2": b[3],
                            "bbox_coord_224_x1": b224[0], "bbox_coord_224_y1": b224[1],
                            "bbox_coord_224_x2": b224[2], "bbox_coord_224_y2": b224[3],
                        })
    return rows
