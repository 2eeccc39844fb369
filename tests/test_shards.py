"""dipro shard / dipro shards verify on a tiny processed fixture (32 px crops)."""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_sharding.constants import BOX_COLUMNS, DEMOGRAPHIC_COLUMNS, DISEASE_SLUGS, EHR_VALUE_COLUMNS, REGION_SLUGS
from data_sharding.crops import crop_regions, draft_reduction, parse_box
from data_sharding.manifest import MANIFEST_COLUMNS, ShardSettings, read_manifest
from data_sharding.regenerate import inspect_shard
from data_sharding import shard_format
from data_sharding.samples import open_processed
from data_sharding.shard_format import MEMBERS
from data_sharding.shard_writer import plan_shards, write_shards
from data_sharding.verify import verify_shards
from dipro.commands import shard as shard_cmd
from dipro.commands import shards as shards_cmd
from data_sharding.errors import DataError
from processed_fixture import make_processed

CROP = 32
SETTINGS = ShardSettings(crop_size=CROP, max_samples_per_shard=2)


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="dipro")
    sub = parser.add_subparsers(dest="command")
    shard_cmd.register(sub)
    shards_cmd.register(sub)
    args = parser.parse_args(argv)
    return args.func(args)


def digests(root: Path) -> dict[str, tuple[str, int]]:
    """Shard path -> (sha256, mtime_ns) of every .tar under root."""
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*.tar"))}


def read_samples(path: Path) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for info in tar:
            key, _, member = info.name.partition(".")
            out.setdefault(key, {})[member] = tar.extractfile(info).read()
    return out


def npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return make_processed(tmp_path_factory.mktemp("proc") / "processed", n_stays=6)


