"""Acquisition metadata: the planted factor of ``dipro synth`` and ``processed/acquisition.parquet``."""
from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from data_sharding import synth
from data_sharding.acquisition import FACTORS, UNKNOWN, acquisition_table
from data_sharding.synth import acquisition as acq

# Content digest of a 12-patient, seed-5, 64-px cohort as the generator wrote it before the
# acquisition factor existed (commit 159858d): every file's bytes, with the gzip CSVs decompressed
# and each JPEG replaced by the pixel array it encodes (so the pin does not depend on the zlib or
# libjpeg build).  --acquisition-shift 0 must reproduce it.
PINNED_DEFAULT_DIGEST = "56e4b39295cfa1e896c82807e44f5fb9856dadcac666ba6f06d771daafe1cb45"


def _content_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            if p.name.endswith(".gz"):
                data = gzip.decompress(data)
            h.update(str(p.relative_to(root)).encode() + b"\0" + hashlib.sha256(data).digest())
    return h.hexdigest()


def _raw_pixels(pixels: np.ndarray) -> bytes:
    return np.ascontiguousarray(pixels).tobytes() + repr(pixels.shape).encode()


def test_shift_zero_writes_the_files_of_a_cohort_without_the_factor(tmp_path, monkeypatch):
    import data_sharding.synth.writer as writer

    monkeypatch.setattr(writer, "encode_jpeg", _raw_pixels)
    synth.generate(tmp_path / "a", patients=12, seed=5, image_size=64, progress=False)
    assert _content_digest(tmp_path / "a") == PINNED_DEFAULT_DIGEST
    synth.generate(tmp_path / "b", patients=12, seed=5, image_size=64, progress=False, acquisition_shift=1.0)
    assert _content_digest(tmp_path / "b") != PINNED_DEFAULT_DIGEST


def test_planted_setting_follows_sickness_and_changes_the_pixels():
    from data_sharding.synth.cohort import build_cohort

    cohort = build_cohort(120, 3, 64)
    settings = acq.draw_settings(cohort, 3)
    ap = [f for f in cohort.films if f.view == "AP" and f.stay_index is not None]
    rec = np.array([settings[f.index] == acq.RECUMBENT for f in ap])
    dies = np.array([cohort.stays[f.stay_index].dies for f in ap])
    assert rec[dies].mean() > rec[~dies].mean() + 0.15  # sicker stays: recumbent more often
    assert all(settings[f.index] == acq.ERECT for f in cohort.films if f.view != "AP")
    mixed = sum(len({settings[i] for i in st.timeline}) == 2 for st in cohort.stays if len(st.timeline) >= 2)
    assert mixed >= 0.3 * len(cohort.stays)  # many stays have films in both settings (proxy twins)

    img = np.tile(np.linspace(20, 220, 64, dtype=np.float32), (64, 1)).astype(np.uint8)
    assert acq.apply_setting(img, acq.RECUMBENT, 0.0, 3, 0) is img
    mid = img[:, 20:44].mean()
    darker = {s: np.mean([mid - acq.apply_setting(img, s, 1.0, 3, i)[:, 20:44].mean() for i in range(40)])
              for s in acq.SETTINGS}
    assert darker[acq.RECUMBENT] > darker[acq.ERECT] + 15  # gamma 1.5 vs 1 on average: darker mid-tones
    dark = acq.apply_setting(img, acq.RECUMBENT, 1.0, 3, 0).astype(float)
    # not affine: no contrast/brightness pair maps the film onto its recumbent version
    a, b = np.polyfit(img.ravel().astype(float), dark.ravel(), 1)
    assert np.abs(a * img + b - dark).mean() > 3.0


def test_acquisition_table_blanks_are_unknown():
    md = pd.DataFrame({
        "dicom_id": ["a", "b", "c"],
        "PerformedProcedureStepDescription": ["CHEST (PORTABLE AP)", None, " "],
        "ProcedureCodeSequence_CodeMeaning": ["x", "CHEST (PA AND LAT)", None],
        "PatientOrientationCodeSequence_CodeMeaning": ["Erect", "", None],
        "Rows": ["3056", "2544", None], "Columns": ["2544", "3056", "2000"],
    })
    t = acquisition_table(md, pd.Series(["c", "a", "b", "zz"]))
    assert t["dicom_id"].tolist() == ["c", "a", "b", "zz"]
    assert t["procedure"].tolist() == [UNKNOWN, "CHEST (PORTABLE AP)", "CHEST (PA AND LAT)", UNKNOWN]
    assert t["orientation"].tolist() == [UNKNOWN, "Erect", UNKNOWN, UNKNOWN]
    assert t["detector"].tolist() == [UNKNOWN, "3056x2544", "2544x3056", UNKNOWN]


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    from data_sharding.prepare import PrepareOptions, prepare
    from data_sharding.readers import resolve_roots

    root = tmp_path_factory.mktemp("acq")
    synth.generate(root / "raw", patients=16, seed=5, image_size=64, progress=False, acquisition_shift=1.0)
    prepare(resolve_roots(str(root / "raw")), root / "processed", PrepareOptions(progress=False))
    return root


