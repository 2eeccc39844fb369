"""Running a planned shard build on workers, and what the build reports.

:func:`build_planned` cuts the planned shards into balanced units
(:func:`data_sharding.build_plan.plan_units`), runs the units (:func:`build_units.run_unit`),
then joins the shards written in parts (:func:`build_units.join_parts`), on a *runner*:

* :class:`InlineRunner`: in this process (``dipro shard --workers 1``);
* :class:`ProcessRunner`: a pool of spawned processes (``dipro shard --workers N``); the
  films-read progress bar is fed live by the workers through a queue;
* ``regenerate.RayRunner``: Ray tasks (``dipro shards regenerate``).

Every shard is left under its temp name for the caller's commit
(:func:`data_sharding.shard_writer.commit_shards`), or on a bucket under its generation's object
name (:func:`data_sharding.shard_writer.commit_objects`).  :class:`BuildReport` says what each worker
did (films, samples, bytes, seconds, peak RSS), how many films were read (each once), and the
anomalies once per film; the per-sample counts are in the manifest rows.
"""
from __future__ import annotations

import queue as queue_mod
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from data_sharding.manifest import Manifest, ShardRecord, ShardSettings


@dataclass
class WorkerStat:
    """One worker process's share of a build (the units it ran, summed)."""

    worker: int
    pid: int
    units: int = 0
    films: int = 0
    samples: int = 0
    bytes: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    peak_rss_mb: float = 0.0


@dataclass
class BuildReport:
    """What a build (``dipro shard``, or the rebuild step of a regeneration) did."""

    records: list[ShardRecord] = field(default_factory=list)
    """The shards built (under their temp names until committed)."""
    manifest: Manifest = field(default_factory=Manifest)
    """The manifest committed (set by the caller)."""
    workers: list[WorkerStat] = field(default_factory=list)
    films_read: int = 0
    """Films read and decoded (each once: a film shared by series, pairs or shards is read once)."""
    film_counts: Counter = field(default_factory=Counter)
    """Anomalies once per film read (missing/invalid boxes, unreadable films, size mismatches)."""
    films: dict[str, tuple[Any, str]] = field(default_factory=dict)
    """image path -> (key, sha256) of every film read (for the fingerprint cache)."""
    joined: int = 0
    """Shards written in parts by several workers and joined."""
    seconds: float = 0.0
    cache_status: str = ""
    """What happened to the film fingerprint cache (saved with N films, or why not)."""

    def worker_table(self) -> str:
        head = f"{'worker':>6} {'pid':>8} {'films':>6} {'samples':>8} {'MiB':>9} {'seconds':>8} {'cpu s':>7} {'peak RSS MiB':>12}"
        lines = [head]
        for w in self.workers:
            lines.append(f"{w.worker:>6} {w.pid:>8} {w.films:>6} {w.samples:>8} {w.bytes / 2**20:>9.2f} "
                         f"{w.seconds:>8.2f} {w.cpu_seconds:>7.2f} {w.peak_rss_mb:>12.0f}")
        return "\n".join(lines)

    def summary(self) -> str:
        return (f"films read {self.films_read} (each once), {len(self.records)} shards built "
                f"({self.joined} joined from parts) in {self.seconds:.2f} s")


def counts_lines(film_counts: Counter | dict | None, sample_counts: Counter | dict) -> list[str]:
    """The anomaly lines of a report: once per film, once per sample that uses the film (reported, not dropped)."""
    lines = []
    if film_counts:
        lines.append("reported, not dropped, per film (each film once): "
                     + ", ".join(f"{k} {v}" for k, v in sorted(film_counts.items())))
    if sample_counts:
        lines.append("reported, not dropped, per sample (once per sample that uses the film): "
                     + ", ".join(f"{k} {v}" for k, v in sorted(sample_counts.items())))
    return lines


class InlineRunner:
    """Runs the jobs one after the other in this process."""

    workers = 1

    def __enter__(self) -> "InlineRunner":
        return self

    def __exit__(self, *exc) -> None:
        return None

    def map(self, fn: Callable, jobs: list[tuple], bar=None, weights: list[int] | None = None) -> list:
        from data_sharding import build_units

        build_units.set_progress(bar.update if bar is not None else None)
        try:
            return [fn(*job) for job in jobs]
        finally:
            build_units.set_progress(None)


