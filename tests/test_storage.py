"""data_sharding.storage against real S3 (moto) and GCS (fake-gcs-server) servers on 127.0.0.1."""
from __future__ import annotations

import io
import tarfile
import threading

import pytest

from data_sharding import storage
from data_sharding.errors import ConfigError


def test_resolve_local_and_uris(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    loc = storage.resolve("rel/dir")
    assert not loc.is_remote and loc.uri == str(tmp_path / "rel" / "dir")
    assert (loc / "a.tar").local == tmp_path / "rel" / "dir" / "a.tar"
    assert loc.native == tmp_path / "rel" / "dir" and isinstance(loc.native, type(tmp_path))
    s3 = storage.resolve("s3://my-bucket/dipro/shards/")
    assert (s3.scheme, s3.bucket, s3.key, s3.fs_path) == ("s3", "my-bucket", "dipro/shards", "my-bucket/dipro/shards")
    assert (s3 / "mortality_los/train-000000.tar").uri == "s3://my-bucket/dipro/shards/mortality_los/train-000000.tar"
    assert storage.resolve("gs://bkt").uri == "gs://bkt" and storage.resolve("gs://bkt").parent.uri == "gs://bkt"
    assert (s3 / "x").relative_to(s3) == "x" and (s3 / "x").parent == s3 and s3.native is s3
    with pytest.raises(ValueError):
        s3 / "../escape"


@pytest.mark.parametrize("uri, words", [
    ("s3://AKIAXXX:hunter2@bucket/p", ["no credentials", "***@"]),
    ("s3://bucket/p?secret_key=hunter2", ["no credentials", "secret_key=***"]),
    ("hdfs://nn/p", ["unsupported storage scheme"]),
    ("s3://B_/p", ["not a bucket name"]),
])
def test_resolve_refuses_bad_uris_in_one_line_without_secrets(uri, words):
    with pytest.raises(ConfigError) as info:
        storage.resolve(uri)
    text = str(info.value)
    assert "\n" not in text and "hunter2" not in text
    for w in words:
        assert w in text


def test_round_trip_listing_and_conditional_writes(bucket):
    root = storage.resolve(bucket) / "run"
    assert not root.is_dir() and root.list() == []
    data = bytes(range(256)) * 1200  # 300 KiB: several 64 KiB chunks
    target = root / "a" / "big.bin"
    with target.open_output() as f:
        for i in range(0, len(data), 50_000):
            f.write(data[i:i + 50_000])
    t1 = (root / "m.json").write_bytes(b'{"v": 1}')
    info = target.stat()
    assert info.size == len(data) and info.token
    listed = root.list()
    assert [o.path for o in listed] == ["a/big.bin", "m.json"] and listed[1].token == t1
    assert root.is_dir() and target.exists() and not (root / "nope").exists()

    with target.open_input(chunk_bytes=64 << 10) as f:
        assert f.read(10) == data[:10]
        f.seek(200_000)
        assert f.read(70_000) == data[200_000:270_000]
        f.seek(0)
        assert f.read() == data

    with pytest.raises(storage.PreconditionFailed):
        (root / "m.json").put(b"x", if_absent=True)
    t2 = (root / "m.json").put(b'{"v": 2}', if_match=t1)
    assert t2 != t1
    with pytest.raises(storage.PreconditionFailed):
        (root / "m.json").put(b'{"v": 3}', if_match=t1)  # stale token: the other writer won
    assert (root / "m.json").read_bytes() == b'{"v": 2}'
    if bucket.startswith("s3://"):  # fake-gcs-server does not check preconditions on DELETE (GCS does)
        with pytest.raises(storage.PreconditionFailed):
            (root / "m.json").delete(if_match=t1)
    (root / "m.json").delete(if_match=t2)
    assert not (root / "m.json").exists()
    root.remove_tree()
    assert root.list() == []


def test_directory_markers_are_not_objects(bucket, tmp_path):
    """pyarrow (and Ray Train through it) leaves empty ``prefix/`` objects behind as directories: a listing
    and ``is_dir`` must see the files only, whichever key sorts first."""
    import pyarrow.fs as pafs

    run = storage.resolve(bucket) / "runs" / "r"
    run.fs.create_dir(run.fs_path + "/checkpoint_a")  # markers: runs/, runs/r/, runs/r/checkpoint_a/
    (tmp_path / "rng").mkdir()
    (tmp_path / "rng" / "rank_0.pt").write_bytes(b"x")
    pafs.copy_files(str(tmp_path), run.fs_path + "/checkpoint_b", destination_filesystem=run.fs)
    assert [o.path for o in run.list()] == ["checkpoint_b/rng/rank_0.pt"]
    assert run.is_dir() and run.list(limit=1)[0].path == "checkpoint_b/rng/rank_0.pt"
    assert not (run / "checkpoint_a").is_dir()
    assert sorted(p.name for p in (run / "checkpoint_b").download_dir(tmp_path / "copy").rglob("*")) == [
        "rank_0.pt", "rng"]


def test_exactly_one_of_two_concurrent_creators_wins(bucket):
    lock = storage.resolve(bucket) / ".dipro.lock"
    results: list[str] = []
    barrier = threading.Barrier(4)

    def create(i: int) -> None:
        barrier.wait()
        try:
            lock.put(f"writer {i}".encode(), if_absent=True)
            results.append(f"won {i}")
        except storage.PreconditionFailed:
            results.append("lost")

    threads = [threading.Thread(target=create, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results)[:3] == ["lost"] * 3 and len([r for r in results if r.startswith("won")]) == 1
    assert lock.read_text() == results[[r.startswith("won") for r in results].index(True)].replace("won", "writer")


def test_missing_object_and_bucket_are_one_line_naming_the_uri(bucket):
    with pytest.raises(storage.NotFound) as info:
        (storage.resolve(bucket) / "no" / "such.tar").open_input()
    assert str(info.value) == f"{bucket}/no/such.tar: no such object (read)"
    scheme = bucket.split("://")[0]
    with pytest.raises(storage.StorageAccessError) as info:
        storage.resolve(f"{scheme}://no-such-bucket-here/x").write_bytes(b"1")
    assert "no-such-bucket-here" in str(info.value) and "\n" not in str(info.value)


def test_streamed_bytes_are_stored_as_written_whatever_the_extension(bucket):
    import gzip

    payload = gzip.compress(b"subject_id,hadm_id\n1,2\n")
    target = storage.resolve(bucket) / "admissions.csv.gz"  # pyarrow would gzip it again by default
    with target.open_output() as f:
        f.write(payload)
    assert target.read_bytes() == payload and target.stat().size == len(payload)


def test_failed_stream_publishes_nothing(bucket):
    target = storage.resolve(bucket) / "partial.tar"
    with pytest.raises(RuntimeError):
        with target.open_output() as f:
            f.write(b"x" * 100_000)
            raise RuntimeError("writer died")
    assert not target.exists()


def test_local_put_conditions(tmp_path):
    loc = storage.resolve(tmp_path / "m.json")
    t = loc.put(b"1", if_absent=True)
    with pytest.raises(storage.PreconditionFailed):
        loc.put(b"2", if_absent=True)
    loc.put(b"2", if_match=t)
    with pytest.raises(storage.PreconditionFailed):
        loc.put(b"3", if_match=t)
    assert loc.read_bytes() == b"2" and [o.path for o in storage.resolve(tmp_path).list()] == ["m.json"]


def _tar_bytes(n: int = 40, size: int = 30_000) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(n):
            info = tarfile.TarInfo(f"s{i:04d}.crops.npy")
            info.size = size
            tar.addfile(info, io.BytesIO(bytes([i % 251]) * size))
    return buf.getvalue()


def test_ranged_reads_start_where_reading_starts(s3_bucket):
    """A reader that seeks into an object before its first read fetches nothing before that point
    (a loader segment that starts mid-shard), and can still seek back."""
    data = bytes(range(256)) * 1200
    loc = storage.resolve(s3_bucket) / "obj.bin"
    loc.write_bytes(data)
    before = storage.counters().get("bytes_read", 0)
    with loc.open_input(chunk_bytes=64 << 10) as f:
        f.seek(100_003)
        assert f.read() == data[100_003:]
        assert storage.counters()["bytes_read"] - before == len(data) - 100_003
        f.seek(5)
        assert f.read(100) == data[5:105]


def test_transient_faults_are_retried_and_counted(s3_server, s3_bucket, monkeypatch):
    from object_store import FaultProxy

    data = _tar_bytes()
    (storage.resolve(s3_bucket) / "t.tar").write_bytes(data)
    proxy = FaultProxy(s3_server.port).start()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        monkeypatch.setattr(storage, "RETRY_BASE_S", 0.01)
        before = storage.counters().get("retries", 0)
        proxy.only = "GET "
        proxy.fail_503 = 2
        proxy.reset_after = (2, 20_000)
        with (storage.resolve(s3_bucket) / "t.tar").open_input(chunk_bytes=256 << 10) as f:
            names = [m.name for m in tarfile.open(fileobj=f, mode="r:")]
            f.seek(0)
            assert f.read() == data
        assert len(names) == 40 and proxy.injected == 4
        assert storage.counters()["retries"] - before >= 4
    finally:
        proxy.stop()


def test_unreachable_server_is_one_line_after_bounded_retries(s3_bucket, monkeypatch):
    from object_store import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setattr(storage, "RETRY_BASE_S", 0.01)
    monkeypatch.setattr(storage, "RETRY_ATTEMPTS", 2)
    with pytest.raises(storage.StorageAccessError) as info:
        (storage.resolve(s3_bucket) / "t.tar").read_bytes()
    assert str(info.value).startswith(f"{s3_bucket}/t.tar: storage unavailable (read)") and "\n" not in str(info.value)
    assert "SECRET" not in str(info.value).upper()


def test_stock_webdataset_reads_bucket_shards(bucket):
    import webdataset as wds

    (storage.resolve(bucket) / "shard-000000.tar").write_bytes(_tar_bytes(5, 100))
    storage.register_webdataset_schemes()
    keys = [s["__key__"] for s in wds.WebDataset(f"{bucket}/shard-000000.tar", shardshuffle=False)]
    assert keys == [f"s{i:04d}" for i in range(5)]


def test_refused_credentials_are_one_line_without_the_secret(tmp_path, monkeypatch):
    from object_store import S3Server, s3_env

    server = S3Server(tmp_path / "moto.log", auth=True).start()
    try:
        key_id, secret = server.make_credentials()
        uri = server.create_bucket("authed", (key_id, secret))
        for k, v in s3_env(server.endpoint, AWS_ACCESS_KEY_ID=key_id, AWS_SECRET_ACCESS_KEY=secret).items():
            monkeypatch.setenv(k, v)
        (storage.resolve(uri) / "x").write_bytes(b"1")
        assert (storage.resolve(uri) / "x").read_bytes() == b"1"
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-" + secret)
        for op in (lambda: (storage.resolve(uri) / "x").read_bytes(), lambda: (storage.resolve(uri) / "y").write_bytes(b"2"),
                   lambda: storage.resolve(uri).list()):
            with pytest.raises(storage.StorageAccessError) as info:
                op()
            text = str(info.value)
            assert text.startswith(f"{uri}") and "access denied" in text and secret not in text and "\n" not in text
    finally:
        server.stop()