@pytest.fixture(scope="module")
def shards(fx, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "s"
    write_shards(fx.root, out, settings=SETTINGS, workers=1, progress=False)
    return out


def test_byte_identical_across_runs_and_worker_counts(fx, shards, tmp_path):
    again = tmp_path / "again"
    write_shards(fx.root, again, settings=SETTINGS, workers=2, progress=False)
    first = {k: v[0] for k, v in digests(shards).items()}
    second = {k: v[0] for k, v in digests(again).items()}
    assert len(first) >= 8 and first == second
    a, b = read_manifest(shards), read_manifest(again)
    assert [(r.path, r.sha256, r.fingerprint) for r in a.records] == [(r.path, r.sha256, r.fingerprint)
                                                                       for r in b.records]


def test_layout_members_and_manifest_follow_the_contract(fx, shards):
    table = pq.read_table(shards / "manifest.parquet")
    assert tuple(table.column_names[:8]) == MANIFEST_COLUMNS[:8]
    manifest = read_manifest(shards)
    tasks = {t: pd.read_parquet(fx.root / "tasks" / f"{t}.parquet") for t in ("disease_progression", "mortality_los")}
    for (task, split), (_, samples, _) in manifest.totals().items():
        assert samples == int((tasks[task]["split"] == split).sum())
    for name in ("label_stats.json", "ehr_stats.json"):
        assert (shards / name).read_bytes() == (fx.root / name).read_bytes()
    for r in manifest.records:
        path = shards / r.path
        assert path.stat().st_size == r.bytes and hashlib.sha256(path.read_bytes()).hexdigest() == r.sha256
        assert r.samples <= SETTINGS.max_samples_per_shard
        with tarfile.open(path) as tar:
            infos = tar.getmembers()
        assert all(i.mtime == 0 and i.uid == 0 and i.gid == 0 and i.uname == "" for i in infos)
        keys = list(dict.fromkeys(i.name.split(".")[0] for i in infos))
        assert [i.name for i in infos] == [f"{k}.{m}" for k in keys for m in MEMBERS]
        assert len(keys) == r.samples


def test_sample_contents_equal_the_processed_inputs(fx, shards):
    ehr = pd.concat([pd.read_parquet(p) for p in sorted((fx.root / "ehr").glob("*.parquet"))])
    demo = pd.read_parquet(fx.root / "demographics.parquet").set_index("stay_id")
    prog = pd.read_parquet(fx.root / "tasks" / "disease_progression.parquet")
    mort = pd.read_parquet(fx.root / "tasks" / "mortality_los.parquet")
    seen = 0
    for path in sorted(shards.rglob("*.tar")):
        for key, m in read_samples(path).items():
            meta, labels = json.loads(m["meta.json"]), json.loads(m["labels.json"])
            assert key == f"s{meta['stay_id']}_{meta['row']}"
            stay = meta["stay_id"]
            if meta["task_dir"] == "disease_progression":
                row = prog.iloc[meta["row"]]
                lo, hi = math.ceil(row.cxr1_hours - 1), math.floor(row.cxr2_hours + 1)  # hours in [t1 - 1, t2 + 1]
                assert labels == {"progression": [int(row[d]) for d in DISEASE_SLUGS]}
                assert meta["dicom_ids"] == [row.cxr1_dicom_id, row.cxr2_dicom_id]
                expected_rl = np.stack(list(row.region_labels))[None]
            else:
                row = mort.iloc[meta["row"]]
                lo, hi = 0, 48
                assert labels == {"mortality": int(row.mortality), "los_days": float(row.los_days),
                                  "los_bin": int(row.los_bin)}
                expected_rl = np.array([np.stack(list(x)) for x in row.region_labels])
            assert int(row.stay_id) == stay
            np.testing.assert_array_equal(npy(m["region_labels.npy"]), expected_rl.astype(np.int8))
            window = ehr[(ehr.stay_id == stay) & (ehr.hour >= lo) & (ehr.hour <= hi)]
            np.testing.assert_array_equal(npy(m["ehr_values.npy"]), window[list(EHR_VALUE_COLUMNS)].to_numpy(np.float32))
            np.testing.assert_array_equal(npy(m["ehr_hours.npy"]), window.hour.to_numpy(np.float32))
            np.testing.assert_array_equal(npy(m["demographics.npy"]),
                                          demo.loc[stay, list(DEMOGRAPHIC_COLUMNS)].to_numpy(np.float32))
            crops = npy(m["crops.npy"])
            assert crops.dtype == np.uint8 and crops.shape == (len(meta["dicom_ids"]), 10, CROP, CROP)
            seen += 1
    assert seen == len(prog) + len(mort)


def test_missing_or_invalid_box_marks_region_missing(fx, shards):
    (dicom, null_region), (_, bad_region) = fx.null_boxes[0], fx.invalid_boxes[0]
    stay = fx.stay_ids[0]
    path = shards / "mortality_los" / "train-000000.tar"
    m = read_samples(path)[f"s{stay}_0"]
    assert json.loads(m["meta.json"])["dicom_ids"][0] == dicom
    present, crops = npy(m["region_present.npy"]), npy(m["crops.npy"])
    missing = [REGION_SLUGS.index(null_region), REGION_SLUGS.index(bad_region)]
    assert present[0, missing].tolist() == [0, 0] and not crops[0, missing].any()
    others = [i for i in range(10) if i not in missing]
    assert present[0, others].all() and present[1].all()
    assert all(crops[0, i].std() > 0 for i in others)
    counts = json.loads(read_manifest(shards).by_path()["mortality_los/train-000000.tar"].counts)
    assert counts == {"boxes_invalid": 1, "boxes_missing": 1}


def test_crop_matches_an_independent_full_resolution_crop(tmp_path):
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:1200, 0:1000]
    img = (127 + 60 * np.sin(xx / 37.0) * np.cos(yy / 53.0) + rng.normal(0, 3, (1200, 1000))).clip(0, 255)
    buf = io.BytesIO()
    Image.fromarray(img.astype(np.uint8)).save(buf, format="JPEG", quality=95)
    boxes = [[100.0 + 20 * r, 150.0, 600.0 + 20 * r, 900.5] for r in range(10)]
    assert draft_reduction([parse_box(b, 1000, 1200) for b in boxes], CROP) == 8
    result = crop_regions(buf.getvalue(), boxes, CROP, recorded_size=(1000, 1200))
    full = Image.open(io.BytesIO(buf.getvalue())).convert("L")
    for r, b in enumerate(boxes):
        ref = np.asarray(full.crop(tuple(round(v) for v in b)).resize((CROP, CROP), Image.Resampling.BILINEAR))
        assert np.abs(result.crops[r].astype(int) - ref.astype(int)).mean() < 4
    assert result.present.all() and not result.counts
    small = [[0.0, 0.0, 20.0, 20.0]] + boxes[1:]
    assert draft_reduction([parse_box(b, 1000, 1200) for b in small], CROP) == 1


