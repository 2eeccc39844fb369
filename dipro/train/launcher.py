"""The driver: validate the config, connect to Ray, run a ``TorchTrainer``, evaluate, track.

Works unchanged as the entrypoint of ``ray job submit`` (``ray.init`` picks up
``RAY_ADDRESS`` / the job's cluster) and on a laptop (a local Ray on 127.0.0.1
without the dashboard).  Everything that can be checked before workers start is:
precision vs device, the DeepSpeed config, the shards, the cluster's resources,
the run name, the tracking server.

:func:`launch` reads as its steps: :func:`preflight` (no Ray, nothing written) ->
:func:`resolve_run` (the caller's config is copied, never changed) -> :func:`claim`
(the run directory and its ``train.log``) -> :func:`ray_session` (Ray started or
joined; its chatter goes to ``train.log``) -> :func:`build_trainer` -> :func:`fit`
-> :func:`report` (test evaluation, ``summary.json``, MLflow).

The terminal gets the driver's ``[dipro train]`` lines and the ranks' ``[dipro train
rank N]`` lines; everything else Ray, DeepSpeed, torch and MLflow print goes to
``RUN/train.log`` (the path is printed), whose tail is printed when a run fails for a
reason that is not a user error.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

from data_sharding import ray_init, storage
from data_sharding.storage import Location
from dipro.config import Config, to_dict
from data_sharding.errors import ConfigError, UserError
from dipro.train import TrainResult
from dipro.train import checkpoint as ck
from dipro.train import failures, rundir

_run_log: rundir.RunLog | None = None
"""The run's ``train.log`` once its directory is claimed: every driver message goes there too."""

LIBRARY_LOGGERS = ("ray", "mlflow", "alembic", "deepspeed", "DeepSpeed", "torch", "urllib3")
"""Driver-side Python loggers whose records go to ``train.log``, not the terminal."""
TAIL_LINES = 25
"""Lines of ``train.log`` printed when a run fails for a reason that is not a user error."""


def _say(msg: str) -> None:
    print(f"[dipro train] {msg}", flush=True)
    if _run_log is not None:
        _run_log.write(f"[dipro train] {msg}")


def make_run_name(cfg: Config) -> str:
    """``{task}-{strategy}-{YYYYmmdd-HHMMSS}-{hex}``: never reused (Ray silently resumes a reused name)."""
    return f"{cfg.task}-{cfg.trainer.strategy}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def validate_config(cfg: Config, *, cuda_available: bool | None = None) -> str:
    """Checks that need no cluster; returns the precision the workers will use."""
    from dipro.train.precision import resolve_precision
    from dipro.train.strategies import deepspeed_config

    if cfg.trainer.use_gpu:
        # The driver may sit on a CPU-only head node: GPU availability is a cluster resource
        # (checked after ray.init) and bf16 support is re-checked on the worker's GPU.
        precision = resolve_precision(cfg, cuda_available=True, bf16_supported=True)
    else:
        precision = resolve_precision(cfg, cuda_available=cuda_available)
    if cfg.trainer.strategy == "deepspeed":
        deepspeed_config(cfg, precision)  # raises ConfigError for impossible combinations
    elif cfg.trainer.offload_optimizer:
        raise ConfigError("trainer.offload_optimizer=true needs trainer.strategy=deepspeed")
    return precision


def check_data(cfg: Config) -> int:
    """Shards fit the config (``dipro.train.preflight``); returns micro batches per rank per epoch."""
    from dipro.train.preflight import check_shards

    return check_shards(cfg)


def init_ray(cfg: Config) -> bool:
    """Connect to ``RAY_ADDRESS`` / the job's cluster, or start a local one; True if started here
    (:func:`data_sharding.ray_init.init_ray`: the one way every job starts Ray)."""
    started = ray_init.init_ray(log_to_driver=True)
    return started and not os.environ.get("RAY_ADDRESS")


def is_report_line(line: str) -> bool:
    """A worker line for the terminal: the ranks' own ``[dipro train rank N]`` messages."""
    return line.startswith("[dipro train")


