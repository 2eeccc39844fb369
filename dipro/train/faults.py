"""Test-only fault injection for the training loop, driven by one environment variable.

``DIPRO_FAULT_INJECT`` holds JSON, e.g.::

    {"kill_rank": 1, "kill_at_step": 3, "marker": "/tmp/killed"}   # SIGKILL rank 1 once after step 3
    {"nan_at_step": 2}                                              # make the loss of step 2 NaN
    {"hold_at_step": 3, "hold_file": "/tmp/held", "hold_s": 300}    # every rank waits after step 3, once
    {"hold_at_step": 2, "hold_file": "/tmp/held", "hold_per_run": true}  # once per rank of every run (sweeps)

``hold_at_step`` lets a test act on a run at a known point (kill a node while
training is in flight): each rank writes ``{hold_file}.rank{R}`` (with ``hold_per_run``:
``{hold_file}.{run_name}.rank{R}``, so the concurrent runs of a sweep each hold) and sleeps up to
``hold_s`` seconds (then carries on); a restarted worker group finds the files and
does not wait again.

``marker`` makes the kill happen once per marker file (a restarted worker group
finds the file and carries on).  Unset (the normal case) every hook is a no-op.
Ray forwards the variable to workers through the runtime environment set up by the
launcher (``env_vars``), so tests can set it in the driver's environment.
"""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import torch

ENV = "DIPRO_FAULT_INJECT"


def _spec() -> dict:
    raw = os.environ.get(ENV)
    return json.loads(raw) if raw else {}


def maybe_kill(rank: int, global_step: int) -> None:
    """SIGKILL this worker process if the spec names this rank and step (once per marker)."""
    spec = _spec()
    if not spec or spec.get("kill_rank") != rank or spec.get("kill_at_step") != global_step:
        return
    marker = spec.get("marker")
    if marker:
        m = Path(marker)
        if m.exists():
            return
        m.write_text(f"killed rank {rank} at step {global_step}\n")
    os.kill(os.getpid(), signal.SIGKILL)


def maybe_nan(loss: torch.Tensor, global_step: int) -> torch.Tensor:
    """Return a NaN loss when the spec asks for one at this optimizer step (0-based: the step being computed)."""
    spec = _spec()
    if spec and spec.get("nan_at_step") == global_step:
        return loss * float("nan")
    return loss


def maybe_hold(rank: int, global_step: int, run_name: str = "") -> None:
    """Wait here once per rank (and run, with ``hold_per_run``) if the spec asks to hold at this step."""
    spec = _spec()
    if not spec or spec.get("hold_at_step") != global_step:
        return
    per_run = f".{run_name}" if spec.get("hold_per_run") else ""
    mine = Path(f"{spec['hold_file']}{per_run}.rank{rank}")
    if mine.exists():
        return
    mine.write_text(f"rank {rank} held at step {global_step} (pid {os.getpid()})\n")
    time.sleep(float(spec.get("hold_s", 300)))
