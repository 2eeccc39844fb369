"""dipro.sweep without Ray: the grid's arms and trial keys, bad grid values as FAILED trials, the report's
tables and statistics from records and saved predictions, and the one-line CLI errors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import config_path

from data_sharding.errors import ConfigError
from dipro.sweep import record as rec
from dipro.sweep.grid import baseline_arm, expand, make_trials, parse_grid


def test_grid_arms_trials_and_baseline():
    grid = parse_grid(["model.use_ehr=true,false", "optim.base_lr=5e-6,1e-5,[1,2]"])
    assert grid == {"model.use_ehr": ["true", "false"], "optim.base_lr": ["5e-6", "1e-5", "[1,2]"]}
    arms = expand(grid)
    assert len(arms) == 6 and arms[0].overrides == ["model.use_ehr=true", "optim.base_lr=5e-6"]
    trials = make_trials(arms, [23, 29])
    assert [t.key for t in trials[:3]] == ["a00-s23", "a00-s29", "a01-s23"]
    assert trials[0].run_name("sw") == "sw-a00-s23" and trials[0].owner("sw") == "sweep:sw/a00-s23"
    assert trials[2].overrides == ["model.use_ehr=true", "optim.base_lr=1e-5", "seed=23"]
    assert [t.key for t in make_trials(expand({}), [1, 2])] == ["s1", "s2"]  # an experiment: one arm
    assert baseline_arm(arms, None).index == 0
    assert baseline_arm(arms, "model.use_ehr=false").index == 3
    with pytest.raises(ConfigError, match="matches no arm"):
        baseline_arm(arms, "model.use_ehr=maybe")
    for bad, msg in ((["model.use_ehr"], "expected KEY=V1,V2"), (["a=1", "a=2"], "twice"),
                     (["seed=1,2"], "--seeds"), (["a=1,,2"], "empty value"), (["a=1,1"], "value twice")):
        with pytest.raises(ConfigError, match=msg):
            parse_grid(bad)


def test_values_that_make_no_config_are_failed_trials(tmp_path):
    from dipro.config import load_config
    from dipro.sweep.driver import resolve_paths, trial_configs

    base = resolve_paths(load_config(config_path("demo"), [f"trainer.storage_path={tmp_path}",
                                                          "tracking.enabled=false", "data.shards=rel/shards"]))
    assert base.data.shards == str(Path.cwd() / "rel" / "shards")  # resolved in the driver
    trials = make_trials(expand(parse_grid(["model.d_model=32,30", "trainer.bogus=1"])), [7])
    cfgs, invalid = trial_configs(base, "sw", tmp_path / "sw", trials)
    assert sorted(invalid) == ["a00-s7", "a01-s7"] and "unknown config key 'trainer.bogus'" in invalid["a00-s7"]
    trials = make_trials(expand(parse_grid(["model.d_model=32,30"])), [7])
    cfgs, invalid = trial_configs(base, "sw", tmp_path / "sw", trials)
    assert list(cfgs) == ["a00-s7"] and "divisible" in invalid["a01-s7"]
    c = cfgs["a00-s7"]
    assert (c.seed, c.trainer.run_name, c.trainer.storage_path) == (7, "sw-a00-s7", str(tmp_path / "sw"))


def _finished(root: Path, key: str, arm: int, seed: int, y: np.ndarray, prob: np.ndarray) -> rec.TrialRecord:
    from dipro.metrics import compute_metrics
    from dipro.train import rundir
    from dipro.train.evaluate import EvalResult, save_predictions

    run_dir = root / f"sw-{key}"
    metrics = compute_metrics("mortality", y, prob)
    save_predictions(run_dir / rundir.TEST_PREDICTIONS, EvalResult(
        metrics, y, prob, [f"s{i}_{i}" for i in range(len(y))], np.arange(len(y)), np.zeros((len(y), 10)),
        "mortality", "test"))
    return rec.TrialRecord(key, arm, seed, f"sw-{key}", status=rec.FINISHED, run_dir=str(run_dir),
                           metrics={f"test/{k}": v for k, v in metrics.items()})


def test_report_tables_failed_rows_and_paired_differences(tmp_path):
    from dipro.sweep import report as rep

    rng = np.random.default_rng(0)
    y = (rng.random(80) < 0.4).astype(int)
    arms = expand(parse_grid(["model.use_ehr=true,false,maybe"]))
    trials = make_trials(arms, [1, 2])
    records = {}
    for t in trials:
        if t.arm.index == 2:
            records[t.key] = rec.TrialRecord(t.key, 2, t.seed, f"sw-{t.key}", status=rec.FAILED,
                                             reason="config key 'model.use_ehr': expected true/false, got 'maybe'")
            continue
        signal = 2.0 if t.arm.index == 0 else 0.2
        prob = 1 / (1 + np.exp(-rng.normal(signal * y, 1.0)))
        records[t.key] = _finished(tmp_path, t.key, t.arm.index, t.seed, y, prob)
    records["a01-s2"].status = rec.RUNNING  # interrupted: neither a result nor a failure
    report = rep.build("mortality", arms, trials, records, arms[0])
    a0, a1, a2 = report.arms
    assert len(a0.finished) == 2 and len(a1.finished) == 1 and len(a2.failed) == 2
    assert a0.pooled["auroc"].value == pytest.approx(np.mean([records[k].metrics["test/auroc"]
                                                              for k in ("a00-s1", "a00-s2")]))
    d = a1.vs_baseline["auroc"]
    assert d.high < 0 and d.value == pytest.approx(records["a01-s1"].metrics["test/auroc"] - a0.pooled["auroc"].value)
    assert not a0.vs_baseline and not a2.vs_baseline
    text = report.table
    assert "model.use_ehr=true (2/2 seeds)" in text and "model.use_ehr=false (1/2 seeds)" in text
    assert "FAILED a02-s1 (model.use_ehr=maybe, seed 1): config key" in text
    assert "NOT FINISHED a01-s2" in text and "model.use_ehr=false - model.use_ehr=true" in text
    flat = rep.summary_metrics(report)
    assert flat["arm01/auroc_delta_high"] == pytest.approx(d.high) and flat["arm02/failed"] == 2.0
    assert rep.figure(report) is not None
    payload = report.as_dict()
    assert payload["arms"][1]["vs_baseline"]["auroc"]["resamples"] == 1000


def test_sweep_cli_errors_are_one_line(tmp_path, capsys):
    from dipro import cli

    assert cli.main(["sweep", "--grid", "a=1,2"]) == 2
    assert "needs --config FILE" in capsys.readouterr().err
    assert cli.main(["sweep", "--resume", "nope", "--config", "x.yaml"]) == 2
    assert "give no --config" in capsys.readouterr().err
    assert cli.main(["sweep", "--resume", "nope", f"trainer.storage_path={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"no sweep at {tmp_path / 'nope'}" in err
    assert cli.main(["sweep", "--config", str(config_path("demo")), "--grid", "model.use_ehr",
                     f"trainer.storage_path={tmp_path}"]) == 2
    assert "expected KEY=V1,V2" in capsys.readouterr().err
