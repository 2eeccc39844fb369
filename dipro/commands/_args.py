"""Argument types and argument groups that several command parsers share (not a command itself).

Standard library and the dependency-free defaults modules only: every parser imports this.
"""
from __future__ import annotations

import argparse
import re

from data_sharding import defaults as data_defaults
from data_sharding.constants import TASK_TO_SHARD_DIR

_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20,
          "g": 2**30, "gb": 2**30, "gib": 2**30}
SHARD_TASK_CHOICES = ("all", *dict.fromkeys(TASK_TO_SHARD_DIR.values()))
"""``--task`` of ``dipro shard`` / ``shards regenerate``: every shard series, or one."""


def parse_bytes(text: str) -> int:
    """``"512M"``, ``"1GiB"``, ``"1048576"`` -> bytes (binary units)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (examples: 512M, 1GiB, 1048576)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_bytes(n: int) -> str:
    """The shortest exact binary-unit spelling: 536870912 -> ``512M``."""
    for unit in ("G", "M", "K"):
        size = _UNITS[unit.lower()]
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 1")
    return value


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
    return value


_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(text: str) -> float:
    """``"90"``, ``"30m"``, ``"12h"``, ``"7d"`` -> seconds (>= 0)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (examples: 3600, 30m, 12h, 7d)")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


def add_shard_settings(p: argparse.ArgumentParser, defaults: bool) -> None:
    """Settings that change shard bytes; ``defaults=False``: absent means "as the existing shards were built"."""
    d = data_defaults
    keep = " (default: as the existing shards were built)"

    def default(value, shown: str):
        return (value, f" (default: {shown})") if defaults else (None, keep)

    value, note = default(d.CROP_SIZE, f"{d.CROP_SIZE}, the paper's")
    p.add_argument("--crop-size", type=positive_int, default=value, metavar="PIXELS",
                   help="side of the square grayscale region crops" + note)
    value, note = default(d.MAX_SAMPLES_PER_SHARD, str(d.MAX_SAMPLES_PER_SHARD))
    p.add_argument("--max-samples-per-shard", type=positive_int, default=value, metavar="N",
                   help="at most N samples per shard" + note)
    value, note = default(d.MAX_SHARD_BYTES, format_bytes(d.MAX_SHARD_BYTES))
    p.add_argument("--max-shard-bytes", type=parse_bytes, default=value, metavar="SIZE",
                   help="at most SIZE bytes per shard, e.g. 512M, 1G" + note)
    value, note = default(d.RESAMPLE_MODES[0], d.RESAMPLE_MODES[0])
    p.add_argument("--crop-resample", choices=d.RESAMPLE_MODES, default=value,
                   help="crop resampling: bilinear (antialiased), nearest (the authors' crops; docs/FIDELITY.md), "
                        f"or bilinear-fast (an approximation of bilinear through PIL's reducing_gap "
                        f"{d.FAST_REDUCING_GAP:g}: faster, error in README 'Benchmarks')" + note)
    p.add_argument("--task", choices=SHARD_TASK_CHOICES, default="all",
                   help="which shard series to build (default: every task table in the processed dir)")


def add_lock_timeout(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lock-timeout", type=seconds, default=0.0, metavar="SECONDS",
                   help="when another job is writing --out, wait up to SECONDS for it to finish "
                        "(default 0: refuse at once, naming the other job)")


def add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    """``--config FILE`` and ``key=value`` overrides of a training config."""
    p.add_argument("--config", required=required, metavar="FILE",
                   help="run config YAML (configs/*.yaml)" + ("" if required else "; required unless --resume"))
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. trainer.num_workers=2 trainer.strategy=deepspeed")


def print_shard_counts(records, film_counts=None) -> None:
    """The skipped/missing counts of a set of shards: reported, never silently dropped.

    ``records``' counts are per sample (a film's anomaly once for every sample that uses it);
    ``film_counts`` (a build's) once per film read.
    """
    from data_sharding.build_run import counts_lines
    from data_sharding.shard_writer import total_counts

    for line in counts_lines(film_counts, total_counts(records)):
        print(line)


class _IntermixedParser(argparse.ArgumentParser):
    """A parser whose positionals may sit on both sides of its options (``CKPT --task T key=value``):
    plain argparse gives the first run of positionals to every positional argument at once and calls
    the later ones unrecognized. Parsing goes through ``parse_known_intermixed_args``, which itself
    calls ``parse_known_args`` (hence the guard)."""

    _intermixing = False

    def parse_known_args(self, args=None, namespace=None):
        if self._intermixing:
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


def allow_intermixed_positionals(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Let ``p`` (a sub-command parser) take positionals before and after its options."""
    p.__class__ = _IntermixedParser
    return p
