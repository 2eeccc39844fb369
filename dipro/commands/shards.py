"""``dipro shard`` (write shards) and ``dipro shards verify|regenerate``.

Only argparse/stdlib at module level; the work lives in ``data_sharding``.
"""
from __future__ import annotations

import argparse
import re
import sys

_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20,
          "g": 2**30, "gb": 2**30, "gib": 2**30}
_TASK_CHOICES = ("all", "disease_progression", "mortality_los")


def parse_bytes(text: str) -> int:
    """``"512M"``, ``"1GiB"``, ``"1048576"`` -> bytes (binary units)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (examples: 512M, 1GiB, 1048576)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 1")
    return value


def _add_settings(p: argparse.ArgumentParser, defaults: bool) -> None:
    keep = " (default: as the existing shards were built)"
    p.add_argument("--crop-size", type=_positive_int, default=224 if defaults else None, metavar="PIXELS",
                   help="side of the square grayscale region crops" + (" (default: 224, the paper's)"
                                                                      if defaults else keep))
    p.add_argument("--max-samples-per-shard", type=_positive_int, default=1000 if defaults else None, metavar="N",
                   help="at most N samples per shard" + (" (default: 1000)" if defaults else keep))
    p.add_argument("--max-shard-bytes", type=parse_bytes, default=parse_bytes("512M") if defaults else None,
                   metavar="SIZE", help="at most SIZE bytes per shard, e.g. 512M, 1G" + (" (default: 512M)"
                                                                                          if defaults else keep))
    p.add_argument("--crop-resample", choices=("bilinear", "nearest"), default="bilinear" if defaults else None,
                   help="crop resampling: bilinear (antialiased) or nearest (the authors' crops; docs/FIDELITY.md)"
                        + (" (default: bilinear)" if defaults else keep))
    p.add_argument("--task", choices=_TASK_CHOICES, default="all",
                   help="which shard series to build (default: every task table in the processed dir)")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
    return value


def _add_lock_timeout(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lock-timeout", type=_seconds, default=0.0, metavar="SECONDS",
                   help="when another job is writing --out, wait up to SECONDS for it to finish "
                        "(default 0: refuse at once, naming the other job)")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "shard", help="write WebDataset shards (region crops, EHR windows, labels) from a processed dir",
        description="One sample per task row; shards S/{disease_progression|mortality_los}/{split}-NNNNNN.tar, "
                    "bounded by sample count and bytes, plus S/manifest.parquet. Same inputs and settings -> "
                    "byte-identical shards.")
    p.add_argument("--processed", required=True, metavar="DIR", help="output of `dipro prepare`")
    p.add_argument("--out", required=True, metavar="DIR", help="shard root to write")
    _add_settings(p, defaults=True)
    p.add_argument("--workers", type=_positive_int, default=None, metavar="N",
                   help="parallel processes (default: all CPU cores)")
    _add_lock_timeout(p)
    p.set_defaults(func=_run_shard)

    s = subparsers.add_parser("shards", help="verify or incrementally regenerate a shard directory",
                              description="Check or update shards written by `dipro shard`.")
    sub = s.add_subparsers(dest="shards_command", metavar="SUBCOMMAND")
    sub.required = True
    v = sub.add_parser("verify", help="check every shard against the manifest and every sample's contents",
                       description="Presence, size and sha256 of every shard in manifest.parquet; every sample "
                                   "decoded and checked (shapes, dtypes, label ranges). Prints a table of "
                                   "problems and exits 1 when there is any.")
    v.add_argument("dir", metavar="DIR", help="shard root (holds manifest.parquet)")
    v.add_argument("--workers", type=_positive_int, default=1, metavar="N", help="parallel processes (default: 1)")
    v.set_defaults(func=_run_verify)

    r = sub.add_parser("regenerate", help="rebuild only shards whose inputs or settings changed (Ray tasks)",
                       description="Recompute input fingerprints, rebuild only the shards whose inputs or "
                                   "settings changed or that fail verification, as Ray tasks on the cluster "
                                   "given by --ray-address / RAY_ADDRESS (else a local Ray). Other shards keep "
                                   "their bytes and mtime; the manifest is replaced atomically at the end.")
    r.add_argument("--processed", required=True, metavar="DIR", help="output of `dipro prepare`")
    r.add_argument("--out", required=True, metavar="DIR", help="shard root to update")
    _add_settings(r, defaults=False)
    r.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="Ray cluster to run on (default: $RAY_ADDRESS, else start a local Ray)")
    r.add_argument("--workers", type=_positive_int, default=None, metavar="N",
                   help="CPUs of the local Ray when one is started (default: all cores)")
    _add_lock_timeout(r)
    r.set_defaults(func=_run_regenerate)


def _print_counts(records) -> None:
    from data_sharding.shard_writer import total_counts

    counts = total_counts(records)
    if counts:
        print("reported, not dropped: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))


def _run_shard(args: argparse.Namespace) -> int:
    from data_sharding.manifest import ShardSettings
    from data_sharding.shard_writer import write_shards

    settings = ShardSettings(crop_size=args.crop_size, max_samples_per_shard=args.max_samples_per_shard,
                             max_shard_bytes=args.max_shard_bytes, resample=args.crop_resample)
    manifest = write_shards(args.processed, args.out, args.task, settings, workers=args.workers,
                            progress=True, lock_timeout=args.lock_timeout)
    print(manifest.summary_table())
    _print_counts(manifest.records)
    print(f"wrote {args.out}/manifest.parquet")
    return 0


def _run_verify(args: argparse.Namespace) -> int:
    from data_sharding.manifest import read_manifest
    from data_sharding.verify import format_problems, verify_shards

    problems = verify_shards(args.dir, workers=args.workers, progress=True)
    manifest = read_manifest(args.dir)
    if problems:
        print(format_problems(problems))
        bad = len({p.shard for p in problems})
        print(f"{len(problems)} problem(s) in {bad} of {len(manifest.records)} shard(s)", file=sys.stderr)
        return 1
    total = sum(r.samples for r in manifest.records)
    print(f"ok: {len(manifest.records)} shards, {total} samples")
    return 0


def _run_regenerate(args: argparse.Namespace) -> int:
    from data_sharding.regenerate import regenerate

    overrides = {"crop_size": args.crop_size, "max_samples_per_shard": args.max_samples_per_shard,
                 "max_shard_bytes": args.max_shard_bytes, "resample": args.crop_resample}
    report = regenerate(args.processed, args.out, args.task, overrides, ray_address=args.ray_address,
                        num_cpus=args.workers, progress=True, lock_timeout=args.lock_timeout)
    print(report.table())
    print(report.manifest.summary_table())
    _print_counts(report.manifest.records)
    return 0
