"""``dipro shard``: write WebDataset shards from a processed dir.

Only argparse/stdlib at module level; the work lives in ``data_sharding.shard_writer``.
"""
from __future__ import annotations

import argparse

from dipro.commands._args import add_lock_timeout, add_shard_settings, positive_int, print_shard_counts


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "shard", help="write WebDataset shards (region crops, EHR windows, labels) from a processed dir",
        description="One sample per task row; shards S/{disease_progression|mortality_los}/{split}-NNNNNN.tar, "
                    "bounded by sample count and bytes, plus S/manifest.parquet. Same inputs and settings -> "
                    "byte-identical shards.")
    p.add_argument("--processed", required=True, metavar="DIR", help="output of `dipro prepare`")
    p.add_argument("--out", required=True, metavar="DIR", help="shard root to write")
    add_shard_settings(p, defaults=True)
    p.add_argument("--workers", type=positive_int, default=None, metavar="N",
                   help="parallel processes, each taking about 1/N of the films (default: all CPU cores; "
                        "1 = in this process)")
    add_lock_timeout(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from data_sharding.manifest import ShardSettings
    from data_sharding.shard_writer import build_shards

    settings = ShardSettings(crop_size=args.crop_size, max_samples_per_shard=args.max_samples_per_shard,
                             max_shard_bytes=args.max_shard_bytes, resample=args.crop_resample)
    report = build_shards(args.processed, args.out, args.task, settings, workers=args.workers,
                          progress=True, lock_timeout=args.lock_timeout)
    print(report.manifest.summary_table())
    print(report.worker_table())
    print(report.summary() + f"; {report.cache_status}")
    print_shard_counts(report.manifest.records, report.film_counts)
    print(f"wrote {args.out}/manifest.parquet")
    return 0
