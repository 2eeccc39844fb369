"""Run directories on object storage (no Ray): the claim, train.log, best/, checkpoint checks and resume.

Each test runs on a real S3 server (moto) and on fake-gcs-server (the ``bucket`` fixture); the
checkpoints are the tiny ones of ``helpers.make_run`` (real digests, a 64-float "model"), published
on the bucket as Ray's upload leaves them (``Location.upload_dir``).  Training on a bucket end to end:
tests/test_tracking_train.py and tests/test_faults_train.py.
"""
from __future__ import annotations

import io
import json
import os
import threading
import time

import pytest
import torch
from helpers import make_checkpoint, make_run

from data_sharding import storage
from data_sharding.errors import ConfigError, UserError
from dipro import cli
from dipro.train import checkpoint as ck
from dipro.train import rundir


def upload_run(local_run, root) -> storage.Location:
    run = root / local_run.name
    run.upload_dir(local_run)
    return run


def test_run_claim_on_a_bucket_is_exclusive_and_names_the_claimant(bucket):
    root = storage.resolve(bucket) / "runs"
    outcomes: list[object] = []

    def race():
        try:
            outcomes.append(rundir.claim(root, "same"))
        except ConfigError as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=race) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    won = [o for o in outcomes if not isinstance(o, ConfigError)]
    assert won == [root / "same"], outcomes  # exactly one claimant; a bucket run dir is a Location
    for lost in (o for o in outcomes if isinstance(o, ConfigError)):
        assert f"run 'same' already exists under {root} (started by pid {os.getpid()} on" in str(lost)
        assert "Ray would silently resume it" in str(lost) and "\n" not in str(lost)
    assert json.loads((root / "same" / "run.json").read_text())["run_name"] == "same"
    # released while it holds only its marker and log; kept once it holds a checkpoint
    log = rundir.RunLog(root / "same")
    log.write("never trained")
    log.close()
    rundir.release(root / "same")
    assert root.list() == []
    run_dir = rundir.claim(root, "same")
    (run_dir / "checkpoint_s00000001" / "meta.json").write_text("{}")
    rundir.release(run_dir)
    assert {o.path for o in run_dir.list()} == {"run.json", "checkpoint_s00000001/meta.json"}


def test_run_log_on_a_bucket_is_uploaded_while_it_grows_failures_at_once(bucket):
    run_dir = storage.resolve(bucket) / "runs" / "logged"
    log = rundir.RunLog(run_dir, upload_every_s=0.1)
    obj = run_dir / "train.log"
    try:
        assert str(log) == obj.uri and not log.path.is_relative_to(os.getcwd())
        log.write("[dipro train] first line")
        deadline = time.monotonic() + 20
        while not (obj.exists() and "first line" in obj.read_text()):
            assert time.monotonic() < deadline, "train.log not uploaded within 20 s"
            time.sleep(0.05)
        with open(log.path, "a") as f:  # what loggers_to_file's handlers and Ray's worker lines do
            f.write("a library line\n")
        log.failure("the one-line reason")  # uploaded before failure() returns
        text = obj.read_text()
        assert "FAILED: the one-line reason" in text and "a library line" in text
        log.write("[dipro train] last line")
    finally:
        log.close()
    assert obj.read_text().endswith("[dipro train] last line\n")
    assert not log.path.parent.exists()  # the local copy is gone once uploaded