def check_resources(cfg: Config, started_here: bool) -> None:
    """Refuse a worker group the (local) cluster can never place, instead of waiting forever."""
    import ray

    res = ray.cluster_resources()
    workers = cfg.trainer.min_workers  # an elastic group starts with MIN
    need_cpu = workers * cfg.trainer.cpus_per_worker
    need_gpu = workers * cfg.trainer.gpus_per_worker if cfg.trainer.use_gpu else 0
    problems = []
    if need_cpu > res.get("CPU", 0):
        problems.append(f"{need_cpu:g} CPUs ({workers} workers x {cfg.trainer.cpus_per_worker:g}) "
                        f"but the cluster has {res.get('CPU', 0):g}")
    if need_gpu > res.get("GPU", 0):
        problems.append(f"{need_gpu:g} GPUs but the cluster has {res.get('GPU', 0):g}")
    if problems:
        msg = "trainer asks for " + "; ".join(problems)
        if started_here:
            raise ConfigError(msg + " (lower trainer.num_workers / trainer.cpus_per_worker, or set RAY_ADDRESS)")
        _say(f"warning: {msg}; waiting up to trainer.schedule_timeout_s={cfg.trainer.schedule_timeout_s:g}s "
             "for the cluster to scale up")


def _failure_message(exc: BaseException) -> str | None:
    """The worker's NonFiniteLossError message if that is why training failed."""
    from dipro.train.loop import NonFiniteLossError

    failures = getattr(exc, "worker_failures", None) or {}
    for _rank, err in sorted(failures.items()):
        text = str(err)
        if NonFiniteLossError.MARKER in text:
            start = text.index(NonFiniteLossError.MARKER)
            return text[start:].splitlines()[0]
    text = str(exc)
    if NonFiniteLossError.MARKER in text:
        return text[text.index(NonFiniteLossError.MARKER):].splitlines()[0]
    return None


def _evaluate_task(best_dir: str, split: str, device: str, precision: str, endpoints: dict[str, str | None]):
    from dipro.config import StorageConfig
    from dipro.train.evaluate import evaluate_checkpoint

    StorageConfig(**endpoints).apply()  # a Ray worker: storage.s3_endpoint / gcs_endpoint before reading the bucket
    return evaluate_checkpoint(best_dir, split, device=device, precision=precision)


@dataclass(frozen=True)
class RunPlan:
    """What :func:`preflight` and :func:`resolve_run` decided; nothing is written yet."""

    cfg: Config
    """A copy of the caller's config with ``trainer.run_name`` set."""
    precision: str
    micro_batches: int
    """Micro batches per rank per epoch."""
    storage: Location
    """``trainer.storage_path``: a local directory or a bucket prefix."""
    resume: str | None
    resume_from: Location | None

    @property
    def run_name(self) -> str:
        return self.cfg.trainer.run_name


def launch(cfg: Config, resume: str | None = None, tracker: Any = None, owner: str | None = None) -> TrainResult:
    """Train ``cfg`` (see :func:`dipro.train.run_training`); ``cfg`` itself is not changed.

    ``owner``: the sweep trial this run is (``dipro.sweep``): its run directory, left by an earlier
    attempt of the same trial, is reclaimed and the run continues from its last complete checkpoint
    (Ray Train's own record of it, else the newest complete one found there: a driver killed right after
    a checkpoint was written may leave it unrecorded)."""
    cfg.storage.apply()  # explicit endpoints (storage.*) before anything reads shards or the storage path
    if owner is not None and resume is None and ck.list_checkpoints(_storage(cfg) / (cfg.trainer.run_name or "")):
        resume = cfg.trainer.run_name  # the trial's own run: same name, same directory
    plan = resolve_run(cfg, resume, *preflight(cfg, resume))
    run_dir, log = claim(plan, owner)
    with ray_session(plan, run_dir, log) as session:
        try:
            check_resources(plan.cfg, session.started_here)
            if tracker is None and plan.cfg.tracking.enabled:
                from dipro.tracking.tracker import Tracker

                tracker = Tracker.create_in_driver(plan.cfg, plan.run_name)
            _log_run_params(plan, tracker, restarted=owner is not None)
            trainer = build_trainer(plan, run_dir, tracker)
        except BaseException as exc:
            if tracker is not None:  # the MLflow run exists but training never started
                tracker.set_tags(failures.failure_tags(f"{type(exc).__name__}: {exc}", None))
                tracker.finish("FAILED")
            raise
        session.fitting = True  # from here on the run directory is kept, whatever happens
        result = fit(trainer, plan, log, tracker)
        return report(plan, run_dir, result, tracker)


