"""Where the workers go, how long the run may wait for them, and what the user sees when it cannot.

Ray Train (2.60, Train V2) is told:

* ``ScalingConfig(num_workers=N | (MIN, MAX), placement_strategy=...)`` from
  ``trainer.num_workers`` (a ``MIN-MAX`` range makes the group elastic) and
  ``trainer.placement_strategy``;
* ``FailureConfig(max_failures, max_preemption_failures, preemption_grace_s)``:
  worker and node failures are retried ``trainer.max_failures`` times, preemptions
  (drained / reclaimed spot nodes) on their own budget;
* a bound on the wait for resources, ``trainer.schedule_timeout_s``.

The bound.  Left alone, Train V2's controller retries a worker group that cannot
be placed forever: each try waits ``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S``
(60 s) for the placement group and ``FailureConfig.controller_failure_limit``
defaults to -1 (unlimited); an elastic group below its MIN is not even tried.
So the run here

1. sets ``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S`` (one placement try) to
   ``min(60, trainer.schedule_timeout_s / 4)`` in the driver while ``fit()`` starts the
   controller (Ray copies that variable into the controller actor's runtime env, where
   the worker group reads it): several tries fit in the bound, and an elastic group
   whose size was decided from stale node information (a node that just died still
   counted) retries with the size the cluster has now instead of waiting for it;
2. installs :class:`SchedulingDeadline`, a controller callback that measures how long
   the controller has been without a running worker group (initial scheduling, and
   each restart after a failure) and raises :class:`WorkersNotPlacedError` once that
   exceeds ``trainer.schedule_timeout_s`` -- the controller's failure policy does not
   retry it, so the run ends;
3. leaves ``controller_failure_limit`` at -1: Ray counts controller failures over the
   whole run and never resets the count, so a finite limit would end a long run after
   its Nth node loss however quickly each one recovered; the deadline bounds each wait
   instead.

:func:`not_placed_message` turns the resulting error into the one line the user sees:
what was asked (workers x resources, placement) and what the cluster has now.
"""
from __future__ import annotations

import contextlib
import os
import time
from typing import Any, Iterator

from ray.train.v2._internal.execution.callback import ControllerCallback

from dipro.config import Config

START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"

# Controller states (ray.train.v2 ..controller.state class names) in which no worker group runs
# and the controller is trying to get one placed and started.
WAITING_STATES = ("InitializingState", "SchedulingState", "ReschedulingState", "RestartingState",
                  "ResizingState")


class WorkersNotPlacedError(RuntimeError):
    """Raised in the Train controller when no worker group ran for ``timeout_s`` seconds."""

    def __init__(self, waited_s: float, timeout_s: float) -> None:
        super().__init__(f"no worker group could be placed and started for {waited_s:.0f}s "
                         f"(trainer.schedule_timeout_s={timeout_s:g})")
        self.waited_s, self.timeout_s = waited_s, timeout_s

    def __reduce__(self):
        return (self.__class__, (self.waited_s, self.timeout_s))


class SchedulingDeadline(ControllerCallback):
    """Controller callback: fail the run after ``timeout_s`` seconds without a running worker group.

    The clock starts when the controller enters a waiting state (:data:`WAITING_STATES`)
    from any other state and stops when a worker group runs.  The controller calls
    ``after_controller_state_update`` after every loop iteration, also while it keeps
    re-deciding in the same waiting state (an elastic group below its MIN), and after
    each placement try ends (bounded by :data:`START_TIMEOUT_ENV`).
    """

    def __init__(self, timeout_s: float, clock=time.monotonic) -> None:
        self.timeout_s = float(timeout_s)
        self._clock = clock
        self._waiting_since: float | None = None

    def after_controller_start(self, train_run_context: Any) -> None:
        self._waiting_since = self._clock()

    def after_controller_state_update(self, previous_state: Any, current_state: Any) -> None:
        name = type(current_state).__name__
        if name not in WAITING_STATES:
            if name == "RunningState":
                self._waiting_since = None
            return
        now = self._clock()
        if self._waiting_since is None:
            self._waiting_since = now
            return
        waited = now - self._waiting_since
        if waited > self.timeout_s:
            raise WorkersNotPlacedError(waited, self.timeout_s)


