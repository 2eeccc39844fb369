"""``dipro sweep``: a grid of training runs x seeds on Ray Tune; mean ± std, bootstrap intervals, paired differences.

Only argparse and the dependency-free defaults at module level; Ray, torch and MLflow are imported
by the handler.
"""
from __future__ import annotations

import argparse

from dipro import defaults
from dipro.commands._args import add_config_args, positive_int

_SEEDS = ",".join(str(s) for s in defaults.PAPER_SEEDS)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sweep", help="grid x seeds of full training runs, concurrently on Ray Tune; resumable",
        description="Train the cross product of every --grid KEY=V1,V2,... and --seeds, each trial a full Ray Train "
                    "run (its own worker group), --max-concurrent at a time, through Ray Tune. Prints the mean ± std "
                    "table over seeds, 95% bootstrap intervals per run and pooled over seeds, and the paired "
                    "difference of every arm against the baseline arm on the same test samples. With tracking: an "
                    "MLflow parent run per sweep and one child per trial. After the driver was killed, --resume "
                    "NAME continues: finished trials are kept, interrupted ones continue from their last checkpoint.")
    add_config_args(p, required=False)
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="a config key and its values (repeat for a cross product), e.g. model.use_ehr=true,false")
    p.add_argument("--seeds", default=_SEEDS, help=f"comma-separated seeds (default: the paper's {_SEEDS})")
    p.add_argument("--baseline", default=None, metavar="KEY=V",
                   help="the arm the others are compared with (default: every key's first grid value)")
    p.add_argument("--max-concurrent", type=positive_int, default=None, metavar="N",
                   help="trials at once (default: what the cluster can place: its CPUs, or GPUs with "
                        "trainer.use_gpu, / workers x resources per worker)")
    p.add_argument("--name", default=None, help="the sweep's name (default: TASK-sweep-TIME-HEX)")
    p.add_argument("--resume", metavar="NAME", default=None,
                   help="continue sweep NAME (under trainer.storage_path=..., default runs/); no --config needed")
    p.add_argument("--retry-failed", action="store_true", help="with --resume: run FAILED trials again too")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: tracking.uri of the config)")
    p.add_argument("--out", metavar="DIR", default=None, help="also write results.json / results.txt here")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from data_sharding.errors import ConfigError
    from dipro.config import load_config, parse_overrides
    from dipro.sweep.driver import run_sweep
    from dipro.sweep.grid import parse_grid
    from dipro.train.experiment import parse_seeds

    if args.resume:
        if args.config or args.grid:
            raise ConfigError("--resume NAME continues the sweep as it was defined: give no --config or --grid")
        extra = parse_overrides(args.overrides)
        if set(extra) - {"trainer"} or set(extra.get("trainer", {})) - {"storage_path"}:
            raise ConfigError("--resume NAME takes only trainer.storage_path=... (where the sweep is) as an override")
        storage = extra.get("trainer", {}).get("storage_path")
        result = run_sweep(None, resume=args.resume, storage=storage, max_concurrent=args.max_concurrent,
                           tracking_uri=args.tracking_uri, retry_failed=args.retry_failed, out_dir=args.out)
    else:
        if not args.config:
            raise ConfigError("dipro sweep needs --config FILE (or --resume NAME)")
        cfg = load_config(args.config, args.overrides)
        result = run_sweep(cfg, grid=parse_grid(args.grid), seeds=parse_seeds(args.seeds), name=args.name,
                           max_concurrent=args.max_concurrent, baseline=args.baseline,
                           tracking_uri=args.tracking_uri, out_dir=args.out)
    print(result.report.table)
    print(f"sweep {result.name}: {result.root} (results.json, results.txt)"
          + (f"; MLflow parent run {result.parent_run_id}" if result.parent_run_id else ""))
    if not any(a.finished for a in result.report.arms):
        from data_sharding.errors import UserError

        raise UserError(f"no trial of sweep {result.name} finished (the FAILED rows above give each reason)")
    return 0