def preflight(cfg: Config, resume: str | None) -> tuple[str, int, Location | None]:
    """Everything checkable before Ray starts: ``(precision, micro batches per rank, checkpoint to resume)``."""
    precision = validate_config(cfg)
    micro = check_data(cfg)
    if cfg.model.init_from:  # the weights come from there (checked against the config before any worker starts)
        ck.check_init_from(cfg)
    elif cfg.model.backbone_weights == "imagenet":  # fetched (or a one-line error) before any worker starts
        from dipro.model.region_encoder import resolve_backbone_weights

        resolve_backbone_weights(cfg.model.backbone, cfg.model.backbone_weights)
    resume_from = None
    if resume:
        resume_from = ck.find_resume_checkpoint(_storage(cfg), resume)
        meta = ck.read_meta(resume_from)
        if meta.get("strategy") != cfg.trainer.strategy:
            raise ConfigError(f"--resume {resume}: its checkpoint was written by trainer.strategy="
                              f"{meta.get('strategy')}, this config says {cfg.trainer.strategy}")
        if cfg.trainer.strategy == "deepspeed" and int(meta.get("world_size", 1)) != cfg.trainer.num_workers:
            raise ConfigError(f"--resume {resume}: DeepSpeed partitions were saved by {meta.get('world_size')} "
                              f"workers, this config has trainer.num_workers={cfg.trainer.num_workers}")
    return precision, micro, resume_from


def _storage(cfg: Config) -> Location:
    return storage.resolve(cfg.trainer.storage_path)


def resolve_run(cfg: Config, resume: str | None, precision: str, micro: int, resume_from: Location | None) -> RunPlan:
    """The run's name (``trainer.run_name``, else a new one; a resumed run gets ``NAME-resumed-...``) in a copy
    of ``cfg``."""
    storage = _storage(cfg)
    run_name = cfg.trainer.run_name or make_run_name(cfg)
    if resume and cfg.trainer.run_name is None:
        base = ck.resolve_run_dir(storage, resume).name.split("-resumed-")[0]
        run_name = f"{base}-resumed-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    run_cfg = dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, run_name=run_name))
    return RunPlan(cfg=run_cfg, precision=precision, micro_batches=micro, storage=storage, resume=resume,
                   resume_from=resume_from)


def claim(plan: RunPlan, owner: str | None = None) -> tuple[Path | Location, rundir.RunLog]:
    """Claim the run directory (refuses a name in use, naming who uses it; a sweep trial reclaims its own),
    open its log, say what will run."""
    global _run_log
    run_dir = rundir.claim(plan.storage, plan.run_name, owner)
    _run_log = log = rundir.RunLog(run_dir)
    cfg, t = plan.cfg, plan.cfg.trainer
    workers, accum = t.num_workers, cfg.optim.grad_accum
    _say(f"run {plan.run_name}: task {cfg.task}, {t.strategy}"
         + (f" ZeRO-{t.zero_stage}" if t.strategy == "deepspeed" else "")
         + f", precision {plan.precision}, {workers} worker(s) on {'GPU' if t.use_gpu else 'CPU'}"
         + f", placement {t.placement_strategy}")
    _say(f"effective batch = micro batch {cfg.data.batch_size} x workers {workers} x accumulation {accum} "
         f"= {cfg.effective_batch_size}" + (f" at {t.max_workers} workers (elastic: it shrinks with the group)"
                                             if t.elastic else "")
         + f"; {plan.micro_batches // accum} optimizer steps/epoch, up to {t.max_epochs} epochs")
    _say(cfg.describe_lr() + f", cosine to {cfg.optim.min_lr:g} per {cfg.optim.schedule_interval}")
    if plan.resume_from is not None:
        _say(f"resuming {plan.resume} from {plan.resume_from}")
    if cfg.model.init_from:
        _say(f"network initialised from {cfg.model.init_from} (model.init_from); optimizer, schedule and "
             "early stopping start fresh")
    _say(f"run directory {run_dir}; Ray, DeepSpeed and MLflow messages go to its log: {log}")
    return run_dir, log


