"""The film-ordered shard build: the per-sample build's bytes, one read per film, balanced units,
anomalies counted per film and per sample, the fast resize option, the film fingerprint cache."""
from __future__ import annotations

import hashlib
import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import PIL
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_sharding import build_units, film_fingerprints as ff
from data_sharding.build_plan import plan_films, plan_units
from data_sharding.build_run import InlineRunner, build_planned, counts_lines
from data_sharding.crops import crop_regions
from data_sharding.manifest import ShardSettings
from data_sharding.samples import TASK_DIRS, open_processed, row_cxrs
from data_sharding.shard_writer import build_shards, plan_shards, tmp_path as shard_tmp
from data_sharding.verify import verify_shards
from processed_fixture import make_processed

# What the per-sample builder this branch started from (commit 159858d) wrote for these inputs
# (Pillow 13.0.0): shard path -> sha256[:16], and sha256[:16] over every (path + fingerprint).
RECORDED = {
    "bilinear": ({
        "disease_progression/test-000000.tar": "c806d7880dd666f6", "disease_progression/train-000000.tar": "344288c30e343d95",
        "disease_progression/train-000001.tar": "8b9fa2794c584fc1", "disease_progression/train-000002.tar": "e6ad923d2cdb19af",
        "disease_progression/train-000003.tar": "39a706c2bd01c4ed", "disease_progression/val-000000.tar": "8da0c8b758178563",
        "disease_progression/val-000001.tar": "f3341998585c1f61", "mortality_los/test-000000.tar": "8b84ef673bc5c8cb",
        "mortality_los/train-000000.tar": "be8b06cc1d80df51", "mortality_los/train-000001.tar": "ad0cf8acbd754d94",
        "mortality_los/val-000000.tar": "08f392f4ce1b6f8c"}, "f1b4fa896afb69c1"),
    "nearest": ({
        "disease_progression/test-000000.tar": "8f877446748798e0", "disease_progression/train-000000.tar": "aeaead5b7567718d",
        "disease_progression/train-000001.tar": "ae3cc8afaa9952dc", "disease_progression/train-000002.tar": "b8fd975ac3277ae7",
        "disease_progression/train-000003.tar": "b74664bfd581d892", "disease_progression/val-000000.tar": "d3d570a5c46478df",
        "disease_progression/val-000001.tar": "521362cc5c4d9e6a", "mortality_los/test-000000.tar": "3e267fbae81dbfd1",
        "mortality_los/train-000000.tar": "d8ae679498ac72f1", "mortality_los/train-000001.tar": "512580299b031352",
        "mortality_los/val-000000.tar": "dc237e33f9924ae7"}, "5b85ffb4c9743f28"),
    "draft": ({  # 360 x 300 films: JPEG DCT scaling at 1/2; one garbage film, one missing, one size mismatch
        "disease_progression/test-000000.tar": "8db59b6098db9488", "disease_progression/train-000000.tar": "5d384946fe715d0d",
        "disease_progression/train-000001.tar": "8de91993219305f4", "disease_progression/val-000000.tar": "df8b968e484fc5f6",
        "mortality_los/test-000000.tar": "1d992f42bd0e2aa5", "mortality_los/train-000000.tar": "6596eeb34ad94140",
        "mortality_los/val-000000.tar": "1530a351940ffe0c"}, "2e2602727dacca87"),
}
SCENARIOS = {
    "bilinear": (dict(n_stays=6), ShardSettings(crop_size=32, max_samples_per_shard=2)),
    "nearest": (dict(n_stays=6), ShardSettings(crop_size=32, max_samples_per_shard=2, resample="nearest")),
    "draft": (dict(n_stays=5, image_size=(360, 300), seed=1), ShardSettings(crop_size=32, max_samples_per_shard=3)),
}


def damage(fx) -> dict[str, str]:
    """Stay 1's first film garbage, stay 2's second film gone, stay 3's first film 1 px off its recorded width."""
    garbage, gone, off = (fx.dicoms_of[fx.stay_ids[1]][0], fx.dicoms_of[fx.stay_ids[2]][1],
                          fx.dicoms_of[fx.stay_ids[3]][0])
    (fx.images / f"{garbage}.jpg").write_bytes(b"not a jpeg")
    (fx.images / f"{gone}.jpg").unlink()
    t = pq.read_table(fx.root / "cxr.parquet")
    w = [x + (d == off) for x, d in zip(t.column("width").to_pylist(), t.column("dicom_id").to_pylist())]
    pq.write_table(t.set_column(t.column_names.index("width"), "width", pa.array(w, pa.int32())),
                   fx.root / "cxr.parquet")
    return {"garbage": garbage, "gone": gone, "off": off}


