"""Full disks, half-written outputs and concurrent writers.

A full disk is simulated with a file-size limit (``RLIMIT_FSIZE``) in a subprocess that
ignores SIGXFSZ, so a write past the limit fails part-way with ``OSError(EFBIG)``, as it
does on a full disk (ENOSPC) or quota (EDQUOT).  Each writer must say so in one line, leave
its previous output exactly as it was (and still verified), and leave no temp file.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from data_sharding import atomic
from data_sharding.lock import LOCK_NAME, LockedError, output_lock
from dipro import cli

import processed_fixture
from helpers import make_run

try:
    from tests.prepare_raw import RawTree, at
except ImportError:  # tests/ is not a package: pytest puts it on sys.path
    from prepare_raw import RawTree, at

ROOT = Path(__file__).resolve().parents[1]
LIMITED = textwrap.dedent("""
    import resource, signal, sys
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # a write past the limit fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, resource.RLIM_INFINITY))
""")


def run_limited(limit: int, code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run ``code`` in a Python subprocess whose files cannot grow beyond ``limit`` bytes."""
    script = LIMITED.format(limit=limit) + textwrap.dedent(code)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "TMPDIR": str(tmp_path / "tmp")}
    (tmp_path / "tmp").mkdir(exist_ok=True)
    return subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def limited_cli(limit: int, argv: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    return run_limited(limit, f"from dipro.cli import main\nsys.exit(main({argv!r}))", tmp_path)


def tree_digest(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under ``root`` (the lock file excluded: it holds the last writer)."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != LOCK_NAME}


def temp_leftovers(*roots: Path) -> list[str]:
    out = []
    for root in roots:
        for p in root.rglob("*"):
            if ".tmp" in p.name or ".old-" in p.name:
                out.append(str(p))
    return out


def error_line(proc: subprocess.CompletedProcess, command: str) -> str:
    lines = [l for l in proc.stderr.splitlines() if l.startswith(f"dipro {command}: error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


# ----------------------------------------------------------------------------- the helper itself

def test_open_atomic_keeps_the_old_file_and_no_temp_on_failure(tmp_path):
    target = tmp_path / "a.bin"
    atomic.write_bytes(target, b"old")
    with pytest.raises(RuntimeError):
        with atomic.open_atomic(target) as f:
            f.write(b"new, half")
            raise RuntimeError("crash mid-write")
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]
    full = OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(atomic.StorageError, match=r"cannot write .*a\.bin: no space left on the device \(errno "
                                                    r"ENOSPC\); .*a\.bin keeps its previous contents"):
        with atomic.open_atomic(target) as f:
            raise full
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]


def test_atomic_dir_replaces_whole_or_not_at_all(tmp_path):
    out = tmp_path / "out"
    with atomic.atomic_dir(out) as t:
        (t / "x").write_text("1")
    with pytest.raises(atomic.StorageError):
        with atomic.atomic_dir(out, unchanged="out stays") as t:
            (t / "y").write_text("2")
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
    assert [p.name for p in out.iterdir()] == ["x"] and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with atomic.atomic_dir(out) as t:
        (t / "z").write_text("3")
    assert [p.name for p in out.iterdir()] == ["z"] and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_bug_keeps_its_type():
    assert atomic.storage_error(ValueError("bug"), "x") is None
    wrapped = RuntimeError("unexpected pos")
    wrapped.__context__ = OSError(errno.EFBIG, "File too large")
    assert isinstance(atomic.storage_error(wrapped, "x"), atomic.StorageError)  # torch.save into a file object


# ----------------------------------------------------------------------------- dipro shard

@pytest.fixture()
def small_shards(tmp_path) -> tuple[Path, Path]:
    processed = processed_fixture.make_processed(tmp_path / "processed", n_stays=8, seed=3).root
    shards = tmp_path / "shards"
    assert cli.main(["shard", "--processed", str(processed), "--out", str(shards), "--crop-size", "16",
                     "--max-samples-per-shard", "2", "--workers", "1"]) == 0
    return processed, shards


def test_shard_write_fails_part_way_previous_shards_intact(small_shards, tmp_path, capsys):
    processed, shards = small_shards
    before = tree_digest(shards)
    largest = max((shards / p).stat().st_size for p in before)
    # 64-px crops in 8-sample shards are many times larger than any file written before
    proc = limited_cli(3 * largest, ["shard", "--processed", str(processed), "--out", str(shards), "--crop-size",
                                     "64", "--max-samples-per-shard", "8", "--workers", "2"], tmp_path)
    line = error_line(proc, "shard")
    assert proc.returncode == 2
    assert "cannot write" in line and ".tar: file too large" in line and "errno EFBIG" in line, line
    assert "the previous shards and manifest are unchanged" in line
    assert tree_digest(shards) == before
    assert temp_leftovers(shards) == []
    capsys.readouterr()
    assert cli.main(["shards", "verify", str(shards)]) == 0
    assert capsys.readouterr().out.startswith("ok: ")


def test_manifest_write_fails_nothing_renamed(small_shards, tmp_path, monkeypatch):
    """The manifest is staged before any shard is renamed: failing there leaves the old set whole."""
    from data_sharding import shard_writer
    from data_sharding.verify import verify_shards

    processed, shards = small_shards
    before = tree_digest(shards)

    def full(*a, **k):
        raise atomic.StorageError("cannot write manifest.parquet: no space left on the device")

    monkeypatch.setattr(shard_writer, "stage_manifest", full)
    from data_sharding.manifest import ShardSettings

    with pytest.raises(atomic.StorageError):
        shard_writer.write_shards(processed, shards, settings=ShardSettings(crop_size=24, max_samples_per_shard=3),
                                  workers=1, progress=False)
    assert tree_digest(shards) == before and temp_leftovers(shards) == []
    assert verify_shards(shards) == []


# ----------------------------------------------------------------------------- dipro prepare

def test_prepare_write_fails_part_way_previous_tables_intact(tmp_path):
    t = RawTree()
    for i in range(10):
        s = 16000001 + i
        t.icu_patient(s)
        for h in range(0, 60, 2):
            t.chartevent(s, s * 10 + 1, s * 100 + 1, 220045, at(h + 0.5), str(70 + h % 11), 70 + h % 11, "bpm")
    raw = t.write(tmp_path / "raw")
    out = tmp_path / "processed"
    assert cli.main(["prepare", "--raw", str(raw), "--out", str(out), "--no-progress"]) == 0
    before = tree_digest(out)
    sizes = {rel: (out / rel).stat().st_size for rel in before}
    biggest = max(sizes, key=sizes.get)
    limit = sizes[biggest] - 1  # the same inputs give the same files: exactly the largest one cannot be written
    assert sorted(sizes.values())[-2] <= limit
    proc = limited_cli(limit, ["prepare", "--raw", str(raw), "--out", str(out), "--overwrite", "--no-progress"],
                       tmp_path)
    line = error_line(proc, "prepare")
    assert proc.returncode == 2
    assert f"cannot write {out / biggest.split('/')[0]}" in line and "file too large" in line, line
    assert f"{out} is unchanged" in line
    assert tree_digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no .processed.tmp-*


# ----------------------------------------------------------------------------- checkpoints

CKPT_SAVE = """
    import json, torch
    from pathlib import Path
    from dipro.config import load_config
    from dipro.train import checkpoint as ck
    from data_sharding.errors import UserError

    run_dir, n = Path(sys.argv[1]), int(sys.argv[2])
    cfg = load_config("configs/demo.yaml")

    def save(step, n):
        # what a rank does in dipro.train.loop.Worker._save_and_report, then Ray's upload (a copy)
        name = f"checkpoint_s{step:08d}"
        with ck.staged_checkpoint(0, f"checkpoint {name}", f"the previous checkpoints under {run_dir} are intact") as local:
            state = {"w": torch.arange(n, dtype=torch.float32)}
            ck.atomic_torch_save(ck.rng_state(), ck.rng_file(local, 0))
            ck.write_model_files(local, state, cfg, {}, {"global_step": step, "epoch": 0, "kind": "step",
                                                         "world_size": 1, "strategy": "ddp"})
            ck.update_best(local, run_dir)
            ck.write_digest(local, 0)
            ck.replace_dir_atomically(local, run_dir / name)

    try:
        save(int(sys.argv[3]), n)
    except UserError as exc:
        print(f"dipro train: error: {exc}", file=sys.stderr)
        sys.exit(2)
"""


def test_checkpoint_save_fails_part_way_previous_checkpoints_intact(tmp_path):
    run_dir = tmp_path / "runs" / "r"
    script = CKPT_SAVE.replace("sys.argv[1]", repr(str(run_dir)))
    first = run_limited(2**40, script.replace("sys.argv[2]", "1000").replace("sys.argv[3]", "1"), tmp_path)
    assert first.returncode == 0, first.stderr
    from dipro.train import checkpoint as ck

    before = tree_digest(run_dir)
    assert ck.checkpoint_problem(run_dir / "checkpoint_s00000001") is None
    # 200k floats (800 kB) cannot be written under a 100 kB limit
    proc = run_limited(100_000, script.replace("sys.argv[2]", "200000").replace("sys.argv[3]", "2"), tmp_path)
    line = error_line(proc, "train")
    assert proc.returncode == 2
    assert "cannot write checkpoint checkpoint_s00000002 (rank 0, model.pt): file too large" in line, line
    assert f"the previous checkpoints under {run_dir} are intact" in line
    assert tree_digest(run_dir) == before
    assert ck.checkpoint_problem(run_dir / "checkpoint_s00000001") is None
    assert temp_leftovers(run_dir) == []
    assert list((tmp_path / "tmp").iterdir()) == []  # the rank's local staging dir is gone too


def test_truncated_checkpoint_is_named_and_previous_only_on_request(tmp_path, capsys):
    from data_sharding.errors import UserError
    from dipro.train import checkpoint as ck

    storage = tmp_path / "runs"
    run_dir = make_run(storage, "r1")
    assert ck.find_resume_checkpoint(storage, "r1").name == "checkpoint_s00000006"
    model = run_dir / "checkpoint_s00000006" / "model.pt"
    model.write_bytes(model.read_bytes()[:-100])  # a copy cut short
    with pytest.raises(UserError) as exc:
        ck.find_resume_checkpoint(storage, "r1")
    msg = str(exc.value)
    assert f"{model} is truncated or damaged" in msg and "--resume r1@previous" in msg, msg
    assert ck.find_resume_checkpoint(storage, "r1@previous").name == "checkpoint_s00000004"
    assert ck.find_resume_checkpoint(storage, "r1@checkpoint_s00000002").name == "checkpoint_s00000002"
    # a damaged byte of the same length is found by its sha256
    rng1 = run_dir / "checkpoint_s00000004" / "rng" / "rank_1.pt"
    data = bytearray(rng1.read_bytes())
    data[len(data) // 2] ^= 0xFF
    rng1.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"rank_1\.pt is damaged: its sha256 differs"):
        ck.find_resume_checkpoint(storage, "r1@previous")
    # the CLI: one line, exit 2, before any Ray or worker starts
    rc = cli.main(["train", "--resume", "r1", f"trainer.storage_path={storage}"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and f"{model} is truncated or damaged" in err, err


def test_a_rank_missing_its_digest_is_incomplete(tmp_path):
    from dipro.train import checkpoint as ck

    storage = tmp_path / "runs"
    run_dir = make_run(storage, "r2", steps=(2, 4))
    (run_dir / "checkpoint_s00000004" / "digests" / "rank_1.json").unlink()  # rank 1's upload never finished
    assert [c.name for c in ck.list_checkpoints(run_dir)] == ["checkpoint_s00000002"]
    assert "rank_1.json is missing" in ck.checkpoint_problem(run_dir / "checkpoint_s00000004")


# ----------------------------------------------------------------------------- concurrent writers

HOLDER = """
    import sys
    from data_sharding.lock import output_lock
    with output_lock(sys.argv[1], "shard directory", command="dipro shards regenerate --out X (test holder)"):
        print("held", flush=True)
        sys.stdin.readline()
"""


@pytest.fixture()
def holder(small_shards):
    """Another process holding the shard directory's lock, as a running `dipro shard` would."""
    _, shards = small_shards
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(HOLDER), str(shards)], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def test_second_writer_refuses_naming_the_holder(small_shards, holder, capsys):
    import socket

    processed, shards = small_shards
    before = tree_digest(shards)
    for argv in (["shard", "--processed", str(processed), "--out", str(shards), "--crop-size", "24", "--workers",
                  "1"],
                 ["shards", "regenerate", "--processed", str(processed), "--out", str(shards), "--crop-size", "24"]):
        rc = cli.main(argv)
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1, err
        assert f"shard directory {shards} is being written by pid {holder.pid} on {socket.gethostname()}" in err
        assert "dipro shards regenerate --out X (test holder)" in err and "since 20" in err
        assert "--lock-timeout" in err
    assert tree_digest(shards) == before


def test_lock_waits_with_a_timeout_and_dies_with_its_holder(small_shards, holder, capsys):
    processed, shards = small_shards
    with pytest.raises(LockedError, match=r"\(waited 1 s\)"):
        with output_lock(shards, "shard directory", wait_s=1):
            pass
    holder.send_signal(signal.SIGKILL)  # a crashed job: the kernel releases its lock
    holder.wait()
    assert cli.main(["shard", "--processed", str(processed), "--out", str(shards), "--crop-size", "24", "--workers",
                     "1", "--lock-timeout", "30"]) == 0
    info = json.loads((shards / LOCK_NAME).read_text())
    assert info["pid"] == os.getpid() and info["command"]  # the file says who wrote last


def test_waiting_writer_goes_ahead_when_the_holder_finishes(small_shards, holder, tmp_path):
    processed, shards = small_shards
    waiter = subprocess.Popen([sys.executable, "-m", "dipro", "shard", "--processed", str(processed), "--out",
                               str(shards), "--crop-size", "24", "--workers", "1", "--lock-timeout", "120"],
                              cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    holder.stdin.write("done\n")
    holder.stdin.flush()
    holder.wait(timeout=60)
    out, err = waiter.communicate(timeout=300)
    assert waiter.returncode == 0, err
    from data_sharding.manifest import ShardSettings, read_manifest
    from data_sharding.verify import verify_shards

    assert verify_shards(shards) == []
    assert {r.settings for r in read_manifest(shards).records} == {ShardSettings(crop_size=24, max_samples_per_shard=1000).to_json()}
