"""The per-worker training loop that Ray Train runs on every rank.

Order of one epoch (all ranks in step):

1. micro batches from the training loader (equal count on every rank); gradients
   accumulated over ``optim.grad_accum`` of them, then one optimizer step;
   a non-finite micro batch loss on any rank stops every rank before that step is taken
   (nothing is updated or saved) with the step and the offending batches' sample keys.
   Loss terms and finiteness stay on the device: the host synchronises once per
   optimizer step (the finiteness all-reduce) and when a log line is written, never
   per micro batch;
2. optional checkpoint every ``trainer.checkpoint_every_n_steps`` steps;
3. validation: each rank predicts its block of the split, rank 0 gathers and scores;
   the task's monitor (``cfg.monitor``) decides the best checkpoint and early stopping
   (decision broadcast from rank 0 so all ranks stop together);
4. an epoch checkpoint reported with ``ray.train.report`` by every rank (rank 0's
   metrics are the ones Ray keeps).

A restarted worker group (``FailureConfig``) resumes from ``ray.train.get_checkpoint()``;
a ``--resume`` run from the checkpoint path the launcher passes in.  Either way training
continues at the next micro batch of the saved data position, with RNG states restored.
"""
from __future__ import annotations

import math
import os
import random
import socket
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_sharding import storage
from dipro.config import Config, from_dict
from data_sharding.errors import ConfigError, DataError, UserError
from dipro.train import checkpoint as ck
from dipro.train import failures, faults
from dipro.train.data import eval_loader, read_label_stats, train_loader
from dipro.train.evaluate import EvalResult, finalize, gather_predictions, predict
from dipro.train.strategies import Strategy, build_strategy


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf: the run stops, nothing from this step is applied or saved."""

    MARKER = "non-finite loss"


# ----------------------------------------------------------------------------- helpers

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _dist_world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _any_rank(flag: bool, device: torch.device) -> bool:
    """True if ``flag`` is true on any rank (one tiny all-reduce)."""
    if _dist_world() == 1:
        return flag
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def _broadcast(obj: Any) -> Any:
    if _dist_world() == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def check_finite_window(losses: list[torch.Tensor], keys: list[list[str]], *, step: int, epoch: int,
                        device: torch.device) -> None:
    """Raise :class:`NonFiniteLossError` on every rank when a micro batch loss of the accumulation
    window that ends at optimizer ``step`` is NaN/inf on any rank.

    Called once per optimizer step, before it is taken: one all-reduce and one host sync
    per step, none per micro batch.  The message names the step, the epoch and, for every
    offending rank, the losses and sample keys of its non-finite micro batches (gathered, so
    rank 0's error names them too).
    """
    finite = torch.stack([torch.isfinite(loss.detach()).all() for loss in losses])
    bad = (~finite).any().to(torch.float32).reshape(1).to(device)
    if _dist_world() > 1:
        import torch.distributed as dist

        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if not bool(bad.item()):
        return
    mine = [(float(loss.detach().float()), k) for loss, k, ok in zip(losses, keys, finite.tolist()) if not ok]
    if _dist_world() > 1:
        import torch.distributed as dist

        parts: list[Any] = [None] * _dist_world()
        dist.all_gather_object(parts, mine)
    else:
        parts = [mine]
    where = "; ".join(f"rank {r}: " + ", ".join(f"loss={v} batch sample keys {k}" for v, k in bad_micro)
                      for r, bad_micro in enumerate(parts) if bad_micro)
    raise NonFiniteLossError(
        f"{NonFiniteLossError.MARKER} at optimizer step {step} (epoch {epoch}): {where}. "
        "Nothing from this step was applied or checkpointed; lower optim.lr, use trainer.precision=fp32, "
        "or check these samples (`dipro shards verify`)")


def _fmt(metrics: dict[str, float], keys: list[str]) -> str:
    return " ".join(f"{k}={metrics[k]:.4g}" for k in keys if k in metrics)


class _Running:
    """Sums of loss terms over the micro batches since the last reset, kept on the device
    (adding is asynchronous; only :meth:`means` / :meth:`global_means` synchronise)."""

    def __init__(self) -> None:
        self.names: tuple[str, ...] = ()
        self.total: torch.Tensor | None = None
        self.n = 0

    def add(self, terms: dict[str, torch.Tensor]) -> None:
        names = tuple(sorted(terms))
        if self.total is None:
            self.names = names
        elif names != self.names:
            raise RuntimeError(f"loss terms changed within a window: {self.names} -> {names}")
        values = torch.stack([terms[k].detach().float().reshape(()) for k in names])
        self.total = values if self.total is None else self.total + values
        self.n += 1

    def merge(self, other: "_Running") -> None:
        """Add another window's sums (the epoch collects its windows)."""
        if other.total is None:
            return
        if self.total is None:
            self.names, self.total, self.n = other.names, other.total.clone(), other.n
            return
        if other.names != self.names:
            raise RuntimeError(f"loss terms differ: {self.names} vs {other.names}")
        self.total = self.total + other.total
        self.n += other.n

    def means(self, prefix: str = "train/") -> dict[str, float]:
        """Means over this rank's micro batches."""
        if self.total is None:
            return {}
        return {f"{prefix}{k}": v / max(self.n, 1) for k, v in zip(self.names, self.total.double().tolist())}

    def global_means(self, device: torch.device, prefix: str = "train/") -> dict[str, float]:
        """Means over every rank's micro batches (collective: all ranks call it together)."""
        if _dist_world() == 1:
            return self.means(prefix)
        import torch.distributed as dist

        sums = (self.total if self.total is not None else torch.zeros(len(self.names)))
        t = torch.cat([sums.to(device=device, dtype=torch.float64),
                       torch.tensor([float(self.n)], dtype=torch.float64, device=device)])
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        values = t.tolist()
        n = max(values[-1], 1.0)
        return {f"{prefix}{k}": values[i] / n for i, k in enumerate(self.names)}


# ----------------------------------------------------------------------------- the worker

class Worker:
    """State and steps of one rank; :func:`train_loop_per_worker` drives it."""

    def __init__(self, config: dict[str, Any]) -> None:
        import ray.train

        self.cfg: Config = from_dict(config["cfg"])
        self.cfg.storage.apply()  # storage.* endpoints in this worker process before it touches a bucket
        self.precision: str = config["precision"]
        self.run_name: str = config["run_name"]
        self.run_dir = storage.resolve(config["run_dir"])  # a local directory or a bucket prefix
        self.tracker = config.get("tracker")
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        cfg = self.cfg
        self._say(f"world rank {self.rank} of {self.world} on Ray node {ray.get_runtime_context().get_node_id()} "
                  f"({socket.gethostname()}, pid {os.getpid()})")
        if cfg.trainer.use_gpu:
            import ray.train.torch

            self.device = ray.train.torch.get_device()
            torch.cuda.set_device(self.device)
            if self.precision == "bf16" and not torch.cuda.is_bf16_supported():
                self._say("bf16 is not supported by this GPU: training in fp32")
                self.precision = "fp32"
        else:
            self.device = torch.device("cpu")
            torch.set_num_threads(max(1, int(cfg.trainer.cpus_per_worker)))
        # Same seed on every rank while the model is built (identical initial weights,
        # which ZeRO-3 partitioning relies on); per-rank seeds after that.
        seed_everything(cfg.seed)
        from dipro.model import build_model

        self.label_stats = read_label_stats(cfg.data.shards)
        model = build_model(cfg, self.label_stats)
        self.loader = train_loader(cfg, rank=self.rank, world_size=self.world, epoch=0)
        self.accum = cfg.optim.grad_accum
        self.micro_per_epoch = len(self.loader)
        self.steps_per_epoch = self.micro_per_epoch // self.accum
        if self.steps_per_epoch < 1:
            raise ConfigError(
                f"{self.micro_per_epoch} micro batches per rank per epoch cannot fill one accumulation window of "
                f"optim.grad_accum={self.accum}; lower optim.grad_accum, data.batch_size or trainer.num_workers")
        self.used_micro = self.steps_per_epoch * self.accum
        total_steps = self.steps_per_epoch * cfg.trainer.max_epochs
        self.strategy: Strategy = build_strategy(cfg, model, precision=self.precision, device=self.device,
                                                 rank=self.rank, world_size=self.world, total_steps=total_steps)
        self.val_loader = eval_loader(cfg, "val", rank=self.rank, world_size=self.world)
        self.state = ck.TrainState()
        self.fallback_batch: dict[str, Any] | None = None
        seed_everything(cfg.seed + 1000 * (self.rank + 1))
        self._restore(config.get("resume_from"))
        if self.rank == 0 and self.tracker is not None:
            from dipro.tracking.tracker import system_metrics_wanted

            if system_metrics_wanted(cfg, self.tracker.uri):
                self.tracker.start_system_metrics(cfg.tracking.system_metrics_interval_s)
        if self.rank == 0:
            unused = self.micro_per_epoch - self.used_micro
            self._say(f"{self.world} worker(s), {self.strategy.name}, {self.precision} on {self.device}; "
                      f"{self.steps_per_epoch} optimizer steps/epoch of {self.accum} micro batches"
                      + (f" ({unused} trailing micro batch(es)/epoch unused)" if unused else "")
                      + f"; starting at epoch {self.state.epoch}, step {self.state.global_step}")

    # ------------------------------------------------------------------ messages
    def _say(self, msg: str) -> None:
        # Written to stdout directly: Ray Train patches ``print`` in its workers to log the message *and*
        # echo it to a redirected stdout, so a printed line would reach the driver twice.
        sys.stdout.write(f"[dipro train rank {self.rank}] {msg}\n")
        sys.stdout.flush()

    # ------------------------------------------------------------------ resume
    def _restore(self, resume_from: str | None) -> None:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is not None:
            with ckpt.as_directory() as d:
                self._load(Path(d), "restarted worker group")
        elif resume_from:
            with ck.local_checkpoint(resume_from) as d:  # on a bucket: downloaded for this rank
                self._load(d, "--resume", shown=resume_from)

    def _load(self, d: Path, why: str, shown: str | None = None) -> None:
        problem = ck.checkpoint_problem(d, hashes=False)  # sizes: a truncated file is named, not unpickled
        if problem is not None:
            raise DataError(f"cannot resume ({why}) from {shown or d}: {problem}")
        meta = ck.read_meta(d)
        if meta.get("strategy") != self.strategy.name:
            raise ConfigError(f"checkpoint {d} was written by strategy {meta.get('strategy')!r}, "
                              f"this run uses {self.strategy.name!r}")
        self.strategy.load_state(d)
        self.state = ck.state_from_meta(meta)
        saved_world = int(meta.get("world_size", self.world))
        if saved_world != self.world:  # an elastic group resized: keep the fraction of the epoch done
            self.state.batches_in_epoch = ck.rescale_data_position(
                self.state.batches_in_epoch, saved_world, self.world, self.accum, self.used_micro)
        rng = ck.rng_file(d, self.rank)
        if rng.is_file():
            ck.set_rng_state(torch.load(rng, map_location="cpu", weights_only=True))
        else:  # a different world size: deterministic fresh per-rank streams
            seed_everything(self.cfg.seed + 1000 * (self.rank + 1) + self.state.global_step)
        if self.rank == 0:
            self._say(f"resumed ({why}) from {shown or d}: epoch {self.state.epoch}, step {self.state.global_step}, "
                      f"{self.state.batches_in_epoch} micro batches of that epoch done")

    # ------------------------------------------------------------------ checkpoint
    def _save_and_report(self, kind: str, metrics: dict[str, float], val: EvalResult | None,
                         improved: bool) -> None:
        """Collective: consolidate weights, write this rank's files, copy best (rank 0), report."""
        import ray.train
        from ray.train import Checkpoint

        s = self.state
        # "_epochN" = the checkpoint taken at the end of epoch N (0-based); none = mid-epoch.
        name = f"checkpoint_s{s.global_step:08d}" + (f"_epoch{s.epoch - 1:04d}" if kind == "epoch" else "")
        with ck.staged_checkpoint(self.rank, f"checkpoint {name} of run {self.run_name}",
                                  f"the run's previous checkpoints under {self.run_dir} are intact") as local:
            model_state = self.strategy.consolidated_state_dict()
            self.strategy.save_state(local)
            ck.atomic_torch_save(ck.rng_state(), ck.rng_file(local, self.rank))
            meta = ck.meta_from_state(s, kind=kind, run_name=self.run_name, monitor=self.cfg.monitor,
                                      monitor_value=(val.metrics.get(self.cfg.monitor) if val else None),
                                      world_size=self.world, strategy=self.strategy.name, precision=self.precision,
                                      metrics=metrics)
            if self.rank == 0:
                ck.write_model_files(local, model_state, self.cfg, self.label_stats, meta)
                if improved:
                    ck.update_best(local, self.run_dir)
            del model_state
            ck.write_digest(local, self.rank)  # last: a checkpoint without every rank's digest is incomplete
            ray.train.report(metrics if self.rank == 0 else {}, checkpoint=Checkpoint.from_directory(str(local)),
                             checkpoint_dir_name=name, delete_local_checkpoint_after_upload=True)

    # ------------------------------------------------------------------ validation
    def validate(self) -> EvalResult | None:
        """Distributed evaluation on the val split; the result on rank 0, None elsewhere."""
        st = self.strategy
        st.sync_buffers()  # rank 0's BatchNorm statistics everywhere: the ones its checkpoint saves
        st.eval()
        lockstep = None
        if st.name == "deepspeed" and self.cfg.trainer.zero_stage == 3 and self.world > 1:
            # ZeRO-3 gathers parameters inside forward: ranks with fewer batches must keep forwarding.
            lockstep = lambda has: _any_rank(has, self.device)  # noqa: E731

        def forward(batch):
            out, loss, _ = st.forward(batch, with_loss=True)
            return out, loss

        preds = predict(forward, st.model.predict_proba, self.val_loader, self.cfg.task, self.device,
                        lockstep=lockstep, fallback_batch=self.fallback_batch)
        parts = gather_predictions(preds.arrays(), self.world)
        st.train()
        return finalize(parts, self.cfg.task, "val") if self.rank == 0 else None

    # ------------------------------------------------------------------ training
    def run(self) -> dict[str, Any]:
        from dipro.data import move_to_device

        cfg, s, st = self.cfg, self.state, self.strategy
        every = cfg.trainer.checkpoint_every_n_steps
        samples_per_step = cfg.data.batch_size * self.world * self.accum  # this group's size (elastic: may vary)
        compile_t0: float | None = None  # set at the first micro batch when the step is compiled
        while s.epoch < cfg.trainer.max_epochs:
            epoch = s.epoch
            self.loader.set_epoch(epoch)
            st.train()
            epoch_terms, window_terms, step_terms = _Running(), _Running(), _Running()
            window_losses: list[torch.Tensor] = []
            window_keys: list[list[str]] = []
            skip = s.batches_in_epoch
            t_window = t_epoch = time.perf_counter()
            steps_in_window = steps_in_epoch = 0
            for i, batch in enumerate(self.loader):
                if i >= self.used_micro:
                    break
                if i < skip:  # data position of a mid-epoch checkpoint
                    continue
                boundary = (i + 1) % self.accum == 0
                batch = move_to_device(batch, self.device)
                if st.compiled and compile_t0 is None:
                    compile_t0 = time.perf_counter()
                if self.fallback_batch is None:
                    self.fallback_batch = batch
                out, loss, terms = st.forward(batch)
                loss = faults.maybe_nan(loss, s.global_step + 1)
                st.backward(loss, boundary)  # a NaN only reaches gradients that are never applied (below)
                step_terms.add(terms)
                window_losses.append(loss.detach())
                window_keys.append(list(batch["sample_key"]))
                if not boundary:
                    continue
                check_finite_window(window_losses, window_keys, step=s.global_step + 1, epoch=epoch,
                                    device=self.device)
                window_losses, window_keys = [], []
                epoch_terms.merge(step_terms)
                window_terms.merge(step_terms)
                step_terms = _Running()
                grad_norm = st.step()
                s.global_step += 1
                s.batches_in_epoch = i + 1
                steps_in_window += 1
                steps_in_epoch += 1
                if compile_t0 is not None and compile_t0 > 0:
                    self._report_compile_time(compile_t0)
                    compile_t0 = -1.0  # once per run (a restarted group compiles again and reports again)
                    t_window, steps_in_window = time.perf_counter(), 0  # the window's rate excludes compilation
                if s.global_step % cfg.trainer.log_every_n_steps == 0 or s.batches_in_epoch == self.used_micro:
                    dt = time.perf_counter() - t_window
                    logm = {**window_terms.global_means(self.device), "train/lr": st.lr(), "train/epoch": epoch,
                            "train/world_size": self.world, **self.loader.stats.as_dict()}
                    if steps_in_window:  # none right after the compiled first step
                        logm.update({"train/samples_per_s": steps_in_window * samples_per_step / max(dt, 1e-9),
                                     "train/step_time_s": dt / steps_in_window})
                    if grad_norm is not None:
                        logm["train/grad_norm"] = float(grad_norm)
                    if self.rank == 0:
                        self._say(f"epoch {epoch} step {s.global_step}: " + _fmt(
                            logm, ["train/total", "train/task_ce", "train/lr", "train/samples_per_s"]))
                        if self.tracker is not None:
                            self.tracker.log_metrics(logm, step=s.global_step)
                    window_terms, t_window, steps_in_window = _Running(), time.perf_counter(), 0
                faults.maybe_kill(self.rank, s.global_step)
                faults.maybe_hold(self.rank, s.global_step, self.run_name)
                if every and s.global_step % every == 0 and s.batches_in_epoch < self.used_micro:
                    self._save_and_report("step", {"epoch": epoch, "global_step": s.global_step,
                                                   **epoch_terms.global_means(self.device)}, None, improved=False)
            elapsed = time.perf_counter() - t_epoch
            speed = {"train/samples_per_s_epoch": steps_in_epoch * samples_per_step / max(elapsed, 1e-9),
                     "train/step_time_s_epoch": elapsed / max(steps_in_epoch, 1)}
            stop = self._end_epoch(epoch, epoch_terms, speed)
            if stop:
                break
        if self.tracker is not None and self.rank == 0:
            self.tracker.stop_system_metrics()
            self.tracker.flush()
        return {"best_value": s.best_value, "best_epoch": s.best_epoch, "epochs_completed": s.epoch,
                "global_step": s.global_step, "history": s.history}

    def _report_compile_time(self, t0: float) -> None:
        """Print and log (MLflow metric ``compile_time_s``) the first optimizer step of a compiled run, from
        ``t0`` (its first micro batch): compilation of forward + loss + backward and one step (the host sync
        it costs is a one-off)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - t0
        if self.rank == 0:
            self._say(f"torch.compile ({self.cfg.model.compile_backend}): compile + first optimizer step "
                      f"{seconds:.1f} s (excluded from samples/s)")
            if self.tracker is not None:
                self.tracker.log_metrics({"compile_time_s": seconds}, step=self.state.global_step)

    def _epoch_io(self) -> dict[str, float]:
        """The epoch's storage and shard-cache counts of the training and validation loaders, summed over
        every rank (collective: all ranks call it together).  Each loader has them from its worker
        processes (``LoaderStats.io``); MLflow gets ``data/epoch_storage_retries`` (transient storage
        failures retried), ``data/epoch_storage_requests``, ``data/epoch_storage_mb_read``,
        ``data/epoch_cache_hits`` and ``data/epoch_cache_misses``."""
        keys = ("storage_retries", "storage_requests", "storage_bytes_read", "cache_hits", "cache_misses")
        values = [float(self.loader.stats.io.get(k, 0) + self.val_loader.stats.io.get(k, 0)) for k in keys]
        if _dist_world() > 1:
            import torch.distributed as dist

            t = torch.tensor(values, dtype=torch.float64, device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            values = t.tolist()
        out = {f"data/epoch_{k}": v for k, v in zip(keys, values)}
        out["data/epoch_storage_mb_read"] = out.pop("data/epoch_storage_bytes_read") / 2**20
        return out

    def _end_epoch(self, epoch: int, epoch_terms: _Running, speed: dict[str, float]) -> bool:
        cfg, s = self.cfg, self.state
        train_means = epoch_terms.global_means(self.device)
        val = self.validate()
        io = self._epoch_io()
        improved, stop, metrics = False, False, {}
        if self.rank == 0:
            value = float(val.metrics.get(cfg.monitor, math.nan))
            if s.best_value is None or (not math.isnan(value) and (math.isnan(s.best_value) or value > s.best_value)):
                improved = True
                s.best_value, s.best_epoch, s.bad_epochs = value, epoch, 0
            else:
                s.bad_epochs += 1
            stop = s.bad_epochs >= cfg.trainer.patience
            metrics = {"epoch": epoch, "global_step": s.global_step, "lr": self.strategy.lr(),
                       **train_means, **speed, **io, **{f"val/{k}": float(v) for k, v in val.metrics.items()},
                       "val/monitor": value, "best/value": float(s.best_value), "best/epoch": s.best_epoch}
            s.history.append({k: metrics[k] for k in ("epoch", "global_step", "lr", "train/total", "val/loss",
                                                      f"val/{cfg.monitor}") if k in metrics})
            self._say(f"epoch {epoch} done: " + _fmt(metrics, ["train/total", "val/loss", f"val/{cfg.monitor}"])
                      + (" (best)" if improved else f" ({s.bad_epochs} epoch(s) without improvement)")
                      + (" -> early stop" if stop else ""))
            if self.tracker is not None:
                self.tracker.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))},
                                         step=s.global_step)
        improved, stop, s.best_value, s.best_epoch, s.bad_epochs, s.history = _broadcast(
            (improved, stop, s.best_value, s.best_epoch, s.bad_epochs, s.history))
        s.epoch, s.batches_in_epoch = epoch + 1, 0
        self._save_and_report("epoch", metrics, val, improved)
        return stop


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train entry point (``TorchTrainer(train_loop_per_worker, train_loop_config=...)``).

    A user error on this rank leaves with its rank and full trace attached and a one-frame
    traceback (``dipro.train.failures``): the driver prints one line, the run log keeps the trace.
    """
    if config.get("faults"):
        os.environ[faults.ENV] = config["faults"]
    try:
        return Worker(config).run()
    except UserError as exc:
        import ray.train

        raise failures.mark_rank_error(exc, ray.train.get_context().get_world_rank()).with_traceback(None) from None