def scaling_config(cfg: Config):
    from ray.train import ScalingConfig

    t = cfg.trainer
    workers: int | tuple[int, int] = (t.min_workers, t.max_workers) if t.elastic else t.num_workers
    return ScalingConfig(num_workers=workers, use_gpu=t.use_gpu, resources_per_worker=worker_resources(cfg),
                         placement_strategy=t.placement_strategy)


def failure_config(cfg: Config):
    from ray.train import FailureConfig

    t = cfg.trainer
    return FailureConfig(max_failures=t.max_failures, controller_failure_limit=-1,
                         max_preemption_failures=t.max_preemption_failures, preemption_grace_s=t.preemption_grace_s)


def worker_resources(cfg: Config) -> dict[str, float]:
    res = {"CPU": float(cfg.trainer.cpus_per_worker)}
    if cfg.trainer.use_gpu:
        res["GPU"] = float(cfg.trainer.gpus_per_worker)  # < 1: ranks share a GPU (trainer.gpus_per_worker)
    return res


def placement_try_s(schedule_timeout_s: float) -> float:
    """Seconds one placement try waits: a quarter of the bound, at most Ray's default of 60."""
    return min(60.0, schedule_timeout_s / 4)


@contextlib.contextmanager
def start_timeout_env(cfg: Config) -> Iterator[None]:
    """``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S`` = :func:`placement_try_s` while the trainer runs."""
    old = os.environ.get(START_TIMEOUT_ENV)
    os.environ[START_TIMEOUT_ENV] = f"{placement_try_s(cfg.trainer.schedule_timeout_s):g}"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(START_TIMEOUT_ENV, None)
        else:
            os.environ[START_TIMEOUT_ENV] = old


def _is_not_placed(exc: BaseException) -> bool:
    """The run ended because its worker group could not be placed (our deadline or Ray's start timeout)."""
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, (WorkersNotPlacedError, WorkerGroupStartupTimeoutError)):
            return True
        todo += [getattr(e, "controller_failure", None), e.__cause__, e.__context__]
    return False


def describe_request(cfg: Config) -> str:
    """``2 workers x {CPU: 2} (placement SPREAD)``; ``1-2 workers`` for an elastic group."""
    t = cfg.trainer
    res = ", ".join(f"{k}: {v:g}" for k, v in worker_resources(cfg).items())
    return f"{t.num_workers} workers x {{{res}}} (placement {t.placement_strategy})"


def describe_cluster() -> str:
    """``1 alive node(s); CPU 0 of 0 free, GPU ...`` from the connected Ray cluster, now."""
    import ray

    try:
        alive = [n for n in ray.nodes() if n.get("Alive")]
        total, free = ray.cluster_resources(), ray.available_resources()
    except Exception as exc:  # the cluster itself may be going away
        return f"the cluster state could not be read ({type(exc).__name__})"
    keys = ["CPU"] + (["GPU"] if total.get("GPU") else [])
    per_node = "; ".join(f"{k} " + "+".join(f"{n.get('Resources', {}).get(k, 0):g}" for n in alive) for k in keys)
    return (f"{len(alive)} alive node(s) with " + ", ".join(f"{k} {total.get(k, 0):g} ({free.get(k, 0):g} free)"
                                                         for k in keys)
            + (f" [per node: {per_node}]" if len(alive) > 1 else ""))


def not_placed_message(exc: BaseException, cfg: Config) -> str | None:
    """The one line for a run whose workers could not be placed, else None."""
    if not _is_not_placed(exc):
        return None
    return (f"the worker group could not be placed within trainer.schedule_timeout_s="
            f"{cfg.trainer.schedule_timeout_s:g}s: asked for {describe_request(cfg)}; the cluster has now "
            f"{describe_cluster()} (add nodes, lower trainer.num_workers / trainer.cpus_per_worker, "
            "or raise trainer.schedule_timeout_s)")
