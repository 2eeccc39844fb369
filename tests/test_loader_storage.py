"""dipro.data.build_loader over shards on a bucket: real S3 (moto) and GCS (fake-gcs-server) on 127.0.0.1.

The same contract-format shards (tests/loader_shards.py) are read locally and from a bucket
(published with ``upload_shard_set``, as ``dipro shard --out s3://...`` lays them out): the loader
must yield the same batches in the same order, with loader worker processes, and evaluation every
sample once.  Faults go through ``FaultProxy`` (503 SlowDown, connection resets mid-read) or kill a
server of the test's own; the shard cache (``data.cache_dir``) is checked for hits, its bound and
a rewritten object.
"""
from __future__ import annotations

import io
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from loader_shards import check_batch_against_source, write_shards

from data_sharding import shard_format, storage
from data_sharding.errors import DataError
from dipro.data import build_loader


def _batches(loader) -> list[list[str]]:
    return [list(b["sample_key"]) for b in loader]


def _publish(local: Path, bucket: str) -> str:
    from object_store import upload_shard_set

    return upload_shard_set(local, f"{bucket}/shards")


# ----------------------------------------------------------------------------- same batches as local

def test_bucket_loader_yields_what_the_local_loader_yields(shards, bucket):
    local, written = shards
    remote = _publish(local, bucket)
    # training: the same (seed, epoch, rank, worker) gives the same batches, with 2 loader worker processes
    kw = dict(seed=4, rank=1, world_size=2, shuffle_buffer=4, epoch=1)
    there = build_loader(remote, "mortality", "train", 2, 2, **kw)
    batches = list(there)
    assert [list(b["sample_key"]) for b in batches] == _batches(build_loader(local, "mortality", "train", 2, 2, **kw))
    for b in batches:
        check_batch_against_source(b, written, "mortality_los")
    assert there.stats.io["storage_requests"] > 0  # counted in the workers, carried to this process
    # evaluation: every sample once, in the local loader's order
    there = build_loader(remote, "mortality", "val", 2, 2)
    keys = _batches(there)
    assert keys == _batches(build_loader(local, "mortality", "val", 2, 2))
    expected = sorted(k for k, s in written.items() if s["shard"].startswith("mortality_los/val-"))
    assert sorted(k for b in keys for k in b) == expected and sum(map(len, keys)) == len(expected)
    assert there.stats.as_dict()["data/storage_retries"] == 0.0


def test_stock_webdataset_reads_the_loaders_bucket_shards(shards, s3_bucket):
    import webdataset as wds

    from dipro.data.plan import read_manifest

    local, written = shards
    remote = _publish(local, s3_bucket)
    storage.register_webdataset_schemes()
    urls = [s.path for s in read_manifest(remote, "mortality", "val").shards]
    assert all(u.startswith("s3://") for u in urls)
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    loader_keys = [k for b in _batches(build_loader(remote, "mortality", "val", 3, 0)) for k in b]
    assert [s["__key__"] for s in samples] == loader_keys
    for s in samples:
        crops = np.load(io.BytesIO(s["crops.npy"]), allow_pickle=False)
        assert np.array_equal(crops, written[s["__key__"]]["crops"])


# ----------------------------------------------------------------------------- skipping into a shard

def _big_sample_shard(path: Path, n: int, payload: int) -> list[tuple[str, dict[str, bytes]]]:
    rng = np.random.default_rng(0)
    samples = [(f"s{i:03d}", {"crops.npy": rng.bytes(payload), "meta.json": b'{"i": %d}' % i}) for i in range(n)]
    shard_format.write_tar(path, samples)
    return samples


