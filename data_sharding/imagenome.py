"""Chest ImaGenome 1.0.0: scene graphs (region boxes, comparison relationships) and the gold file, as read.

Scene graph (``silver_dataset/scene_graph/{dicom_id}_SceneGraph.json``):

* ``objects[]`` -> the full-image box ``original_x1, original_y1, original_x2,
  original_y2`` of each of the 10 regions of :data:`~data_sharding.constants.REGIONS`.
  A box that is not four finite numbers, has no area, or lies outside the image
  is *impossible*: it is dropped (the region then has no crop) and counted.
* ``relationships[]`` with ``relationship_names`` like ``"comparison|yes|worsened"``
  compare a region of this image (``subject_id = "{dicom}_{bbox}"``) with the same
  region of a prior image (``object_id = "{prior dicom}_{bbox}"``); the
  ``attributes`` name the findings (``"anatomicalfinding|yes|lung opacity"``).
  Each is kept as a :class:`Relation` -- every bbox, every comparison name (a repeated
  name counted twice), every finding with its category and yes/no -- and
  :attr:`SceneGraph.first_prior` records the prior of the *first* relationship, which
  is the image the authors pair this one with (``process_ImaGenome.py:
  get_disease_progression_labels``).  The labelling rules live in :mod:`data_sharding.dp_labels`.

Gold (``gold_dataset/gold_object_comparison_with_coordinates.txt``, TSV): the rows of
each (current, previous) image pair in file order (image ids with a ``.dcm`` / ``.jpg``
suffix are matched without it), and the set of gold subjects (every row's patient_id).
"""
from __future__ import annotations

import json
import math
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_sharding.constants import (
    COMPARISON_TO_LABEL,
    DISEASES,
    IMAGENOME_FINDING_TO_DISEASE,
    NOT_MENTIONED,
    NUM_DISEASES,
    NUM_REGIONS,
    REGIONS,
)
from data_sharding.readers import check_columns, read_table
from data_sharding.errors import DataError

REGION_INDEX = {r: i for i, r in enumerate(REGIONS)}
DISEASE_INDEX = {d: i for i, d in enumerate(DISEASES)}
Box = tuple[float, float, float, float]


def empty_region_labels() -> np.ndarray:
    """``[10][7]`` all "not mentioned"."""
    return np.full((NUM_REGIONS, NUM_DISEASES), NOT_MENTIONED, dtype=np.int8)


@dataclass(frozen=True)
class Relation:
    """One comparison relationship of a scene graph, before any labelling rule."""

    prior: str
    """dicom_id of the image compared with."""
    bbox: str
    """bbox name, lower case (any of ImaGenome's 29 / 36 regions, not only the paper's 10)."""
    comparisons: tuple[int, ...]
    """labels of its ``comparison|yes|<state>`` names, in order, repeats kept."""
    findings: tuple[tuple[str, str, str], ...]
    """(category, yes/no, name) of each attribute, lower case."""


@dataclass
class SceneGraph:
    """What the pipeline uses from one scene graph."""

    dicom_id: str
    boxes: dict[int, Box] = field(default_factory=dict)
    """region index -> (x1, y1, x2, y2) in full-image pixels (only valid boxes)."""
    relations: list[Relation] = field(default_factory=list)
    """comparison relationships in file order."""
    first_prior: str | None = None
    """prior dicom_id of the first relationship: the pair the authors label with this graph."""


def split_object_id(object_id: str) -> tuple[str, str]:
    """``"{dicom_id}_{bbox name}"`` -> (dicom_id, bbox name).  DICOM ids hold no underscore."""
    dicom, sep, bbox = str(object_id).partition("_")
    if not sep or not dicom or not bbox:
        raise ValueError(f"object id {object_id!r} is not of the form '<dicom_id>_<bbox name>'")
    return dicom, bbox


def finding_to_disease(name: str) -> str | None:
    """ImaGenome finding name -> paper disease name (None if not one of the 7)."""
    return IMAGENOME_FINDING_TO_DISEASE.get(str(name).strip().lower())


