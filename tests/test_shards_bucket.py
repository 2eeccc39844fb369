"""Shard sets on a bucket: the same bytes as a local build, published by the manifest alone, two writers
never both committing, a writer killed mid-upload publishing nothing, the lock object, gc."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from data_sharding import storage
from data_sharding.lock import LockedError, ObjectLock, output_lock
from data_sharding.manifest import ConcurrentCommit, ShardSettings, commit_manifest, read_manifest, read_stats
from data_sharding.shard_writer import write_shards
from data_sharding.verify import verify_shards
from helpers import repo_env
from processed_fixture import make_processed

SETTINGS = ShardSettings(crop_size=32, max_samples_per_shard=2)


@pytest.fixture(scope="module")
def processed(tmp_path_factory):
    """A processed dir and its local shard build (the reference for the bucket builds)."""
    root = tmp_path_factory.mktemp("bucket-shards")
    fx = make_processed(root / "p", n_stays=6)
    write_shards(fx.root, root / "local", settings=SETTINGS, workers=1, progress=False)
    return fx, root / "local"


def _digests(manifest):
    return {r.logical: (r.sha256, r.samples, r.fingerprint) for r in manifest.records}


def test_bucket_build_matches_local_and_is_published_by_its_manifest(processed, bucket):
    fx, local = processed
    out = f"{bucket}/shards"
    write_shards(fx.root, out, settings=SETTINGS, workers=1, progress=False)
    remote, reference = read_manifest(out), read_manifest(local)
    assert _digests(remote) == _digests(reference)
    assert all(r.path != r.logical and r.etag for r in remote.records)  # generation-named, ETag recorded
    assert verify_shards(out) == []
    from dipro.tracking.provenance import data_fingerprint

    assert data_fingerprint(out) == data_fingerprint(local)  # "the same data" for the registry's gate
    for name in ("label_stats.json", "ehr_stats.json"):  # the same, in the same key order (features' order)
        assert json.dumps(read_stats(out, name)) == json.dumps(json.loads((local / name).read_text()))
    objects = {o.path for o in storage.resolve(out).list()}
    assert objects == {r.path for r in remote.records} | {"manifest.parquet", "film_fingerprints.parquet"}  # no stats objects, no lock left

    # a second build publishes a new generation; the old objects stay readable (gc removes them)
    first = {r.logical: r.path for r in remote.records}
    write_shards(fx.root, out, settings=SETTINGS, workers=1, progress=False)
    second = read_manifest(out)
    assert _digests(second) == _digests(reference)
    assert all(first[r.logical] != r.path for r in second.records)
    assert all((storage.resolve(out) / p).exists() for p in first.values())

    # a no-op regeneration decides from the manifest, the film cache and object metadata, in this process
    import ray

    from data_sharding.regenerate import regenerate

    report = regenerate(fx.root, out, progress=False)
    assert (report.rebuilt, report.films_hashed, report.films_read) == ({}, 0, 0)
    assert not ray.is_initialized() and read_manifest(out).token == second.token

    from data_sharding.gc import collect

    assert collect(out, min_age_s=3600).removed == []  # too young
    report = collect(out, min_age_s=0)
    assert sorted(report.removed) == sorted(first.values())
    assert {o.path for o in storage.resolve(out).list()} == {r.path for r in second.records} | {"manifest.parquet", "film_fingerprints.parquet"}
    assert verify_shards(out) == []


def test_two_writers_never_both_commit(processed, s3_bucket):
    fx, _ = processed
    out = f"{s3_bucket}/shards"
    write_shards(fx.root, out, settings=SETTINGS, workers=1, progress=False)
    seen = read_manifest(out)  # both writers planned from this version
    commit_manifest(out, seen, seen.token, seen.stats)  # writer 1 commits
    with pytest.raises(ConcurrentCommit) as info:
        commit_manifest(out, seen, seen.token, seen.stats)  # writer 2, from the same version
    assert "committed by another writer" in str(info.value) and "\n" not in str(info.value)

    # and the lock object admits one holder at a time
    results = []
    barrier = threading.Barrier(3)

    def take(i):
        barrier.wait()
        try:
            with output_lock(out, "shard directory", command=f"writer {i}"):
                results.append("held")
                time.sleep(0.5)
        except LockedError as exc:
            results.append(str(exc))

    threads = [threading.Thread(target=take, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count("held") == 1
    assert all("is being written by pid" in r and "--lock-timeout" in r for r in results if r != "held")
    assert not (storage.resolve(out) / ".dipro.lock").exists()  # released


_HOLDER = """
import sys, time
from data_sharding.lock import output_lock
with output_lock(sys.argv[1], "shard directory", wait_s=15, command="dipro shard --out X (test holder)"):
    print("locked", flush=True)
    time.sleep(600)
"""


def test_a_killed_writer_publishes_nothing_and_its_lock_expires(processed, s3_server, s3_bucket):
    from object_store import s3_env

    fx, _ = processed
    out = f"{s3_bucket}/shards"
    write_shards(fx.root, out, settings=SETTINGS, workers=1, progress=False)
    before = read_manifest(out)
    env = repo_env(**s3_env(s3_server.endpoint), DIPRO_LOCK_TTL_S="3")

    # a build killed while it uploads: the committed manifest and its objects are untouched
    proc = subprocess.Popen([sys.executable, "-m", "dipro", "shard", "--processed", str(fx.root), "--out", out,
                             "--crop-size", "32", "--max-samples-per-shard", "1", "--workers", "1"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            names = {o.path for o in storage.resolve(out).list()}
            if any(n.endswith(".tar") and n not in {r.path for r in before.records} for n in names):
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(30)
    after = read_manifest(out)
    assert after.token == before.token and _digests(after) == _digests(before)
    assert verify_shards(out) == []

    # its lock expires after the TTL; until then a writer is refused naming the holder
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, out], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(10)
        with pytest.raises(LockedError) as info:
            ObjectLock(storage.resolve(out), "shard directory", ttl_s=3).acquire(0)
        assert "test holder" in str(info.value) and "expires" in str(info.value)
        lock = ObjectLock(storage.resolve(out), "shard directory", ttl_s=3)
        lock.acquire(wait_s=10)  # the dead holder's lock expired: taken over
        lock.release()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(10)
