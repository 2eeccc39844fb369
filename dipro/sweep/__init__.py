"""``dipro sweep``: a grid of full training runs x seeds, concurrently on Ray Tune, resumable, with statistics.

Modules: ``grid`` (``--grid`` / ``--seeds`` -> arms and trials, deterministic keys and run names),
``record`` (what the sweep keeps on the storage path: ``sweep.json``, one record per trial),
``trial`` (the Tune function trainable: one ``dipro train`` per trial), ``runs`` (the MLflow parent
and children, found again by tags), ``progress`` (the terminal), ``report`` (mean ± std, bootstrap
intervals, paired differences vs the baseline), ``driver`` (:func:`run_sweep`).
``dipro experiment`` is the one-arm case (:func:`dipro.train.experiment.run_experiment`).
"""
from __future__ import annotations


def run_sweep(*args, **kwargs):
    from dipro.sweep.driver import run_sweep as _run

    return _run(*args, **kwargs)


__all__ = ["run_sweep"]
