"""One way to reach Ray for every job, and one place that decides where Ray's output goes.

:func:`init_ray`: under ``ray job submit`` the job's environment carries ``RAY_ADDRESS``
and ``ray.init(address=...)`` joins that cluster (its token auth comes from the same
environment: ``RAY_AUTH_MODE`` / ``RAY_AUTH_TOKEN``).  Otherwise a local Ray starts,
asked for the loopback address (``_node_ip_address="127.0.0.1"``) and without the dashboard.
Ray 2.60 still advertises the machine's own address and its GCS and raylet listen on every
interface whatever it is told (README, Tests: what listens where); token auth guards them.  Every job (``dipro train``, ``dipro predict``, ``dipro shards
regenerate``) starts Ray through it.

:func:`loggers_to_file` and :func:`worker_lines_to`: while a job runs, what Ray prints
(its own driver-side log records such as the token-auth notice, and every line its
workers and actors write, which Ray forwards to the driver: DeepSpeed's and torch's
warnings, Ray Train's controller chatter) goes to the job's log file instead of the
terminal; only the lines the job chooses (its own progress) are also printed::

    with loggers_to_file(log_path, ("ray",)):     # before init: catches start-up notices
        started = init_ray(log_to_driver=True)
        try:
            with worker_lines_to(write, show):      # after init: replaces Ray's printer
                ...
        finally:
            if started:
                ray.shutdown()
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

_HANDLER_NAME = "dipro_log_file"
_RAY_PRINT_HANDLER = "ray_print_logs"  # ray._private.worker: the handler that prints worker lines


def init_ray(address: str | None = None, num_cpus: int | None = None, **kwargs: Any) -> bool:
    """Initialise Ray once; returns True when this call started it (the caller then shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            **kwargs,
        )
    return True


@contextlib.contextmanager
def loggers_to_file(path: str | Path, names: tuple[str, ...]) -> Iterator[None]:
    """While inside, the Python loggers ``names`` (and their children) write to ``path`` only.

    Their own handlers and ``propagate`` are restored on exit; warnings shown meanwhile
    (``warnings.warn``) go to the file too.  Blocks nest: the inner file wins while inside.
    """
    import warnings

    handler = logging.FileHandler(path, encoding="utf-8", delay=True)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S"))
    saved = []
    for name in names:
        logger = logging.getLogger(name)
        saved.append((logger, logger.handlers[:], logger.propagate))
        logger.handlers = [handler]
        logger.propagate = False

    def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
        text = warnings.formatwarning(message, category, filename, lineno, line).rstrip()
        handler.handle(logging.makeLogRecord({"name": "py.warnings", "levelno": logging.WARNING,
                                              "levelname": "WARNING", "msg": text}))

    previous_show = warnings.showwarning  # restored as found: these blocks nest (demo -> training run)
    warnings.showwarning = show_warning
    try:
        yield
    finally:
        warnings.showwarning = previous_show
        for logger, handlers, propagate in saved:
            logger.handlers, logger.propagate = handlers, propagate
        handler.close()


@contextlib.contextmanager
def worker_lines_to(write: Callable[[str], None], show: Callable[[str], bool] = lambda line: False,
                    ) -> Iterator[None]:
    """While inside, every line Ray forwards from workers and actors goes to ``write`` (with its
    ``(Name pid=N)`` prefix) instead of the terminal; lines ``show`` accepts are also printed as they are.

    Enter after ``ray.init(log_to_driver=True)`` (Ray's default; ``ray.init`` installs Ray's
    printer, which this replaces); with ``log_to_driver=False`` Ray forwards nothing and this
    changes nothing.  Leave before ``ray.shutdown()``.
    """
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    def handle(data: dict) -> None:
        who = data.get("actor_name") or data.get("task_name") or "worker"
        prefix = f"({who} pid={data.get('pid')}{', stderr' if data.get('is_err') else ''})"
        for line in data.get("lines") or ():
            write(f"{prefix} {line}")
            if show(line):
                print(line, file=sys.stdout, flush=True)

    printers = [pair for pair in dispatcher.handlers if pair[0] == _RAY_PRINT_HANDLER]
    dispatcher.remove_handler(_RAY_PRINT_HANDLER)
    dispatcher.add_handler(_HANDLER_NAME, handle)
    try:
        yield
    finally:
        dispatcher.remove_handler(_HANDLER_NAME)
        import ray

        # Put Ray's printer back only while Ray runs and lacks it: ray.shutdown() removes it and the
        # next ray.init() adds a new one, and two printers would print every worker line twice.
        if ray.is_initialized() and not any(name == _RAY_PRINT_HANDLER for name, _ in dispatcher.handlers):
            for name, printer in printers:
                dispatcher.add_handler(name, printer)
