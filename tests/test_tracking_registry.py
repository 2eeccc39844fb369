"""Registry, promotion gate, pyfunc parity and `dipro predict` against a sqlite tracking backend.

Shards are written here in the contract format (ARCHITECTURE.md section 2, data_sharding.shard_format)
from random numbers; checkpoints are tiny DiPro networks written with dipro.train.checkpoint.
"""
from __future__ import annotations

import getpass
import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import make_checkpoint

from data_sharding import shard_format
from data_sharding.constants import NUM_DEMOGRAPHICS, NUM_DISEASES, NUM_EHR_VARIABLES, NUM_REGIONS
from dipro import cli
from dipro.config import load_config

REPO = Path(__file__).resolve().parents[1]
CROP = 32  # configs/demo.yaml
SHARD_SIZES = (5, 4)


def _members(rng: np.random.Generator, stay: int, corrupt: bool = False, split: str = "test",
             mortality: int | None = None) -> dict[str, bytes]:
    t, steps = int(rng.integers(2, 5)), int(rng.integers(0, 6))
    present = (rng.random((t, NUM_REGIONS)) > 0.1).astype(np.uint8)
    arrays = {
        "crops": rng.integers(0, 256, (t, NUM_REGIONS, CROP, CROP), dtype=np.uint8) * present[:, :, None, None],
        "region_present": present,
        "cxr_hours": np.sort(rng.uniform(0, 48, t)).astype(np.float32),
        "ehr_values": rng.standard_normal((steps, NUM_EHR_VARIABLES)).astype(np.float32),
        "ehr_masks": (rng.random((steps, NUM_EHR_VARIABLES)) < 0.4).astype(np.uint8),
        "ehr_hours": np.arange(steps, dtype=np.float32),
        "demographics": rng.standard_normal(NUM_DEMOGRAPHICS).astype(np.float32),
        "region_labels": rng.integers(0, 4, (t - 1, NUM_REGIONS, NUM_DISEASES)).astype(np.int8),
    }
    drawn = int(rng.integers(0, 2))
    labels = {"mortality": drawn if mortality is None else mortality, "los_days": 3.5, "los_bin": 1}
    meta = {"subject_id": 10_000 + stay, "stay_id": stay, "split": split, "task_dir": "mortality_los", "row": stay}
    out = shard_format.member_bytes({f"{k}.npy": v for k, v in arrays.items()}, labels, meta)
    if corrupt:
        out["crops.npy"] = b"not an npy file"
    return out


def _write_split(root: Path, split: str, sizes: tuple[int, ...], seed: int, first_stay: int = 0,
                 corrupt_key: str | None = None, labels: dict[str, int] | None = None) -> tuple[list[dict], list[str]]:
    """mortality_los/{split} shards of ``sizes`` samples; returns the manifest rows and the sample keys.
    ``labels``: mortality label by sample key (else drawn); the inputs are the same either way."""
    rng = np.random.default_rng(seed)
    (root / "mortality_los").mkdir(parents=True, exist_ok=True)
    rows, keys, stay = [], [], first_stay
    for i, n in enumerate(sizes):
        rel = f"mortality_los/{split}-{i:06d}.tar"
        samples = []
        for _ in range(n):
            stay += 1
            key = f"s{stay}_{stay}"
            keys.append(key)
            samples.append((key, _members(rng, stay, corrupt=key == corrupt_key, split=split,
                                          mortality=(labels or {}).get(key))))
        shard_format.write_tar(root / rel, samples)
        data = (root / rel).read_bytes()
        rows.append({"task": "mortality_los", "split": split, "path": rel, "samples": n, "bytes": len(data),
                     "sha256": hashlib.sha256(data).hexdigest(), "fingerprint": "f" * 16,
                     "settings": json.dumps({"crop_size": CROP})})
    return rows, keys


def _write_manifest(root: Path, rows: list[dict]) -> None:
    pd.DataFrame(rows).to_parquet(root / "manifest.parquet", index=False)


def write_shards(root: Path, seed: int = 0, corrupt_key: str | None = None) -> list[str]:
    """mortality_los/test shards of SHARD_SIZES samples + manifest; returns the sample keys in order."""
    rows, keys = _write_split(root, "test", SHARD_SIZES, seed, corrupt_key=corrupt_key)
    _write_manifest(root, rows)
    return keys