def test_nearest_crop_is_the_authors_crop_then_nearest_resize():
    """``resample="nearest"``: the whole image decoded, the box rounded to pixels, output pixel (j, i)
    taken from input pixel (y1 + floor((j + .5) h / C), x1 + floor((i + .5) w / C))."""
    rng = np.random.default_rng(2)
    img = rng.integers(0, 256, (300, 260), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=95)
    decoded = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("L"))
    boxes = [[10.4 + 7 * r, 20.6, 130.2 + 9 * r, 250.0] for r in range(10)]
    result = crop_regions(buf.getvalue(), boxes, CROP, recorded_size=(260, 300), resample="nearest")
    for r, b in enumerate(boxes):
        x1, y1, x2, y2 = (int(round(v)) for v in b)
        rows = y1 + np.floor((np.arange(CROP) + 0.5) * (y2 - y1) / CROP).astype(int)
        cols = x1 + np.floor((np.arange(CROP) + 0.5) * (x2 - x1) / CROP).astype(int)
        np.testing.assert_array_equal(result.crops[r], decoded[np.ix_(rows, cols)])
    with pytest.raises(ValueError, match="resample"):
        crop_regions(buf.getvalue(), boxes, CROP, resample="bicubic")


def test_resample_setting_round_trips_and_keeps_old_fingerprints():
    assert "resample" not in ShardSettings(crop_size=CROP).to_json()  # shards built before the option: unchanged
    nearest = ShardSettings(crop_size=CROP, resample="nearest")
    assert ShardSettings.from_json(nearest.to_json()) == nearest
    assert ShardSettings.from_json(ShardSettings(crop_size=CROP).to_json()).resample == "bilinear"
    with pytest.raises(DataError, match="resampling"):
        ShardSettings(resample="bicubic")


def test_unreadable_image_is_counted_not_fatal(tmp_path):
    fx = make_processed(tmp_path / "p", n_stays=2)
    Path(fx.images / f"{fx.dicoms_of[fx.stay_ids[1]][0]}.jpg").write_bytes(b"not a jpeg")
    manifest = write_shards(fx.root, tmp_path / "s", task="mortality_los", settings=SETTINGS, workers=1,
                            progress=False)
    counts = json.loads(manifest.records[0].counts)
    assert counts["images_unreadable"] == 1
    m = read_samples(tmp_path / "s" / manifest.records[0].path)[f"s{fx.stay_ids[1]}_1"]
    assert npy(m["region_present.npy"])[0].sum() == 0 and npy(m["region_present.npy"])[1].sum() == 10
    assert verify_shards(tmp_path / "s") == []


def test_shards_are_bounded_by_bytes(fx, tmp_path):
    settings = ShardSettings(crop_size=CROP, max_samples_per_shard=100, max_shard_bytes=80 * 1024)
    manifest = write_shards(fx.root, tmp_path / "s", settings=settings, workers=1, progress=False)
    assert all(r.bytes <= settings.max_shard_bytes for r in manifest.records)
    assert any(r.samples > 1 for r in manifest.records)
    assert len(manifest.records) > len(manifest.totals())  # some series needed more than one shard
    with pytest.raises(DataError, match="max-shard-bytes"):
        write_shards(fx.root, tmp_path / "t", settings=ShardSettings(crop_size=224, max_shard_bytes=40960),
                     workers=1, progress=False)


