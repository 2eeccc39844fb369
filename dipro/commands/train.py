"""``dipro train``, ``dipro evaluate`` and ``dipro experiment``: training on Ray Train and its evaluation.

Heavy imports (torch, ray, deepspeed, mlflow) happen inside the handlers.
"""
from __future__ import annotations

import argparse


def _add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--config", required=required, metavar="FILE",
                   help="run config YAML (configs/*.yaml); required unless --resume")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. trainer.num_workers=2 trainer.strategy=deepspeed")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train DiPro on Ray Train (DDP or DeepSpeed), locally or on RAY_ADDRESS's cluster",
        description="Train one run. Connects to RAY_ADDRESS (or the `ray job submit` cluster) or starts a local Ray. "
                    "Checkpoints go to trainer.storage_path/RUN; the best one to RUN/best.")
    _add_config_args(p, required=False)
    p.add_argument("--resume", metavar="RUN",
                   help="continue RUN (a name under trainer.storage_path, or a run directory) from its last "
                        "checkpoint, under a new run name; without --config its saved config is used. A damaged "
                        "last checkpoint is an error naming the file: RUN@previous resumes from the one before, "
                        "RUN@checkpoint_NAME from that one")
    p.set_defaults(func=_train)

    p = subparsers.add_parser("evaluate", help="evaluate a checkpoint or registered model on a split",
                              description="Print and write the task's metrics (metrics.json and metrics.txt).")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="PATH", help="checkpoint directory (e.g. runs/RUN/best) or its model.pt")
    src.add_argument("--model", metavar="URI", help="MLflow model URI, e.g. models:/dipro-mortality@champion")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--shards", metavar="DIR", help="shard directory (default: the checkpoint config's data.shards)")
    p.add_argument("--out", metavar="DIR", help="where to write metrics.json / metrics.txt (default: ./eval-SPLIT)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--batch-size", type=int, default=None)
    p.set_defaults(func=_evaluate)

    p = subparsers.add_parser("experiment", help="train and test once per seed; mean ± std table",
                              description="One `dipro train` + test evaluation per seed; prints the paper's "
                                          "mean ± std table. With tracking: an MLflow parent run, one child per seed.")
    _add_config_args(p)
    p.add_argument("--seeds", default="23,29,66", help="comma-separated seeds (default: the paper's 23,29,66)")
    p.add_argument("--out", metavar="DIR", default=None, help="write experiment.json / experiment.txt here")
    p.set_defaults(func=_experiment)


def _train(args) -> int:
    from dipro.config import load_config, replace
    from data_sharding.errors import UserError

    if args.config:
        cfg = load_config(args.config, args.overrides)
    elif args.resume:
        import os

        from dipro.config import Config
        from dipro.train import checkpoint as ck

        storage = Config().trainer.storage_path
        for item in args.overrides:
            if item.startswith("trainer.storage_path="):
                storage = item.split("=", 1)[1]
        last = ck.find_resume_checkpoint(os.path.abspath(storage), args.resume)
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


def _evaluate(args) -> int:
    from pathlib import Path

    from data_sharding.errors import UserError
    from dipro.train.evaluate import (checkpoint_from_model_uri, evaluate_checkpoint, format_metrics,
                                      write_eval_outputs)

    if args.batch_size is not None and args.batch_size < 1:
        raise UserError("--batch-size must be >= 1")
    source = args.checkpoint or args.model
    path = Path(args.checkpoint) if args.checkpoint else checkpoint_from_model_uri(args.model)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.precision == "fp16" and not device.startswith("cuda"):
        raise UserError("--precision fp16 needs a GPU (--device cuda); on CPU use bf16 or fp32")
    result = evaluate_checkpoint(path, args.split, shard_dir=args.shards, device=device, precision=args.precision,
                                 batch_size=args.batch_size, progress=True)
    out = Path(args.out or f"eval-{args.split}")
    jpath, _ = write_eval_outputs(result, out, source)
    print(format_metrics(result.metrics, f"{result.task} / {args.split} / {result.num_samples} samples / {source}"))
    print(f"wrote {jpath} and {jpath.with_suffix('.txt')}")
    return 0


def _experiment(args) -> int:
    from dipro.config import load_config
    from dipro.train.experiment import parse_seeds, run_experiment

    seeds = parse_seeds(args.seeds)
    cfg = load_config(args.config, args.overrides)
    result = run_experiment(cfg, seeds, out_dir=args.out)
    print(result.table)
    return 0
