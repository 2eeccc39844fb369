"""Fast tests of worker placement and the bounded wait for resources (no Ray cluster started):
``trainer.num_workers`` / ``trainer.placement_strategy`` / failure keys -> Ray Train's configs,
the controller-side deadline, the driver's recognition of an unplaceable group, and the data
position an elastic group resumes from.  The behaviour on a real multi-node cluster is in
tests/test_multinode.py.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError
from ray.train.v2._internal.execution.controller.state import (
    FinishedState, InitializingState, ReschedulingState, RestartingState, RunningState, SchedulingState,
    ShuttingDownState)
from ray.train.v2.api.exceptions import ControllerError, WorkerGroupError

from data_sharding.errors import ConfigError
from dipro.config import from_dict, load_config, to_dict
from dipro.train import checkpoint as ck
from dipro.train import placement

ROOT = Path(__file__).resolve().parents[1]


def demo_cfg(*overrides):
    return load_config(ROOT / "configs" / "demo.yaml", ["tracking.enabled=false", *overrides])


# ----------------------------------------------------------------------------- config keys

@pytest.mark.parametrize("value, expected, lo, hi, elastic", [
    ("3", 3, 3, 3, False), ("2-8", "2-8", 2, 8, True), ("4-4", 4, 4, 4, False), ("1 - 2", "1-2", 1, 2, True)])
def test_num_workers_count_or_min_max(value, expected, lo, hi, elastic):
    t = demo_cfg(f"trainer.num_workers={value}").trainer
    assert (t.num_workers, t.min_workers, t.max_workers, t.elastic) == (expected, lo, hi, elastic)


def test_elastic_config_round_trips_and_sizes_the_batch_at_max():
    cfg = demo_cfg("trainer.num_workers=1-3", "data.batch_size=2", "optim.grad_accum=2")
    assert from_dict(to_dict(cfg)) == cfg
    assert cfg.effective_batch_size == 2 * 3 * 2


@pytest.mark.parametrize("overrides, fragment", [
    (["trainer.num_workers=3-1"], "MIN <= MAX"),
    (["trainer.num_workers=0-2"], "MIN <= MAX"),
    (["trainer.num_workers=1-2-3"], "MIN-MAX"),
    (["trainer.num_workers=1-2", "trainer.strategy=deepspeed"], "needs trainer.strategy=ddp"),
    (["trainer.placement_strategy=spread"], "trainer.placement_strategy must be PACK|SPREAD"),
    (["trainer.schedule_timeout_s=0"], "trainer.schedule_timeout_s"),
    (["trainer.max_preemption_failures=-2"], "trainer.max_preemption_failures"),
    (["trainer.preemption_grace_s=-1"], "trainer.preemption_grace_s"),
])
def test_bad_placement_keys_are_named(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("|", r"\|")):
        demo_cfg(*overrides)


def test_keys_map_onto_ray_train_configs():
    cfg = demo_cfg("trainer.num_workers=2-4", "trainer.cpus_per_worker=3", "trainer.placement_strategy=STRICT_SPREAD",
                   "trainer.max_failures=5", "trainer.max_preemption_failures=7", "trainer.preemption_grace_s=12")
    sc = placement.scaling_config(cfg)
    assert sc.num_workers == (2, 4) and sc.elasticity_enabled
    assert sc.placement_strategy == "STRICT_SPREAD"
    assert sc.resources_per_worker == {"CPU": 3.0} and not sc.use_gpu
    fc = placement.failure_config(cfg)
    assert (fc.max_failures, fc.max_preemption_failures, fc.preemption_grace_s) == (5, 7, 12.0)
    assert fc.controller_failure_limit == -1  # counted over the whole run: the deadline bounds each wait
    fixed = placement.scaling_config(demo_cfg("trainer.num_workers=2", "trainer.use_gpu=true"))
    assert fixed.num_workers == 2 and not fixed.elasticity_enabled and fixed.placement_strategy == "PACK"
    assert fixed.resources_per_worker == {"CPU": 1.0, "GPU": 1.0}


def test_start_timeout_env_is_set_while_training_and_restored(monkeypatch):
    monkeypatch.setenv(placement.START_TIMEOUT_ENV, "999")
    with placement.start_timeout_env(demo_cfg("trainer.schedule_timeout_s=20")):
        assert os.environ[placement.START_TIMEOUT_ENV] == "5"  # four tries fit in the bound
    assert os.environ[placement.START_TIMEOUT_ENV] == "999"
    monkeypatch.delenv(placement.START_TIMEOUT_ENV)
    with placement.start_timeout_env(demo_cfg("trainer.schedule_timeout_s=3600")):
        assert os.environ[placement.START_TIMEOUT_ENV] == "60"  # never longer than Ray's default try
    assert placement.START_TIMEOUT_ENV not in os.environ


# ----------------------------------------------------------------------------- the deadline

class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_deadline_counts_only_time_without_a_running_group():
    clock = FakeClock()
    d = placement.SchedulingDeadline(30, clock=clock)
    d.after_controller_start(None)
    clock.t += 25
    d.after_controller_state_update(InitializingState(), SchedulingState(None))  # 25 s of initial scheduling
    clock.t += 4
    d.after_controller_state_update(SchedulingState(None), RunningState())  # placed after 29 s: fine
    clock.t += 3600  # an hour of training does not count
    d.after_controller_state_update(RunningState(), RunningState())
    err = WorkerGroupError("node died", {})
    d.after_controller_state_update(RunningState(), RestartingState(err))  # the clock starts again here
    for _ in range(6):  # retries in waiting states, 5 s apart: 30 s in all, not more
        clock.t += 5
        d.after_controller_state_update(RestartingState(err), ReschedulingState(err))
    clock.t += 0.5
    with pytest.raises(placement.WorkersNotPlacedError, match=r"for 30s \(trainer.schedule_timeout_s=30\)"):
        d.after_controller_state_update(ReschedulingState(err), ReschedulingState(err))


def test_deadline_ignores_shutdown_and_terminal_states():
    clock = FakeClock()
    d = placement.SchedulingDeadline(10, clock=clock)
    d.after_controller_start(None)
    clock.t += 100
    d.after_controller_state_update(RunningState(), ShuttingDownState(FinishedState()))
    d.after_controller_state_update(ShuttingDownState(FinishedState()), FinishedState())


def test_not_placed_error_survives_pickling_inside_a_controller_error():
    import pickle

    err = pickle.loads(pickle.dumps(ControllerError(placement.WorkersNotPlacedError(31.2, 30))))
    assert isinstance(err.controller_failure, placement.WorkersNotPlacedError)
    assert err.controller_failure.waited_s == 31.2


def test_driver_recognises_an_unplaceable_group_and_nothing_else():
    cfg = demo_cfg("trainer.num_workers=2", "trainer.cpus_per_worker=2", "trainer.placement_strategy=SPREAD",
                   "trainer.schedule_timeout_s=20")
    line = placement.not_placed_message(ControllerError(placement.WorkersNotPlacedError(21, 20)), cfg)
    assert line.startswith("the worker group could not be placed within trainer.schedule_timeout_s=20s: "
                           "asked for 2 workers x {CPU: 2} (placement SPREAD); the cluster has now ")
    assert "\n" not in line
    assert placement.not_placed_message(ControllerError(WorkerGroupStartupTimeoutError(2)), cfg) is not None
    assert placement.not_placed_message(WorkerGroupError("rank 1 died", {}), cfg) is None
    assert placement.not_placed_message(ControllerError(RuntimeError("other")), cfg) is None


# ----------------------------------------------------------------------------- elastic resume

@pytest.mark.parametrize("done, saved, world, accum, used, expected", [
    (2, 2, 1, 1, 10, 4),   # 2 ranks x 2 micro batches consumed = 4 micro batches for 1 rank
    (4, 1, 2, 1, 5, 2),    # grown: 4 of 1 rank = 2 per rank for 2 ranks
    (3, 1, 2, 1, 5, 1),    # 1.5 rounds down (redo half a step rather than skip one)
    (6, 2, 3, 2, 8, 4),    # 12 / 3 = 4 micro batches = 2 whole steps of accumulation 2
    (5, 3, 2, 2, 6, 6),    # 15 / 2 = 7 -> 6 (whole steps of accumulation 2)
    (5, 3, 2, 2, 4, 4),    # ... capped at the 4 micro batches a rank uses per epoch
    (0, 2, 1, 1, 10, 0),
])
def test_rescaled_data_position(done, saved, world, accum, used, expected):
    assert ck.rescale_data_position(done, saved, world, accum, used) == expected
