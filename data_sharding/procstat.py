"""This process's peak resident memory, as the build reports and the benchmarks print it.

Linux ``VmHWM`` (``/proc/self/status``) is the high-water mark of the process's own memory and
starts afresh at ``exec``.  ``getrusage().ru_maxrss`` does not: Linux carries it across ``exec``
from the process that forked the child, so a worker spawned by a driver holding 400 MiB of
tables, or a benchmark child started by a driver that had just generated a cohort, reported the
parent's peak as its own.  ``ru_maxrss`` is only the fallback where there is no ``/proc``
(kilobytes on Linux, bytes on macOS).
"""
from __future__ import annotations

import resource
import sys


def peak_rss_mb() -> float:
    """Peak RSS of this process in MiB."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024.0
