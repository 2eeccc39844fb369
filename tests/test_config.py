"""The typed config system: YAML, key=value overrides, validation, round trip."""
from __future__ import annotations

from pathlib import Path

import pytest

from dipro.config import Config, load_config, parse_overrides, replace, save_config, to_dict, from_dict
from data_sharding.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults_are_the_paper_configuration():
    cfg = Config()
    assert cfg.model.input_scaling == "unit" and cfg.model.num_heads == 8
    assert cfg.optim.scale_lr and cfg.optim.schedule_interval == "epoch" and cfg.optim.grad_clip == 0.0
    assert cfg.model.backbone == "resnet50"
    assert cfg.model.crop_size == 224
    assert cfg.optim.grad_accum == 4
    assert cfg.trainer.max_epochs == 100
    assert cfg.trainer.patience == 10


def test_yaml_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("task: length_of_stay\noptim:\n  base_lr: 8.0e-6\ntrainer:\n  num_workers: 2\n")
    cfg = load_config(f, ["trainer.num_workers=3", "model.use_ehr=false", "optim.base_lr=1e-3", "trainer.run_name=null"])
    assert cfg.task == "length_of_stay"
    assert cfg.trainer.num_workers == 3
    assert cfg.model.use_ehr is False
    assert cfg.optim.base_lr == pytest.approx(1e-3)
    assert cfg.trainer.run_name is None
    assert cfg.monitor == "accuracy"
    assert cfg.effective_batch_size == cfg.data.batch_size * 3 * cfg.optim.grad_accum


def test_base_inheritance(tmp_path):
    (tmp_path / "base.yaml").write_text("task: mortality\nmodel:\n  d_model: 64\n  num_heads: 4\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\nmodel:\n  num_layers: 3\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert (cfg.task, cfg.model.d_model, cfg.model.num_layers) == ("mortality", 64, 3)


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("trainer.num_wrkers=2", "trainer.num_wrkers"),
        ("nonsense=1", "nonsense"),
        ("model.backbone=vgg", "model.backbone"),
        ("trainer.strategy=fsdp", "trainer.strategy"),
        ("trainer.precision=fp8", "trainer.precision"),
        ("trainer.num_workers=two", "trainer.num_workers"),
        ("task=segmentation", "task"),
        ("model.use_ehr=maybe", "model.use_ehr"),
        ("model.variant=extended", "model.variant' was removed"),
        ("model.input_scaling=zscore", "model.input_scaling"),
        ("model.pair_reversal=flip", "model.pair_reversal"),
        ("optim.schedule_interval=batch", "optim.schedule_interval"),
        ("model.num_layers=1", "model.num_layers"),
        ("trainer.storage_path=s3://KEY:SECRET@bucket/runs", "trainer.storage_path: s3:"),
        ("trainer.storage_path=hdfs://nn/runs", "trainer.storage_path: hdfs://nn/runs: unsupported storage scheme"),
        ("storage.s3_endpoint=http://KEY:SECRET@minio:9000", "storage.s3_endpoint must be"),
        ("storage.gcs_endpoint=http://h:1/p?token=SECRET", "storage.gcs_endpoint must be"),
    ],
)
def test_bad_keys_and_values_are_named(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        load_config(None, [override])


def test_storage_endpoints_are_applied_and_never_hold_secrets(monkeypatch):
    monkeypatch.delenv("DIPRO_S3_ENDPOINT", raising=False)
    cfg = load_config(None, ["storage.s3_endpoint=http://minio.internal:9000", "trainer.storage_path=s3://bkt/runs"])
    monkeypatch.setenv("DIPRO_S3_ENDPOINT", "")  # (restored afterwards: apply() sets it for this process)
    cfg.storage.apply()
    import os

    assert os.environ["DIPRO_S3_ENDPOINT"] == "http://minio.internal:9000" and cfg.trainer.storage_path == "s3://bkt/runs"
    for bad in ("storage.s3_endpoint=http://KEY:SECRET@minio:9000", "trainer.storage_path=s3://KEY:SECRET@bkt/x"):
        with pytest.raises(ConfigError) as info:
            load_config(None, [bad])
        assert "SECRET" not in str(info.value)


def test_the_old_lr_key_in_yaml_names_its_replacement(tmp_path):
    f = tmp_path / "old.yaml"
    f.write_text("optim:\n  lr: 1.0e-5\n")
    with pytest.raises(ConfigError, match=r"'optim\.lr' was renamed to optim\.base_lr.*scale_lr") as err:
        load_config(f)
    assert "\n" not in str(err.value)


def test_unknown_key_in_yaml_is_named(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("data:\n  shard_dir: x\n")
    with pytest.raises(ConfigError, match=r"data\.shard_dir"):
        load_config(f)


def test_override_without_equals():
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["trainer.num_workers"])


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_round_trip_and_replace(tmp_path):
    cfg = load_config(None, ["task=disease_progression", "seed=29"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert to_dict(again) == to_dict(cfg)
    assert from_dict(to_dict(cfg)) == cfg
    other = replace(cfg, ["seed=66"])
    assert other.seed == 66 and cfg.seed == 29


@pytest.mark.parametrize("name", ["disease_progression", "mortality", "length_of_stay", "demo"])
def test_shipped_configs_load(name):
    path = CONFIGS / f"{name}.yaml"
    if not path.exists():
        pytest.fail(f"configs/{name}.yaml is missing")
    cfg = load_config(path)
    assert cfg.task in ("disease_progression", "mortality", "length_of_stay")