def scenario(root: Path, name: str):
    kw, settings = SCENARIOS[name]
    fx = make_processed(root / name, **kw)
    damaged = damage(fx) if name == "draft" else {}
    return fx, settings, damaged


def fingerprints_digest(records) -> str:
    return hashlib.sha256("".join(r.path + r.fingerprint for r in records).encode()).hexdigest()[:16]


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_shards_are_the_bytes_the_per_sample_build_wrote(name, tmp_path):
    """Same inputs and settings -> the recorded sha256 and fingerprints, built whole (one unit) and in
    three units (shards written in parts by several units and joined)."""
    fx, settings, _ = scenario(tmp_path, name)
    shas, fps = RECORDED[name]
    note = f"recorded with Pillow 13.0.0, running {PIL.__version__}"
    report = build_shards(fx.root, tmp_path / "s", settings=settings, workers=1, progress=False)
    assert {r.path: r.sha256[:16] for r in report.manifest.records} == shas, note
    assert fingerprints_digest(report.manifest.records) == fps, note
    assert verify_shards(tmp_path / "s") == []

    view = open_processed(fx.root)
    plans = plan_shards(view, TASK_DIRS, {t: settings for t in TASK_DIRS})
    out = tmp_path / "units"
    three = build_planned(fx.root, out, plans, {t: settings for t in TASK_DIRS}, 3, lambda n: InlineRunner(),
                          progress=False)
    assert three.joined > 0 and len(three.workers) == 1  # inline: one process ran the three units
    records = sorted(three.records, key=lambda r: r.path)
    assert {r.path: r.sha256[:16] for r in records} == shas
    assert fingerprints_digest(records) == fps
    # each sample's byte offset (verify_shards checked them against the tar's headers above), also across joined parts
    assert {r.path: r.offsets for r in records} == {r.path: r.offsets for r in report.manifest.records}
    assert all(len(r.offsets) == r.samples + 1 for r in records)
    for r in records:  # the bytes on disk are the ones hashed, and no part file is left
        data = shard_tmp(out / r.path).read_bytes()
        assert hashlib.sha256(data).hexdigest() == r.sha256 and len(data) == r.bytes
    assert sorted(p.name for p in out.rglob("*.part*")) == []


def test_each_film_is_read_once_and_anomalies_count_per_film_and_per_sample(tmp_path, monkeypatch):
    fx, settings, bad = scenario(tmp_path, "draft")
    reads: Counter = Counter()
    real = build_units.read_film
    monkeypatch.setattr(build_units, "read_film", lambda path: (reads.update([path]), real(path))[1])
    report = build_shards(fx.root, tmp_path / "s", settings=settings, workers=1, progress=False)

    view = open_processed(fx.root)
    used: Counter = Counter()  # film -> samples that use it
    for task in TASK_DIRS:
        for row in view.task_rows(task):
            used.update(row_cxrs(task, row)[0])
    assert set(reads.values()) == {1} and len(reads) == report.films_read == len(used)
    assert any(n > 1 for n in used.values())  # films shared by pairs and series: read once all the same

    null_box = fx.null_boxes[0][0]
    assert report.film_counts == {"boxes_missing": 1, "boxes_invalid": 1, "images_unreadable": 2,
                                  "image_size_mismatch": 1}
    per_sample = Counter()
    for r in report.manifest.records:
        per_sample.update(json.loads(r.counts))
    assert per_sample == {"boxes_missing": used[null_box], "boxes_invalid": used[null_box],
                          "images_unreadable": used[bad["garbage"]] + used[bad["gone"]],
                          "image_size_mismatch": used[bad["off"]]}
    assert per_sample["images_unreadable"] > report.film_counts["images_unreadable"]
    film_line, sample_line = counts_lines(report.film_counts, per_sample)
    assert "per film" in film_line and "images_unreadable 2" in film_line
    assert "per sample" in sample_line and f"images_unreadable {per_sample['images_unreadable']}" in sample_line


def test_units_balance_estimated_work_and_cover_every_row_once(tmp_path):
    fx = make_processed(tmp_path / "p", n_stays=16, seed=2)
    view = open_processed(fx.root)
    settings = ShardSettings(crop_size=32, max_samples_per_shard=1000)  # one shard per series and split
    plans = plan_shards(view, TASK_DIRS, {t: settings for t in TASK_DIRS})
    units = plan_units(view, plans, 3)
    assert len(units) == 3
    costs = [u.cost for u in units]
    # stays are atomic: units differ by at most about one stay's cost (a stay here: 2-4 films)
    assert max(costs) - min(costs) <= 0.5 * sum(costs) / len(costs)
    films = {f for p in plans for f in plan_films(view, p)}
    assert sum(u.films for u in units) == len(films)  # every film in exactly one unit
    for plan in plans:
        segs = sorted((s for u in units for s in u.segments if s.plan.path == plan.path), key=lambda s: s.part)
        assert [s.part for s in segs] == list(range(len(segs))) and {s.parts for s in segs} == {len(segs)}
        assert [i for s in segs for i in s.rows] == list(plan.rows)
    assert any(s.parts > 1 for u in units for s in u.segments)  # big shards are shared by units
    assert len(plan_units(view, plans[:1], 64)) <= len({view.task_rows(plans[0].task)[i]["stay_id"]
                                                         for i in plans[0].rows})