@dataclass
class RaySession:
    started_here: bool = False
    """Ray was started by this driver (and is shut down by it)."""
    fitting: bool = False
    """``trainer.fit()`` was called: the run directory is kept even if the run fails."""


@contextlib.contextmanager
def ray_session(plan: RunPlan, run_dir: Path | Location, log: rundir.RunLog) -> Iterator[RaySession]:
    """Ray started (or joined) with its output in ``train.log``, the ranks' own lines on the terminal.

    A run that fails before ``fit`` releases its directory (no worker ran: the name is free
    again); Ray started here is shut down on the way out, and the log closed (on a bucket: uploaded
    a last time).
    """
    import ray

    global _run_log
    if plan.cfg.tracking.enabled:
        import mlflow  # noqa: F401 (mlflow configures its loggers on import: take them over after that)
    session = RaySession()
    try:
        with ray_init.loggers_to_file(log.path, LIBRARY_LOGGERS):
            session.started_here = init_ray(plan.cfg)
            with ray_init.worker_lines_to(log.write, show=is_report_line):
                yield session
    except BaseException:
        if not session.fitting:
            log.discard()
            rundir.release(run_dir)  # claimed, but no worker ever ran: the name is free again
        raise
    finally:
        _run_log = None
        if session.started_here:
            ray.shutdown()
        log.close()


def _log_run_params(plan: RunPlan, tracker: Any, restarted: bool = False) -> None:
    """``restarted``: a sweep trial, whose MLflow run may be logged into again by a later attempt; MLflow
    params cannot change, so where it resumed from is a tag there."""
    if tracker is not None:
        resumed = str(plan.resume_from) if plan.resume_from else "none"
        tracker.log_params({"effective_batch_size": plan.cfg.effective_batch_size, "precision_used": plan.precision,
                            **({} if restarted else {"resumed_from": resumed})})
        if restarted:
            tracker.set_tags({"resumed_from": resumed})


def build_trainer(plan: RunPlan, run_dir: Path | Location, tracker: Any):
    """The ``TorchTrainer``: per-worker loop, scaling/placement, failure policy, checkpoints, callbacks."""
    from ray.train import CheckpointConfig, RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from dipro.train import placement
    from dipro.train.loop import train_loop_per_worker

    cfg = plan.cfg
    if plan.resume_from is not None:
        old_best = ck.resolve_run_dir(plan.storage, plan.resume) / ck.BEST_DIR
        new_best = storage.resolve(run_dir) / ck.BEST_DIR
        if (ck.checkpoint_location(old_best) / ck.MODEL_FILE).exists() and old_best.uri != new_best.uri:  # not reclaimed
            ck.update_best(old_best, run_dir)
    loop_config = {"cfg": to_dict(cfg), "precision": plan.precision, "run_name": plan.run_name,
                   "run_dir": str(run_dir), "resume_from": str(plan.resume_from) if plan.resume_from else None,
                   "tracker": tracker, "faults": os.environ.get("DIPRO_FAULT_INJECT")}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend=cfg.trainer.dist_backend),  # gloo when ranks share a GPU
        scaling_config=placement.scaling_config(cfg),
        run_config=RunConfig(name=plan.run_name, **ray_storage(plan.storage),
                             failure_config=placement.failure_config(cfg),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.trainer.num_to_keep),
                             callbacks=[placement.SchedulingDeadline(cfg.trainer.schedule_timeout_s),
                                        failures.StopOnUserError()]),
    )


def ray_storage(root: Location) -> dict[str, Any]:
    """``RunConfig`` storage arguments: a local path as it is; a bucket as the layer's ``pyarrow.fs``
    filesystem plus its path without scheme (Ray refuses a URI together with a filesystem)."""
    if root.is_remote:
        return {"storage_path": root.fs_path, "storage_filesystem": root.fs}
    return {"storage_path": str(root.local)}