def test_plan_groups_rows_by_stay_in_row_order(fx):
    view = open_processed(fx.root)
    plans = plan_shards(view, ["disease_progression"], {"disease_progression": SETTINGS})
    rows = view.task_rows("disease_progression")
    for split in ("train", "val", "test"):
        flat = [i for p in plans if p.split == split for i in p.rows]
        assert flat == sorted((i for i, r in enumerate(rows) if r["split"] == split),
                              key=lambda i: (rows[i]["stay_id"], i))
        assert [p.index for p in plans if p.split == split] == list(range(len([p for p in plans if p.split == split])))


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["truncate", "bitflip", "missing"])
def test_verify_finds_damage_and_names_the_shard(fx, tmp_path, capsys, damage):
    out = tmp_path / "s"
    write_shards(fx.root, out, settings=SETTINGS, workers=1, progress=False)
    assert run_cli(["shards", "verify", str(out)]) == 0
    victim = "disease_progression/train-000001.tar"
    path = out / victim
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "bitflip":
        _flip_byte(path, 3000)  # inside the first sample's crops
    else:
        path.unlink()
    capsys.readouterr()
    assert run_cli(["shards", "verify", str(out)]) == 1
    table = capsys.readouterr().out
    bad = {p.shard for p in verify_shards(out)}
    assert bad == {victim} and victim in table
    kinds = {p.kind for p in verify_shards(out)}
    assert {"truncate": {"size", "sha256"}, "bitflip": {"sha256"}, "missing": {"missing"}}[damage] <= kinds


def test_verify_reports_bad_sample_contents(fx, tmp_path):
    """A shard rewritten with a wrong label and a matching manifest still fails the content checks."""
    out = tmp_path / "s"
    manifest = write_shards(fx.root, out, task="mortality_los", settings=SETTINGS, workers=1, progress=False)
    record = manifest.records[0]
    path = out / record.path
    samples = read_samples(path)
    key = next(iter(samples))
    samples[key]["labels.json"] = json.dumps({"mortality": 2, "los_days": 1.0, "los_bin": 0}).encode()
    buf = io.BytesIO()
    shard_format.write_tar(buf, samples.items())
    path.write_bytes(buf.getvalue())
    problems = verify_shards(out)
    assert any(p.kind == "sample" and p.sample == key and "mortality" in p.detail for p in problems)


def test_sample_offsets_are_checked_by_verify_and_the_loader_plan(fx, tmp_path):
    """The manifest's per-sample byte offsets (where a reader starting mid-shard seeks to): `dipro shards
    verify` compares them with the tar's headers, and the loader's plan refuses a malformed list."""
    from dataclasses import replace

    from data_sharding.manifest import Manifest, write_manifest
    from dipro.data.plan import read_manifest as plan_manifest

    out = tmp_path / "s"
    manifest = write_shards(fx.root, out, task="mortality_los", settings=SETTINGS, workers=1, progress=False)
    record = next(r for r in manifest.records if r.samples >= 2)
    with tarfile.open(out / record.path) as tar:
        firsts = [m.offset for m in tar if m.name.endswith(".crops.npy")]
    assert list(record.offsets[:-1]) == firsts and record.offsets[-1] <= record.bytes
    shifted = record.offsets[:1] + tuple(o + 512 for o in record.offsets[1:])
    others = [r for r in manifest.records if r is not record]
    write_manifest(out, Manifest(others + [replace(record, offsets=shifted)]))
    problems = verify_shards(out)
    assert [(p.shard, p.kind) for p in problems] == [(record.path, "offsets")]
    assert "from sample 1 on" in problems[0].detail
    write_manifest(out, Manifest(others + [replace(record, offsets=record.offsets[:-1])]))
    with pytest.raises(DataError, match=rf"{record.path} records {record.samples} sample offsets for "
                                        rf"{record.samples} samples, expected {record.samples + 1}"):
        plan_manifest(out, "mortality", record.split)
    write_manifest(out, Manifest(others + [replace(record, offsets=())]))  # a manifest from before offsets
    assert verify_shards(out) == [] and plan_manifest(out, "mortality", record.split).shards


