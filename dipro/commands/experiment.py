"""``dipro experiment``: one training + test evaluation per seed; the paper's mean ± std table.

Only argparse and the dependency-free defaults at module level; the training stack is
imported by the handler.
"""
from __future__ import annotations

import argparse

from dipro import defaults
from dipro.commands._args import add_config_args, positive_int

_SEEDS = ",".join(str(s) for s in defaults.PAPER_SEEDS)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("experiment", help="train and test once per seed; mean ± std table",
                              description="One `dipro train` + test evaluation per seed (concurrently: a one-arm "
                                          "dipro sweep); prints the paper's mean ± std table and the 95% bootstrap "
                                          "intervals per seed and pooled over seeds. With tracking: an MLflow parent "
                                          "run, one child per seed.")
    add_config_args(p)
    p.add_argument("--seeds", default=_SEEDS, help=f"comma-separated seeds (default: the paper's {_SEEDS})")
    p.add_argument("--out", metavar="DIR", default=None, help="write experiment.json / experiment.txt here (a directory or an s3:// / gs:// prefix)")
    p.add_argument("--max-concurrent", type=positive_int, default=None, metavar="N",
                   help="seeds trained at once (default: what the cluster can place; it is a one-arm dipro sweep)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dipro.config import load_config
    from dipro.train.experiment import parse_seeds, run_experiment

    seeds = parse_seeds(args.seeds)
    cfg = load_config(args.config, args.overrides)
    result = run_experiment(cfg, seeds, out_dir=args.out, max_concurrent=args.max_concurrent)
    print(result.table)
    print(f"experiment {result.name}: continue it after an interruption with dipro sweep --resume {result.name}")
    return 0