class ProcessRunner:
    """A pool of ``workers`` spawned processes; a worker that dies raises ``BrokenProcessPool`` (no hang).

    When one job fails, the others stop at their next stay (a shared event), so the failure is
    reported after seconds, not after the other workers' whole share of the build.
    """

    def __init__(self, workers: int) -> None:
        self.workers = workers

    def __enter__(self) -> "ProcessRunner":
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        from data_sharding.build_units import _pool_initializer

        ctx = mp.get_context("spawn")
        self._queue, self._stop = ctx.Queue(), ctx.Event()
        self._pool = ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_pool_initializer,
                                         initargs=(self._queue, self._stop))
        return self

    def __exit__(self, *exc) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)  # running jobs finish: their temp files can go
        self._queue.close()

    def _drain(self, bar) -> None:
        while True:
            try:
                n = self._queue.get_nowait()
            except (queue_mod.Empty, OSError, ValueError):
                return
            if bar is not None:
                bar.update(n)

    def map(self, fn: Callable, jobs: list[tuple], bar=None, weights: list[int] | None = None) -> list:
        from concurrent.futures import FIRST_EXCEPTION, wait

        futures = [self._pool.submit(fn, *job) for job in jobs]
        try:
            pending = set(futures)
            while pending:
                done, pending = wait(pending, timeout=0.2, return_when=FIRST_EXCEPTION)
                self._drain(bar)
                for f in done:
                    f.result()  # raise the first failure here
            self._drain(bar)
            return [f.result() for f in futures]
        except BaseException:
            self._stop.set()
            for f in futures:
                f.cancel()
            raise


def build_planned(processed, out, plans: list, settings: dict[str, ShardSettings], workers: int,
                  make_runner: Callable[[int], Any], progress: bool, desc: str = "dipro shard",
                  generation: str | None = None) -> BuildReport:
    """Build ``plans`` (shards under temp names in ``out``; with a ``generation``, a bucket: straight to
    that generation's objects) in at most ``workers`` units on ``make_runner(units)`` (a runner
    context: :class:`InlineRunner`, :class:`ProcessRunner` ...)."""
    from tqdm import tqdm

    from data_sharding.build_plan import plan_units
    from data_sharding.build_units import join_parts, run_unit
    from data_sharding.samples import open_processed

    t0 = time.perf_counter()
    view = open_processed(processed)
    units = plan_units(view, plans, workers)
    report = BuildReport()
    with make_runner(len(units)) as runner, \
            tqdm(total=sum(u.films for u in units), unit="film", desc=desc, disable=not progress) as bar:
        results = runner.map(run_unit, [(str(processed), u, settings, str(out), generation) for u in units], bar,
                             [u.films for u in units])
        parts: dict[str, list] = {}
        for r in results:
            for p in r.parts:
                parts.setdefault(p.path, []).append(p)
        by_path = {p.path: p for p in plans}
        joins = [(str(processed), by_path[path], settings[by_path[path].task], str(out), ps, generation)
                 for path, ps in sorted(parts.items())]
        joined = runner.map(join_parts, joins, None, [1] * len(joins)) if joins else []
    report.records = [rec for r in results for rec in r.records] + list(joined)
    report.joined = len(joined)
    stats: dict[int, WorkerStat] = {}
    for r in results:
        w = stats.setdefault(r.pid, WorkerStat(len(stats), r.pid))
        w.units += 1
        w.films += r.films_read
        w.samples += r.samples
        w.bytes += r.bytes
        w.seconds += r.seconds
        w.cpu_seconds += r.cpu_seconds
        w.peak_rss_mb = max(w.peak_rss_mb, r.peak_rss_mb)
        report.films_read += r.films_read
        report.film_counts.update(r.film_counts)
        report.films.update(r.films)
    report.workers = list(stats.values())
    report.seconds = time.perf_counter() - t0
    return report

