"""dipro shards regenerate: Ray tasks rebuild only what changed; a crash leaves the old shards valid."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq
import pytest

from data_sharding import regenerate as regen_mod
from data_sharding.lock import LOCK_NAME
from data_sharding.manifest import ShardSettings, read_manifest
from data_sharding.regenerate import regenerate
from data_sharding.shard_writer import write_shards
from data_sharding.verify import verify_shards
from processed_fixture import make_processed

pytestmark = pytest.mark.slow  # starts a local Ray (about 10 s on 2 cores)

SETTINGS = ShardSettings(crop_size=32, max_samples_per_shard=2)


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    import ray

    from data_sharding.ray_init import init_ray

    # the one way the project starts a local Ray: pinned to 127.0.0.1, no dashboard
    assert init_ray(num_cpus=2, logging_level="warning")
    try:
        yield
    finally:
        ray.shutdown()


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """Every output file (the writers' lock file records the last writer, so it is left out)."""
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != LOCK_NAME}


def bump_ehr(processed: Path, stay_id: int, column: str = "heart_rate") -> None:
    """Change one EHR value column of one stay in whichever part holds it."""
    for part in sorted((processed / "ehr").glob("part-*.parquet")):
        table = pq.read_table(part)
        ids = table.column("stay_id").to_numpy()
        if (ids == stay_id).any():
            values = table.column(column).to_numpy().copy()
            values[ids == stay_id] += np.float32(0.5)
            pq.write_table(table.set_column(table.column_names.index(column), column, pa.array(values)), part)


def shards_holding(out: Path, stay_id: int) -> set[str]:
    import tarfile

    found = set()
    for p in sorted(out.rglob("*.tar")):
        with tarfile.open(p) as tar:
            if any(n.startswith(f"s{stay_id}_") for n in tar.getnames()):
                found.add(str(p.relative_to(out)))
    return found


@pytest.fixture()
def built(tmp_path):
    fx = make_processed(tmp_path / "p", n_stays=6)
    out = tmp_path / "s"
    write_shards(fx.root, out, settings=SETTINGS, workers=1, progress=False)
    return fx, out


def test_changed_stay_rebuilds_only_its_shards(built, tmp_path):
    fx, out = built
    assert regenerate(fx.root, out, progress=False).rebuilt == {}
    before = snapshot(out)
    stay = fx.stay_ids[1]
    holding = shards_holding(out, stay)
    assert 2 <= len(holding) < len([k for k in before if k.endswith(".tar")])
    bump_ehr(fx.root, stay)

    report = regenerate(fx.root, out, progress=False)

    assert set(report.rebuilt) == holding and set(report.rebuilt.values()) == {"inputs changed"}
    after = snapshot(out)
    for path, (digest, mtime) in before.items():
        if path.endswith(".tar") and path not in holding:
            assert after[path] == (digest, mtime), path
        elif path in holding:
            assert after[path][0] != digest
    assert verify_shards(out) == []
    fresh = tmp_path / "fresh"
    write_shards(fx.root, fresh, settings=SETTINGS, workers=1, progress=False)
    assert {k: v[0] for k, v in snapshot(fresh).items() if k.endswith(".tar")} == \
           {k: v[0] for k, v in after.items() if k.endswith(".tar")}
    assert [(r.path, r.fingerprint) for r in read_manifest(fresh).records] == \
           [(r.path, r.fingerprint) for r in read_manifest(out).records]


def test_crash_before_commit_leaves_previous_shards_valid(built, monkeypatch):
    fx, out = built
    before = snapshot(out)
    bump_ehr(fx.root, fx.stay_ids[0])

    def crash(*args, **kwargs):
        raise RuntimeError("injected crash after the rebuilt shards were written")

    monkeypatch.setattr(regen_mod, "commit_shards", crash)
    with pytest.raises(RuntimeError, match="injected crash"):
        regenerate(fx.root, out, progress=False)
    leftovers = sorted(p.name for p in out.rglob("*.tmp"))
    assert leftovers  # the crash happened with new shards written under temp names
    assert {k: v for k, v in snapshot(out).items() if not k.endswith(".tmp")} == before
    assert verify_shards(out) == []

    monkeypatch.undo()
    report = regenerate(fx.root, out, progress=False)
    assert report.rebuilt and not list(out.rglob("*.tmp"))
    assert verify_shards(out) == []