def test_best_on_a_bucket_moves_by_its_pointer_never_half_copied(bucket, tmp_path):
    local = make_run(tmp_path, "r", steps=(2, 4, 6), world=1)
    run = storage.resolve(bucket) / "runs" / "r"
    best = run / ck.BEST_DIR

    def best_step() -> float:
        weights = torch.load(io.BytesIO((ck.checkpoint_location(best) / "model.pt").read_bytes()), weights_only=True)
        assert ck.read_meta(ck.checkpoint_location(best))["global_step"] == weights["w"][0]
        return float(weights["w"][0])

    for step in (2, 4, 6):
        ck.update_best(local / f"checkpoint_s{step:08d}", run)
        assert best_step() == step
    generations = {o.path.split("/")[0] for o in best.list()} - {ck.BEST_POINTER}
    assert len(generations) == 2  # the current one and the one before it (a reader may still be on it)
    # an update that died after writing part of a new generation: readers still see the last best
    (best / "29991231T235959-abcdef" / "model.pt").write_bytes(b"half")
    assert best_step() == 6
    with ck.local_checkpoint(best) as d:
        assert sorted(p.name for p in d.iterdir()) == sorted(ck.BEST_FILES)
    # a resumed run's best starts as a copy of its predecessor's (bucket to bucket)
    ck.update_best(best, run.parent / "r-resumed")
    assert ck.read_meta(ck.checkpoint_location(run.parent / "r-resumed" / "best"))["global_step"] == 6


def test_damaged_checkpoint_object_is_refused_with_the_local_line(bucket, tmp_path, capsys):
    local = make_run(tmp_path / "local", "r1")
    root = storage.resolve(bucket) / "runs"
    run = upload_run(local, root)
    assert [c.name for c in ck.list_checkpoints(run)] == [f"checkpoint_s0000000{s}" for s in (2, 4, 6)]
    assert ck.find_resume_checkpoint(root, "r1") == run / "checkpoint_s00000006"
    assert ck.find_resume_checkpoint(bucket + "/runs", f"{run.uri}@previous").name == "checkpoint_s00000004"
    assert ck.find_resume_checkpoint(root, "r1@checkpoint_s00000002") == run / "checkpoint_s00000002"
    # the same damage to the local file and to the object: the same message but for where it is
    for where in (local, run):
        model = where / "checkpoint_s00000006" / "model.pt"
        data = model.read_bytes()
        model.write_bytes(data[:-100])
    with pytest.raises(UserError) as on_disk:
        ck.find_resume_checkpoint(tmp_path / "local", "r1")
    with pytest.raises(UserError) as on_bucket:
        ck.find_resume_checkpoint(root, "r1")
    assert str(on_bucket.value) == str(on_disk.value).replace(str(tmp_path / "local"), root.uri)
    assert f"{run / 'checkpoint_s00000006' / 'model.pt'} is truncated or damaged" in str(on_bucket.value)
    assert "--resume r1@previous" in str(on_bucket.value)
    assert ck.find_resume_checkpoint(root, "r1@previous").name == "checkpoint_s00000004"
    rng1 = run / "checkpoint_s00000004" / "rng" / "rank_1.pt"  # same size, one byte flipped: the sha256 says so
    data = bytearray(rng1.read_bytes())
    data[len(data) // 2] ^= 0xFF
    rng1.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"rank_1\.pt is damaged: its sha256 differs"):
        ck.find_resume_checkpoint(root, "r1@previous")
    # the CLI: one line, exit 2, before Ray starts
    rc = cli.main(["train", "--resume", "r1", f"trainer.storage_path={root}"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and f"{run.uri}/checkpoint_s00000006/model.pt is truncated" in err, err


def test_model_loads_from_a_bucket_checkpoint(bucket, tmp_path):
    from dipro.config import load_config
    from helpers import config_path

    cfg = load_config(config_path("demo"))
    local = make_checkpoint(tmp_path / "best", cfg, seed=3, val=0.5)
    remote = storage.resolve(bucket) / "runs" / "m" / "checkpoint_s00000001"
    remote.upload_dir(local)
    want, _ = ck.load_model(local)
    got, got_cfg = ck.load_model(remote / "model.pt")  # the file or its directory, as locally
    assert got_cfg == cfg
    for (k, a), (_, b) in zip(want.state_dict().items(), got.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    with pytest.raises(UserError, match=rf"no model\.pt in checkpoint directory {storage.resolve(bucket)}/nothing"):
        ck.load_model(bucket + "/nothing")