def test_bilinear_fast_is_an_approximation_recorded_in_the_settings():
    rng = np.random.default_rng(4)
    yy, xx = np.mgrid[0:1400, 0:1200]
    img = (127 + 60 * np.sin(xx / 31.0) * np.cos(yy / 47.0) + rng.normal(0, 4, (1400, 1200))).clip(0, 255)
    buf = io.BytesIO()
    Image.fromarray(img.astype(np.uint8)).save(buf, format="JPEG", quality=92)
    # one box just above the crop size (no DCT scaling, as hilar boxes at 224), the others 10-20x it
    boxes = [[100.0, 100.0, 170.0, 172.0]] + [[40.0 + 30 * r, 60.0, 700.0 + 30 * r, 1300.0] for r in range(9)]
    exact = crop_regions(buf.getvalue(), boxes, 64, recorded_size=(1200, 1400))
    fast = crop_regions(buf.getvalue(), boxes, 64, recorded_size=(1200, 1400), resample="bilinear-fast")
    diff = np.abs(exact.crops.astype(int) - fast.crops.astype(int))
    assert 0 < diff.mean() < 1.0 and fast.present.all()
    assert json.loads(ShardSettings(resample="bilinear-fast").to_json())["resample"] == "bilinear-fast"


def test_film_fingerprint_cache_round_trips_and_is_rebuilt_when_damaged(tmp_path):
    fx = make_processed(tmp_path / "p", n_stays=3)
    out = tmp_path / "s"
    assert ff.load_cache(out).status == "missing: rebuilt"
    report = build_shards(fx.root, out, settings=ShardSettings(crop_size=16), workers=1, progress=False)
    cache = ff.load_cache(out)
    assert cache.status == "loaded" and report.cache_status == f"{ff.CACHE_NAME}: {len(cache.entries)} films"
    assert set(cache.entries) == set(report.films) and len(cache.entries) == report.films_read
    path, (key, digest) = next(iter(sorted(cache.entries.items())))
    assert key == ff.stat_film(path) and digest == hashlib.sha256(Path(path).read_bytes()).hexdigest()
    assert cache.digest(path, key) == digest and cache.digest(path, ff.FilmKey(key.size + 1, key.version)) is None
    assert ff.load_cache(out, rehash=True).entries == {}

    data = bytearray(ff.cache_path(out).read_bytes())
    for damaged in (bytes(data[: len(data) // 2]), bytes(data[:200]) + bytes([data[200] ^ 0x40]) + bytes(data[201:])):
        ff.cache_path(out).write_bytes(damaged)
        broken = ff.load_cache(out)
        assert broken.status.startswith("corrupt (") and broken.status.endswith("): rebuilt") and not broken.entries
    ff.save_cache(out, {path: (key, "not a digest")} | {"b": (key, digest)})
    assert ff.load_cache(out).entries == {"b": (key, digest)}  # nothing but real digests is written


def test_a_unit_stops_when_another_failed_and_leaves_no_temp_file(tmp_path, monkeypatch):
    """The pool's stop event (set when one unit fails): a unit still running stops at its next stay and
    removes what it had written."""
    import threading

    fx = make_processed(tmp_path / "p", n_stays=4)
    view = open_processed(fx.root)
    settings = {t: ShardSettings(crop_size=16) for t in TASK_DIRS}
    plans = plan_shards(view, TASK_DIRS, settings)
    stop = threading.Event()
    stays = []
    real = build_units.read_film

    def read_film(path):  # while the first film is read, another unit "fails"
        stays.append(path)
        stop.set()
        return real(path)

    monkeypatch.setattr(build_units, "_stop", stop)
    monkeypatch.setattr(build_units, "read_film", read_film)
    out = tmp_path / "s"
    with pytest.raises(build_units.Cancelled, match="another unit of the build failed"):
        build_planned(fx.root, out, plans, settings, 1, lambda n: InlineRunner(), progress=False)
    assert 1 <= len(stays) <= 4  # the first stay's films, then it stopped
    assert [p.name for p in out.rglob("*") if p.is_file()] == []