def test_damaged_shard_and_settings_change(built):
    fx, out = built
    victim = "mortality_los/val-000000.tar"
    data = bytearray((out / victim).read_bytes())
    data[len(data) // 3] ^= 0x10
    (out / victim).write_bytes(bytes(data))
    report = regenerate(fx.root, out, progress=False)
    assert list(report.rebuilt) == [victim] and report.rebuilt[victim].startswith("failed verification")
    assert verify_shards(out) == []

    report = regenerate(fx.root, out, task="disease_progression", overrides={"max_samples_per_shard": 3},
                        progress=False)
    manifest = read_manifest(out)
    prog = [r for r in manifest.records if r.task == "disease_progression"]
    assert all(ShardSettings.from_json(r.settings).max_samples_per_shard == 3 for r in prog)
    assert report.rebuilt and all(p.startswith("disease_progression/") for p in report.rebuilt)
    assert report.removed and all(not (out / p).exists() for p in report.removed)
    assert verify_shards(out) == []


def test_bad_input_in_a_ray_task_is_a_one_line_data_error(built):
    from data_sharding.errors import DataError

    fx, out = built
    before = snapshot(out)
    cxr = pq.read_table(fx.root / "cxr.parquet")
    dropped = fx.dicoms_of[fx.stay_ids[2]][0]
    keep = pa.compute.not_equal(cxr.column("dicom_id"), dropped)
    pq.write_table(cxr.filter(keep), fx.root / "cxr.parquet")
    with pytest.raises(DataError, match=f"CXR {dropped} of stay {fx.stay_ids[2]} is not in .*cxr.parquet") as info:
        regenerate(fx.root, out, progress=False)
    assert "\n" not in str(info.value)
    assert snapshot(out) == before


def test_bucket_regeneration_reads_no_shard_body_and_rebuilds_only_what_changed(tmp_path, s3_server, s3_bucket):
    """On a bucket a no-op regeneration decides from the manifest and object metadata (no shard GET);
    one changed stay rebuilds only its shards as new objects, the old ones left for gc."""
    from data_sharding import storage

    fx = make_processed(tmp_path / "p", n_stays=6)
    # the films in the bucket too: cxr.parquet names them by URI
    storage.resolve(f"{s3_bucket}/films").upload_dir(fx.images)
    cxr = pq.read_table(fx.root / "cxr.parquet")
    uris = [f"{s3_bucket}/films/{Path(p).name}" for p in cxr.column("image_path").to_pylist()]
    pq.write_table(cxr.set_column(cxr.column_names.index("image_path"), "image_path", pa.array(uris)),
                   fx.root / "cxr.parquet")
    out = f"{s3_bucket}/shards"
    write_shards(fx.root, out, settings=SETTINGS, workers=1, progress=False)
    before = read_manifest(out)
    bucket = s3_bucket.split("://")[1]
    log_start = s3_server.log.stat().st_size

    report = regenerate(fx.root, out, progress=False)

    assert report.rebuilt == {} and read_manifest(out).token == before.token  # nothing written
    assert (report.films_hashed, report.films_read) == (0, 0) and report.cache_status == "loaded"
    log = s3_server.log.read_bytes()[log_start:].decode("utf-8", "replace").splitlines()
    gets = [line for line in log if f'"GET /{bucket}/' in line and "list-type" not in line]
    assert [g for g in gets if "/films/" in g or ".tar" in g] == []  # no film, no shard body read
    assert any(f'"HEAD /{bucket}/shards/' in line for line in log)  # shard objects checked by metadata

    victim = fx.dicoms_of[fx.stay_ids[2]][1]  # one film rewritten in the bucket: re-hashed alone
    film = storage.resolve(f"{s3_bucket}/films/{victim}.jpg")
    film.write_bytes(film.read_bytes() + b"\0")
    report = regenerate(fx.root, out, progress=False)
    after = read_manifest(out)
    changed = {r.logical for r in after.records if r.path not in before.by_path()}
    assert report.films_hashed == 1 and set(report.rebuilt) == changed
    assert set(report.rebuilt.values()) == {"inputs changed"} and 2 <= len(changed) < len(after.records)
    assert sorted(report.removed) == sorted(r.path for r in before.records if r.logical in changed)
    assert all((storage.resolve(out) / p).exists() for p in report.removed)  # superseded, not deleted
    assert verify_shards(out) == []
    fresh = tmp_path / "fresh"
    write_shards(fx.root, fresh, settings=SETTINGS, workers=1, progress=False)
    assert {r.logical: r.sha256 for r in read_manifest(fresh).records} == \
           {r.logical: r.sha256 for r in after.records}


# ----------------------------------------------------------------------------- film fingerprints

def shards_using(out: Path, dicom: str) -> set[str]:
    """Shards with a sample whose meta.json lists ``dicom``."""
    import json
    import tarfile

    found = set()
    for p in sorted(out.rglob("*.tar")):
        with tarfile.open(p) as tar:
            for info in tar:
                if info.name.endswith(".meta.json") and dicom in json.loads(tar.extractfile(info).read())["dicom_ids"]:
                    found.add(str(p.relative_to(out)))
    return found


def test_noop_regeneration_reads_no_film_and_rehash_reads_every_one(built):
    import os

    fx, out = built
    report = regenerate(fx.root, out, progress=False)
    n_films = sum(len(d) for d in fx.dicoms_of.values())
    assert (report.rebuilt, report.films, report.films_hashed, report.films_read) == ({}, n_films, 0, 0)
    assert report.cache_status == "loaded" and report.cache_saved == ""  # nothing rewritten
    before = snapshot(out)
    # change a film's bytes behind the cache's back (same size, same mtime): a film that were opened
    # would be re-hashed and its shards rebuilt; a no-op regeneration opens none
    victim = fx.dicoms_of[fx.stay_ids[1]][0]
    path = fx.images / f"{victim}.jpg"
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    report = regenerate(fx.root, out, progress=False)
    assert (report.rebuilt, report.films_hashed, report.films_read) == ({}, 0, 0)
    after = snapshot(out)  # the commit rewrites the manifest with the same bytes; nothing else is touched
    assert {k: v[0] for k, v in after.items()} == {k: v[0] for k, v in before.items()}
    assert {k: v for k, v in after.items() if k != "manifest.parquet"} == \
           {k: v for k, v in before.items() if k != "manifest.parquet"}

    report = regenerate(fx.root, out, progress=False, rehash=True)  # --rehash: the cache is not trusted
    assert report.cache_status.startswith("ignored (--rehash)") and report.films_hashed == n_films
    assert set(report.rebuilt) == shards_using(out, victim) and set(report.rebuilt.values()) == {"inputs changed"}
    assert verify_shards(out) == []


def test_one_changed_film_is_rehashed_alone_and_rebuilds_only_its_shards(built, tmp_path):
    from PIL import Image

    from data_sharding.film_fingerprints import load_cache, stat_film

    fx, out = built
    victim = fx.dicoms_of[fx.stay_ids[2]][1]
    holding = shards_using(out, victim)
    assert 2 <= len(holding) < len(list(out.rglob("*.tar")))  # a progression pair (or two) and a mortality sample
    before = snapshot(out)
    path = fx.images / f"{victim}.jpg"
    Image.open(path).save(path, format="JPEG", quality=60)

    report = regenerate(fx.root, out, progress=False)

    assert report.films_hashed == 1 and set(report.rebuilt) == holding
    assert report.build.films_read == report.films_read < report.films  # only the rebuilt shards' films
    after = snapshot(out)
    for rel, (digest, mtime) in before.items():
        if rel.endswith(".tar") and rel not in holding:
            assert after[rel] == (digest, mtime), rel
    assert load_cache(out).entries[str(path)][0] == stat_film(str(path))
    fresh = tmp_path / "fresh"
    write_shards(fx.root, fresh, settings=SETTINGS, workers=1, progress=False)
    assert {k: v[0] for k, v in snapshot(fresh).items() if k.endswith(".tar")} == \
           {k: v[0] for k, v in after.items() if k.endswith(".tar")}
    assert verify_shards(out) == []


def test_missing_or_corrupt_film_cache_is_rebuilt_not_trusted(built):
    from data_sharding.film_fingerprints import cache_path, load_cache

    fx, out = built
    n_films = sum(len(d) for d in fx.dicoms_of.values())
    for damage, status in (("corrupt", "corrupt ("), ("delete", "missing: rebuilt")):
        if damage == "delete":
            cache_path(out).unlink()
        else:
            cache_path(out).write_bytes(cache_path(out).read_bytes()[:100])
        report = regenerate(fx.root, out, progress=False)
        assert report.cache_status.startswith(status) and report.films_hashed == n_films
        assert report.rebuilt == {} and "films" in report.cache_saved
        assert load_cache(out).status == "loaded" and len(load_cache(out).entries) == n_films