VAL_SIZES = (12, 12)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Checkpoints a (seed 1), b (seed 2), c (seed 3) and shards whose val labels are a's ranking: the stays a
    scores above its median died. So on val, a is perfect (AUPRC 1) and b, an unrelated network, is not."""
    from dipro.tracking.provenance import data_fingerprint
    from dipro.train.evaluate import evaluate_checkpoint

    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root}/mlflow.db"
    shards = root / "shards"
    cfg = load_config(REPO / "configs" / "demo.yaml", [f"tracking.uri={uri}", f"data.shards={shards}",
                                                        "tracking.experiment=registry-test",
                                                        "data.num_loader_workers=0"])
    ckpts = {name: make_checkpoint(root / f"ckpt-{name}", cfg, seed, val)
             for name, seed, val in (("a", 1, 0.6), ("b", 2, 0.4), ("c", 3, 0.9))}
    test_rows, keys = _write_split(shards, "test", SHARD_SIZES, 0)
    val_rows, _ = _write_split(shards, "val", VAL_SIZES, 1, first_stay=100)
    _write_manifest(shards, test_rows + val_rows)
    first = evaluate_checkpoint(ckpts["a"], "val", shard_dir=shards)
    ranked = first.y_prob > np.median(first.y_prob)
    val_rows, _ = _write_split(shards, "val", VAL_SIZES, 1, first_stay=100,
                               labels=dict(zip(first.sample_keys, ranked.astype(int).tolist())))
    _write_manifest(shards, test_rows + val_rows)
    return {"root": root, "uri": uri, "shards": shards, "cfg": cfg, "keys": keys, "ckpts": ckpts,
            "fingerprint": data_fingerprint(shards)}


def _register(env, name: str, val: float, fingerprint: str) -> int:
    from dipro.tracking import Tracker, register_checkpoint

    tracker = Tracker.create_in_driver(env["cfg"], name)
    tracker.finish()
    return register_checkpoint(env["cfg"], env["ckpts"][name], tracker.run_id, {"auprc": val / 2, "auroc": 0.5},
                               fingerprint)


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def versions(env):
    """v1 (a) and v2 (b) on the shards of ``env`` (data A); v3 val 0.9 on data B."""
    return {1: _register(env, "a", 0.6, env["fingerprint"]), 2: _register(env, "b", 0.4, env["fingerprint"]),
            3: _register(env, "c", 0.9, "b" * 64)}


def test_registered_version_tags_and_run(env, versions, monkeypatch):
    from mlflow import MlflowClient

    assert list(versions.values()) == [1, 2, 3]
    client = MlflowClient(tracking_uri=env["uri"], registry_uri=env["uri"])
    mv = client.get_model_version("dipro-mortality", "1")
    tags = mv.tags
    assert tags["data.fingerprint"] == env["fingerprint"] and tags["monitor"] == "val/auprc"
    assert float(tags["val.auprc"]) == 0.6 and float(tags["test.auprc"]) == 0.3
    assert json.loads(tags["config"])["model"]["backbone"] == "tiny"
    run = client.get_run(mv.run_id)
    assert run.info.status == "FINISHED"  # registering after finish did not reopen the run
    from mlflow.models import get_model_info

    monkeypatch.setenv("MLFLOW_TRACKING_URI", env["uri"])
    info = get_model_info("models:/dipro-mortality/1")
    assert info.signature is not None and "crops" in info.signature.inputs.input_names()
    assert "python_model.pkl" not in json.dumps(info.flavors)  # models from code: nothing pickled


def test_promotion_gate_via_cli(env, versions, capsys, tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=env["uri"], registry_uri=env["uri"])
    base = ["registry", "promote", "--task", "mortality", "--tracking-uri", env["uri"]]
    rc, out, _ = _cli(capsys, *base, "--version", "2", "--alias", "champion")
    assert rc == 0 and "first holder" in out
    rc, _, err = _cli(capsys, *base, "--version", "3", "--alias", "champion")  # other data
    assert rc == 2 and "not comparable" in err and "b" * 12 in err
    rc, _, err = _cli(capsys, *base, "--version", "1", "--alias", "challenger")
    assert rc == 0
    # v1 ranks the validation stays perfectly, v2 does not: the paired interval lies above 0
    rc, out, err = _cli(capsys, *base, "--version", "1", "--alias", "champion")
    assert rc == 0, err
    tags = client.get_model_version("dipro-mortality", "1").tags
    n_val = sum(VAL_SIZES)
    assert tags["promotion.champion.samples"] == str(n_val) and tags["promotion.champion.resamples"] == "1000"
    delta, low, high = (float(tags[f"promotion.champion.{k}"]) for k in ("delta", "delta_low", "delta_high"))
    assert 0 < low <= delta <= high and tags["promotion.champion.metric"] == "val/auprc"
    assert f"{n_val} validation samples" in tags["promotion.champion.evidence"] and "1.0000 vs" in out
    rc, _, err = _cli(capsys, *base, "--version", "2", "--alias", "champion")  # worse on the same samples
    assert rc == 2 and "does not beat champion version 1" in err and err.count("\n") == 1
    assert "the lower bound is not above --min-delta 0" in err
    rc, _, err = _cli(capsys, *base, "--version", "2", "--alias", "champion", "--force")
    assert rc == 2 and "--reason" in err
    rc, out, _ = _cli(capsys, *base, "--version", "2", "--alias", "champion", "--force", "--reason", "clinical review")
    assert rc == 0 and "forced" in out

    assert str(client.get_model_version_by_alias("dipro-mortality", "champion").version) == "2"
    tags = client.get_model_version("dipro-mortality", "2").tags
    assert tags["promotion.champion.forced"] == "true"
    assert tags["promotion.champion.by"] == getpass.getuser()
    assert tags["promotion.champion.reason"] == "clinical review"
    assert "does not beat" in tags["promotion.champion.gate"] and float(tags["promotion.champion.delta_high"]) < 0
    # the evidence must clear --min-delta, not just 0
    rc, _, err = _cli(capsys, *base, "--version", "1", "--alias", "champion", "--min-delta", str(high))
    assert rc == 2 and f"--min-delta {high:g}" in err
    other = tmp_path / "other-shards"  # shards that are not the ones both versions were trained on
    write_shards(other, seed=5)
    rc, _, err = _cli(capsys, *base, "--version", "1", "--alias", "champion", "--shards", str(other))
    assert rc == 2 and "have data fingerprint" in err and str(other) in err
    rc, _, _ = _cli(capsys, *base, "--version", "1", "--alias", "champion")  # the better one wins it back
    assert rc == 0 and str(client.get_model_version_by_alias("dipro-mortality", "champion").version) == "1"

    rc, out, _ = _cli(capsys, "registry", "list", "--task", "mortality", "--tracking-uri", env["uri"])
    assert rc == 0
    lines = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert "challenger,champion" in lines["1"] and "0.6000" in lines["1"] and lines["3"].split()[1] == "-"
    rc, _, err = _cli(capsys, "registry", "list", "--task", "length_of_stay", "--tracking-uri", env["uri"])
    assert rc == 2 and "dipro-length_of_stay" in err


def _decoded_test_samples(env):
    from dipro.data.decode import decode_sample
    from dipro.data.plan import Segment, read_manifest
    from dipro.data.reader import read_segment

    shard_set = read_manifest(env["shards"], "mortality", "test")
    return [decode_sample(raw, "mortality_los", CROP) for s in shard_set.shards
            for raw in read_segment(Segment(s, 0, s.samples))]


def test_pyfunc_by_alias_matches_the_checkpoint(env, versions, monkeypatch):
    import mlflow.pyfunc

    from dipro.data import collate
    from dipro.tracking.pyfunc import encode_sample
    from dipro.train.checkpoint import load_model

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=env["uri"], registry_uri=env["uri"])
    client.set_registered_model_alias("dipro-mortality", "staging", "3")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env["uri"])
    served = mlflow.pyfunc.load_model("models:/dipro-mortality@staging")
    samples = _decoded_test_samples(env)
    frame = pd.DataFrame([encode_sample(s) for s in samples])
    got = served.predict(frame)
    model, _ = load_model(env["root"] / "ckpt-c")
    with torch.no_grad():
        expected = model.predict_proba(model(collate(samples, "mortality_los"))).numpy()
    assert list(got["sample_key"]) == env["keys"]
    np.testing.assert_allclose(got["prob_died"].to_numpy(), expected, rtol=1e-5, atol=1e-6)
    assert set(got["predicted"]) <= {0, 1}
    bad = frame.copy()
    bad.loc[1, "demographics"] = encode_sample({**samples[1], "demographics": np.zeros(5, np.float32)})["demographics"]
    with pytest.raises(Exception, match="demographics"):
        served.predict(bad)


def test_predict_cli_writes_ids_and_counts_corrupt_samples(env, versions, tmp_path, capsys):
    shards = tmp_path / "shards"
    keys = write_shards(shards, corrupt_key="s3_3")
    out = tmp_path / "preds" / "test.parquet"
    rc, stdout, err = _cli(capsys, "predict", "--model", "models:/dipro-mortality/3", "--shards", str(shards),
                           "--split", "test", "--out", str(out), "--tracking-uri", env["uri"], "--no-ray")
    assert rc == 0, err
    assert "skipped 1 corrupt" in stdout and "s3_3" in err
    table = pd.read_parquet(out)
    assert list(table.columns[:4]) == ["sample_key", "subject_id", "stay_id", "shard"]
    assert list(table["sample_key"]) == [k for k in keys if k != "s3_3"]
    assert (table["subject_id"] == table["stay_id"] + 10_000).all()
    assert table["prob_died"].between(0, 1).all()
    assert not list(out.parent.glob(".*tmp*"))  # written atomically
    # the same model from its checkpoint directory gives the same numbers
    out2 = tmp_path / "ckpt.parquet"
    rc, _, err = _cli(capsys, "predict", "--model", str(env["root"] / "ckpt-c"), "--shards", str(shards),
                      "--out", str(out2), "--no-ray")
    assert rc == 0, err
    np.testing.assert_allclose(pd.read_parquet(out2)["prob_died"], table["prob_died"], rtol=1e-6)
    rc, _, err = _cli(capsys, "predict", "--model", "models:/dipro-mortality@nope", "--shards", str(shards),
                      "--out", str(out2), "--tracking-uri", env["uri"])
    assert rc == 2 and "dipro-mortality@nope" in err


@pytest.mark.slow
def test_predict_with_ray_tasks_matches_in_process(env, versions, tmp_path, capsys):
    a, b = tmp_path / "ray.parquet", tmp_path / "local.parquet"
    common = ["--model", "models:/dipro-mortality/1", "--shards", str(env["shards"]), "--tracking-uri", env["uri"]]
    rc, out, err = _cli(capsys, "predict", *common, "--out", str(a), "--ray")
    assert rc == 0 and "Ray tasks" in out, err
    rc, out, err = _cli(capsys, "predict", *common, "--out", str(b), "--no-ray")
    assert rc == 0 and "in-process" in out, err
    pd.testing.assert_frame_equal(pd.read_parquet(a), pd.read_parquet(b))


def test_evaluate_cli_prints_and_saves_bootstrap_intervals(env, capsys, tmp_path):
    out = tmp_path / "eval"
    rc, stdout, err = _cli(capsys, "evaluate", "--checkpoint", str(env["ckpts"]["a"]), "--split", "val",
                           "--shards", str(env["shards"]), "--out", str(out), "--device", "cpu")
    assert rc == 0, err
    payload = json.loads((out / "metrics.json").read_text())
    iv = payload["intervals"]["auprc"]
    assert iv["value"] == pytest.approx(1.0) and iv["samples"] == sum(VAL_SIZES) and iv["resamples"] == 1000
    low, high = payload["intervals"]["auroc"]["low"], payload["intervals"]["auroc"]["high"]
    assert low == high == 1.0  # a perfect ranking stays perfect on every resample
    assert "95 % bootstrap CI" in stdout and f"resamples of {sum(VAL_SIZES)} samples" in stdout
    assert "1.000 [1.000, 1.000]" in (out / "metrics.txt").read_text()