def validate_box(raw: Box, width: int | None, height: int | None) -> Box | None:
    """A box clipped to the image, or None when it is impossible (non-finite, empty, outside)."""
    try:
        x1, y1, x2, y2 = (float(v) for v in raw)
    except (TypeError, ValueError):
        return None
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)) or x2 <= x1 or y2 <= y1:
        return None
    if width is not None and height is not None:
        x1, x2 = max(0.0, x1), min(float(width), x2)
        y1, y2 = max(0.0, y1), min(float(height), y2)
        if x2 <= x1 or y2 <= y1:
            return None
    return (x1, y1, x2, y2)


def _flatten(values) -> list[str]:
    out: list[str] = []
    stack = [values]
    while stack:
        v = stack.pop()
        if isinstance(v, (list, tuple)):
            stack.extend(reversed(v))
        elif isinstance(v, str):
            out.append(v)
    return out


def _comparisons_of(names: list[str]) -> tuple[int, ...]:
    out = []
    for n in names:
        parts = [p.strip().lower() for p in n.split("|")]
        if len(parts) == 3 and parts[0] == "comparison" and parts[1] == "yes" and parts[2] in COMPARISON_TO_LABEL:
            out.append(COMPARISON_TO_LABEL[parts[2]])
    return tuple(out)


def _findings_of(attributes: list[str]) -> tuple[tuple[str, str, str], ...]:
    out = []
    for a in attributes:
        parts = [p.strip().lower() for p in a.split("|")]
        if len(parts) == 3:
            out.append((parts[0], parts[1], parts[2]))
    return tuple(out)


def parse_scene_graph(
    doc: dict, dicom_id: str, width: int | None, height: int | None, counts: Counter
) -> SceneGraph:
    """Extract valid boxes and comparison labels; bad objects / relationships are counted in ``counts``.

    Raises ValueError when the document itself is malformed (the caller skips the image).
    """
    if not isinstance(doc, dict):
        raise ValueError("scene graph is not a JSON object")
    objects = doc.get("objects")
    if not isinstance(objects, list):
        raise ValueError("scene graph has no 'objects' list")
    relationships = doc.get("relationships", [])
    if relationships is None:
        relationships = []
    if not isinstance(relationships, list):
        raise ValueError("'relationships' is not a list")

    sg = SceneGraph(dicom_id=dicom_id)
    for obj in objects:
        if not isinstance(obj, dict):
            counts["scene graph object malformed"] += 1
            continue
        region = REGION_INDEX.get(str(obj.get("bbox_name", "")).strip().lower())
        if region is None:
            continue  # one of ImaGenome's other 26 regions
        box = validate_box(tuple(obj.get(k) for k in ("original_x1", "original_y1", "original_x2", "original_y2")),
                           width, height)
        if box is None:
            counts["impossible box"] += 1
            continue
        sg.boxes[region] = box

    for rel in relationships:
        if not isinstance(rel, dict):
            counts["relationship malformed"] += 1
            continue
        try:
            cur, _ = split_object_id(rel.get("subject_id", ""))
            prior, bbox = split_object_id(rel.get("object_id", ""))
        except ValueError:
            counts["relationship malformed"] += 1
            continue
        if cur != dicom_id or prior == dicom_id:
            counts["relationship malformed"] += 1
            continue
        if sg.first_prior is None:
            sg.first_prior = prior
        comps = _comparisons_of(_flatten(rel.get("relationship_names", [])))
        if not comps:
            continue  # not a comparison relationship
        name = str(rel.get("bbox_name") or bbox).strip().lower()
        sg.relations.append(Relation(prior, name, comps, _findings_of(_flatten(rel.get("attributes", [])))))
    return sg


