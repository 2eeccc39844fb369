"""The driver: validate the config, connect to Ray, run a ``TorchTrainer``, evaluate, track.

Works unchanged as the entrypoint of ``ray job submit`` (``ray.init`` picks up
``RAY_ADDRESS`` / the job's cluster) and on a laptop (a local Ray on 127.0.0.1
without the dashboard).  Everything that can be checked before workers start is:
precision vs device, the DeepSpeed config, the shards, the cluster's resources,
the run name, the tracking server.
"""
from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Any

from dipro.config import Config, to_dict
from data_sharding.errors import ConfigError, UserError
from dipro.train import TrainResult
from dipro.train import checkpoint as ck
from dipro.train import failures, rundir

_run_log: rundir.RunLog | None = None
"""The run's ``train.log`` once its directory is claimed: every driver message goes there too."""


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
    """Connect to ``RAY_ADDRESS`` / the job's cluster, or start a local one; True if started here."""
    from data_sharding.ray_init import init_ray as _init

    started = _init(log_to_driver=True)
    return started and not os.environ.get("RAY_ADDRESS")


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


def _evaluate_task(best_dir: str, split: str, device: str, precision: str):
    from dipro.train.evaluate import evaluate_checkpoint

    return evaluate_checkpoint(best_dir, split, device=device, precision=precision)


