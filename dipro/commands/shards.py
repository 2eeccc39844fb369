"""``dipro shards verify|regenerate``: check or incrementally update a shard directory.

Only argparse/stdlib at module level; the work lives in ``data_sharding``.
"""
from __future__ import annotations

import argparse
import sys

from data_sharding import defaults
from dipro.commands._args import add_lock_timeout, add_shard_settings, duration, positive_int, print_shard_counts


def register(subparsers: argparse._SubParsersAction) -> None:
    s = subparsers.add_parser("shards", help="verify or incrementally regenerate a shard directory",
                              description="Check or update shards written by `dipro shard`.")
    sub = s.add_subparsers(dest="shards_command", metavar="SUBCOMMAND")
    sub.required = True
    v = sub.add_parser("verify", help="check every shard against the manifest and every sample's contents",
                       description="Presence, size and sha256 of every shard in manifest.parquet; every sample "
                                   "decoded and checked (shapes, dtypes, label ranges). Prints a table of "
                                   "problems and exits 1 when there is any.")
    v.add_argument("dir", metavar="DIR", help="shard root (holds manifest.parquet)")
    v.add_argument("--workers", type=positive_int, default=1, metavar="N", help="parallel processes (default: 1)")
    v.set_defaults(func=_run_verify)

    r = sub.add_parser("regenerate", help="rebuild only shards whose inputs or settings changed (Ray tasks)",
                       description="Recompute input fingerprints, rebuild only the shards whose inputs or "
                                   "settings changed or that fail verification, as Ray tasks on the cluster "
                                   "given by --ray-address / RAY_ADDRESS (else a local Ray). Films are stat'ed, "
                                   "and re-read only when their size or mtime differs from the film fingerprint "
                                   "cache beside the manifest. Other shards keep their bytes and mtime; the "
                                   "manifest is replaced atomically at the end.")
    r.add_argument("--processed", required=True, metavar="DIR", help="output of `dipro prepare`")
    r.add_argument("--out", required=True, metavar="DIR", help="shard root to update")
    add_shard_settings(r, defaults=False)
    r.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="Ray cluster to run on (default: $RAY_ADDRESS, else start a local Ray)")
    r.add_argument("--workers", type=positive_int, default=None, metavar="N",
                   help="CPUs of the local Ray when one is started (default: all cores)")
    r.add_argument("--rehash", action="store_true",
                   help="re-read and hash every film instead of trusting the film fingerprint cache "
                        "(S/film_fingerprints.parquet, keyed by path, size and mtime)")
    add_lock_timeout(r)
    r.set_defaults(func=_run_regenerate)

    g = sub.add_parser("gc", help="remove objects no commit refers to (superseded shard generations)",
                       description="On a bucket, commits never delete: shard objects a newer manifest no longer "
                                   "names, and superseded generations of a published directory (dipro prepare "
                                   "--out s3://...), stay readable for jobs that planned from them. This removes "
                                   "those older than --min-age (locally: temp files of interrupted builds).")
    g.add_argument("dir", metavar="DIR", help="shard root (manifest.parquet) or published directory (_published.json)")
    g.add_argument("--min-age", type=duration, default=defaults.GC_MIN_AGE_S, metavar="AGE",
                   help="keep what was written less than AGE ago (3600, 30m, 12h, 7d; default 7d: longer than a "
                        "job that could still be reading a superseded generation)")
    g.add_argument("--dry-run", action="store_true", help="list what would be removed, remove nothing")
    add_lock_timeout(g)
    g.set_defaults(func=_run_gc)


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
                        num_cpus=args.workers, progress=True, lock_timeout=args.lock_timeout, rehash=args.rehash)
    print(report.table())
    if report.build is not None:
        print(report.build.worker_table())
    print(report.manifest.summary_table())
    print_shard_counts(report.manifest.records, report.build.film_counts if report.build is not None else None)
    return 0


def _run_gc(args: argparse.Namespace) -> int:
    from data_sharding.gc import collect

    print(collect(args.dir, args.min_age, args.dry_run, args.lock_timeout).table())
    return 0