class SceneGraphSource:
    """Scene graphs from ``silver_dataset/scene_graph/`` (a folder, or PhysioNet's ``scene_graph.zip``)."""

    def __init__(self, imagenome_root):
        from data_sharding import storage

        root = storage.resolve(imagenome_root)
        self.dir = root / "silver_dataset" / "scene_graph"
        self.zip_path = root / "silver_dataset" / "scene_graph.zip"
        self._zip: zipfile.ZipFile | None = None
        self._zip_names: dict[str, str] = {}
        if not self.dir.is_dir():
            if not self.zip_path.is_file():
                raise DataError(
                    f"Chest ImaGenome scene graphs not found: expected the folder {self.dir} "
                    f"(files {{dicom_id}}_SceneGraph.json) or {self.zip_path}"
                )
            try:  # the archive is read in place (ranged reads on a bucket), never copied
                self._zip = zipfile.ZipFile(self.zip_path.open_input())
            except (zipfile.BadZipFile, OSError, EOFError) as exc:
                raise DataError(f"{self.zip_path}: not a readable zip archive ({exc}); the file is truncated or "
                                "corrupt -- download it again") from None
            for name in self._zip.namelist():
                if name.endswith("_SceneGraph.json"):
                    self._zip_names[name.rsplit("/", 1)[-1]] = name

    def load(self, dicom_id: str) -> dict | None:
        """The parsed JSON document, None when the file is absent; ValueError when it is not JSON.

        A document that is not JSON (or not UTF-8) is one image's problem: the caller skips
        and counts it.  An archive member that cannot be decompressed, or a scene graph
        file that cannot be read, is a damaged download: DataError naming it.
        """
        fname = f"{dicom_id}_SceneGraph.json"
        if self._zip is not None:
            member = self._zip_names.get(fname)
            if member is None:
                return None
            try:
                data = self._zip.read(member)
            except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as exc:
                raise DataError(f"{self.zip_path} member {member}: cannot decompress ({exc}); the archive is "
                                "corrupt -- download it again") from None
        else:
            from data_sharding import storage

            p = self.dir / fname
            try:  # one read, no existence check first (one request per graph on a bucket)
                data = p.read_bytes()
            except storage.NotFound:
                return None
            except OSError as exc:
                raise DataError(f"{p}: cannot read ({exc.strerror or exc})") from None
        try:
            return json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"not valid JSON ({exc})") from None

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()


def _strip_image_id(v: str) -> str:
    v = str(v).strip()
    for ext in (".dcm", ".jpg"):
        if v.endswith(ext):
            v = v[: -len(ext)]
    return v


@dataclass(frozen=True)
class GoldRow:
    """One gold comparison row: bbox and label name lower case, comparison label (None: not one of the 3)."""

    bbox: str
    label_name: str
    comparison: int | None


@dataclass
class GoldLabels:
    """Gold rows per (current dicom, previous dicom) in file order, and the gold subjects."""

    rows: dict[tuple[str, str], list[GoldRow]] = field(default_factory=dict)
    subjects: set[int] = field(default_factory=set)


def read_gold(path, counts: Counter) -> GoldLabels:
    """Read the gold comparison TSV (absent file = no gold labels).  Bad rows are counted and skipped."""
    gold = GoldLabels()
    if not path.is_file():
        counts["gold file absent"] += 1
        return gold
    check_columns(path, "gold_object_comparison", delimiter="\t")
    cols = ["patient_id", "current_image_id", "previous_image_id", "bbox", "label_name", "comparison"]
    df = read_table(path, "gold_object_comparison", cols, delimiter="\t")
    for row in df.itertuples(index=False):
        try:
            subject = int(float(row.patient_id))
        except (TypeError, ValueError):
            counts["gold row with unparseable patient_id"] += 1
            continue
        gold.subjects.add(subject)
        if row.current_image_id is None or row.previous_image_id is None:
            counts["gold row malformed"] += 1
            continue
        comp = COMPARISON_TO_LABEL.get(str(row.comparison).strip().lower())
        if comp is None:
            counts["gold row with a comparison other than worsened/improved/no change"] += 1
        key = (_strip_image_id(row.current_image_id), _strip_image_id(row.previous_image_id))
        gold.rows.setdefault(key, []).append(
            GoldRow(str(row.bbox or "").strip().lower(), str(row.label_name or "").strip().lower(), comp))
    return gold