def launch(cfg: Config, resume: str | None = None, tracker: Any = None) -> TrainResult:
    """Train ``cfg`` (see :func:`dipro.train.run_training`)."""
    import ray
    from ray.train import CheckpointConfig, RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from dipro.train import placement
    from dipro.train.loop import train_loop_per_worker

    precision = validate_config(cfg)
    micro = check_data(cfg)
    if cfg.model.backbone_weights == "imagenet":  # fetched (or a one-line error) before any worker starts
        from dipro.model.region_encoder import resolve_backbone_weights

        resolve_backbone_weights(cfg.model.backbone, cfg.model.backbone_weights)
    storage = Path(os.path.abspath(os.path.expanduser(cfg.trainer.storage_path)))
    resume_from: Path | None = None
    if resume:
        resume_from = ck.find_resume_checkpoint(storage, resume)
        meta = ck.read_meta(resume_from)
        if meta.get("strategy") != cfg.trainer.strategy:
            raise ConfigError(f"--resume {resume}: its checkpoint was written by trainer.strategy="
                              f"{meta.get('strategy')}, this config says {cfg.trainer.strategy}")
        if cfg.trainer.strategy == "deepspeed" and int(meta.get("world_size", 1)) != cfg.trainer.num_workers:
            raise ConfigError(f"--resume {resume}: DeepSpeed partitions were saved by {meta.get('world_size')} "
                              f"workers, this config has trainer.num_workers={cfg.trainer.num_workers}")
    run_name = cfg.trainer.run_name or make_run_name(cfg)
    if resume and cfg.trainer.run_name is None:
        run_name = f"{ck.resolve_run_dir(storage, resume).name.split('-resumed-')[0]}-resumed-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    run_dir = rundir.claim(storage, run_name)  # refuses a name in use, naming who uses it
    global _run_log
    _run_log = log = rundir.RunLog(run_dir)
    cfg.trainer.run_name = run_name
    workers, accum = cfg.trainer.num_workers, cfg.optim.grad_accum
    _say(f"run {run_name}: task {cfg.task}, {cfg.trainer.strategy}"
         + (f" ZeRO-{cfg.trainer.zero_stage}" if cfg.trainer.strategy == "deepspeed" else "")
         + f", precision {precision}, {workers} worker(s) on {'GPU' if cfg.trainer.use_gpu else 'CPU'}"
         + f", placement {cfg.trainer.placement_strategy}")
    _say(f"effective batch = micro batch {cfg.data.batch_size} x workers {workers} x accumulation {accum} "
         f"= {cfg.effective_batch_size}" + (f" at {cfg.trainer.max_workers} workers (elastic: it shrinks with the group)"
                                             if cfg.trainer.elastic else "")
         + f"; {micro // accum} optimizer steps/epoch, up to {cfg.trainer.max_epochs} epochs")
    _say(cfg.describe_lr() + f", cosine to {cfg.optim.min_lr:g} per {cfg.optim.schedule_interval}")
    if resume_from is not None:
        _say(f"resuming {resume} from {resume_from}")

    _say(f"run directory {run_dir} (log: {log.path})")
    try:
        started_here = init_ray(cfg)
    except BaseException:
        rundir.release(run_dir)
        _run_log = None
        raise
    fitting = False
    try:
        check_resources(cfg, started_here)
        if tracker is None and cfg.tracking.enabled:
            from dipro.tracking.tracker import Tracker

            tracker = Tracker.create_in_driver(cfg, run_name)
        if tracker is not None:
            tracker.log_params({"effective_batch_size": cfg.effective_batch_size, "precision_used": precision,
                                "resumed_from": str(resume_from) if resume_from else "none"})
        if resume_from is not None:
            old_best = ck.resolve_run_dir(storage, resume) / ck.BEST_DIR
            if (old_best / ck.MODEL_FILE).is_file():
                ck.replace_dir_atomically(old_best, run_dir / ck.BEST_DIR)
        loop_config = {"cfg": to_dict(cfg), "precision": precision, "run_name": run_name, "run_dir": str(run_dir),
                       "resume_from": str(resume_from) if resume_from else None, "tracker": tracker,
                       "faults": os.environ.get("DIPRO_FAULT_INJECT")}
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config=loop_config,
            torch_config=TorchConfig(backend=cfg.trainer.dist_backend),  # gloo when ranks share a GPU
            scaling_config=placement.scaling_config(cfg),
            run_config=RunConfig(name=run_name, storage_path=str(storage),
                                 failure_config=placement.failure_config(cfg),
                                 checkpoint_config=CheckpointConfig(num_to_keep=cfg.trainer.num_to_keep),
                                 callbacks=[placement.SchedulingDeadline(cfg.trainer.schedule_timeout_s)]),
        )
        fitting = True
        try:
            with placement.start_timeout_env(cfg):
                result = trainer.fit()
        except Exception as exc:
            failure = failures.rank_error(exc)
            reason = _failure_message(exc) or placement.not_placed_message(exc, cfg)
            summary = (failure.one_line() if failure is not None else
                       f"run {run_name} stopped: {reason}" if reason is not None else
                       f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}")
            log.failure(summary, exc, failure.traces if failure is not None else None)
            _say(f"run {run_name} failed; full trace in {log.path}")
            if tracker is not None:
                tracker.set_tags(failures.failure_tags(summary, failure))
                tracker.finish("FAILED")
            if failure is not None or reason is not None:
                raise UserError(summary) from None
            raise
        summary = result.return_value or {}
        best_dir = run_dir / ck.BEST_DIR
        last_ckpt = Path(result.checkpoint.path) if result.checkpoint is not None else None
        best_meta = ck.read_meta(best_dir)
        metrics = {k: v for k, v in (best_meta.get("metrics") or {}).items() if k.startswith("val/")}
        device = "cuda" if cfg.trainer.use_gpu else "cpu"
        evaluate = ray.remote(num_cpus=cfg.trainer.cpus_per_worker,
                              num_gpus=1 if cfg.trainer.use_gpu else 0)(_evaluate_task)
        test = ray.get(evaluate.remote(str(best_dir), "test", device, precision))
        metrics.update({f"test/{k}": float(v) for k, v in test.metrics.items()})
        _say(f"best epoch {best_meta.get('best_epoch')} ({cfg.monitor} {best_meta.get('best_value')}); test: "
             + " ".join(f"{k}={v:.4f}" for k, v in test.metrics.items() if "/" not in k and not math.isnan(v)))
        summary_out = {"run_name": run_name, "run_dir": str(run_dir), "best_checkpoint": str(best_dir),
                       "last_checkpoint": str(last_ckpt) if last_ckpt else None, "metrics": metrics,
                       "epochs_completed": summary.get("epochs_completed"), "global_step": summary.get("global_step"),
                       "history": summary.get("history", []), "resumed_from": str(resume_from) if resume_from else None}
        ck.atomic_write_text(run_dir / "summary.json", json.dumps(summary_out, indent=1, default=float))
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
        return TrainResult(run_name=run_name, run_dir=run_dir, best_checkpoint=best_dir, last_checkpoint=last_ckpt,
                           metrics=metrics, mlflow_run_id=run_id, epochs_completed=summary.get("epochs_completed"),
                           global_step=summary.get("global_step"), history=summary.get("history", []),
                           test=test)
    except BaseException as exc:
        if not fitting:
            if tracker is not None:  # the MLflow run was created but training never started
                tracker.set_tags(failures.failure_tags(f"{type(exc).__name__}: {exc}", None))
                tracker.finish("FAILED")
            rundir.release(run_dir)  # claimed, but no worker ever ran: the name is free again
        raise
    finally:
        _run_log = None
        if started_here:
            ray.shutdown()
