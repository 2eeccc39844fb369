"""Errors raised on a Ray Train rank, as the driver reports them.

A :class:`~data_sharding.errors.UserError` raised inside a worker (shards that do not
fit the model, a corrupt sample past ``data.max_corrupt_fraction``, a full disk while
checkpointing) reaches ``trainer.fit()`` wrapped in Ray Train's ``WorkerGroupError``
with a long traceback.  The worker (:func:`mark_rank_error`, called by
``dipro.train.loop.train_loop_per_worker``) attaches its rank and full trace to the
exception and re-raises it with a one-frame traceback, so the worker logs stay short;
the driver (:func:`rank_error`) finds it, writes the traces to the run's log and
raises the same one line as any user error, ``... (rank N)``: the CLI prints it and
exits 2.

A user error is not worth a retry: the same shards, config or disk fail the same way on
the next attempt.  Ray Train's failure policy retries every worker-group error up to
``trainer.max_failures`` times and cannot be replaced, so :class:`StopOnUserError`, a
controller callback, ends the run when the controller is about to restart a group that
failed with a user error: Ray Train does not retry an error raised by a controller
callback, and the driver (:func:`rank_error`) finds the rank's error inside it.
"""
from __future__ import annotations

import re
import traceback
from dataclasses import dataclass, field

from ray.train.v2._internal.execution.callback import ControllerCallback

from data_sharding.errors import UserError, one_line

TRACE_ATTR = "dipro_trace"
RANK_ATTR = "dipro_rank"


def mark_rank_error(exc: UserError, rank: int) -> UserError:
    """Attach ``rank`` and the current full trace to ``exc`` (they travel with it when Ray pickles it)."""
    setattr(exc, TRACE_ATTR, traceback.format_exc())
    setattr(exc, RANK_ATTR, rank)
    return exc


@dataclass
class RankError:
    """The first (lowest-rank) user error behind a failed worker group."""

    rank: int
    message: str
    traces: dict[int, str] = field(default_factory=dict)
    """rank -> full trace, for every rank that raised a user error."""

    def one_line(self) -> str:
        return f"{first_line(self.message)} (rank {self.rank})"


def first_line(message: str) -> str:
    """The user-facing line of an error message (:func:`data_sharding.errors.one_line`: an error from a
    DataLoader worker process, re-raised by torch with the worker's traceback, gives its own message)."""
    return one_line(message)


def _unwrap(err: BaseException) -> BaseException:
    """Ray keeps the worker's exception itself, or wraps it (``UserExceptionWithTraceback``, ``RayTaskError``)."""
    for attr in ("_base_exc", "cause"):
        inner = getattr(err, attr, None)
        if isinstance(inner, BaseException):
            return _unwrap(inner)
    return err


def rank_error(exc: BaseException) -> RankError | None:
    """The user error a rank raised behind ``trainer.fit()``'s exception, or None (a crash, a bug)."""
    stopped = getattr(exc, "controller_failure", None)
    if isinstance(stopped, UserErrorOnRank):  # StopOnUserError ended the run before a retry
        return stopped.found
    failures = getattr(exc, "worker_failures", None) or {}
    found: RankError | None = None
    for rank, err in sorted(failures.items()):
        base = _unwrap(err)
        if not isinstance(base, UserError):
            continue
        trace = getattr(base, TRACE_ATTR, None) or "".join(traceback.format_exception(base))
        if found is None:
            found = RankError(int(getattr(base, RANK_ATTR, rank)), str(base))
        found.traces[int(rank)] = trace
    return found


class UserErrorOnRank(Exception):
    """Raised by :class:`StopOnUserError` in the Train controller: carries the rank's user error."""

    def __init__(self, found: RankError) -> None:
        super().__init__(found.one_line())
        self.found = found

    def __reduce__(self):
        return (self.__class__, (self.found,))


class StopOnUserError(ControllerCallback):
    """Controller callback: a worker group that failed with a user error is not restarted; the run ends.

    The controller enters ``RestartingState`` (or ``ReschedulingState``) with the group's
    error before it starts a new group; this callback raises there, and Ray Train ends
    the run with that error (:class:`UserErrorOnRank`) instead of spending
    ``trainer.max_failures`` on a retry that fails the same way.  Crashes, lost nodes and
    preemptions keep their retries.
    """

    def after_controller_state_update(self, previous_state, current_state) -> None:
        if type(current_state).__name__ not in ("RestartingState", "ReschedulingState"):
            return
        found = rank_error(getattr(current_state, "training_failed_error", None))
        if found is not None:
            raise UserErrorOnRank(found)


_SAMPLE_KEY = re.compile(r"\bs\d+_\d+\b")


def failure_tags(summary: str, failure: RankError | None) -> dict[str, str]:
    """MLflow tags of a failed run: the one-line reason (and the rank).

    Sample keys (``s{stay_id}_{row}``) are replaced by ``s<stay>_<row>``: a tracking
    server may be shared, and stay ids identify MIMIC records; the run's log keeps them.
    """
    tags = {"failure.reason": _SAMPLE_KEY.sub("s<stay>_<row>", summary)[:5000]}
    if failure is not None:
        tags["failure.rank"] = str(failure.rank)
    return tags
