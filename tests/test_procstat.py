"""data_sharding.procstat: a process's peak RSS is its own, not its parent's."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from data_sharding.procstat import peak_rss_mb

ROOT = Path(__file__).resolve().parents[1]
CHILD = ("import json, resource; from data_sharding.procstat import peak_rss_mb; "
         "print(json.dumps([peak_rss_mb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024]))")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_a_child_reports_its_own_peak_not_the_parents():
    ballast = bytearray(600 << 20)  # 600 MiB, every page touched: the parent's RSS is at least that
    ballast[::4096] = b"\x01" * len(ballast[::4096])
    assert peak_rss_mb() >= 600
    out = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    own, rusage = json.loads(out.stdout)
    del ballast
    assert own < 300, own  # an interpreter and numpy-free imports: tens of MiB
    # what getrusage says in the same child (Linux carries ru_maxrss across exec from the forked parent)
    print(f"child peak: VmHWM {own:.0f} MiB, ru_maxrss {rusage:.0f} MiB")
