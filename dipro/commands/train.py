"""``dipro train``: train one run on Ray Train (DDP or DeepSpeed), locally or on RAY_ADDRESS's cluster.

Only argparse and the dependency-free defaults at module level; torch, ray, deepspeed and
mlflow are imported by the handler.
"""
from __future__ import annotations

import argparse

from dipro.commands._args import add_config_args


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", help="train DiPro on Ray Train (DDP or DeepSpeed), locally or on RAY_ADDRESS's cluster",
        description="Train one run. Connects to RAY_ADDRESS (or the `ray job submit` cluster) or starts a local Ray. "
                    "Checkpoints go to trainer.storage_path/RUN; the best one to RUN/best.")
    add_config_args(p, required=False)
    p.add_argument("--resume", metavar="RUN",
                   help="continue RUN (a name under trainer.storage_path, a run directory or its s3:// / gs:// URI) from its last "
                        "checkpoint, under a new run name; without --config its saved config is used. A damaged "
                        "last checkpoint is an error naming the file: RUN@previous resumes from the one before, "
                        "RUN@checkpoint_NAME from that one")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dipro.config import load_config, replace
    from data_sharding.errors import UserError

    if args.config:
        cfg = load_config(args.config, args.overrides)
    elif args.resume:
        from dipro.train import checkpoint as ck

        # where the run is (trainer.storage_path, storage.* endpoints) before its saved config can be read
        where = load_config(None, [o for o in args.overrides if o.startswith(("trainer.storage_path=", "storage."))])
        where.storage.apply()
        last = ck.find_resume_checkpoint(where.trainer.storage_path, args.resume)
        cfg = replace(ck.load_config_from_checkpoint(last), ["trainer.run_name=null", *args.overrides])
    else:
        raise UserError("give --config FILE (or --resume RUN to continue a run with its saved config)")
    from dipro.train import run_training

    result = run_training(cfg, resume=args.resume)
    print(f"run {result.run_name}: best checkpoint {result.best_checkpoint}")
    from dipro.train.evaluate import format_metrics

    print(format_metrics({k[5:]: v for k, v in result.metrics.items() if k.startswith("test/")},
                         f"test metrics ({cfg.task})"))
    return 0
