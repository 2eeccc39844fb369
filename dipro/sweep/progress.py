"""What the sweep's terminal shows while Tune runs: one line per trial start and end, and a progress bar.

Tune's own progress table is off (``verbose=0``); every trial's training lines go to the sweep's
log (``sweep.log``) and the trial's ``train.log``, so concurrent trials do not interleave on the terminal.
"""
from __future__ import annotations

from typing import Any, Callable

from ray import tune

from data_sharding.storage import Location

from dipro.sweep import record as rec


class SweepProgress(tune.Callback):
    """Tune callback in the sweep driver: ``say`` a line when a trial starts or ends (read from its record)."""

    def __init__(self, root: Location, trials: dict[str, Any], say: Callable[[str], None]) -> None:
        self.root, self.trials, self.say = root, trials, say
        self.running: set[str] = set()
        self.done = 0
        self._bar = None

    def _key(self, trial) -> str:
        return trial.config.get("trial", trial.trial_id)

    def _progress(self):
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=len(self.trials), desc="sweep", unit="trial", leave=False)
        return self._bar

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        key = self._key(trial)
        self.running.add(key)
        t = self.trials.get(key)
        queued = len(self.trials) - self.done - len(self.running)
        self.say(f"trial {key} started ({t.arm.label if t else '?'}, seed {t.seed if t else '?'}): "
                 f"{len(self.running)} running, {queued} queued")
        self._progress()

    def _ended(self, trial, crashed: str | None = None) -> None:
        key = self._key(trial)
        self.running.discard(key)
        self.done += 1
        r = rec.read_record(self.root, key)
        if crashed is not None or r is None or r.status == rec.RUNNING:
            self.say(f"trial {key} ended without a record of its outcome ({crashed or 'no record'}); "
                     "--resume runs it again")
        elif r.status == rec.FAILED:
            self.say(f"trial {key} FAILED: {r.reason}")
        else:
            test = " ".join(f"{k}={v:.4f}" for k, v in r.metrics.items()
                            if k.startswith("test/") and "/" not in k[5:] and v == v)
            self.say(f"trial {key} finished in {r.ended - r.started:.0f} s: {test}")
        self._progress().update(1)
        if self.done == len(self.trials):
            self._bar.close()

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self._ended(trial)

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._ended(trial, crashed="the trial process raised or died")