def test_inspect_shard_reasons_without_ray(fx, tmp_path):
    out = tmp_path / "s"
    manifest = write_shards(fx.root, out, settings=SETTINGS, workers=1, progress=False).by_path()
    view = open_processed(fx.root)
    plans = plan_shards(view, ["disease_progression", "mortality_los"],
                        {"disease_progression": SETTINGS, "mortality_los": SETTINGS})
    assert all(inspect_shard(str(fx.root), p, SETTINGS, str(out), manifest[p.path]) is None for p in plans)
    bigger = ShardSettings(crop_size=CROP + 8, max_samples_per_shard=2)
    assert inspect_shard(str(fx.root), plans[0], bigger, str(out), manifest[plans[0].path]) == "settings changed"
    _flip_byte(out / plans[0].path, 3000)
    assert inspect_shard(str(fx.root), plans[0], SETTINGS, str(out), manifest[plans[0].path]).startswith(
        "failed verification: sha256")


def test_cli_shard_prints_totals_and_rejects_bad_input(fx, tmp_path, capsys):
    out = tmp_path / "s"
    assert run_cli(["shard", "--processed", str(fx.root), "--out", str(out), "--crop-size", "32",
                    "--max-samples-per-shard", "3", "--max-shard-bytes", "1M", "--workers", "1",
                    "--task", "disease_progression"]) == 0
    text = capsys.readouterr().out
    assert "disease_progression  train" in text and "mortality_los" not in text
    assert "boxes_missing 1" in text
    assert not (out / "mortality_los").exists()
    assert {ShardSettings.from_json(r.settings).resample for r in read_manifest(out).records} == {"bilinear"}
    assert run_cli(["shard", "--processed", str(fx.root), "--out", str(tmp_path / "n"), "--crop-size", "32",
                    "--workers", "1", "--task", "disease_progression", "--crop-resample", "nearest"]) == 0
    assert {ShardSettings.from_json(r.settings).resample for r in read_manifest(tmp_path / "n").records} == {"nearest"}
    assert verify_shards(tmp_path / "n") == []
    with pytest.raises(DataError, match="processed directory not found"):
        run_cli(["shard", "--processed", str(tmp_path / "nope"), "--out", str(out)])
    with pytest.raises(DataError, match="no shard manifest"):
        run_cli(["shards", "verify", str(tmp_path / "empty")])
    with pytest.raises(SystemExit):
        run_cli(["shard", "--processed", str(fx.root), "--out", str(out), "--max-shard-bytes", "lots"])


def test_missing_column_is_named(fx, tmp_path):
    import shutil

    root = tmp_path / "p"
    shutil.copytree(fx.root, root)
    table = pq.read_table(root / "cxr.parquet").drop_columns([BOX_COLUMNS[0]])
    pq.write_table(table, root / "cxr.parquet")
    with pytest.raises(DataError, match=f"cxr.parquet: missing column.*{BOX_COLUMNS[0]}"):
        write_shards(root, tmp_path / "s", settings=SETTINGS, workers=1, progress=False)


def test_non_finite_task_value_names_the_row(fx, tmp_path):
    import shutil

    root = tmp_path / "p"
    shutil.copytree(fx.root, root)
    table = pd.read_parquet(root / "tasks" / "mortality_los.parquet")
    table.loc[1, "los_days"] = float("nan")
    table.to_parquet(root / "tasks" / "mortality_los.parquet")
    with pytest.raises(DataError, match=r"mortality_los.parquet row 1: .*finite"):
        write_shards(root, tmp_path / "s", settings=SETTINGS, workers=1, progress=False)