def fit(trainer, plan: RunPlan, log: rundir.RunLog, tracker: Any):
    """``trainer.fit()``; a failure is written to ``train.log`` with every trace and ends as one line
    (:class:`UserError`) when it is a user error on a rank or an unplaceable group, else re-raised."""
    from dipro.train import placement

    try:
        with placement.start_timeout_env(plan.cfg):
            return trainer.fit()
    except Exception as exc:
        failure = failures.rank_error(exc)
        reason = _failure_message(exc) or placement.not_placed_message(exc, plan.cfg)
        summary = (failure.one_line() if failure is not None else
                   f"run {plan.run_name} stopped: {reason}" if reason is not None else
                   f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}")
        if failure is None and reason is None:  # not a user error: show what the workers said last
            _print_tail(log)
        log.failure(summary, exc, failure.traces if failure is not None else None)
        _say(f"run {plan.run_name} failed; full trace in {log}")
        if tracker is not None:
            tracker.set_tags(failures.failure_tags(summary, failure))
            tracker.finish("FAILED")
        if failure is not None or reason is not None:
            raise UserError(summary) from None
        raise


def _print_tail(log: rundir.RunLog, lines: int = TAIL_LINES) -> None:
    try:
        tail = log.path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
    except OSError:
        return
    print(f"[dipro train] last {len(tail)} lines of {log}:", file=sys.stderr)
    print("\n".join(f"  {line}" for line in tail), file=sys.stderr, flush=True)


def report(plan: RunPlan, run_dir: Path | Location, result, tracker: Any) -> TrainResult:
    """Evaluate the best checkpoint on test (as a Ray task), write ``summary.json``, finish the MLflow run."""
    import ray

    from dipro.train.evaluate import save_predictions

    cfg = plan.cfg
    summary = result.return_value or {}
    run_loc = storage.resolve(run_dir)
    best_dir = run_loc / ck.BEST_DIR
    last_ckpt = run_loc / PurePosixPath(result.checkpoint.path).name if result.checkpoint is not None else None
    best_meta = ck.read_meta(ck.checkpoint_location(best_dir))
    metrics = {k: v for k, v in (best_meta.get("metrics") or {}).items() if k.startswith("val/")}
    device = "cuda" if cfg.trainer.use_gpu else "cpu"
    # DEFAULT scheduling: inside a sweep trial a task would otherwise be placed in the trial's own
    # placement group (capture_child_tasks), which holds no CPU for it, and be refused.
    evaluate = ray.remote(num_cpus=cfg.trainer.cpus_per_worker, num_gpus=1 if cfg.trainer.use_gpu else 0,
                          scheduling_strategy="DEFAULT")(_evaluate_task)
    test = ray.get(evaluate.remote(str(best_dir), "test", device, plan.precision, dataclasses.asdict(cfg.storage)))
    save_predictions(run_loc / rundir.TEST_PREDICTIONS, test)  # for sweeps' bootstrap (never logged to MLflow)
    metrics.update({f"test/{k}": float(v) for k, v in test.metrics.items()})
    _say(f"best epoch {best_meta.get('best_epoch')} ({cfg.monitor} {best_meta.get('best_value')}); test: "
         + " ".join(f"{k}={v:.4f}" for k, v in test.metrics.items() if "/" not in k and not math.isnan(v)))
    resumed_from = str(plan.resume_from) if plan.resume_from else None
    summary_out = {"run_name": plan.run_name, "run_dir": str(run_dir), "best_checkpoint": str(best_dir),
                   "last_checkpoint": str(last_ckpt) if last_ckpt else None, "metrics": metrics,
                   "epochs_completed": summary.get("epochs_completed"), "global_step": summary.get("global_step"),
                   "history": summary.get("history", []), "resumed_from": resumed_from}
    (run_loc / "summary.json").write_text(json.dumps(summary_out, indent=1, default=float))
    run_id = None
    if tracker is not None:
        run_id = tracker.run_id
        tracker.log_evaluation("test", test)
        tracker.log_dict(summary_out, "summary.json")
        if cfg.tracking.register:
            from dipro.tracking import register_checkpoint

            version = register_checkpoint(cfg, str(best_dir), run_id, test.metrics, tracker.data_fingerprint)
            _say(f"registered {version}")
        tracker.finish("FINISHED")
    return TrainResult(run_name=plan.run_name, run_dir=run_loc.native, best_checkpoint=best_dir.native,
                       last_checkpoint=last_ckpt.native if last_ckpt is not None else None,
                       metrics=metrics, mlflow_run_id=run_id, epochs_completed=summary.get("epochs_completed"),
                       global_step=summary.get("global_step"), history=summary.get("history", []), test=test)