def test_prepare_writes_acquisition_and_its_counts(planted):
    proc = planted / "processed"
    table = pq.read_table(proc / "acquisition.parquet").to_pandas()
    cxr = pq.read_table(proc / "cxr.parquet").to_pandas()
    assert table.columns.tolist() == ["dicom_id", *FACTORS]
    assert table["dicom_id"].tolist() == cxr["dicom_id"].tolist()
    assert set(table["orientation"]) == {"Erect", "Recumbent"}
    assert (table["detector"] == cxr["height"].astype(str) + "x" + cxr["width"].astype(str)).all()
    md = pd.read_csv(planted / "raw/mimic-cxr-jpg/2.0.0/mimic-cxr-2.0.0-metadata.csv.gz").set_index("dicom_id")
    assert (md.loc[table["dicom_id"], "PatientOrientationCodeSequence_CodeMeaning"].to_numpy()
            == table["orientation"].to_numpy()).all()
    counts = json.loads((proc / "report.json").read_text())["acquisition"]
    assert counts["images"] == len(table)
    assert counts["orientation"] == table["orientation"].value_counts().to_dict()


def test_shards_do_not_read_the_acquisition_table(planted, tmp_path):
    """The shards of a processed directory are the same bytes with or without acquisition.parquet."""
    import shutil

    from data_sharding.manifest import ShardSettings
    from data_sharding.shard_writer import write_shards

    without = tmp_path / "processed"
    shutil.copytree(planted / "processed", without)
    (without / "acquisition.parquet").unlink()
    settings = ShardSettings(crop_size=16)
    for src, dst in ((planted / "processed", "s1"), (without, "s2")):
        write_shards(src, tmp_path / dst, task="disease_progression", settings=settings, workers=1, progress=False)
    m1 = pq.read_table(tmp_path / "s1/manifest.parquet").to_pandas()
    m2 = pq.read_table(tmp_path / "s2/manifest.parquet").to_pandas()
    assert m1["sha256"].tolist() == m2["sha256"].tolist() and m1["fingerprint"].tolist() == m2["fingerprint"].tolist()


def test_anatomy_types_draw_an_oriented_grating_and_change_nothing_else(tmp_path, monkeypatch, capsys):
    """``--anatomy-types N``: every subject gets a type (recorded in SYNTH.json), its frontal films show a
    grating of the type's orientation, and every table, scene graph and other film is the cohort's without it."""
    import data_sharding.synth.writer as writer
    from data_sharding.synth import anatomy_types as atypes
    from data_sharding.errors import UserError
    from data_sharding.synth.anatomy import NUM_LOCI, Anatomy
    from data_sharding.synth.images import StayPatterns, render_frontal
    from dipro.cli import main

    # the grating's orientation in the pixels is the type's: the difference of one film drawn with and
    # without it has its spectral peak along the type's direction
    for t in range(4):
        rng = np.random.default_rng(0)
        a, pat = Anatomy.sample(rng), StayPatterns.sample(rng)
        sev = np.zeros(NUM_LOCI)
        plain, _ = render_frontal(a, sev, pat, 112, 128, np.random.default_rng(1))
        typed, _ = render_frontal(a, sev, pat, 112, 128, np.random.default_rng(1), anatomy_type=(t, 4))
        diff = typed.astype(float) - plain.astype(float)
        assert 4 < np.abs(diff).max() <= atypes.TYPE_AMPLITUDE + 1
        spec = np.abs(np.fft.fftshift(np.fft.fft2(diff)))
        spec[64, 56] = 0  # the mean
        fy, fx = np.unravel_index(np.argmax(spec), spec.shape)
        angle = np.arctan2((fy - 64) / 128, (fx - 56) / 112) % np.pi  # wave vector, in cycles per pixel
        assert min(abs(angle - atypes.type_angle(t, 4)), np.pi - abs(angle - atypes.type_angle(t, 4))) < 0.2, (t, angle)

    monkeypatch.setattr(writer, "encode_jpeg", _raw_pixels)
    synth.generate(tmp_path / "plain", patients=12, seed=5, image_size=64, progress=False)
    assert main(["synth", "--out", str(tmp_path / "typed"), "--patients", "12", "--seed", "5", "--image-size", "64",
                 "--anatomy-types", "3", "--quiet"]) == 0
    assert "3 anatomy types: " in capsys.readouterr().out
    meta = json.loads((tmp_path / "typed" / "SYNTH.json").read_text())
    types = meta["anatomy_type_of_subject"]
    assert meta["anatomy_types"] == 3 and len(types) == 12 and set(types.values()) <= {0, 1, 2}
    assert sum(meta["counts"][f"subjects_anatomy_type_{t}"] for t in range(3)) == 12
    changed = set()
    for p in sorted((tmp_path / "plain").rglob("*")):
        q = tmp_path / "typed" / p.relative_to(tmp_path / "plain")
        if p.is_file() and p.name != "SYNTH.json" and p.read_bytes() != q.read_bytes():
            changed.add(p)
    md = pd.read_csv(tmp_path / "plain/mimic-cxr-jpg/2.0.0/mimic-cxr-2.0.0-metadata.csv.gz")
    frontal = set(md.loc[md["ViewPosition"] != "LATERAL", "dicom_id"])
    assert changed and {p.stem for p in changed} == frontal  # exactly the frontal films
    with pytest.raises(UserError, match="--anatomy-types must be 0"):
        synth.generate(tmp_path / "bad", patients=2, seed=5, image_size=64, progress=False, anatomy_types=1)