def test_skipping_into_a_bucket_shard_reads_headers_not_samples(s3_bucket, tmp_path, monkeypatch):
    """A segment that starts mid-shard: with samples above the probe threshold the bytes of the
    samples before it are never fetched (header probes), below it they are streamed through; both
    yield exactly the local reader's samples."""
    from dipro.data import reader
    from dipro.data.plan import Segment, ShardInfo

    local = tmp_path / "big.tar"
    samples = _big_sample_shard(local, 10, 1 << 20)
    loc = storage.resolve(s3_bucket) / "t" / "big.tar"
    loc.write_bytes(local.read_bytes())
    info = loc.stat()
    shard = ShardInfo(loc.uri, "t/big.tar", 10, info.size, info.token)
    with tarfile.open(local) as tar:
        offset7 = next(m.offset for m in tar if m.name.startswith("s007."))

    def read(shard_info, threshold):
        monkeypatch.setattr(reader, "SKIP_STREAM_BELOW_BYTES", threshold)
        before = storage.counters().get("bytes_read", 0)
        got = list(reader.read_segment(Segment(shard_info, 7, 10)))
        return got, storage.counters().get("bytes_read", 0) - before

    expected = list(reader.read_segment(Segment(ShardInfo(str(local), "t/big.tar", 10), 7, 10)))
    assert [s["__key__"] for s in expected] == ["s007", "s008", "s009"]
    assert [s["crops.npy"] for s in expected] == [m["crops.npy"] for _, m in samples[7:]]
    probed, fetched = read(shard, 0)
    assert probed == expected
    assert fetched <= (info.size - offset7) + 7 * 2 * reader.SKIP_PROBE_BYTES  # no skipped sample's payload
    streamed, fetched = read(shard, 4 << 20)
    assert streamed == expected and fetched >= offset7  # small samples: read through by the stream

    # with the manifest's sample offsets (what `dipro shard` records) a segment fetches its own bytes only
    with tarfile.open(local) as tar:
        members = [m for m in tar if m.isfile()]
    offsets = [m.offset for m in members if m.name.endswith(".crops.npy")]
    offsets.append(members[-1].offset_data + -(-members[-1].size // 512) * 512)
    indexed = ShardInfo(loc.uri, "t/big.tar", 10, info.size, info.token, offsets=tuple(offsets))
    for start, stop in ((7, 10), (3, 7), (0, 1)):
        before = storage.counters().get("bytes_read", 0)
        got = list(reader.read_segment(Segment(indexed, start, stop)))
        assert [s["crops.npy"] for s in got] == [m["crops.npy"] for _, m in samples[start:stop]]
        assert storage.counters().get("bytes_read", 0) - before == offsets[stop] - offsets[start]


# ----------------------------------------------------------------------------- faults

def test_503s_and_resets_mid_read_are_retried_and_counted(shards, s3_server, s3_bucket, monkeypatch):
    from object_store import FaultProxy

    local, _ = shards
    remote = _publish(local, s3_bucket)
    expected = _batches(build_loader(local, "mortality", "val", 2, 2))
    monkeypatch.setattr(storage, "RETRY_BASE_S", 0.01)  # the forked loader workers inherit it
    proxy = FaultProxy(s3_server.port).start()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        loader = build_loader(remote, "mortality", "val", 2, 2)
        proxy.only = "GET "  # the shard reads, not the plan's manifest GET and listing (already done)
        proxy.fail_503, proxy.reset_after = 2, (2, 1500)
        assert _batches(loader) == expected
        assert proxy.injected == 4
        assert loader.stats.io.get("storage_retries", 0) >= 4
        assert loader.stats.as_dict()["data/storage_retries"] >= 4.0
    finally:
        proxy.stop()


def test_server_killed_mid_epoch_is_one_line_naming_the_uri(tmp_path, monkeypatch):
    from object_store import S3Server, s3_env

    local = tmp_path / "shards"
    write_shards(local, {("mortality_los", "val"): [2] * 12}, seed=2)
    server = S3Server(tmp_path / "moto.log").start()
    try:
        for k, v in s3_env(server.endpoint).items():
            monkeypatch.setenv(k, v)
        monkeypatch.setattr(storage, "RETRY_BASE_S", 0.01)
        monkeypatch.setattr(storage, "RETRY_ATTEMPTS", 2)
        remote = _publish(local, server.create_bucket("killed"))
        loader = build_loader(remote, "mortality", "val", 2, 2)
        it = iter(loader)
        next(it)  # each worker has read at most 4 of its 6 shards
        server.kill()
        t0 = time.monotonic()
        with pytest.raises(storage.StorageAccessError) as info:
            list(it)
        text = str(info.value)
        assert time.monotonic() - t0 < 30
        assert text.startswith(f"{remote}/mortality_los/val-") and "storage unavailable" in text
        assert "\n" not in text and "SECRET" not in text.upper()
    finally:
        server.stop()


def test_missing_object_is_one_line_at_planning_and_while_reading(shards, bucket):
    local, _ = shards
    remote = _publish(local, bucket)
    gone = storage.resolve(remote) / "mortality_los" / "val-000001.tar"
    loader = build_loader(remote, "mortality", "val", 2, 0)  # planned while the object existed
    gone.delete()
    with pytest.raises(storage.NotFound) as info:
        list(loader)
    assert str(info.value) == f"{gone.uri}: no such object (read)"
    with pytest.raises(DataError) as info:
        build_loader(remote, "mortality", "val", 2, 0)
    assert str(info.value).startswith(f"shard {gone.uri} is listed in {remote}/manifest.parquet but no such object")
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------- the shard cache

def test_shard_cache_hits_bound_and_rewritten_objects(shards, s3_bucket, tmp_path):
    from dipro.data.plan import read_manifest
    from dipro.data.shard_cache import ShardCache

    local, _ = shards
    remote = _publish(local, s3_bucket)
    cache_dir = tmp_path / "cache"
    expected = _batches(build_loader(local, "mortality", "val", 2, 2))

    def loader(workers=2, gb=1.0):
        return build_loader(remote, "mortality", "val", 2, workers, cache_dir=cache_dir, cache_max_gb=gb)

    first = loader()  # two loader processes share the misses (one download per shard)
    assert _batches(first) == expected
    assert first.stats.io["cache_misses"] == 3 and not first.stats.io.get("cache_errors")
    again = loader()
    assert _batches(again) == expected
    assert again.stats.io["cache_hits"] >= 3 and "storage_requests" not in again.stats.io  # nothing from the bucket
    assert len(ShardCache(cache_dir, 1).entries()) == 3 and not list(cache_dir.glob(".*.tmp-*"))

    # the bound: room for the two largest shards; the least recently used entry goes first
    infos = read_manifest(remote, "mortality", "val").shards
    sizes = sorted(s.bytes for s in infos)
    cache = ShardCache(tmp_path / "small", sizes[-1] + sizes[-2])
    for s in (infos[0], infos[1], infos[0], infos[2]):
        cache.open(s).close()
    kept = {p.name for p, _, _ in cache.entries()}
    assert kept == {cache.entry(infos[0].path, infos[0].token).name, cache.entry(infos[2].path, infos[2].token).name}
    assert sum(size for _, size, _ in cache.entries()) <= cache.max_bytes

    # a shard rewritten under the same name (new ETag, new manifest) is fetched again, never served stale
    other = tmp_path / "other"
    new_written = write_shards(other, {("mortality_los", "val"): [4, 6, 1]}, seed=11)
    _publish(other, s3_bucket)
    fresh = loader(workers=0)
    keys = [k for b in _batches(fresh) for k in b]
    assert sorted(keys) == sorted(new_written) and fresh.stats.io["cache_misses"] == 3

    # an object that is not what the manifest names (sha256) is served once and not kept
    obj = storage.resolve(remote) / "mortality_los" / "val-000000.tar"
    grouped: dict[str, dict[str, bytes]] = {}
    with tarfile.open(other / "mortality_los/val-000000.tar") as tar:
        for m in tar:
            key, name = m.name.split(".", 1)
            grouped.setdefault(key, {})[name] = tar.extractfile(m).read()
    buf = io.BytesIO()
    shard_format.write_tar(buf, list(grouped.items())[:3])  # one sample fewer than the manifest says
    obj.write_bytes(buf.getvalue())
    short = build_loader(remote, "mortality", "val", 2, 0, cache_dir=cache_dir, cache_max_gb=1.0,
                         max_corrupt_fraction=0.5)
    assert len([k for b in _batches(short) for k in b]) == 10 and short.stats.corrupt == 1
    assert short.stats.io["cache_errors"] == 1
    token = storage.resolve(obj.uri).stat().token
    assert not ShardCache(cache_dir, 1).entry(obj.uri, token).exists()
